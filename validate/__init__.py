"""Validation against a reference: physics observables, CaloChallenge metrics, plots."""
