"""Hydra launcher plugin: hydra/launcher=slurm, hydra-submitit-launcher's SLURM launcher with one-line failures (docs/cluster.md)."""
