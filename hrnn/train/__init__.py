"""The runtime of one run: the loop (loop.py), its optimizer (optim.py), checkpoints and resume
(resume.py), where it runs (environment.py), evaluation on a split (evaluate.py), and how batches meet the
model (stream.py: independent sequences, or a text's windows with the state carried)."""
