"""Hydra finds sweepers in the ``hydra_plugins`` namespace only: this module puts metalab's Optuna sweeper
there (``make setup`` installs it into site-packages; pyproject.toml's force-include). The code is
:mod:`metalab.search.sweeper`."""

from metalab.search.sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """``hydra/sweeper=optuna``: metalab's Optuna sweeper (:class:`metalab.search.sweeper.OptunaSweeper`)."""
