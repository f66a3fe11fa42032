"""task=text_jsonl (Bao et al. 2020's JSON lines) and task=fewrel (FewRel 1.0's JSON): parsing, class splits,
entity markers, one-line errors, and a short ProtoNet run of each through `metalab-train` on generated files."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks import FewRelTexts, JsonLinesTexts
from metalab.tasks.text_files import BAO_SPLITS, mark_entities
from tests.conftest import run_cli
from tests.test_reproduce import reproduce_cli

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def words(count: int, seed: int) -> list[str]:
    """``count`` distinct made-up words of three syllables."""
    rng, found = random.Random(seed), set()
    while len(found) < count:
        found.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return sorted(found)


KEYWORDS, FILLER = words(14, seed=1), words(40, seed=2)
# Each class is a distinct pair of keywords: a test class is an unseen pair of words the tokeniser has seen.
PAIRS = random.Random(0).sample(list(itertools.combinations(KEYWORDS, 2)), 91)


def sentence(rng: random.Random, pair: tuple[str, ...]) -> list[str]:
    """A learnable text of class ``pair``: its two keywords twice each among 8 filler words."""
    tokens = [*pair, *pair, *rng.sample(FILLER, 8)]
    rng.shuffle(tokens)
    return tokens


def bao_file(path: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """A Bao et al. JSON-lines file: label ``c`` is keyword pair ``c``; a ``raw`` key as their files carry."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for label in range(classes):
            for _ in range(per_class):
                tokens = sentence(rng, PAIRS[label])
                out.write(json.dumps({"text": tokens, "label": label, "raw": " ".join(tokens).upper()}) + "\n")
    return path


def fewrel_instance(rng: random.Random, pair: tuple[str, ...]) -> dict:
    """A FewRel instance: head entity (two tokens, mentioned twice) and tail (one token) among the words."""
    tokens = sentence(rng, pair)
    tokens[2:2] = ["Cape", "Bridge"]
    tokens.append("Mississippi")
    end = len(tokens) - 1
    return {"tokens": tokens, "h": ["cape bridge", "Q1", [[2, 3], [end - 1]]], "t": ["mississippi", "Q2", [[end]]]}


