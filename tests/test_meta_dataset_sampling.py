"""Meta-Dataset's episode rules (Triantafillou et al. 2020, ``meta_dataset/data/sampling.py``), each on a small
synthetic source with known class sizes, and the image families' ``task.sampler=meta_dataset``."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from metalab.errors import ConfigError
from metalab.job import train
from metalab.tasks.episodes import Episodes
from metalab.tasks.images import ImageClassFamily, LabelledImages
from metalab.tasks.meta_dataset_sampling import (
    EpisodeRules,
    MetaDatasetSampler,
    num_query,
    support_per_class,
    support_set_size,
)

RULES = EpisodeRules()


def descriptions(sizes: list[int], count: int, superclasses: list[str] | None = None, seed: int = 0,
                 rules: EpisodeRules = RULES) -> list:
    sampler, generator = MetaDatasetSampler(sizes, rules, superclasses), torch.Generator().manual_seed(seed)
    return [sampler.sample(generator) for _ in range(count)]


def test_the_paper_defaults() -> None:
    assert (RULES.min_ways, RULES.max_ways, RULES.max_query, RULES.max_support, RULES.max_support_per_class) == (
        5, 50, 10, 500, 100)
    assert (math.exp(RULES.min_log_weight), math.exp(RULES.max_log_weight)) == pytest.approx((0.5, 2.0))


def test_ways_are_uniform_between_five_and_the_class_count() -> None:
    episodes = descriptions([20] * 12, 4000)
    counts = Counter(episode.ways for episode in episodes)
    assert set(counts) == set(range(5, 13))  # [5, min(50, 12)]
    for ways in range(5, 13):  # 500 expected each; 5 standard deviations is ~108
        assert abs(counts[ways] - 500) < 110, counts
    assert all(len(set(episode.classes)) == episode.ways for episode in episodes)  # no class twice


def test_ways_stop_at_fifty_and_every_class_is_drawn() -> None:
    episodes = descriptions([30] * 80, 2000)
    ways = [episode.ways for episode in episodes]
    assert min(ways) == 5 and max(ways) == 50
    assert abs(sum(ways) / len(ways) - 27.5) < 1.0  # the mean of U{5..50}
    assert set().union(*(episode.classes for episode in episodes)) == set(range(80))


def test_queries_per_class_are_ten_or_half_the_smallest_class() -> None:
    sizes = [4, 7, 30, 40, 50, 60, 70, 80, 90, 100]
    for episode in descriptions(sizes, 500):
        smallest = min(sizes[c] for c in episode.classes)
        assert episode.query == min(10, smallest // 2)
    assert num_query(torch.tensor([25, 40]), RULES) == 10 and num_query(torch.tensor([9, 40]), RULES) == 4


def test_support_set_size_rule() -> None:
    remaining = torch.tensor([3, 50, 300])  # contributions 3, 50, 100 (capped at 100 per class)
    assert support_set_size(remaining, 1.0, RULES) == 4 + 51 + 101  # ⌊c + 1⌋ at β = 1
    assert support_set_size(remaining, 1e-9, RULES) == 3  # one per class as β → 0
    assert support_set_size(remaining, 0.5, RULES) == 2 + 26 + 51
    assert support_set_size(torch.full((40,), 600), 0.9, RULES) == 500  # Σ would be 40 · 91: the 500 cap


def test_support_per_class_is_proportional_to_class_size() -> None:
    sizes = torch.tensor([10, 100, 1000])
    remaining = sizes - 5
    got = support_per_class(sizes, remaining, total=120, log_weights=torch.zeros(3, dtype=torch.double))
    assert got.tolist() == [2, 11, 106]  # ⌊p_c · 117⌋ + 1 with p = (1, 10, 100) / 111: ⌊1.05⌋, ⌊10.5⌋, ⌊105.4⌋
    capped = support_per_class(torch.tensor([10, 1000]), torch.tensor([2, 990]), total=400,
                               log_weights=torch.zeros(2, dtype=torch.double))
    assert capped.tolist() == [2, 395]  # a small class gives what it has left after its queries


def test_support_totals_fill_the_500_cap_on_large_classes_and_never_pass_it() -> None:
    episodes = descriptions([600] * 60, 1500)
    totals = [sum(episode.support) for episode in episodes]
    assert max(totals) <= 500
    # β·Σ⌈..⌉ > 500 for β > 500 / (100 · ways): most episodes of more than 10 ways are capped (floors lose < ways)
    capped = [t for t, e in zip(totals, episodes, strict=True) if e.ways >= 20]
    assert sum(t >= 500 - 50 for t in capped) / len(capped) > 0.6
    assert all(min(episode.support) >= 1 for episode in episodes)


def test_support_is_imbalanced_as_the_classes_are() -> None:
    """Big classes give ~10x the support of small ones (p_c ∝ size · e^U(log ½, log 2)), on average."""
    sizes = [40] * 10 + [400] * 10
    small, large = [], []
    for episode in descriptions(sizes, 3000, rules=EpisodeRules(max_ways=20)):
        for c, shots in zip(episode.classes, episode.support, strict=True):
            (small if sizes[c] == 40 else large).append(shots)
    ratio = (sum(large) / len(large)) / (sum(small) / len(small))
    assert 5 < ratio < 12, ratio  # < 10: the +1 per class and the small classes' floors lift the small mean


def test_a_superclass_is_drawn_first_then_its_classes() -> None:
    sizes = [20] * 50
    alphabets = ["small"] * 8 + ["large"] * 42
    episodes = descriptions(sizes, 2000, alphabets)
    chosen = Counter()
    for episode in episodes:
        groups = {alphabets[c] for c in episode.classes}
        assert len(groups) == 1  # all classes from one alphabet
        group = groups.pop()
        chosen[group] += 1
        assert episode.ways <= (8 if group == "small" else 42)
    assert abs(chosen["small"] - 1000) < 120, chosen  # alphabets uniformly, not by their class counts


def test_a_hierarchy_node_is_drawn_and_its_classes_are_the_episode_s() -> None:
    """ILSVRC's rule: a node spanning 5..392 classes uniformly; all its classes, or 50 of them drawn without
    replacement where it spans more; a node of fewer than min_ways classes (or more than 392) is never drawn."""
    sizes = [30] * 500
    nodes = [list(range(0, 6)), list(range(6, 10)), list(range(10, 70)), list(range(0, 400))]  # 6, 4, 60, 400
    sampler, generator = MetaDatasetSampler(sizes, RULES, hierarchy=nodes), torch.Generator().manual_seed(0)
    drawn = Counter()
    for _ in range(1500):
        episode = sampler.sample(generator)
        classes = set(episode.classes)
        assert len(classes) == episode.ways  # without replacement
        if classes <= set(nodes[0]):
            assert classes == set(nodes[0])  # a small node: every class it spans
            drawn["six"] += 1
        else:
            assert classes <= set(nodes[2]) and episode.ways == 50  # 50 of the 60
            drawn["sixty"] += 1
    assert abs(drawn["six"] - 750) < 90, drawn  # the two eligible nodes uniformly
    with pytest.raises(ConfigError, match=r"^task.sampler=meta_dataset: no node of the class hierarchy spans between "
                                          r"task.meta_dataset.min_ways=5 and 392 classes: lower min_ways$"):
        MetaDatasetSampler(sizes, RULES, hierarchy=[nodes[1], nodes[3]])


def test_the_same_generator_seed_gives_the_same_episodes() -> None:
    assert descriptions([20] * 30, 20, seed=3) == descriptions([20] * 30, 20, seed=3)
    assert descriptions([20] * 30, 20, seed=3) != descriptions([20] * 30, 20, seed=4)


def test_bad_rules_and_sources_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^task.meta_dataset has no key max_way: its keys are "):
        EpisodeRules.from_settings({"max_way": 20})
    with pytest.raises(ConfigError, match=r"^task.meta_dataset.max_ways must be a whole number, got 7.5$"):
        EpisodeRules.from_settings({"max_ways": 7.5})
    rules = EpisodeRules.from_settings({"max_ways": 20.0})  # OmegaConf's floats: counts become ints again
    assert rules.max_ways == 20 and isinstance(rules.max_ways, int) and rules.max_query == 10
    with pytest.raises(ConfigError, match=r"^task.meta_dataset.min_ways=10 exceeds max_ways=8$"):
        EpisodeRules.from_settings({"min_ways": 10, "max_ways": 8})
    with pytest.raises(ConfigError, match=r"needs a split with at least task.meta_dataset.min_ways=5 classes; "
                                          r"the largest has 4: lower min_ways$"):
        MetaDatasetSampler([20] * 4, RULES)
    with pytest.raises(ConfigError, match=r"needs at least 2 images per class .* a class has 1$"):
        MetaDatasetSampler([20, 1, 20, 20, 20], RULES)


class SyntheticImages(ImageClassFamily):
    """Three "alphabets" of 8 classes; class c's images are filled with the value c (so a task's classes can be
    read back from its pixels), 6 + c % 5 images per class."""

    name = "synthetic"
    image_size = 4

    def load_split(self, split: str) -> LabelledImages:
        labels = torch.cat([torch.full((6 + c % 5,), c) for c in range(24)])
        images = labels.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).to(torch.uint8).contiguous()
        return LabelledImages(images, labels, [f"alphabet{c // 8}/char{c}" for c in range(24)])


def test_an_image_family_serves_ragged_meta_dataset_episodes() -> None:
    family = SyntheticImages(sampler="meta_dataset", meta_batch_size=6)
    family.prepare()
    tasks = family.sample(6, torch.Generator().manual_seed(0), "train")
    assert isinstance(tasks, Episodes) and not tasks.stacked and len(tasks) == 6
    shapes = set()
    for task in tasks:
        ways = int(task.support_y.max()) + 1
        assert 5 <= ways <= 8  # one alphabet of 8 classes
        classes = (task.support_x[:, 0, 0, 0] * 255).round().long()
        assert len({int(c) // 8 for c in classes}) == 1  # one alphabet
        for way in range(ways):  # each label is one class, the same in support and query
            in_support = classes[task.support_y == way].unique()
            in_query = (task.query_x[task.query_y == way, 0, 0, 0] * 255).round().long().unique()
            assert len(in_support) == 1 and torch.equal(in_support, in_query)
        smallest = min(6 + int(c) % 5 for c in classes.unique())
        assert torch.equal(torch.bincount(task.query_y), torch.full((ways,), min(10, smallest // 2)))
        shapes.add((len(task.support_y), len(task.query_y)))
    assert len(shapes) > 1  # episodes differ in size


META_DATASET_KANJI = ["task=kanji", "task.num_classes=300", "task.sampler=meta_dataset",
                      "task.meta_dataset={max_ways: 10, max_support: 60}", "task.meta_batch_size=2",
                      "task.val_tasks=10", "task.test_tasks=40", "task.eval_batch_size=10", "model.hidden_size=32",
                      "tracking=none", "trainer.max_steps=60", "trainer.val_check_interval=1000",
                      "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(("algorithm", "overrides", "least"), [
    ("protonet", [], 0.5),
    # ~60 s each; `make test` keeps the protonet run, tests/test_protomaml.py and tests/test_zero_head.py
    pytest.param("protomaml", [], 0.5, marks=pytest.mark.slow),
    # a zero head learns from scratch in each episode: lower after 60 steps (0.46 seen), still 3x chance
    pytest.param("fomaml", ["algorithm.zero_head=true", "algorithm.inner_lr=0.4", "algorithm.inner_steps=3"], 0.35,
                 marks=pytest.mark.slow),
])
def test_algorithms_that_take_any_number_of_ways_learn_meta_dataset_episodes(
        job, kanji_cache, algorithm: str, overrides: list[str], least: float) -> None:
    metrics = train(job(*META_DATASET_KANJI, f"task.cache_dir={kanji_cache}", f"algorithm={algorithm}", *overrides))
    assert metrics["meta_test/post_acc"] > least, metrics  # 5-10 ways: chance is 1/ways, at most 0.2


def test_an_algorithm_with_a_fixed_head_is_refused_meta_dataset_episodes(job, kanji_cache) -> None:
    with pytest.raises(ConfigError, match=r"^task.sampler=meta_dataset draws episodes of varying ways, but "
                                          r"algorithm=maml predicts with a head of one output per way: set "
                                          r"algorithm.zero_head=true \(a zero head per episode\), use an "
                                          r"algorithm that builds its head per episode"):
        train(job(*META_DATASET_KANJI, f"task.cache_dir={kanji_cache}", "algorithm=maml"))
