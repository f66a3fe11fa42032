"""Few-shot text classification from files in two published formats.

- :class:`JsonLinesTexts` (``task=text_jsonl``): Bao et al. (2020)'s JSON lines, one ``{"text": [tokens], "label":
  int}`` per line, with their fixed class splits (HuffPost, Amazon, 20 Newsgroups, Reuters, RCV1, FewRel) or yours.
- :class:`FewRelTexts` (``task=fewrel``): FewRel 1.0's ``{relation: [{"tokens", "h", "t"}]}`` files (Han et al. 2018).

Relations are given to the encoder as text with the entity markers of :data:`~metalab.tasks.texts.ENTITY_MARKERS`
around the head and tail (Soares et al. 2019), so any text encoder sees which entities the relation is between.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.classification import SPLITS
from metalab.tasks.texts import ENTITY_MARKERS, TextClassFamily, Texts

# Bao et al.'s class splits (train, val, test), verbatim from YujiaBao/Distributional-Signatures src/dataset/loader.py
# @ e04970ff6399d34d439bc128fdd5b66d0eb49592 (_get_<dataset>_classes). 20newsgroup's is computed there from the
# newsgroup names (train sci.* + rec.*, val comp.*, test the rest); these are the ids that code gives.
BAO_SPLITS: dict[str, tuple[list[int], list[int], list[int]]] = {
    "huffpost": (list(range(20)), list(range(20, 25)), list(range(25, 41))),
    "reuters": (list(range(15)), list(range(15, 20)), list(range(20, 31))),
    "amazon": ([2, 3, 4, 7, 11, 12, 13, 18, 19, 20], [1, 22, 23, 6, 9], [0, 5, 14, 15, 8, 10, 16, 17, 21]),
    "20newsgroup": ([1, 5, 10, 11, 13, 14, 16, 18], [4, 6, 7, 12, 17], [0, 2, 3, 8, 9, 15, 19]),
    "rcv1": ([1, 2, 12, 15, 18, 20, 22, 25, 27, 32, 33, 34, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52,
              53, 54, 55, 56, 57, 58, 59, 60, 61, 66],
             [5, 24, 26, 28, 29, 31, 35, 23, 67, 36],
             [0, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 16, 17, 19, 21, 30, 37, 62, 63, 64, 65, 68, 69, 70]),
    "fewrel": ([0, 1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 19, 21, 22, 24, 25, 26, 27, 28, 30, 31, 32, 33, 34,
                35, 36, 37, 38, 39, 40, 41, 43, 44, 45, 46, 48, 49, 50, 52, 53, 56, 57, 58, 59, 61, 62, 63, 64, 66, 67,
                68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78],
               [7, 9, 17, 18, 20],
               [23, 29, 42, 47, 51, 54, 55, 60, 65, 79]),  # "head=WORK_OF_ART validation/test split", not FewRel's
}
DATASETS = (*BAO_SPLITS, "custom")
JSONL_FORMAT = 'one {"text": [tokens] or "a string", "label": int} per line (Bao et al. 2020)'
FEWREL_FILES = ("train_wiki.json", "val_wiki.json")
FEWREL_FORMAT = '{relation id: [{"tokens": [...], "h": [name, id, [[positions]]], "t": [...]}, ...]} (FewRel 1.0)'


def mark_entities(tokens: list[str], head: tuple[int, int], tail: tuple[int, int]) -> list[str]:
    """``tokens`` with ``[E1] … [/E1]`` around tokens ``head[0]..head[1]`` (inclusive) and ``[E2] … [/E2]`` around
    ``tail``'s."""
    opening, closing = defaultdict(list), defaultdict(list)
    for (start, end), (begin, finish) in ((head, ENTITY_MARKERS[:2]), (tail, ENTITY_MARKERS[2:])):
        opening[start].append(begin)
        closing[end].append(finish)
    marked = []
    for index, token in enumerate(tokens):
        marked += [*opening[index], token, *reversed(closing[index])]  # nested spans close inside out
    return marked


