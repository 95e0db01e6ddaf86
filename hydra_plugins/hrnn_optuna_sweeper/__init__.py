"""Hydra sweeper plugin: hrnn's Bayesian search on current Optuna (see hrnn/sweep/search.py and docs/search.md)."""
