"""Task families: each a LightningDataModule that yields meta-batches of few-shot episodes."""

from metalab.tasks.base import TaskFamily
from metalab.tasks.cheetah import CheetahDirection, CheetahVelocity
from metalab.tasks.environments import EnvironmentFamily, EnvironmentTasks
from metalab.tasks.episodes import Episodes
from metalab.tasks.folder import ImageFolder
from metalab.tasks.glyphs import PrintedGlyphs
from metalab.tasks.images import ImageClassFamily, LabelledImages
from metalab.tasks.kanji import KanjiHandwriting
from metalab.tasks.meta_dataset_records import MetaDatasetSource
from metalab.tasks.mini_imagenet import MiniImageNet
from metalab.tasks.multi_source import MultiSource
from metalab.tasks.nav2d import Nav2D
from metalab.tasks.omniglot import Omniglot
from metalab.tasks.pendulum import Pendulum
from metalab.tasks.sinusoid import SinusoidLineRegression, SinusoidRegression
from metalab.tasks.text_files import FewRelTexts, JsonLinesTexts
from metalab.tasks.texts import TextClassFamily
from metalab.tasks.wordnet import WordNetGlosses

__all__ = [
    "CheetahDirection",
    "CheetahVelocity",
    "EnvironmentFamily",
    "EnvironmentTasks",
    "Episodes",
    "FewRelTexts",
    "ImageClassFamily",
    "ImageFolder",
    "JsonLinesTexts",
    "KanjiHandwriting",
    "LabelledImages",
    "MetaDatasetSource",
    "MiniImageNet",
    "MultiSource",
    "Nav2D",
    "Omniglot",
    "Pendulum",
    "PrintedGlyphs",
    "SinusoidLineRegression",
    "SinusoidRegression",
    "TaskFamily",
    "TextClassFamily",
    "WordNetGlosses",
]
