"""Hydra sweeper plugin: hrnn's Bayesian search on current Optuna (see hrnn/search.py and docs/search.md)."""
