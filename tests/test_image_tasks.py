"""Few-shot image families: the standard layouts are read, splits are disjoint, episodes are well formed."""

from __future__ import annotations

import io
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metalab.errors import ConfigError
from metalab.tasks import ImageFolder, KanjiHandwriting, MiniImageNet, Omniglot, SinusoidLineRegression
from metalab.tasks import omniglot as omniglot_module
from metalab.tasks.classification import SPLITS
from metalab.tasks.images import ImageClassFamily, LabelledImages
from tests import fake_datasets


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    return fake_datasets.omniglot_tree(root, {"images_background": (3, 4), "images_evaluation": (2, 4)})


def kanji(cache: str, **settings) -> KanjiHandwriting:
    return KanjiHandwriting(**({"num_classes": 150, "max_alphabet_size": 20, "cache_dir": cache} | settings))


def check_episodes(family, split: str, count: int = 3) -> None:
    tasks = family.sample(count, torch.Generator().manual_seed(0), split)
    ways, shots, queries = family.ways, family.shots, family.queries
    size = family.image_size
    assert tasks.support_x.shape == (count, ways * shots, family.channels, size, size)
    assert tasks.query_x.shape == (count, ways * queries, family.channels, size, size)
    assert tasks.support_x.dtype == torch.float32 and 0 <= tasks.support_x.min() and tasks.support_x.max() <= 1
    for t in range(count):  # labels 0..N−1, each class `shots` times in support and `queries` in query
        assert torch.equal(torch.bincount(tasks.support_y[t], minlength=ways), torch.full((ways,), shots))
        assert torch.equal(torch.bincount(tasks.query_y[t], minlength=ways), torch.full((ways,), queries))


