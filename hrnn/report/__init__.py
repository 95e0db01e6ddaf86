"""What a run reports besides its console lines: TensorBoard (tensorboard.py), the clock's figures (figures.py),
and on a text the modules' update rates at word and verse boundaries and the excerpt figure (text.py)."""
