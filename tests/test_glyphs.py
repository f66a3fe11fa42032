"""task=glyphs: printed characters of many scripts, rendered from matplotlib's fonts; split by Unicode block."""

from __future__ import annotations

import io
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from metalab.errors import ConfigError
from metalab.job import train
from metalab.tasks import PrintedGlyphs
from metalab.tasks import glyphs as glyphs_module
from metalab.tasks.classification import SPLITS
from tests.test_training import SHORT

NAME = re.compile(r"^(?P<block>[A-Za-z0-9 -]+)/U\+(?P<point>[0-9A-F]{4,5})$")
# DejaVu Sans's four faces only: a quicker render, for the tests that render more than once.
SANS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"]


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyphs-cache"))


def glyphs(cache: str | Path, **settings) -> PrintedGlyphs:
    """150 classes of blocks cut at 20 characters, 4 drawers each (1 shot + 3 queries), every typeface."""
    return PrintedGlyphs(**({"drawers": 4, "num_classes": 150, "max_alphabet_size": 20, "queries": 3,
                             "cache_dir": str(cache)} | settings))


def small(cache: str | Path, **settings) -> PrintedGlyphs:
    return glyphs(cache, **({"typefaces": SANS} | settings))


def test_classes_are_block_and_code_point_and_splits_are_disjoint(glyph_cache: str) -> None:
    family = glyphs(glyph_cache)
    family.prepare()
    names = {split: family.load_split(split).class_names for split in SPLITS}
    blocks = {split: {name.rsplit("/", 1)[0] for name in names[split]} for split in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(names[a]) & set(names[b])
        assert not blocks[a] & blocks[b]
    for name in (name for split in SPLITS for name in names[split]):
        match = NAME.match(name)
        assert match, name
        assert glyphs_module.block_of(int(match["point"], 16)) == match["block"], name  # the block it is filed under
    assert sum(len(n) for n in names.values()) == 150
    assert len(names["train"]) > len(names["test"]) > len(names["val"]) > 0
    for split in SPLITS:
        data = family.load_split(split)
        assert data.images.shape == (4 * len(names[split]), 1, 28, 28) and data.images.dtype == torch.uint8
        sizes = Counter(data.superclasses())  # the block of each class: what meta_dataset draws first
        assert 14 <= min(sizes.values()) and max(sizes.values()) <= 20, (split, sizes)


def test_every_image_has_ink_bright_on_a_dark_ground(glyph_cache: str) -> None:
    for split in SPLITS:
        images = glyphs(glyph_cache).load_split(split).images.flatten(1)
        assert int(images.max(1).values.min()) >= 128  # every image holds a full-ink pixel
        assert (images == 0).float().mean() > 0.5  # most pixels are ground (0), as kanji's and inverted Omniglot's


def test_drawers_differ_but_are_nearer_their_class_than_other_classes(glyph_cache: str) -> None:
    """Leave-one-out 1-nearest-neighbour on raw pixels: an image's nearest other image is of its class far more
    often than chance (seen: 0.5-0.6 against 0.01-0.05), and no two drawers of a class are the same image."""
    for split in SPLITS:
        data = glyphs(glyph_cache).load_split(split)
        for images in data.images.reshape(len(data.class_names), 4, -1):  # (drawers, pixels) of each class
            assert len({bytes(image.numpy()) for image in images}) == 4
        x = data.images.flatten(1).float()
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True)
        similarity = x @ x.T  # cosine, (N, N)
        similarity.fill_diagonal_(-2)
        accuracy = (data.labels[similarity.argmax(1)] == data.labels).float().mean().item()
        chance = 3 / (len(data.labels) - 1)  # the 3 other drawers of its class among the N − 1 other images
        assert accuracy > max(0.3, 5 * chance), (split, accuracy, chance)


def test_a_second_render_gives_the_same_bytes_and_a_second_load_renders_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small(tmp_path / "a")
    images = {split: first.load_split(split).images for split in SPLITS}
    again = small(tmp_path / "b")  # rendered anew in another folder
    for split in SPLITS:
        assert torch.equal(again.load_split(split).images, images[split])
        assert again.load_split(split).class_names == first.load_split(split).class_names
    [cache] = (tmp_path / "a").iterdir()  # the cache, and no partial file left beside it
    assert re.fullmatch(r"glyphs-[0-9a-f]{16}\.npz", cache.name)

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again, though the cache holds these settings")

    monkeypatch.setattr(glyphs_module, "survey", no_rendering)
    monkeypatch.setattr(glyphs_module, "place", no_rendering)
    reloaded = small(tmp_path / "a")
    assert all(torch.equal(reloaded.load_split(split).images, images[split]) for split in SPLITS)
    description = reloaded.data_description()
    assert description["source"] == str(cache) and description["matplotlib"]
    with pytest.raises(AssertionError, match="rendered again"):  # other settings: another file, rendered
        small(tmp_path / "a", variation=0.5).load_split("train")


