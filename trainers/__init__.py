"""Training loops: one per kind of training (likelihood, adversarial, meta), a per-region fleet on Ray Train."""
