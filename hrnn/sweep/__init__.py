"""Multiruns (`hrnn-train -m`): the jobs and the end-of-sweep report (callbacks.py), the Bayesian
search (search.py) and the summary table (summary.py)."""