def fewrel_folder(root: Path, train: int = 20, val: int = 8, per_class: int = 20) -> Path:
    """FewRel 1.0's layout: train_wiki.json relations P0..P<train−1>, val_wiki.json the next ``val``."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, relations in (("train_wiki.json", range(train)), ("val_wiki.json", range(train, train + val))):
        data = {f"P{r}": [fewrel_instance(rng, PAIRS[r]) for _ in range(per_class)] for r in relations}
        (root / name).write_text(json.dumps(data))
    return root


def test_marks_wrap_inclusive_spans_and_nest() -> None:
    tokens = "the river flows into lake erie".split()
    assert mark_entities(tokens, (1, 1), (4, 5)) == ["the", "[E1]", "river", "[/E1]", "flows", "into", "[E2]",
                                                     "lake", "erie", "[/E2]"]
    assert mark_entities(["a", "b"], (0, 1), (1, 1)) == ["[E1]", "a", "[E2]", "b", "[/E2]", "[/E1]"]


def test_huffpost_lines_split_by_bao_s_published_classes(tmp_path: Path) -> None:
    family = JsonLinesTexts(path=str(bao_file(tmp_path / "huffpost.json", 41, 3)), dataset="huffpost")
    train, val, test = (family.read_texts(split) for split in ("train", "val", "test"))
    assert train.class_names == [f"label{c}" for c in range(20)]
    assert val.class_names == [f"label{c}" for c in range(20, 25)]
    assert test.class_names == [f"label{c}" for c in range(25, 41)]
    assert len(test.texts) == 16 * 3 and test.labels[:4] == [0, 0, 0, 1]  # labels index the split's classes
    first = json.loads((tmp_path / "huffpost.json").read_text().splitlines()[0])
    assert train.texts[0] == " ".join(first["text"])  # tokens joined by spaces; "raw" ignored
    assert family.name == "huffpost_jsonl"


def test_custom_split_string_texts_names_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text('{"text": "good film", "label": 0}\n\n{"text": "bad film", "label": 1}\n'
                    '{"text": "a tune", "label": 2}\n{"text": "ignored", "label": 9}\n')
    family = JsonLinesTexts(path=str(path), train_classes=[0], val_classes=[1], test_classes=[2],
                            label_names={"0": "praise"})
    assert family.read_texts("train").texts == ["good film"] and family.read_texts("train").class_names == ["praise"]
    assert family.read_texts("test").class_names == ["label2"] and family.name == "text_jsonl"
    overridden = JsonLinesTexts(path=str(path), dataset="huffpost", val_classes=[25], test_classes=[26])
    assert overridden.classes == {"train": list(range(20)), "val": [25], "test": [26]}


def test_bao_fewrel_lines_split_and_mark_head_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "fewrel.json"
    with open(path, "w") as out:
        for label in range(80):
            out.write(json.dumps({"text": ["the", "river", "flows", "into", "lake", "erie"], "label": label,
                                  "head": [1, 1], "tail": [4, 5]}) + "\n")
    family = JsonLinesTexts(path=str(path), dataset="fewrel")
    val = family.read_texts("val")
    assert val.class_names == ["label7", "label9", "label17", "label18", "label20"]
    assert len(family.read_texts("train").class_names) == 65 and len(family.read_texts("test").class_names) == 10
    assert val.texts[0] == "the [E1] river [/E1] flows into [E2] lake erie [/E2]"


def test_published_splits_are_disjoint_and_cover_every_class() -> None:
    sizes = {"huffpost": 41, "reuters": 31, "amazon": 24, "20newsgroup": 20, "rcv1": 71, "fewrel": 80}
    for dataset, splits in BAO_SPLITS.items():
        assert sorted(itertools.chain(*splits)) == list(range(sizes[dataset])), dataset


def test_fewrel_marks_first_mentions_holds_out_val_relations_and_tests_on_val_wiki(tmp_path: Path) -> None:
    root = fewrel_folder(tmp_path / "fewrel")
    data = json.loads((root / "train_wiki.json").read_text())
    data["P0"][0] = {"tokens": ["In", "1987", ",", "the", "Cape", "Bridge", "crossed", "the", "Mississippi", "."],
                     "h": ["cape bridge", "Q1", [[4, 5], [9]]], "t": ["mississippi", "Q2", [[8]]]}
    (root / "train_wiki.json").write_text(json.dumps(data))
    (root / "pid2name.json").write_text(json.dumps({"P0": ["crosses", "obstacle crossed"], "P99": ["x", "y"]}))
    family = FewRelTexts(root=str(root), val_relations=5, split_seed=0)
    splits = {split: family.read_texts(split) for split in ("train", "val", "test")}
    assert [len(splits[s].class_names) for s in splits] == [15, 5, 8]
    pids = {split: {name.split()[0] for name in texts.class_names} for split, texts in splits.items()}
    assert not pids["train"] & pids["val"] and pids["train"] | pids["val"] == {f"P{r}" for r in range(20)}
    assert splits["test"].class_names == sorted(f"P{r}" for r in range(20, 28))
    texts = splits["train"].texts if "P0 (crosses)" in splits["train"].class_names else splits["val"].texts
    assert "In 1987 , the [E1] Cape Bridge [/E1] crossed the [E2] Mississippi [/E2] ." in texts
    assert FewRelTexts(root=str(root), val_relations=5, split_seed=0).read_texts("val").class_names == (
        splits["val"].class_names)  # the split is fixed by split_seed
    tokens = family.tokenizer.encode(splits["test"].texts[0]).tokens
    assert tokens.count("[E1]") == tokens.count("[/E2]") == 1  # markers are whole tokens


def bad_lines(tmp_path: Path, text: str) -> JsonLinesTexts:
    path = tmp_path / "bad.json"
    path.write_text(text)
    return JsonLinesTexts(path=str(path), train_classes=[0], val_classes=[1], test_classes=[2])


def test_jsonl_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    good = '{"text": ["a"], "label": 0}\n'
    with pytest.raises(DataMissingError, match=r"^task.path=/nonexistent/h.json does not exist: give a JSON-lines "
                                               r"file, one \{\"text\""):
        JsonLinesTexts(path="/nonexistent/h.json", dataset="huffpost").read_texts("train")
    with pytest.raises(ConfigError, match=rf"^task.path={re.escape(str(tmp_path))}/bad.json:2: not a line of .* fix "
                                          r"or remove the line$"):
        bad_lines(tmp_path, good + "not json\n").read_texts("train")
    with pytest.raises(ConfigError, match=r"bad.json:1: not a line of .*\(no key 'label'\)"):
        bad_lines(tmp_path, '{"text": ["a"]}\n').read_texts("train")
    with pytest.raises(ConfigError, match=r"^task.val_classes: class 1 has no example in task.path=.*bad.json: remove "
                                          r"it from the split or check task.dataset=custom$"):
        bad_lines(tmp_path, good).read_texts("train")
    with pytest.raises(ConfigError, match=r"^task.train_classes and task.test_classes share \[3\]: a class goes to "
                                          r"one split$"):
        JsonLinesTexts(path="x", train_classes=[0, 3], val_classes=[1], test_classes=[3])
    (tmp_path / "one.json").write_text(good)
    with pytest.raises(ConfigError, match=r"^task.dataset=custom needs task.val_classes, task.test_classes: list "):
        JsonLinesTexts(path=str(tmp_path / "one.json"), train_classes=[0]).read_texts("train")
    with pytest.raises(ConfigError, match=r"^task.dataset must be one of huffpost, .*custom, got 'hufpost'$"):
        JsonLinesTexts(path="x", dataset="hufpost")


def test_fewrel_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match=r"^task.root=/nonexistent/fewrel holds no train_wiki.json and "
                                               r"val_wiki.json: point it at FewRel 1.0's data folder"):
        FewRelTexts(root="/nonexistent/fewrel").read_texts("train")
    root = fewrel_folder(tmp_path / "fewrel", train=6, val=2, per_class=2)
    with pytest.raises(ConfigError, match=r"^task.val_relations=6 but train_wiki.json has 6 relations: hold out "):
        FewRelTexts(root=str(root), val_relations=6).read_texts("train")
    with pytest.raises(ConfigError, match=r"^task.test_file=train_wiki.json shares relations \['P0', "):
        FewRelTexts(root=str(root), test_file="train_wiki.json").read_texts("train")
    (root / "val_wiki.json").write_text(json.dumps({"P9": [{"tokens": ["a"], "h": ["a", "Q1", []]}]}))
    with pytest.raises(ConfigError, match=r"val_wiki.json: instance 0 of P9 is not FewRel's \{tokens, h, t\}"):
        FewRelTexts(root=str(root), val_relations=2).read_texts("train")
    with pytest.raises(ConfigError, match=r"^task.val_relations must be >= 1, got 0$"):
        FewRelTexts(root=str(root), val_relations=0)


SHORT = ["algorithm=protonet", "task.vocab_size=500", "task.max_length=32", "model.embedding_size=32",
         "model.filters=16", "task.meta_batch_size=2", "task.val_tasks=10", "task.test_tasks=100",
         "task.eval_batch_size=50", "trainer.max_steps=40", "trainer.val_check_interval=40",
         "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("task", ["text_jsonl", pytest.param("fewrel", marks=pytest.mark.slow)])  # ~9 s each
def test_protonet_learns_generated_files_end_to_end(tmp_path: Path, task: str) -> None:
    if task == "text_jsonl":
        data = ["task.dataset=huffpost", f"task.path={bao_file(tmp_path / 'huffpost.json', 41, 30)}"]
    else:
        data = [f"task.root={fewrel_folder(tmp_path / 'fewrel')}", "task.val_relations=5"]
    result = run_cli([f"task={task}", *data, *SHORT, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("MLflow run id: ")[1].split()[0]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["meta_test/post_acc"] > 0.4, run.data.metrics  # 5-way: chance is 0.2


@pytest.mark.parametrize(("task", "key"), [("text_jsonl", "task.path=/nonexistent/huffpost.json"),
                                           ("fewrel", "task.root=/nonexistent/fewrel")])
def test_missing_files_exit_3_with_one_line_naming_the_key(tmp_path: Path, task: str, key: str) -> None:
    result = run_cli([f"task={task}", key, "task.dataset=huffpost" if task == "text_jsonl" else "task.val_relations=16",
                      "algorithm=protonet", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"metalab: error: {key} ")


@pytest.mark.slow  # ~14 s: two processes; tests/test_reproduce.py's missing-data test runs the same path
def test_fewrel_preset_without_its_data_is_no_data(tmp_path: Path) -> None:
    result = reproduce_cli(["protonet_fewrel_5w1s", "--budget", "smoke", "task.root=/nonexistent/fewrel"], tmp_path)
    assert result.returncode == 1
    assert "| protonet_fewrel_5w1s |" in result.stdout and "| no data |" in result.stdout
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "task.root=/nonexistent/fewrel holds no train_wiki.json" in line


@pytest.mark.parametrize(("name", "shots", "published"), [("protonet_fewrel_5w1s", 1, 69.20),
                                                          ("protonet_fewrel_5w5s", 5, 84.79)])
def test_fewrel_presets_pin_the_official_code_s_protocol(job, name: str, shots: int, published: float) -> None:
    cfg = job(f"experiment={name}", "tracking=none")
    task, model = cfg.task, cfg.model
    assert (task.ways, task.shots, task.queries, task.train_ways, task.meta_batch_size) == (5, shots, 5, 10, 4)
    assert (task.test_file, task.test_tasks, cfg.trainer.max_steps) == ("val_wiki.json", 10000, 30000)
    assert (model.embedding_size, model.filters, list(model.widths)) == (50, 230, [3])
    assert cfg.reproduction.published == published and "hidden test set" in cfg.reproduction.note
