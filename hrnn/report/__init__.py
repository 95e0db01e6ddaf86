"""What a run reports besides its console lines: TensorBoard (tensorboard.py) and the clock's figures (figures.py)."""