def test_kanji_splits_are_disjoint_by_class_and_alphabet(kanji_cache: str) -> None:
    family = kanji(kanji_cache)
    family.prepare()
    names = {split: family.load_split(split).class_names for split in SPLITS}
    alphabets = {split: {name.split("/")[0] for name in names[split]} for split in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(names[a]) & set(names[b])
        assert not alphabets[a] & alphabets[b]
    assert sum(len(n) for n in names.values()) == 150
    assert len(names["train"]) > len(names["test"]) > len(names["val"]) > 0
    assert all(len(family.load_split(s).images) == 20 * len(names[s]) for s in SPLITS)


def test_kanji_splits_hold_no_alphabet_below_min_alphabet_size(kanji_cache: str) -> None:
    family = kanji(kanji_cache)  # 150 classes, alphabets cut at 20: the last one used to be cut to 13 (val)
    for split in SPLITS:
        sizes = Counter(name.split("/")[0] for name in family.load_split(split).class_names)
        assert sizes and 14 <= min(sizes.values()) and max(sizes.values()) <= 20, (split, sizes)
    with pytest.raises(ConfigError, match=r"need 1 <= min_alphabet_size <= max_alphabet_size, got 21 and 20"):
        kanji(kanji_cache, min_alphabet_size=21)


def test_kanji_episodes_shapes_labels_and_determinism(kanji_cache: str) -> None:
    family = kanji(kanji_cache, ways=5, shots=2, queries=3)
    for split in SPLITS:
        check_episodes(family, split)
    first = family.sample(4, torch.Generator().manual_seed(5), "train")
    again = family.sample(4, torch.Generator().manual_seed(5), "train")
    other = family.sample(4, torch.Generator().manual_seed(6), "train")
    assert torch.equal(first.support_x, again.support_x) and torch.equal(first.query_y, again.query_y)
    assert not torch.equal(first.support_x, other.support_x)


def test_kanji_drawers_vary_reproducibly_and_render_is_cached(kanji_cache: str) -> None:
    family = kanji(kanji_cache)
    images = family.load_split("train").images
    assert not torch.equal(images[0], images[1])  # two drawers of the first glyph differ
    assert images[0].float().mean() > 5  # and there is ink
    caches = {path: path.stat().st_mtime_ns for path in Path(kanji_cache).glob("kanji-*.npz")}
    reloaded = kanji(kanji_cache).load_split("train").images  # same settings: read from the cache, not re-rendered
    assert torch.equal(images, reloaded)
    assert {path: path.stat().st_mtime_ns for path in Path(kanji_cache).glob("kanji-*.npz")} == caches
    still = kanji(kanji_cache, variation=0.0).load_split("train").images
    assert torch.equal(still[0], still[1])  # variation 0: every drawer the same


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_kanji_rendering_shows_a_progress_bar_on_a_terminal_only_while_rendering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    kanji(str(tmp_path), drawers=2).load_split("train")  # a cache miss: renders
    shown = terminal.getvalue()
    assert f"rendering kanji once into {tmp_path}:" in shown and "/150 [" in shown
    kanji(str(tmp_path), drawers=2).load_split("train")  # a cache hit: silent
    assert terminal.getvalue() == shown


def test_too_many_ways_or_shots_fail_at_start_with_one_line(kanji_cache: str) -> None:
    with pytest.raises(ConfigError, match=r"task.ways=500 .* has only \d+ classes: lower task.ways"):
        kanji(kanji_cache, ways=500).prepare()
    with pytest.raises(ConfigError, match=r"task.shots \+ task.queries = 25 .* only 20 images"):
        kanji(kanji_cache, shots=5, queries=20).prepare()


@pytest.mark.parametrize("form", ["folders", "zip"])
def test_omniglot_lake_split_from_folders_and_zips(omniglot_root: Path, tmp_path: Path, form: str) -> None:
    root = omniglot_root if form == "folders" else fake_datasets.zip_parts(omniglot_root, tmp_path, "omniglot-master")
    family = Omniglot(root=str(root), split="lake", val_classes=3, ways=3, shots=1, queries=2)
    family.prepare()
    names = {split: family.load_split(split).class_names for split in SPLITS}
    assert len(names["train"]) == 9 and len(names["val"]) == 3 and len(names["test"]) == 8
    assert all(name.startswith("Back") for name in names["train"] + names["val"])
    assert all(name.startswith("Eval") for name in names["test"])
    data = family.load_split("train")
    assert data.images.shape == (180, 1, 28, 28)
    assert data.images.float().mean() < 128  # inverted: ink bright on a dark ground
    check_episodes(family, "test")


@pytest.fixture(scope="module")
def full_omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Omniglot's 1,623 real character names in its layout, two tiny images each."""
    names = [name for members in omniglot_module.vinyals_characters().values() for name in members]
    return fake_datasets.omniglot_named_tree(tmp_path_factory.mktemp("omniglot-full"), names)


def vinyals_lines(split: str) -> list[str]:
    return (omniglot_module.VINYALS_FOLDER / f"{split}.txt").read_text().split()


def test_omniglot_vinyals_split_is_the_published_lists(full_omniglot: Path) -> None:
    plain = Omniglot(root=str(full_omniglot), split="vinyals").characters_by_split()
    assert {split: len(plain[split]) for split in SPLITS} == {"train": 1028, "val": 172, "test": 423}
    names = {split: {name for name, _ in plain[split]} for split in SPLITS}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    family = Omniglot(root=str(full_omniglot), split="vinyals", rotations=True, ways=5, shots=1, queries=1)
    for split in ("val", "test"):  # with rotations, the classes are the files' lines, rotDDD ↔ @DDD
        classes = family.load_split(split).class_names
        assert sorted(classes) == sorted(f"{line[:-7]}@{int(line[-3:])}" for line in vinyals_lines(split))
    data = family.load_split("val")
    first = data.images[data.labels == 0][0]
    rotated = data.images[data.labels == 172][0]  # the same character turned 90°
    assert torch.equal(first.rot90(1, dims=(1, 2)), rotated)
    check_episodes(family, "val")


def test_shipped_vinyals_lists_hold_four_rotations_of_1623_distinct_characters() -> None:
    lines = {split: vinyals_lines(split) for split in SPLITS}
    assert {split: len(lines[split]) for split in SPLITS} == {"train": 4112, "val": 688, "test": 1692}
    characters = omniglot_module.vinyals_characters()
    for split in SPLITS:
        assert sorted(lines[split]) == sorted(f"{c}/rot{r:03d}" for c in characters[split] for r in (0, 90, 180, 270))
    assert len({c for members in characters.values() for c in members}) == 1623
    assert (omniglot_module.VINYALS_FOLDER / "LICENSE").read_text().startswith("MIT License")


def test_omniglot_maml_split_is_a_fixed_shuffle_of_all_characters(full_omniglot: Path) -> None:
    split = Omniglot(root=str(full_omniglot), split="maml").characters_by_split()
    names = {part: [name for name, _ in split[part]] for part in SPLITS}
    assert {part: len(names[part]) for part in SPLITS} == {"train": 1100, "val": 100, "test": 423}
    assert len(set(names["train"]) | set(names["val"]) | set(names["test"])) == 1623
    assert names == {part: [name for name, _ in chars] for part, chars in
                     Omniglot(root=str(full_omniglot), split="maml").characters_by_split().items()}
    # Pinned: a change of seed, order or sizes changes every published comparison made with this split.
    assert names["train"][:2] == ["Gurmukhi/character23", "Malayalam/character36"]
    assert names["val"][0] == "Tifinagh/character11" and names["test"][0] == "Keble/character04"


def test_omniglot_split_settings_fail_in_one_line(omniglot_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"^task.split must be one of lake, vinyals, maml, got 'vinyls'$"):
        Omniglot(root=str(omniglot_root), split="vinyls")
    with pytest.raises(ConfigError, match=r"task.val_classes applies to task.split=lake only"):
        Omniglot(root=str(omniglot_root), split="vinyals", val_classes=4)
    with pytest.raises(ConfigError, match=r"task.split=vinyals lists 1623 characters not under task.root=.*"
                                          r"\(e.g. Alphabet_of_the_Magi/character01\)"):
        Omniglot(root=str(omniglot_root), split="vinyals").characters_by_split()
    with pytest.raises(ConfigError, match=r"task.split=maml needs Omniglot's 1623 characters, .* has 20"):
        Omniglot(root=str(omniglot_root), split="maml").characters_by_split()


def test_omniglot_missing_or_corrupt_data_names_layout_key_and_path(tmp_path: Path, omniglot_root: Path) -> None:
    with pytest.raises(ConfigError) as error:
        Omniglot(root=str(tmp_path / "nowhere")).prepare()
    message = str(error.value)
    assert "task.root=" in message and "nowhere" in message and "images_background/<Alphabet>/<character>" in message
    assert "\n" not in message
    broken = fake_datasets.omniglot_tree(tmp_path / "broken", {"images_background": (1, 2),
                                                               "images_evaluation": (1, 2)}, drawers=2)
    next((broken / "images_evaluation").rglob("*.png")).write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read image"):
        Omniglot(root=str(broken), split="lake", val_classes=1, ways=1, shots=1, queries=1).prepare()


@pytest.mark.parametrize("form", ["pickles", "csv"])
def test_mini_imagenet_pickles_and_csv_layout(tmp_path: Path, form: str) -> None:
    if form == "pickles":
        root = fake_datasets.mini_imagenet_pickles(tmp_path, {"train": 6, "validation": 5, "test": 5})
    else:
        root = fake_datasets.mini_imagenet_csv(tmp_path, {"train": 6, "val": 5, "test": 5})
    family = MiniImageNet(root=str(root), ways=5, shots=1, queries=3)
    family.prepare()
    names = {split: set(family.load_split(split).class_names) for split in SPLITS}
    assert len(names["train"]) == 6 and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert family.load_split("train").images.shape == (120, 3, 84, 84)
    check_episodes(family, "val")


def test_mini_imagenet_missing_data_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mini-imagenet-cache-train.pkl.*train.csv.*task.root"):
        MiniImageNet(root=str(tmp_path)).prepare()


def test_image_folder_with_split_file(tmp_path: Path) -> None:
    for c in range(8):
        folder = tmp_path / f"class{c}"
        folder.mkdir()
        for d in range(6):
            from PIL import Image

            Image.fromarray(fake_datasets.glyph_image(c, d, 40)).save(folder / f"{d}.{'png' if d % 2 else 'jpg'}")
    split = {"train": [f"class{c}" for c in range(4)], "val": ["class4", "class5"], "test": ["class6", "class7"]}
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split))
    family = ImageFolder(root=str(tmp_path), image_size=32, channels=1, ways=2, shots=2, queries=3)
    family.prepare()
    assert family.load_split("test").class_names == ["class6", "class7"]
    check_episodes(family, "train")
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split | {"test": ["class6", "class0"]}))
    with pytest.raises(ConfigError, match="'class0' is in both train and test"):
        ImageFolder(root=str(tmp_path)).prepare()
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split | {"test": ["class6", "missing"]}))
    with pytest.raises(ConfigError, match=r"names class 'missing' but .* is not a folder"):
        ImageFolder(root=str(tmp_path)).prepare()


