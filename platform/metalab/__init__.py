"""metalab: a research platform for meta-learning (Lightning bi-level training, Hydra, MLflow, learn2learn)."""

from metalab._quiet import silence_gym_banner

__version__ = "0.1.0"

silence_gym_banner()
