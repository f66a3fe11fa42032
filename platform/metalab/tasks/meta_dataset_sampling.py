"""Meta-Dataset's episodes: variable ways, variable and imbalanced shots (Triantafillou et al., ICLR 2020).

The rules of ``EpisodeDescriptionSampler`` in google-research/meta-dataset (``meta_dataset/data/sampling.py``),
for a split whose classes hold known numbers of images:

1. ways: uniform in [``min_ways``, min(``max_ways``, classes)]; with ``superclass_first`` (Omniglot: its
   alphabets), a superclass is drawn uniformly first and the ways and classes come from it;
2. queries per class: min(``max_query``, ⌊smallest chosen class / 2⌋), the same for every class;
3. support size: min(``max_support``, Σ_c ⌊β · min(``max_support_per_class``, remaining_c) + 1⌋), β ~ U(0, 1],
   remaining_c being the class's images left after its queries;
4. support per class: ⌊p_c · (support size − ways)⌋ + 1, capped by remaining_c, where p_c ∝ images_c ·
   exp(U(log ½, log 2)): proportional to the class's size, jittered, so episodes are imbalanced as the data.

With a class hierarchy (ILSVRC-2012: WordNet), step 1 is instead ``use_dag_hierarchy``'s: an internal node of the
split's graph is drawn uniformly among those spanning ``min_ways`` to 392 leaves (``MAX_SPANNING_LEAVES_ELIGIBLE``,
the least that reaches every leaf), its leaves are the episode's classes, ``max_ways`` of them drawn without
replacement where it spans more; so the classes of an episode are related, as in Meta-Dataset.

Numbers only (which classes, how many support and query images of each); the family draws the images.
Draws come from a ``torch.Generator``, so episodes follow the run's seed alone. Where Meta-Dataset's code
differs: a superclass with fewer than ``min_ways`` classes is never drawn (its code would fail on one; Omniglot's
alphabets all hold 14 or more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from metalab.errors import ConfigError

MAX_SPANNING_LEAVES_ELIGIBLE = 392  # Meta-Dataset's bound on an eligible node's leaves (meta_dataset/data/sampling.py)


@dataclass(frozen=True)
class EpisodeRules:
    """The settings of Meta-Dataset's sampler; the defaults are the paper's (its ``config.gin``)."""

    min_ways: int = 5
    max_ways: int = 50  # max_ways_upper_bound
    max_query: int = 10  # max_num_query
    max_support: int = 500  # max_support_set_size
    max_support_per_class: int = 100  # max_support_size_contrib_per_class
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    @classmethod
    def from_settings(cls, settings: dict[str, float] | None) -> EpisodeRules:
        """Rules from ``task.meta_dataset``'s keys (any left out keeps the paper's value); one line on a bad one."""
        settings = dict(settings or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"task.meta_dataset has no key {', '.join(unknown)}: "
                              f"its keys are {', '.join(sorted(known))}")
        defaults, typed = cls(), {}
        for name, value in settings.items():  # OmegaConf hands every value as a float: counts back to ints
            kind = type(getattr(defaults, name))
            if kind is int and float(value) != int(value):
                raise ConfigError(f"task.meta_dataset.{name} must be a whole number, got {value}")
            typed[name] = kind(value)
        rules = cls(**typed)
        for name in ("min_ways", "max_ways", "max_query", "max_support", "max_support_per_class"):
            if getattr(rules, name) < 1:
                raise ConfigError(f"task.meta_dataset.{name} must be >= 1, got {getattr(rules, name)}")
        if rules.min_ways > rules.max_ways:
            raise ConfigError(f"task.meta_dataset.min_ways={rules.min_ways} exceeds max_ways={rules.max_ways}")
        if rules.max_support < rules.max_ways:  # every way takes one support image at least
            raise ConfigError(f"task.meta_dataset.max_support={rules.max_support} is below max_ways={rules.max_ways}: "
                              "an episode needs a support image per way")
        if rules.min_log_weight > rules.max_log_weight:
            raise ConfigError("task.meta_dataset.min_log_weight exceeds max_log_weight")
        return rules


@dataclass(frozen=True)
class EpisodeDescription:
    """One episode's classes (indices into the split's classes) and per-class support and query counts."""

    classes: tuple[int, ...]
    support: tuple[int, ...]
    query: int  # per class, the same for every class (as Meta-Dataset)

    @property
    def ways(self) -> int:
        return len(self.classes)


class MetaDatasetSampler:
    """Draws :class:`EpisodeDescription` s for one split.

    Arguments:
        class_sizes: images per class of the split.
        superclasses: each class's superclass (e.g. its alphabet), to draw a superclass first; ``None``: flat.
        rules: the sampler's settings.
        hierarchy: the classes (indices) each internal node of a class hierarchy spans, to draw a node and take its
            classes (ILSVRC-2012's WordNet); ``None``: flat (or by superclass).
    """

    def __init__(self, class_sizes: Sequence[int], rules: EpisodeRules,
                 superclasses: Sequence[str] | None = None, hierarchy: Sequence[Sequence[int]] | None = None) -> None:
        self.sizes = torch.as_tensor(list(class_sizes), dtype=torch.long)
        self.rules = rules
        if int(self.sizes.min()) < 2:
            raise ConfigError("task.sampler=meta_dataset needs at least 2 images per class (one support, one query); "
                              f"a class has {int(self.sizes.min())}")
        self.nodes = None
        if hierarchy is not None:
            self.nodes = [torch.tensor(list(span)) for span in hierarchy
                          if rules.min_ways <= len(span) <= MAX_SPANNING_LEAVES_ELIGIBLE]
            if not self.nodes:
                raise ConfigError("task.sampler=meta_dataset: no node of the class hierarchy spans between "
                                  f"task.meta_dataset.min_ways={rules.min_ways} and {MAX_SPANNING_LEAVES_ELIGIBLE} "
                                  "classes: lower min_ways")
            return
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(superclasses or [""] * len(self.sizes)):
            groups.setdefault(name, []).append(index)
        self.groups = [torch.tensor(members) for members in groups.values() if len(members) >= rules.min_ways]
        if not self.groups:
            where = "superclass (alphabet)" if superclasses else "split"
            raise ConfigError(f"task.sampler=meta_dataset needs a {where} with at least "
                              f"task.meta_dataset.min_ways={rules.min_ways} classes; the largest has "
                              f"{max(len(members) for members in groups.values())}: lower min_ways")

    def sample(self, generator: torch.Generator) -> EpisodeDescription:
        rules = self.rules
        if self.nodes is not None:  # a node of the hierarchy, all its classes (at most max_ways of them)
            node = self.nodes[int(torch.randint(len(self.nodes), (1,), generator=generator))]
            classes = node[torch.randperm(len(node), generator=generator)[:rules.max_ways]] \
                if len(node) > rules.max_ways else node
            ways = len(classes)
        else:
            group = self.groups[int(torch.randint(len(self.groups), (1,), generator=generator))]
            ways = int(torch.randint(rules.min_ways, min(rules.max_ways, len(group)) + 1, (1,), generator=generator))
            classes = group[torch.randperm(len(group), generator=generator)[:ways]]
        sizes = self.sizes[classes]
        query = num_query(sizes, rules)
        remaining = sizes - query
        beta = 1.0 - float(torch.rand((), generator=generator))  # U(0, 1]
        total = support_set_size(remaining, beta, rules)
        log_weights = torch.empty(ways, dtype=torch.double).uniform_(rules.min_log_weight, rules.max_log_weight,
                                                                       generator=generator)
        support = support_per_class(sizes, remaining, total, log_weights)
        return EpisodeDescription(tuple(classes.tolist()), tuple(support.tolist()), query)


def num_query(sizes: torch.Tensor, rules: EpisodeRules) -> int:
    """Queries per class: min(max_query, ⌊smallest class / 2⌋) (``compute_num_query``)."""
    return min(rules.max_query, int(sizes.min()) // 2)


def support_set_size(remaining: torch.Tensor, beta: float, rules: EpisodeRules) -> int:
    """min(max_support, Σ_c ⌊β · min(max_support_per_class, remaining_c) + 1⌋) (``sample_support_set_size``): the
    floor plus one is a ceiling that stays ≥ 1 per class for β near 0."""
    contributions = remaining.clamp(max=rules.max_support_per_class).double()
    return min(rules.max_support, int(torch.floor(beta * contributions + 1).sum()))


def support_per_class(sizes: torch.Tensor, remaining: torch.Tensor, total: int,
                      log_weights: torch.Tensor) -> torch.Tensor:
    """⌊p_c · (total − ways)⌋ + 1 capped by remaining_c, p_c ∝ sizes_c · exp(log_weights_c)
    (``sample_num_support_per_class``): one image per class guaranteed, the rest shared by size, jittered."""
    proportions = sizes.double() * log_weights.exp()
    proportions = proportions / proportions.sum()
    desired = torch.floor(proportions * (total - len(sizes))).long() + 1
    return torch.minimum(desired, remaining)
