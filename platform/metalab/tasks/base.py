"""What every task family is: a seeded sampler of episodes, served by Lightning's data hooks."""

from __future__ import annotations

import hashlib
import itertools
import json
import zlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from metalab.errors import ConfigError
from metalab.tasks.episodes import Episodes

Problem = Literal["regression", "classification", "reinforcement"]


class TaskFamily(pl.LightningDataModule):
    """A distribution over tasks, as a LightningDataModule.

    Meta-training draws fresh meta-batches forever from a generator seeded by ``seed``. Validation and
    test use fixed task sets drawn from ``eval_seed``, the same for every run whatever its training seed,
    so runs (and seeds) are compared on identical tasks; each batch of them is drawn when it is evaluated
    (:class:`FixedTasks`), so memory holds one batch, not the set. Subclasses implement :meth:`sample`.

    Arguments (every family's; a subclass takes ``**kwargs`` and passes them up, so its schema has these too):
        meta_batch_size: tasks per outer-loop update.
        val_tasks, test_tasks: sizes of the fixed validation and test task sets.
        eval_batch_size: tasks per batch when validating and testing (memory, not results).
        seed: draws the training tasks (``${seed}`` in the YAML: the run's seed).
        eval_seed: draws the validation and test tasks.
    The defaults are MAML's sinusoid settings; ``conf/task/<family>.yaml`` gives each family its own.
    """

    name: str
    problem: Problem
    batch_type: type = Episodes  # what sample() returns; environment families: EnvironmentTasks (both have .of, .to)

    def __init__(self, *, meta_batch_size: int = 25, val_tasks: int = 100, test_tasks: int = 600,
                 eval_batch_size: int = 100, seed: int = 0, eval_seed: int = 1) -> None:
        super().__init__()
        for key, value in {"meta_batch_size": meta_batch_size, "val_tasks": val_tasks,
                           "test_tasks": test_tasks, "eval_batch_size": eval_batch_size}.items():
            if value < 1:
                raise ConfigError(f"task.{key} must be >= 1, got {value}")
        self.meta_batch_size = meta_batch_size
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.eval_seed = eval_seed

    def prepare(self) -> None:
        """Load and check the data, so a problem with it stops the run before anything is recorded."""

    generator_parameters: tuple[str, ...] = ()  # a generated family's attributes that define its data

    def data_description(self) -> dict[str, str]:
        """The data this family's tasks come from, recorded on each run as an MLflow dataset input.

        Keys: ``name``; ``source_type`` ("local": files at the path ``source``, or "generated": ``source`` is
        the generating class); ``digest`` (16 hex digits of a sha256, changed by any change of the data);
        ``digest_of`` (what the digest covers); any further counts or parameters. Called after
        :meth:`prepare`. This default describes a generated family: the digest covers the class and its
        :attr:`generator_parameters` (sinusoid: amplitude, phase and input ranges); episode settings
        (shots, ways) and seeds are not data, so runs that vary them compare the same data.
        """
        generator = f"{type(self).__module__}.{type(self).__qualname__}"
        parameters = json.dumps({name: getattr(self, name) for name in self.generator_parameters}, sort_keys=True)
        digest = hashlib.sha256(f"{generator} {parameters}".encode()).hexdigest()[:16]
        return {"name": self.name, "source_type": "generated", "source": generator, "digest": digest,
                "digest_of": "the generator and its parameters", "parameters": parameters}

    @abstractmethod
    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        """Draw ``num_tasks`` tasks of ``split`` ("train", "val" or "test") using ``generator`` only."""

    sampling_workers: int = 0  # processes drawing training meta-batches ahead of the step (0: this one)

    def train_dataloader(self) -> DataLoader:
        # A resumed fit continues the stream where the checkpoint left it: batch i is the same either way.
        start = self.trainer.global_step if self.trainer is not None else 0
        workers = self.sampling_workers
        return DataLoader(_EndlessMetaBatches(self, self.seed, start), batch_size=None,
                          num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False)

    def transfer_batch_to_device(self, batch: object, device: torch.device, dataloader_idx: int) -> object:
        """Move the episodes' four tensors directly. Lightning's generic walk over a dataclass (deep copies
        included) cost ~0.5 ms a step: a tenth of a sinusoid meta-iteration with ``backend=vmap``."""
        if isinstance(batch, self.batch_type):
            return batch.to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def evaluation_sources(self, split: str) -> list[str]:
        """The sources whose ``split`` ("val" or "test") tasks are evaluated apart, each with its own metrics
        (``meta_test/<source>/post_acc``) and ``val_tasks``/``test_tasks`` tasks: empty for a family of one source.
        A family that names some implements :meth:`sample_source`."""
        return []

    def sample_source(self, source: str, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        """Draw ``num_tasks`` tasks of ``split`` from ``source`` (one of :meth:`evaluation_sources`)."""
        raise NotImplementedError(f"{type(self).__name__} evaluates no sources apart")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._fixed_loaders("val", self.val_tasks, offset=1)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._fixed_loaders("test", self.test_tasks, offset=2)

    def _fixed_loaders(self, split: str, num_tasks: int, offset: int) -> DataLoader | list[DataLoader]:
        """One loader of fixed tasks, or one per evaluation source (Lightning's ``dataloader_idx``)."""
        sources = self.evaluation_sources(split)
        if not sources:
            return DataLoader(FixedTasks(self, split, num_tasks, offset), batch_size=None)
        return [DataLoader(FixedTasks(self, split, num_tasks, offset, source), batch_size=None) for source in sources]


class FixedTasks(Dataset):
    """The fixed validation or test tasks of a family, in batches of ``eval_batch_size``, drawn when a batch is
    asked for: task ``i`` from a generator seeded by (``eval_seed``, the split's offset, ``i``), so the tasks are
    the same in every run and every validation whatever the batch size, and only one batch is in memory (600
    mini-ImageNet-shaped tasks drawn up front took about 4 GB: ``benchmarks/eval_memory.py``). With ``source``,
    the tasks of that source of a multi-source family, seeded by its name too (adding a source changes no other's)."""

    def __init__(self, family: TaskFamily, split: str, num_tasks: int, offset: int, source: str | None = None) -> None:
        self.family, self.split, self.num_tasks, self.offset = family, split, num_tasks, offset
        self.source = source

    def __len__(self) -> int:
        return -(-self.num_tasks // self.family.eval_batch_size)

    def __getitem__(self, batch: int) -> Episodes:
        if not 0 <= batch < len(self):
            raise IndexError(batch)
        start = batch * self.family.eval_batch_size
        indices = range(start, min(start + self.family.eval_batch_size, self.num_tasks))
        if self.source is None:
            return self.family.batch_type.of([self.family.sample(1, self.generator(index), self.split)[0]
                                              for index in indices])
        return Episodes.of([self.family.sample_source(self.source, 1, self.generator(index), self.split)[0]
                            for index in indices], source=self.source)

    def generator(self, index: int) -> torch.Generator:
        entropy = [self.family.eval_seed, self.offset, index]
        if self.source is not None:
            entropy.append(zlib.crc32(self.source.encode()))
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _EndlessMetaBatches(IterableDataset):
    """Fresh meta-batches of training tasks; batch ``i`` is drawn from a generator seeded by (seed, i),
    so the stream can start at any batch (resuming) and still match an uninterrupted run. With ``n``
    DataLoader workers, worker ``w`` draws batches ``w, w + n, ...`` and the DataLoader takes them in
    turn: the same stream as without workers. In distributed training every process draws the whole
    meta-batch; the runner adapts the process's share."""

    def __init__(self, family: TaskFamily, seed: int, start: int = 0) -> None:
        self.family = family
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[Episodes]:
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in itertools.count(self.start + offset, stride):
            state = np.random.SeedSequence([self.seed, index]).generate_state(2, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
            yield self.family.sample(self.family.meta_batch_size, generator, "train")
