"""A run's configuration as one hash (tag ``metalab.config_hash``): runs with equal hashes ran the same science.

``metalab reproduce --from-mlflow`` judges the run whose hash is its preset's (composed with the same
overrides), never merely the newest run of the preset.
"""

from __future__ import annotations

import copy
import hashlib

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_HASH_TAG = "metalab.config_hash"

# Keys that change where a run writes, how it displays or what reads it afterwards, but not one number it
# computes; everything else (seeds, hardware, backend, evaluation batches, callbacks) is hashed, so two runs
# with one hash are the same computation.
NOT_SCIENCE = (
    "output_dir",  # the job's folder; its interpolations (checkpoint dirpath) are hashed as a placeholder
    "tracking",  # where the run is recorded
    "resume",  # continuing a run gives the numbers of the run it continues
    "resume_allow",  # what a resume may change (metalab.resume); a change made is tagged on the run
    "hydra",  # Hydra's own runtime (present only when a config is composed with it)
    "objective",  # the metric a sweeper reads after the run
    "reproduction",  # the paper's number and tolerance a preset is judged against, not a setting of the run
    "sampling_workers",  # worker processes draw the same meta-batch stream as the training process
    "trainer.enable_progress_bar",  # display
    "trainer.enable_model_summary",  # display
    "task.cache_dir",  # where kanji's rendered images are cached (the cache file's name hashes its settings)
)


def config_hash(cfg: DictConfig) -> str:
    """sha256 (hex) of ``cfg`` as resolved YAML with sorted keys, without the keys of :data:`NOT_SCIENCE`.

    The same for a job's config in ``metalab-train`` and for the preset composed outside Hydra's runtime
    (``metalab reproduce``): ``output_dir`` is replaced by a placeholder before anything is resolved.

    Example:
        config_hash(cfg)  # '3f1c…' (64 hex digits), recorded on the run as tag metalab.config_hash
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.output_dir = "<output_dir>"
        for key in ("tracking", "hydra"):  # may hold resolvers that only work in a job (${hydra:...}, ${oc.env:...})
            cfg.pop(key, None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NOT_SCIENCE:
        *parents, leaf = dotted.split(".")
        node = resolved
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
