"""Hyper-parameter sweeps (grid and ASHA) with Ray Tune, tracked through the tracker they are handed."""
