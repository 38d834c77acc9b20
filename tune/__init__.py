"""Hyper-parameter sweeps (grid and ASHA) with Ray Tune, logged to MLflow."""
