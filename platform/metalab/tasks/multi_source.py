"""Several image sources in one run, as Meta-Dataset trains and evaluates (Triantafillou et al., ICLR 2020).

Each training episode comes from one source, drawn per episode (uniformly, or in proportion to the sources'
classes); each source keeps its own train/val/test classes; validation and test tasks are drawn and reported
per source (``meta_test/<source>/post_acc``), with their mean over sources as ``meta_test/post_acc``. Sources
named in ``test_only`` are never trained or validated on, only tested, as Meta-Dataset holds out Traffic Signs
and MSCOCO.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Episodes, Task
from metalab.tasks.images import ImageClassFamily

SOURCE_WEIGHTS = ("uniform", "classes")
EPISODE_SETTINGS = ("ways", "shots", "queries", "train_ways", "train_shots", "train_queries", "sampler",
                    "meta_dataset", "channels")


def rekeyed(message: str, source: str) -> str:
    """A source's error message with its own keys named where they are set in a multi-source run:
    ``task.root`` → ``task.catalogue.<source>.root``; episode settings stay ``task.*`` (they are this family's)."""
    def where(match: re.Match[str]) -> str:
        key = match.group(1)
        return match.group(0) if key in EPISODE_SETTINGS else f"task.catalogue.{source}.{key}"

    return re.sub(r"\btask\.(\w+)", where, message)


class MultiSource(TaskFamily):
    """Few-shot classification over several sources (each an image family of ``conf/task/``).

    Arguments:
        sources: the sources of this run, names of ``catalogue`` entries (``task.sources=[kanji,glyphs]``).
        catalogue: every source's own config, as ``task=<name>`` composes it (``conf/task/multi_source.yaml``
            includes them: ``task.catalogue.omniglot.root=...`` sets where a source's data is). Episode settings
            are this family's, not the entries': ``ways``, ``shots``, ``queries``, ``train_*``, ``sampler``,
            ``meta_dataset``, ``channels``, ``image_size`` (where the source has one; other sources' images are
            resized), and the seeds, are handed to every source.
        test_only: sources tested only (their test classes), never trained or validated on.
        source_weights: how a training episode's source is drawn: ``uniform`` (Meta-Dataset's default) or
            ``classes`` (in proportion to each source's training classes).
        name: the runs' MLflow experiment (``multi_source``; ``task=meta_dataset``'s is ``meta_dataset``).
        root: a data root the catalogue's entries may share (``root: ${task.root}``, as ``task=meta_dataset``'s do).
        skip_missing: leave out a source whose data is missing (a line says so) instead of stopping the run, so that
            a benchmark of many sources runs on those present (at least one training source).
        image_size, channels: what every source serves (the model is sized from them).
        ways, shots, queries, train_ways, train_shots, train_queries, sampler, meta_dataset: episode settings, as
            :class:`~metalab.tasks.images.ImageClassFamily` takes them; ``sampler=meta_dataset`` (the default here)
            draws Meta-Dataset's variable-way, variable-shot episodes in every source.
    ``val_tasks`` and ``test_tasks`` are per source (Meta-Dataset tests 600 episodes of each).
    """

    name = "multi_source"
    problem = "classification"
    instantiate_recursive = False  # Hydra hands the catalogue over as configs: only the chosen sources are built

    def __init__(self, *, sources: list[str], catalogue: dict[str, Any], test_only: list[str] | None = None,
                 source_weights: str = "uniform", name: str = "multi_source", root: str | None = None,
                 skip_missing: bool = False,
                 image_size: int = 28, channels: int = 1, ways: int = 5, shots: int = 1, queries: int = 15,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 sampler: str = "meta_dataset", meta_dataset: dict[str, float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sources, test_only = list(sources), list(test_only or [])
        if not sources:
            raise ConfigError("task.sources is empty: name the sources to use, e.g. task.sources=[kanji,glyphs]")
        unknown = [source for source in sources if source not in catalogue]
        if unknown:
            raise ConfigError(f"task.sources names {', '.join(unknown)}, which task.catalogue lacks: its entries are "
                              f"{', '.join(sorted(catalogue))}")
        stray = [source for source in test_only if source not in sources]
        if stray:
            raise ConfigError(f"task.test_only names {', '.join(stray)}, which task.sources lacks: add it to "
                              "task.sources or drop it from task.test_only")
        if len(set(sources)) != len(sources):
            raise ConfigError(f"task.sources names a source twice: {sources}")
        if source_weights not in SOURCE_WEIGHTS:
            raise ConfigError(f"task.source_weights must be {' or '.join(SOURCE_WEIGHTS)}, got {source_weights!r}")
        self.sources, self.test_only, self.source_weights = sources, test_only, source_weights
        self.skip_missing, self.root, self.name = skip_missing, root, name
        self.training_sources = [source for source in sources if source not in test_only]
        if not self.training_sources:
            raise ConfigError("every source is in task.test_only: leave at least one to train on")
        self.image_size, self.channels, self.ways, self.sampler = image_size, channels, ways, sampler
        settings = {"ways": ways, "shots": shots, "queries": queries, "train_ways": train_ways,
                    "train_shots": train_shots, "train_queries": train_queries, "sampler": sampler,
                    "meta_dataset": meta_dataset, "channels": channels, "seed": self.seed, "eval_seed": self.eval_seed}
        self.families: dict[str, TaskFamily] = {}
        for source in sources:
            entry = catalogue[source]
            own = {"image_size": image_size} if "image_size" in entry else {}
            family = instantiate(entry, **settings, **own)
            if family.problem != "classification":
                raise ConfigError(f"task.sources: {source} is a {family.problem} family; a multi-source run takes "
                                  "image classification sources")
            self.families[source] = family

    def prepare(self) -> None:
        """Load and check every source: the splits it serves (a test-only source its test split alone). A source
        whose data is missing stops the run in one line naming it, or with ``skip_missing`` is left out (a line
        on stderr says so; its metrics are then absent, and ``metalab reproduce`` says "no data" for it)."""
        for name, family in list(self.families.items()):
            splits = ("test",) if name in self.test_only else ("train", "val", "test")
            try:
                if isinstance(family, ImageClassFamily):
                    family.prepare(splits)
                else:
                    family.prepare()
            except DataMissingError as error:
                if not self.skip_missing:
                    raise DataMissingError(f"source {name} of task={self.name}: {rekeyed(str(error), name)} (or "
                                           "task.skip_missing=true to go on without it)") from None
                print(f"metalab: source {name} left out (task.skip_missing=true): {rekeyed(str(error), name)}",
                      file=sys.stderr)
                self._leave_out(name)
            except ConfigError as error:
                raise ConfigError(f"source {name} of task={self.name}: {rekeyed(str(error), name)}") from None
        if not self.training_sources:
            under = f" under task.root={self.root}" if self.root else ""
            raise DataMissingError(f"no training source of task={self.name} has its data{under} (each left out "
                                   "above): point task.root (or task.catalogue.<source>.root) at the data")

    def _leave_out(self, name: str) -> None:
        del self.families[name]
        self.sources.remove(name)
        if name in self.training_sources:
            self.training_sources.remove(name)
        if name in self.test_only:
            self.test_only.remove(name)

    def data_description(self) -> dict[str, str]:
        """Each source's description, under its name; the digest covers every source's digest."""
        described = {name: family.data_description() for name, family in self.families.items()}
        digest = hashlib.sha256(json.dumps({name: d["digest"] for name, d in described.items()},
                                           sort_keys=True).encode()).hexdigest()[:16]
        return {"name": self.name, "source_type": "local", "source": ",".join(self.sources), "digest": digest,
                "digest_of": "every source's digest", "sources": json.dumps(described, sort_keys=True)}

    def evaluation_sources(self, split: str) -> list[str]:
        return self.sources if split == "test" else self.training_sources

    def source_probabilities(self, split: str) -> torch.Tensor:
        """The chance that an episode of ``split`` comes from each of its sources (:meth:`evaluation_sources`)."""
        names = self.evaluation_sources(split) if split != "train" else self.training_sources
        if self.source_weights == "uniform":
            return torch.full((len(names),), 1 / len(names), dtype=torch.double)
        classes = torch.tensor([len(self.families[name].load_split(split).class_names) for name in names],
                               dtype=torch.double)
        return classes / classes.sum()

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        """Per task, a source (by ``source_weights``), then a task of it; ragged across sources."""
        names = self.evaluation_sources(split) if split != "train" else self.training_sources
        chosen = torch.multinomial(self.source_probabilities(split), num_tasks, replacement=True, generator=generator)
        return Episodes.of([self.sample_source(names[int(index)], 1, generator, split)[0] for index in chosen])

    def sample_source(self, source: str, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        episodes = self.families[source].sample(num_tasks, generator, split)
        return Episodes.of([self._sized(task) for task in episodes], source=source)

    def _sized(self, task: Task) -> Task:
        """The task's images at ``image_size`` (antialiased bilinear resize where the source has another size)."""
        def resize(images: torch.Tensor) -> torch.Tensor:
            if images.shape[-2:] == (self.image_size, self.image_size):
                return images
            return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                 align_corners=False).clamp_(0, 1)

        return Task(resize(task.support_x), task.support_y, resize(task.query_x), task.query_y)
