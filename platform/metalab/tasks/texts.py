"""Few-shot text classification: texts tokenised once into fixed-length token ids, served as ``{"ids", "mask"}``.

The tokeniser is Hugging Face ``tokenizers``' byte-pair encoding (BPE), trained on the family's training split alone
(no vocabulary comes from the classes a run is tested on), or one a user has on disk (``task.tokenizer``: a
``tokenizer.json``, e.g. a pretrained model's). Every text is cut or padded to ``max_length`` tokens, so the
episodes of a meta-batch share one shape (stacked, and ``runner.backend=vmap`` can run them).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from metalab.errors import ConfigError
from metalab.tasks.classification import SPLITS, ClassificationFamily, LabelledItems

PAD, UNK = "[PAD]", "[UNK]"
ENTITY_MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")  # around a relation's head and tail (Soares et al. 2019)


@dataclass
class Texts:
    """All texts of one split: ``texts[i]`` is of class ``class_names[labels[i]]``."""

    texts: list[str]
    labels: list[int]
    class_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")


def train_tokenizer(texts: list[str], vocab_size: int, lowercase: bool) -> Tokenizer:
    """A BPE tokeniser (BERT's normaliser and pre-tokeniser) learnt from ``texts``, with ``[PAD]`` = 0, ``[UNK]`` = 1
    and the entity markers as whole tokens; the same texts give the same tokeniser in every process.

    BPE with no continuing-subword marker, not WordPiece: ``tokenizers``' WordPiece trainer numbers its ``##``
    tokens in hash-map order, which changes from process to process and with it, through ties, the vocabulary
    learnt (huggingface/tokenizers#1794; metalab saw one token in 8,000 differ in one run of five).
    """
    tokenizer = Tokenizer(BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, *ENTITY_MARKERS],
                                                    show_progress=False))
    return tokenizer


class TextClassFamily(ClassificationFamily):
    """Few-shot text classification (episodes and ``sampler`` as
    :class:`~metalab.tasks.classification.ClassificationFamily`). Subclasses read each split's texts
    (:meth:`read_texts`); this class tokenises them. Inputs are ``{"ids": (n, max_length) int64,
    "mask": (n, max_length) bool}`` (``mask``: a real token, not padding).

    Arguments:
        vocab_size: the tokeniser's vocabulary (trained: at most this many tokens) and so the encoders'
            embedding rows (``model.vocab_size: ${task.vocab_size}``).
        max_length: tokens per text; longer texts are cut, shorter ones padded.
        lowercase: whether the trained tokeniser lower-cases (and strips accents).
        tokenizer: a ``tokenizer.json`` to use instead of training one (``null``: train on the training split).
        kwargs: :class:`ClassificationFamily`'s.
    """

    examples = "texts"

    def __init__(self, *, vocab_size: int = 8000, max_length: int = 64, lowercase: bool = True,
                 tokenizer: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key, value in {"vocab_size": vocab_size, "max_length": max_length}.items():
            if value < 8:
                raise ConfigError(f"task.{key} must be >= 8, got {value}")
        self.vocab_size, self.max_length, self.lowercase = vocab_size, max_length, lowercase
        self.tokenizer_file = Path(tokenizer).expanduser() if tokenizer else None
        self._tokenizer: Tokenizer | None = None
        self._splits: dict[str, LabelledItems] = {}

    @abstractmethod
    def read_texts(self, split: str) -> Texts:
        """The texts of ``split`` ("train", "val" or "test"); raise ConfigError (DataMissingError where files are
        absent) naming what is wrong."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokeniser, read from ``task.tokenizer`` or trained on the training split on first use."""
        if self._tokenizer is None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else a later fork (DataLoader) warns
            self._tokenizer = self._read_tokenizer() if self.tokenizer_file else train_tokenizer(
                self.read_texts("train").texts, self.vocab_size, self.lowercase)
            size = self._tokenizer.get_vocab_size()
            if size > self.vocab_size:
                raise ConfigError(f"task.tokenizer={self.tokenizer_file} has {size} tokens but task.vocab_size="
                                  f"{self.vocab_size}: set task.vocab_size={size}")
            self._tokenizer.enable_truncation(self.max_length)
            self._tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=self.max_length)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        found = self._tokenizer.token_to_id(PAD) if self._tokenizer is not None else None
        return 0 if found is None else found

    def _read_tokenizer(self) -> Tokenizer:
        if not self.tokenizer_file.is_file():
            raise ConfigError(f"task.tokenizer={self.tokenizer_file} does not exist: give a tokenizer.json (Hugging "
                              "Face tokenizers' format) or task.tokenizer=null to train one on the training split")
        try:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        except Exception as error:  # tokenizers raises its own Exception type for a malformed file
            raise ConfigError(f"task.tokenizer={self.tokenizer_file} is no tokenizer.json ({error}): give a file "
                              "saved by Hugging Face tokenizers") from None
        tokenizer.add_special_tokens(list(ENTITY_MARKERS))  # whole tokens, as a trained tokeniser has them
        return tokenizer

    def load_split(self, split: str) -> LabelledItems:
        """``split``'s texts as token ids (N, max_length), tokenised once."""
        if split not in self._splits:
            texts = self.read_texts(split)
            tokenizer = self.tokenizer
            ids = [encoding.ids for encoding in tokenizer.encode_batch(texts.texts)] if texts.texts else []
            self._splits[split] = LabelledItems(torch.tensor(ids, dtype=torch.long).reshape(-1, self.max_length),
                                                torch.tensor(texts.labels, dtype=torch.long), texts.class_names)
        return self._splits[split]

    def serve(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ids": items, "mask": items != self.pad_id}

    def data_description(self) -> dict[str, str]:
        description = super().data_description()
        lengths = [int(self.serve(self.load_split(split).items)["mask"].sum(1).float().mean()) for split in SPLITS]
        return description | {"tokens_per_text": "/".join(map(str, lengths)),
                              "tokenizer": str(self.tokenizer_file or f"BPE trained on the training split, "
                                                                      f"{self.tokenizer.get_vocab_size()} tokens")}
