"""The command lines: hrnn-train (train.py), hrnn-eval (eval.py), hrnn-summary (summary.py)."""
