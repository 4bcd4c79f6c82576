"""Integration tests against a live single-node SLURM started by ``conftest.py``."""