def test_without_variation_the_drawers_of_a_class_differ_only_by_typeface(tmp_path: Path) -> None:
    data = small(tmp_path, drawers=8, variation=0.0).load_split("train")
    drawers = data.images.reshape(len(data.class_names), 8, -1)  # every class is drawn by SANS's 4 faces
    assert torch.equal(drawers[:, :4], drawers[:, 4:])  # drawer d and d + 4: the same face, no jitter
    assert not torch.equal(drawers[:, 0], drawers[:, 1])


def test_lookalikes_across_scripts_are_one_class(tmp_path: Path) -> None:
    """Latin A, Greek Alpha and Cyrillic A are the same outline in DejaVu: only the first block keeps it; Greek
    alpha (α) and Cyrillic Zhe (Ж), which no earlier block draws, stay."""
    family = small(tmp_path, drawers=1, num_classes=1623, max_alphabet_size=55)  # every block that DejaVu Sans gives
    names = set()
    for split in SPLITS:
        names |= set(family.load_split(split).class_names)
    points = {int(name.rsplit("U+", 1)[1], 16) for name in names}
    assert 0x41 in points and 0x391 not in points and 0x410 not in points
    assert {0x3B1, 0x416} <= points


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rendering_shows_progress_on_a_terminal_only_while_rendering(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    small(tmp_path).load_split("train")  # a cache miss: renders
    shown = terminal.getvalue()
    assert "choosing the characters of 4 typefaces:" in shown and f"rendering glyphs once into {tmp_path}:" in shown
    assert "/150 [" in shown
    small(tmp_path).load_split("train")  # a cache hit: silent
    assert terminal.getvalue() == shown


@pytest.mark.parametrize(("settings", "message"), [
    ({"typefaces": ["cmr10.ttf"]}, r"task.typefaces must list distinct font files of DejaVuSans.ttf, .*cmr10.ttf"),
    ({"typefaces": []}, r"task.typefaces must list"),
    ({"typefaces": SANS * 2}, r"task.typefaces must list distinct"),
    ({"typefaces": SANS, "min_typefaces": 5}, r"task.min_typefaces must be 1..4 .*got 5"),
    ({"min_typefaces": 0}, r"task.min_typefaces must be 1..16"),
    ({"image_size": 4}, r"task.image_size >= 8"),
    ({"drawers": 0}, r"task.drawers >= 1"),
    ({"min_alphabet_size": 30}, r"need 1 <= min_alphabet_size <= max_alphabet_size, got 30 and 20"),
    ({"val_fraction": 0.7}, r"task.val_fraction and task.background_fraction need"),
    ({"ways": 0}, r"task.ways must be >= 1"),
])
def test_bad_settings_fail_with_one_line_naming_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        glyphs("unused", **settings)


def test_fonts_that_give_too_few_blocks_fail_at_load_naming_the_settings(tmp_path: Path) -> None:
    family = glyphs(tmp_path, typefaces=["STIXGeneral.ttf"], min_typefaces=1, min_alphabet_size=200,
                    max_alphabet_size=200)
    with pytest.raises(ConfigError, match=r"task.typefaces give [012] Unicode blocks of task.min_alphabet_size=200 "):
        family.prepare()
    assert not list(tmp_path.iterdir())  # nothing cached


def test_meta_dataset_episodes_draw_one_block_first(glyph_cache: str) -> None:
    family = glyphs(glyph_cache, sampler="meta_dataset", meta_dataset={"max_ways": 10, "max_support": 60})
    family.prepare()
    generator = torch.Generator().manual_seed(0)
    for split in SPLITS:
        blocks = family.load_split(split).superclasses()
        for _ in range(20):
            episode = family.meta_dataset_sampler(split).sample(generator)
            assert len({blocks[index] for index in episode.classes}) == 1  # one alphabet per episode
            assert 5 <= episode.ways <= 10
    tasks = family.sample(3, generator, "train")
    for task in tasks:
        ways = int(task.support_y.max()) + 1
        assert set(task.query_y.tolist()) == set(range(ways)) and task.support_x.shape[1:] == (1, 28, 28)
        assert 0 <= float(task.support_x.min()) and float(task.support_x.max()) <= 1


@pytest.mark.slow  # 25-45 s on 2 cores (two runs, the first probing runner.backend=auto): `make test-slow`
def test_protonet_learns_glyphs_beyond_its_untrained_features(job, glyph_cache: str) -> None:
    """A short real run on the module's render (its settings: no second render), tested on unseen blocks. An
    untrained ProtoNet's random features already tell printed glyphs apart (seen: 0.62, chance 0.2), so the run
    is judged against it: seen 0.83 after 40 steps."""
    run = ["tracking=none", "task=glyphs", "algorithm=protonet", *SHORT, f"task.cache_dir={glyph_cache}",
           "task.num_classes=150", "task.max_alphabet_size=20", "task.drawers=4", "task.queries=3",
           "task.meta_batch_size=8", "task.test_tasks=100", "model.hidden_size=32", "trainer.val_check_interval=1000"]
    untrained = train(job(*run, "trainer.max_steps=0"))
    trained = train(job(*run, "trainer.max_steps=40"))
    assert trained["meta_test/post_acc"] > untrained["meta_test/post_acc"] + 0.1, (untrained, trained)
    assert trained["meta_test/post_loss"] < 0.7 * untrained["meta_test/post_loss"], (untrained, trained)
