"""The runtime of one run: the loop (loop.py), its optimizer (optim.py), checkpoints and resume
(resume.py), where it runs (environment.py) and evaluation on a split (evaluate.py)."""
