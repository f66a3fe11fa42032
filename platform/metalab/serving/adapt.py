"""``metalab adapt MODEL --support DIR --query DIR``: adapt a logged learner to images in folders and print each
query's predicted class and score.

``MODEL`` is a run id (its artifact ``model``) or any MLflow model URI (``models:/NAME/VERSION``, ``runs:/ID/model``,
a local model folder such as a run's ``<output dir>/model``). The support folder holds one sub-folder per class
(``<class>/*.png``; classes numbered in the order of their sorted names), the query folder the images to classify.
Images are read as the run's family serves them: grey or RGB as the model takes, pixel / 255, at the model's size.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from metalab._quiet import quiet_mlflow_models
from metalab.errors import ConfigError, DataMissingError
from metalab.serving.problem import LABEL, QUERY, SET, SUPPORT, ProblemSpec
from metalab.tracking.registry import model_uri
from metalab.tracking.uri import DEFAULT_TRACKING_URI, default_tracking_uri

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run id, or a model URI: models:/NAME/VERSION, runs:/ID/model, a model folder")
    parser.add_argument("--support", type=Path, required=True, help="one sub-folder of images per class")
    parser.add_argument("--query", type=Path, required=True, help="the images to classify")
    parser.add_argument("--tracking-uri", help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}")


def run(arguments: argparse.Namespace) -> None:
    support = class_folders(arguments.support)
    queries = images_in(arguments.query, "--query")
    model = load(arguments.model, arguments.tracking_uri)
    spec = model.unwrap_python_model().spec
    if spec.problem != "classification" or spec.inputs != "images":
        raise ConfigError(f"{arguments.model} learns {spec.problem} of {spec.inputs}, and metalab adapt classifies "
                          "images: call its predict (mlflow.pyfunc.load_model) with a problem table instead")
    if spec.ways is not None and len(support) != spec.ways:
        raise ConfigError(f"--support {arguments.support} has {len(support)} class folders but the model was "
                          f"meta-trained for {spec.ways}-way problems: give {spec.ways} classes")
    rows = [(SUPPORT, read_image(file, spec), label) for label, (_, files) in enumerate(support) for file in files]
    rows += [(QUERY, read_image(file, spec), -1) for file in queries]
    answers = model.predict(pd.DataFrame(rows, columns=[SET, spec.example, LABEL]))
    names = [name for name, _ in support]
    width = max(len(file.name) for file in queries)
    for file, label, score in zip(queries, answers[LABEL], answers["score"], strict=True):
        print(f"{file.name:<{width}}  {names[int(label)]}  {float(score):.4f}")


def load(model: str, tracking_uri: str | None) -> PyFuncModel:
    """The model a run id or URI names; one line when there is none."""
    import mlflow.pyfunc  # here: `metalab --help` imports no torch (the model's learner does)
    from mlflow.exceptions import MlflowException

    from metalab.serving.model import FewShotModel

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    uri = model if ":" in model or Path(model).exists() else model_uri(model)
    try:
        with quiet_mlflow_models():
            loaded = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as error:
        what = f"run {model}" if uri != model else model
        raise ConfigError(f"{what}: no metalab model there in {mlflow.get_tracking_uri()} ({error.__class__.__name__}: "
                          f"{' '.join(str(error).split())[:160]}): give a run id of a finished run, or a model URI "
                          "(models:/NAME/VERSION)") from None
    if not isinstance(loaded.unwrap_python_model(), FewShotModel):
        raise ConfigError(f"{model} is an MLflow model, but not a metalab learner: give a metalab run's model")
    return loaded


def class_folders(folder: Path) -> list[tuple[str, list[Path]]]:
    """``folder``'s class sub-folders, sorted by name, each with its images."""
    if not folder.is_dir():
        raise DataMissingError(f"--support {folder} is not a folder: give one holding a sub-folder of images per class "
                               "(<class>/*.png)")
    classes = sorted(path for path in folder.iterdir() if path.is_dir())
    if not classes:
        raise DataMissingError(f"--support {folder} holds no class sub-folders: put each class's images in "
                               "<class>/*.png")
    return [(path.name, images_in(path, f"--support class {path.name!r}")) for path in classes]


def images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DataMissingError(f"{what} {folder} is not a folder: give a folder of images")
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataMissingError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(file: Path, spec: ProblemSpec) -> np.ndarray:
    """One image as the family serves it: grey or RGB as the model takes, pixel / 255, (C, H, W) flattened."""
    channels, height, width = spec.shape
    try:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"{file} is not an image that can be read ({error}): remove it or convert it") from None
    if pixels.shape[:2] != (height, width):
        raise ConfigError(f"{file} is {pixels.shape[1]}×{pixels.shape[0]} px and the model takes {width}×{height}: "
                          f"resize the images to {width}×{height}")
    return (pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)).reshape(-1)
