"""Environments of multi-turn rollouts: the contract (base.py) and the built-in ones."""
