"""Hyper-parameter search on Optuna: the sweeper (``hydra/sweeper=optuna``), its study, pruning."""
