"""``metalab-train``: compose the config, then run the job (:func:`metalab.job.train`: instantiate → fit → test).

Usage: ``metalab-train algorithm.inner_lr=0.05 task.shots=5 trainer.max_steps=2000`` (see README).

This module stays light: composing a config (``--help``, ``--cfg job``, the override check) imports none of
torch, Lightning, MLflow or learn2learn. The config's schemas come from a disk cache
(:mod:`metalab.schema_cache`), and :func:`main` imports the job when Hydra runs one.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metalab._quiet import plain_lightning_logs
from metalab.config import config_dir, register_configs
from metalab.errors import DATA_MISSING_EXIT_CODE, DataMissingError, one_line
from metalab.overrides import check_overrides

register_configs()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the value a sweeper optimises: ``objective`` (default ``meta_val/post_loss``)."""
    plain_lightning_logs()
    from metalab.job import train  # here: only a job imports torch, Lightning, MLflow and learn2learn
    from metalab.search.pruning import TrialPruned
    from metalab.sweep import job_failed

    try:
        metrics = train(cfg)
    except TrialPruned as pruned:  # not an error: the sweeper records the trial as pruned
        print(f"metalab: {pruned}", flush=True)
        raise
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"metalab: error: {one_line(error)}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return job_failed(error)  # one failed job (its run FAILED) does not stop the sweep
        raise SystemExit(DATA_MISSING_EXIT_CODE if isinstance(error, DataMissingError) else 1) from None
    return metrics.get(cfg.objective, float("nan"))


def cli() -> None:
    """Console entry point: reject bad overrides with one line before Hydra starts the job."""
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"metalab: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    main()


if __name__ == "__main__":
    cli()