def test_image_folder_names_an_empty_class_folder_and_a_corrupt_file(tmp_path: Path) -> None:
    """Neither is fixed by fewer shots: the message names the folder (or file) and what to do with it."""
    from PIL import Image

    for c in range(6):
        (tmp_path / f"c{c}").mkdir()
        for d in range(4):
            Image.fromarray(fake_datasets.glyph_image(c, d, 16)).save(tmp_path / f"c{c}" / f"{d}.png")
    (tmp_path / "split.yaml").write_text(yaml.safe_dump({"train": ["c0", "c1"], "val": ["c2", "c3"],
                                                         "test": ["c4", "c5"]}))
    settings = {"root": str(tmp_path), "image_size": 16, "channels": 1, "ways": 2, "shots": 1, "queries": 1}
    for image in (tmp_path / "c5").iterdir():
        image.unlink()
    with pytest.raises(ConfigError, match=rf"^class folder {re.escape(str(tmp_path / 'c5'))} has no images "
                                          rf"\(.png, .jpg, .jpeg\): add images to it or remove 'c5' from the test "
                                          rf"list of {re.escape(str(tmp_path / 'split.yaml'))}$"):
        ImageFolder(**settings).prepare()
    (tmp_path / "c5" / "0.png").write_bytes((tmp_path / "c4" / "0.png").read_bytes())
    (tmp_path / "c5" / "1.jpg").write_bytes((tmp_path / "c4" / "1.png").read_bytes())  # any readable image will do
    truncated = tmp_path / "c1" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ConfigError, match=rf"^cannot read image {re.escape(str(truncated))}: image file is truncated; "
                                          "replace or remove the file$"):
        ImageFolder(**settings).prepare()
    truncated.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=rf"^cannot read image {re.escape(str(truncated))}: not an image file PIL can "
                                          "identify; replace or remove the file$"):
        ImageFolder(**settings).prepare()
    truncated.unlink()
    ImageFolder(**settings).prepare()  # each class has enough images again


class ClassesOfThreeTwoAndNone(ImageClassFamily):
    name = "three-two-none"

    def load_split(self, split: str) -> LabelledImages:
        return LabelledImages(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1]),
                              ["three", "two", "none"])


def test_an_empty_class_of_any_image_family_is_named_and_not_blamed_on_shots() -> None:
    with pytest.raises(ConfigError, match=r"^class 'none' of the train split of three-two-none has no images: add "
                                          r"images to it or remove it from the split$"):
        ClassesOfThreeTwoAndNone(ways=2, shots=1, queries=1).prepare()


def test_sinusoid_line_mixes_lines_and_sinusoids() -> None:
    tasks = SinusoidLineRegression(shots=10, queries=10).sample(200, torch.Generator().manual_seed(0), "train")
    x = torch.cat([tasks.support_x, tasks.query_x], 1).squeeze(-1).double().numpy()
    y = torch.cat([tasks.support_y, tasks.query_y], 1).squeeze(-1).double().numpy()
    residuals = [np.abs(np.polyval(np.polyfit(xi, yi, 1), xi) - yi).max() for xi, yi in zip(x, y, strict=True)]
    lines = sum(r < 1e-4 for r in residuals)
    assert 70 < lines < 130  # about half of 200 tasks are exactly linear
