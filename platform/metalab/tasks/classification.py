"""N-way, K-shot classification episodes from labelled examples of any kind, via learn2learn's Taskset.

A family holds each split's examples as one tensor of items (images as uint8 pixels, texts as token ids) with
their labels; episodes are drawn over item indices and each drawn item is turned into the model's input by the
family's :meth:`ClassificationFamily.serve` (images: floats in [0, 1]; texts: ``{"ids", "mask"}``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import learn2learn as l2l
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info

from metalab.errors import ConfigError
from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Episodes, Inputs, Task
from metalab.tasks.meta_dataset_sampling import EpisodeDescription, EpisodeRules, MetaDatasetSampler

SPLITS = ("train", "val", "test")
SAMPLERS = ("fixed", "meta_dataset")


class ItemStore(Protocol):
    """Items read when drawn, for data too large to hold (e.g. Meta-Dataset's ILSVRC-2012 images): ``len`` and
    ``store[indices]`` (a LongTensor of item indices) → a tensor (n, ...), as indexing a tensor would give."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LabelledItems:
    """All examples of one split: ``items`` (N, ...) (a tensor, or an :class:`ItemStore` that reads them when
    drawn; images are uint8 (N, C, H, W), texts token ids (N, L)), ``labels`` int64 (N,), class names by label."""

    items: torch.Tensor | ItemStore
    labels: torch.Tensor
    class_names: list[str]
    hierarchy: list[list[int]] | None = None  # the classes each internal node of a class hierarchy spans (ILSVRC)

    def samples_per_class(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=len(self.class_names))

    def superclasses(self) -> list[str] | None:
        """Each class's group (e.g. its alphabet) where every class is named ``group/name``, else ``None``."""
        if not all("/" in name for name in self.class_names):
            return None
        return [name.rsplit("/", 1)[0] for name in self.class_names]


@dataclass(frozen=True)
class Pretraining:
    """How an algorithm that pre-trains on labelled examples (``algorithm=finetune``) is served its training split:
    ``batch_size`` examples a step, each epoch in a new order; ``augment``: images randomly cropped and flipped."""

    batch_size: int
    augment: bool = False


class ClassificationFamily(TaskFamily):
    """Few-shot classification: each task draws ``ways`` classes of a split, ``shots`` support and
    ``queries`` query examples per class, labels remapped to 0..ways−1. ``train_ways``, ``train_shots`` and
    ``train_queries`` (``None``: the same) set other episodes for meta-training only (validation and test
    keep ``ways``/``shots``/``queries``), as Prototypical Networks train with more ways than they test
    (Snell et al. 2017, §3.1) and Reptile with more shots (Nichol et al. 2018, appendix A: 10 for 5-shot).

    Subclasses load the data (:meth:`load_split`) and turn drawn items into the model's inputs (:meth:`serve`);
    episodes are built with learn2learn's ``MetaDataset``/``Taskset`` and its ``NWays``, ``KShots``,
    ``LoadData``, ``RemapLabels`` transforms. Those transforms draw from Python's ``random``; :meth:`sample`
    seeds it from the task generator, so episodes depend on the run's seed alone. ``kwargs``:
    :class:`TaskFamily`'s; a subclass takes ``**kwargs`` too and names an argument of these only to give it
    another default.

    ``sampler=meta_dataset`` draws Meta-Dataset's episodes instead (Triantafillou et al. 2020; every split): 5 to
    50 ways, per-class support sizes proportional to the classes' sizes, up to 500 support examples and 10
    queries per class (:mod:`metalab.tasks.meta_dataset_sampling`; ``meta_dataset``: its rules, e.g.
    ``{max_ways: 20}``); where every class is named ``group/name`` (kanji, Omniglot: ``alphabet/character``) a
    group is drawn first, as Meta-Dataset draws Omniglot's alphabets. ``ways``/``shots``/``queries`` then
    apply to nothing; tasks of one meta-batch differ in shape (ragged :class:`Episodes`), so ``runner.backend``
    is ``loop`` or ``threads``, and the algorithm must not need a fixed number of ways (``protonet``, ``protomaml``).
    learn2learn's transforms draw fixed ways and shots only, hence metalab's sampler.
    """

    problem = "classification"
    examples = "examples"  # what a class holds, in messages ("images", "texts")
    pretraining: Pretraining | None = None  # set (:meth:`serve_examples`) for an algorithm that pre-trains

    def __init__(self, *, ways: int = 5, shots: int = 1, queries: int = 15,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 sampler: str = "fixed", meta_dataset: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if sampler not in SAMPLERS:
            raise ConfigError(f"task.sampler must be {' or '.join(SAMPLERS)}, got {sampler!r}")
        self.sampler = sampler
        self.rules = EpisodeRules.from_settings(meta_dataset) if sampler == "meta_dataset" else None
        self._samplers: dict[str, MetaDatasetSampler] = {}
        self._members: dict[str, list[torch.Tensor]] = {}  # per split, each class's item indices
        for key, value in {"ways": ways, "shots": shots, "queries": queries, "train_ways": train_ways,
                           "train_shots": train_shots, "train_queries": train_queries}.items():
            if value is not None and value < 1:
                raise ConfigError(f"task.{key} must be >= 1, got {value}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.train_ways, self.train_shots = train_ways or ways, train_shots or shots
        self.train_queries = train_queries or queries
        self._tasksets: dict[str, l2l.data.Taskset] = {}

    @abstractmethod
    def load_split(self, split: str) -> LabelledItems:
        """All examples of ``split`` ("train", "val" or "test"); raise ConfigError naming the layout if absent."""

    @abstractmethod
    def serve(self, items: torch.Tensor) -> Inputs:
        """The model's inputs for ``items`` (n, ...) drawn from :meth:`load_split`'s items."""

    def prepare(self, splits: tuple[str, ...] = SPLITS) -> None:
        """Load every split (or ``splits``: a test-only source of ``task=multi_source`` needs its test split alone)
        and check it can serve the configured episodes (fails at start, not mid-run)."""
        for split in splits:
            if self.sampler == "meta_dataset":
                self.meta_dataset_sampler(split)
            else:
                self.taskset(split)

    def serve_examples(self, pretraining: Pretraining) -> int:
        """Meta-training is served labelled examples of the training split (mini-batches of ``(inputs, labels)``,
        labels over all its classes) instead of episodes, as ``pretraining`` says; return the number of classes."""
        data = self._read_split("train")
        if pretraining.batch_size > len(data.labels):
            raise ConfigError(f"algorithm.batch_size={pretraining.batch_size} but the train split of {self.name} has "
                              f"only {len(data.labels)} {self.examples}: lower algorithm.batch_size")
        if pretraining.augment:
            self.augmented(self.serve(data.items[torch.arange(1)]), torch.Generator())  # refused here, not mid-run
        self.pretraining = pretraining
        return len(data.class_names)

    def augmented(self, inputs: Inputs, generator: torch.Generator) -> Inputs:
        """``inputs`` (served) randomly transformed for pre-training (``algorithm.augment``); images only."""
        raise ConfigError(f"algorithm.augment=true: task {self.name}'s {self.examples} have no augmentation: set "
                          "algorithm.augment=false")

    def train_dataloader(self) -> DataLoader:
        if self.pretraining is None:
            return super().train_dataloader()
        start = self.trainer.global_step if self.trainer is not None else 0  # resumed: the same stream goes on
        workers = self.sampling_workers
        return DataLoader(_EndlessExampleBatches(self, self.seed, start), batch_size=None, num_workers=workers,
                          prefetch_factor=2 if workers else None, persistent_workers=False)

    def meta_dataset_sampler(self, split: str) -> MetaDatasetSampler:
        """``split``'s Meta-Dataset sampler (``sampler=meta_dataset``), built on first use."""
        if split not in self._samplers:
            data = self._read_split(split)
            counts = data.samples_per_class()
            self._check_no_empty_class(split, data, counts)
            try:
                self._samplers[split] = MetaDatasetSampler(counts.tolist(), self.rules, data.superclasses(),
                                                           data.hierarchy)
            except ConfigError as error:
                raise ConfigError(f"the {split} split of {self.name}: {error}") from None
            order = torch.argsort(data.labels, stable=True)
            self._members[split] = list(torch.split(order, counts.tolist()))
        return self._samplers[split]

    def data_description(self) -> dict[str, str]:
        """The examples served, as the base describes data: the digest is a sha256 of every split's items (as
        served: images resized, rotations added; texts tokenised), labels and class names, so two copies of a
        data set that serve the same items share it; counts per split. A subclass adds ``source`` (where it read
        them)."""
        hasher, counts = hashlib.sha256(), {}
        for split in SPLITS:
            data = self.load_split(split)
            hasher.update(json.dumps([split, data.class_names]).encode())
            hasher.update(data.items.contiguous().numpy())
            hasher.update(data.labels.contiguous().numpy())
            counts |= {f"{split}_classes": str(len(data.class_names)),
                       f"{split}_{self.examples}": str(len(data.labels))}
        return {"name": self.name, "source_type": "local", "digest": hasher.hexdigest()[:16],
                "digest_of": f"every split's {self.examples} as served, labels and class names", **counts}

    def _read_split(self, split: str) -> LabelledItems:
        try:
            return self.load_split(split)
        except PermissionError as error:  # e.g. an unreadable task.root
            where = f"task.root={getattr(self, 'root', '')}: " if hasattr(self, "root") else ""
            raise ConfigError(f"{where}cannot read {error.filename} ({error.strerror}): check the path and its "
                              "permissions") from None

    def taskset(self, split: str) -> l2l.data.Taskset:
        if split not in self._tasksets:
            data = self._read_split(split)
            self._check_enough(split, data)
            ways, shots, queries = self.episode(split)
            if isinstance(data.items, torch.Tensor):
                dataset = l2l.data.MetaDataset(TensorDataset(data.items, data.labels))
            else:  # given the labels' indices: MetaDataset would otherwise read every item to learn them
                members = torch.split(torch.argsort(data.labels, stable=True), data.samples_per_class().tolist())
                by_label = {label: indices.tolist() for label, indices in enumerate(members) if len(indices)}
                dataset = l2l.data.MetaDataset(_StoredItems(data), labels_to_indices=by_label)
            transforms = [l2l.data.transforms.NWays(dataset, ways),
                          l2l.data.transforms.KShots(dataset, shots + queries),
                          l2l.data.transforms.LoadData(dataset),
                          l2l.data.transforms.RemapLabels(dataset)]
            self._tasksets[split] = l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)
        return self._tasksets[split]

    def episode(self, split: str) -> tuple[int, int, int]:
        """Ways, shots and queries per class of ``split``'s episodes."""
        if split == "train":
            return self.train_ways, self.train_shots, self.train_queries
        return self.ways, self.shots, self.queries

    def _check_enough(self, split: str, data: LabelledItems) -> None:
        ways, shots, queries = self.episode(split)
        # Name the train_* key where meta-training's episodes differ, so the message points at what was set.
        train = split == "train"
        ways_key = "train_ways" if train and ways != self.ways else "ways"
        shots_key = "train_shots" if train and shots != self.shots else "shots"
        queries_key = "train_queries" if train and queries != self.queries else "queries"
        classes = len(data.class_names)
        if classes < ways:
            raise ConfigError(f"task.{ways_key}={ways} but the {split} split of {self.name} has only {classes} "
                              f"classes: lower task.{ways_key}")
        counts = data.samples_per_class()
        self._check_no_empty_class(split, data, counts)
        fewest = int(counts.min())
        if fewest < shots + queries:
            raise ConfigError(f"task.{shots_key} + task.{queries_key} = {shots + queries} but a {split} class of "
                              f"{self.name} has only {fewest} {self.examples}: lower task.{shots_key} or "
                              f"task.{queries_key}")

    def _check_no_empty_class(self, split: str, data: LabelledItems, counts: torch.Tensor) -> None:
        if int(counts.min()) == 0:  # fewer shots cannot help
            empty = data.class_names[int(counts.argmin())]
            raise ConfigError(f"class {empty!r} of the {split} split of {self.name} has no {self.examples}: add "
                              f"{self.examples} to it or remove it from the split")

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        if self.sampler == "meta_dataset":
            sampler = self.meta_dataset_sampler(split)
            return Episodes.of([self._episode(sampler.sample(generator), split, generator) for _ in range(num_tasks)])
        taskset = self.taskset(split)
        state = random.getstate()
        random.seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        try:
            tasks = [self._split_support_query(*taskset.sample(), *self.episode(split)) for _ in range(num_tasks)]
        finally:
            random.setstate(state)
        return Episodes.of(tasks)

    def _episode(self, description: EpisodeDescription, split: str, generator: torch.Generator) -> Task:
        """The examples of a Meta-Dataset episode: per class, its support and query examples drawn without
        replacement; labels 0..ways−1 in the description's class order."""
        data, members = self.load_split(split), self._members[split]
        support, query = [], []
        for index, shots in zip(description.classes, description.support, strict=True):
            chosen = members[index][torch.randperm(len(members[index]), generator=generator)]
            support.append(chosen[:shots])
            query.append(chosen[shots:shots + description.query])
        support_labels = torch.cat([torch.full((len(s),), way) for way, s in enumerate(support)])
        query_labels = torch.arange(description.ways).repeat_interleave(description.query)
        return Task(self.serve(data.items[torch.cat(support)]), support_labels,
                    self.serve(data.items[torch.cat(query)]), query_labels)

    def _split_support_query(self, items: torch.Tensor, labels: torch.Tensor, ways: int, shots: int,
                             queries: int) -> Task:
        """Sort by class; the first ``shots`` examples of each class are support, the rest query."""
        order = torch.argsort(labels, stable=True)
        items = items[order].reshape(ways, shots + queries, *items.shape[1:])  # (N, K + Q, ...)
        labels = labels[order].reshape(ways, shots + queries)
        return Task(self.serve(items[:, :shots].flatten(0, 1)), labels[:, :shots].flatten(),
                    self.serve(items[:, shots:].flatten(0, 1)), labels[:, shots:].flatten())


class _StoredItems(Dataset):
    """(item, label) pairs of an :class:`ItemStore`'s split, each item read when learn2learn loads it."""

    def __init__(self, data: LabelledItems) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.items[torch.tensor([index])][0], self.data.labels[index]


class _EndlessExampleBatches(IterableDataset):
    """Mini-batches of the training split's examples for pre-training: epoch ``e`` visits the examples in an order
    drawn from (seed, e), in batches of ``batch_size`` (the last, short one dropped); batch ``i`` depends on
    (seed, i) alone, so a resumed run goes on with the stream an uninterrupted one would have seen. Workers draw
    batches ``w, w + n, ...`` as :class:`~metalab.tasks.base._EndlessMetaBatches` does."""

    def __init__(self, family: ClassificationFamily, seed: int, start: int = 0) -> None:
        self.family, self.seed, self.start = family, seed, start

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        family, pretraining = self.family, self.family.pretraining
        data = family.load_split("train")
        size = pretraining.batch_size
        per_epoch = len(data.labels) // size
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, order = None, torch.empty(0, dtype=torch.long)
        for index in itertools.count(self.start + offset, stride):
            if index // per_epoch != epoch:
                epoch = index // per_epoch
                order = torch.randperm(len(data.labels), generator=_generator(self.seed, 1, epoch))
            chosen = order[index % per_epoch * size:(index % per_epoch + 1) * size]
            inputs = family.serve(data.items[chosen])
            if pretraining.augment:
                inputs = family.augmented(inputs, _generator(self.seed, 2, index))
            yield inputs, data.labels[chosen]


def _generator(*entropy: int) -> torch.Generator:
    state = np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