class JsonLinesTexts(TextClassFamily):
    """Bao et al. (2020)'s JSON-lines files ("Few-shot Text Classification with Distributional Signatures", ICLR;
    data in github.com/YujiaBao/Distributional-Signatures' data.zip): one example per line, ``text`` a token list
    (or a string) and ``label`` an int; other keys (``raw``, ...) are ignored. FewRel lines' ``head`` and ``tail``
    ([start, end] token positions, end inclusive as their ``pos.py`` reads them) get the entity markers. Texts are
    the tokens joined by spaces. Examples of a class in no split are left out.

    Arguments:
        path: the ``.json`` file.
        dataset: whose class split: huffpost, amazon, 20newsgroup, reuters, rcv1, fewrel (Bao et al.'s, see
            :data:`BAO_SPLITS`) or custom (``train_classes``, ``val_classes`` and ``test_classes`` required).
        train_classes, val_classes, test_classes: label ids of each split (``null``: the dataset's).
        label_names: a name per label id (``{"0": "politics"}``); others are named ``label<id>``.
        kwargs: :class:`~metalab.tasks.texts.TextClassFamily`'s.
    """

    name = "text_jsonl"

    def __init__(self, *, path: str, dataset: str = "custom", train_classes: list[int] | None = None,
                 val_classes: list[int] | None = None, test_classes: list[int] | None = None,
                 label_names: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dataset not in DATASETS:
            raise ConfigError(f"task.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
        given = {"train": train_classes, "val": val_classes, "test": test_classes}
        # task=custom's lists are checked when read (prepare(), before training): the YAML's defaults must build
        self.unset = [f"task.{split}_classes" for split, classes in given.items() if classes is None]
        published = dict(zip(SPLITS, BAO_SPLITS.get(dataset, ([], [], [])), strict=True))
        self.classes = {split: list(given[split]) if given[split] is not None else published[split]
                        for split in SPLITS}
        for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sorted(set(self.classes[first]) & set(self.classes[second]))
            if both:
                raise ConfigError(f"task.{first}_classes and task.{second}_classes share {both}: a class goes to one "
                                  "split")
        self.path, self.dataset, self.label_names = path, dataset, dict(label_names or {})
        self.name = "text_jsonl" if dataset == "custom" else f"{dataset}_jsonl"  # the MLflow experiment
        self._texts: dict[str, Texts] | None = None

    def read_texts(self, split: str) -> Texts:
        if self._texts is None:
            by_label = self._read_file()  # first: a missing file is "no data" whatever the split
            if self.dataset == "custom" and self.unset:
                raise ConfigError(f"task.dataset=custom needs {', '.join(self.unset)}: list the label ids of each "
                                  "split, or set task.dataset to one of Bao et al.'s data sets")
            self._texts = {}
            for name in SPLITS:
                empty = [label for label in self.classes[name] if label not in by_label]
                if empty:
                    raise ConfigError(f"task.{name}_classes: class {empty[0]} has no example in task.path="
                                      f"{self.path}: remove it from the split or check task.dataset={self.dataset}")
                pairs = [(text, index) for index, label in enumerate(self.classes[name]) for text in by_label[label]]
                self._texts[name] = Texts([text for text, _ in pairs], [index for _, index in pairs],
                                          [self.label_names.get(str(label), f"label{label}")
                                           for label in self.classes[name]])
        return self._texts[split]

    def _read_file(self) -> dict[int, list[str]]:
        """Every line's text by label."""
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise DataMissingError(f"task.path={self.path} does not exist: give a JSON-lines file, {JSONL_FORMAT} "
                                   "(e.g. huffpost.json from Bao et al.'s data.zip)")
        by_label: dict[int, list[str]] = defaultdict(list)
        with open(file, encoding="utf-8", errors="ignore") as lines:  # errors="ignore" as Bao et al.'s loader
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text, label = row["text"], int(row["label"])
                    tokens = text.split() if isinstance(text, str) else [str(token) for token in text]
                    if "head" in row and "tail" in row:
                        tokens = mark_entities(tokens, tuple(row["head"]), tuple(row["tail"]))
                except (ValueError, KeyError, TypeError) as error:
                    problem = f"no key {error}" if isinstance(error, KeyError) else str(error)
                    raise ConfigError(f"task.path={self.path}:{number}: not a line of {JSONL_FORMAT} ({problem}): fix "
                                      "or remove the line") from None
                by_label[label].append(" ".join(tokens))
        return by_label

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(Path(self.path).expanduser())}


class FewRelTexts(TextClassFamily):
    """FewRel 1.0 (Han et al., "FewRel: A Large-Scale Supervised Few-Shot Relation Classification Dataset with
    State-of-the-Art Evaluation", EMNLP 2018; github.com/thunlp/FewRel): relations of Wikidata between two entities
    of a Wikipedia sentence. Each instance's text is its tokens joined by spaces, with ``[E1] … [/E1]`` around the
    head's first mention and ``[E2] … [/E2]`` around the tail's (the official loader, too, uses the first mention).

    Splits: the public files hold 64 training relations (``train_wiki.json``) and 16 validation relations
    (``val_wiki.json``); the 20 test relations are hidden (scored on the authors' server), so papers report on
    ``val_wiki.json``. Here ``val_relations`` of the 64 are held out (drawn with ``split_seed`` from the sorted ids)
    to validate on, the rest train, and ``test_file`` (``val_wiki.json``) is tested on.

    Arguments:
        root: the folder holding ``train_wiki.json`` and ``val_wiki.json`` (and ``pid2name.json``, optional: its
            names are added to the relation ids).
        val_relations: training relations held out for validation.
        split_seed: draws them.
        test_file: the file under ``root`` tested on (``test_wiki.json`` where you have the labelled test set).
        kwargs: :class:`~metalab.tasks.texts.TextClassFamily`'s.
    """

    name = "fewrel"

    def __init__(self, *, root: str, val_relations: int = 16, split_seed: int = 0,
                 test_file: str = "val_wiki.json", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if val_relations < 1:
            raise ConfigError(f"task.val_relations must be >= 1, got {val_relations}")
        self.root, self.val_relations, self.split_seed, self.test_file = root, val_relations, split_seed, test_file
        self._texts: dict[str, Texts] | None = None

    def read_texts(self, split: str) -> Texts:
        if self._texts is None:
            self._texts = self._read_all()
        return self._texts[split]

    def _read_all(self) -> dict[str, Texts]:
        folder = Path(self.root).expanduser()
        missing = [name for name in (FEWREL_FILES[0], self.test_file) if not (folder / name).is_file()]
        if missing:
            raise DataMissingError(f"task.root={self.root} holds no {' and '.join(missing)}: point it at FewRel 1.0's "
                                   f"data folder ({', '.join(FEWREL_FILES)}: {FEWREL_FORMAT}, from "
                                   "github.com/thunlp/FewRel)")
        training, testing = read_fewrel(folder / FEWREL_FILES[0]), read_fewrel(folder / self.test_file)
        shared = sorted(set(training) & set(testing))
        if shared:
            raise ConfigError(f"task.test_file={self.test_file} shares relations {shared[:5]} with "
                              f"{FEWREL_FILES[0]}: test on relations not trained on (val_wiki.json)")
        if self.val_relations >= len(training):
            raise ConfigError(f"task.val_relations={self.val_relations} but {FEWREL_FILES[0]} has {len(training)} "
                              f"relations: hold out fewer (task.val_relations < {len(training)})")
        held_out = set(random.Random(self.split_seed).sample(sorted(training), self.val_relations))
        names = _relation_names(folder / "pid2name.json")
        relations = {"train": {pid: texts for pid, texts in training.items() if pid not in held_out},
                     "val": {pid: texts for pid, texts in training.items() if pid in held_out}, "test": testing}
        splits = {}
        for split, by_relation in relations.items():
            ids = sorted(by_relation)
            pairs = [(text, label) for label, pid in enumerate(ids) for text in by_relation[pid]]
            splits[split] = Texts([text for text, _ in pairs], [label for _, label in pairs],
                                  [f"{pid} ({names[pid]})" if pid in names else pid for pid in ids])
        return splits

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(Path(self.root).expanduser())}


def read_fewrel(file: Path) -> dict[str, list[str]]:
    """A FewRel 1.0 file's instances by relation id, each its tokens with the entity markers, joined by spaces."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{file} is not JSON ({error}): give FewRel 1.0's file, {FEWREL_FORMAT}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a {type(data).__name__}, not {FEWREL_FORMAT}")
    texts = {}
    for relation, instances in data.items():
        texts[relation] = []
        for index, instance in enumerate(instances):
            try:
                head, tail = instance["h"][2][0], instance["t"][2][0]  # each entity's first mention's token indices
                marked = mark_entities(list(instance["tokens"]), (min(head), max(head)), (min(tail), max(tail)))
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise ConfigError(f"{file}: instance {index} of {relation} is not FewRel's {{tokens, h, t}} "
                                  f"({type(error).__name__}: {error}): fix or remove it") from None
            texts[relation].append(" ".join(marked))
    return texts


def _relation_names(file: Path) -> dict[str, str]:
    """``pid2name.json``'s names (``{"P177": ["crosses", "..."]}``) if present; a ``/`` would read as a class group."""
    if not file.is_file():
        return {}
    try:
        return {pid: str(entry[0]).replace("/", "|") for pid, entry in json.loads(file.read_text("utf-8")).items()}
    except (ValueError, AttributeError, IndexError, KeyError, TypeError) as error:
        raise ConfigError(f"{file} is not FewRel's pid2name.json ({{pid: [name, description]}}: {error}): fix or "
                          "remove it") from None
