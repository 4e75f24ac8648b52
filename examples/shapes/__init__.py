"""Procedural "shapes" toy world: a dataset whose every sample has a known truth, a classifier, and small
diffusion models trained on it. Everything here is trained from scratch on this machine (no downloads)."""
