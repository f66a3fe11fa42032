"""The generated config schemas (:func:`metalab.config.schema_for`) kept on disk, so that composing a config
imports no ``_target_``: ``metalab-train --help`` and ``--cfg job`` then import neither torch nor Lightning,
MLflow or learn2learn (generating the schemas of metalab's algorithms imports all of them: ~7 s).

One JSON file per checkout of metalab, ``$XDG_CACHE_HOME/metalab/schemas-<key>.json`` (default
``~/.cache/metalab``), holds per target the schema's fields: name, OmegaConf type (a description
:func:`decode_type` rebuilds) and default; :meth:`SchemaCache.get` rebuilds the dataclass with
``make_dataclass`` and imports nothing. A schema is used from the file only while what it was read from is
unchanged, else generated again (importing the target) and the file rewritten:

- the file's key: the content of every ``.py`` file of the metalab package (any edit of metalab, or another
  checkout, gets another file) and Python's version;
- per target, the packages of the classes the schema was read from (the target, the base classes its
  ``**kwargs`` reach, the classes in its annotations): an installed distribution's version
  (``importlib.metadata``), or for a package outside site-packages (a user's own) the content of its ``.py``
  files. metalab's own are the file's key; the standard library's follow Python's version.

The YAML of ``conf/`` is no part of the key: it only names a target, and a target the file lacks is generated.
A file that is missing, stale or unreadable is regenerated; one that cannot be written (a read-only home) is
skipped: the schemas are then generated in each process, as without a cache. Not traced: a type alias
(``Size = int | None``) imported from another package into an annotation (an alias carries no module of its own);
such a package's upgrade is seen when metalab or the target's own package changes. Deleting the files is
always safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import json
import os
import site
import sys
import sysconfig
import time
import types
import typing
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import metalab

FORMAT = 1  # of the file's content: a change of it makes older files stale
PRUNE_AFTER_S = 30 * 24 * 3600  # files of other checkouts or older sources, untouched this long, are removed
PRIMITIVE_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Any": Any}

# schema_for's result and the modules of the classes it read (their top-level packages are the entry's sources).
SchemaGenerator = Callable[[str, tuple[str, ...]], tuple[type, set[str]]]


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/metalab``, default ``~/.cache/metalab`` (where the empty MLflow store is kept too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metalab"


def hash_sources(locations: Iterable[str | Path]) -> str:
    """SHA-256 over the ``.py`` files at ``locations`` (files, or folders searched recursively): names and content."""
    digest = hashlib.sha256()
    for location in locations:
        location = Path(location)
        files = sorted(location.rglob("*.py")) if location.is_dir() else [location]
        for path in files:
            digest.update(str(path.relative_to(location.parent)).encode() + b"\0")
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def metalab_key() -> str:
    """What every cached schema depends on: metalab's sources, Python's version and the file format."""
    sources = hash_sources([Path(metalab.__file__).parent])
    return hashlib.sha256(f"{FORMAT} {sys.version} {sources}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Types and defaults as JSON. metalab.config._config_type returns int, float, str, bool, Any, an Enum class,
# list[X], dict[str, X] or X | None of these; anything else has no description and its schema is not cached.


def encode_type(kind: Any) -> Any:
    for name, primitive in PRIMITIVE_TYPES.items():
        if kind is primitive:
            return name
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return {"optional": encode_type(next(arg for arg in args if arg is not type(None)))}
    if origin is list and len(args) == 1:
        return {"list": encode_type(args[0])}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"dict": encode_type(args[1])}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return {"enum": f"{kind.__module__}:{kind.__qualname__}"}
    raise TypeError(f"no description for {kind!r}")


def decode_type(description: Any) -> Any:
    """The type :func:`encode_type` described, built as metalab.config._config_type builds it."""
    if isinstance(description, str):
        return PRIMITIVE_TYPES[description]
    ((key, value),) = description.items()
    if key == "optional":
        return decode_type(value) | None
    if key == "list":
        return list[decode_type(value)]
    if key == "dict":
        return dict[str, decode_type(value)]
    if key == "enum":  # OmegaConf needs the class itself: imports its module (no current target has an Enum)
        return _import_attribute(value)
    raise ValueError(f"unknown type description {description!r}")


def _import_attribute(path: str) -> Any:
    module, _, qualname = path.partition(":")
    value: Any = importlib.import_module(module)
    for name in qualname.split("."):
        value = getattr(value, name)
    return value


def encode_schema(schema: type) -> dict[str, Any]:
    """The JSON description of a generated schema dataclass; ``TypeError`` if some type or default has none."""
    fields = []
    for item in dataclasses.fields(schema):
        entry: dict[str, Any] = {"name": item.name, "type": encode_type(item.type)}
        if item.default_factory is not dataclasses.MISSING:
            entry["factory"] = item.default_factory()  # a list or dict default, copied per instance
        elif isinstance(item.default, enum.Enum):
            entry["member"] = [f"{type(item.default).__module__}:{type(item.default).__qualname__}", item.default.name]
        else:
            entry["default"] = item.default
        fields.append(entry)
    description = {"name": schema.__name__, "fields": fields}
    json.dumps(description, allow_nan=True, default=_refuse)  # a default JSON cannot hold: TypeError
    return description


def _refuse(value: Any) -> Any:
    raise TypeError(f"no JSON for {value!r}")


def decode_schema(description: dict[str, Any]) -> type:
    """The schema dataclass :func:`encode_schema` described, rebuilt with ``make_dataclass``."""
    fields = []
    for entry in description["fields"]:
        if "factory" in entry:
            copy = list if isinstance(entry["factory"], list) else dict
            spec = dataclasses.field(default_factory=lambda value=entry["factory"], copy=copy: copy(value))
        elif "member" in entry:
            path, name = entry["member"]
            spec = dataclasses.field(default=_import_attribute(path)[name])
        else:
            spec = dataclasses.field(default=entry["default"])
        fields.append((entry["name"], decode_type(entry["type"]), spec))
    return dataclasses.make_dataclass(description["name"], fields)


def schema_fields(schema: type) -> list[tuple[str, Any, str]]:
    """Each field's name, type and default (a factory's value) with its type: what makes two schemas the same
    (``repr`` tells 1 from 1.0 and True, and NaN from any other value)."""
    described = []
    for item in dataclasses.fields(schema):
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        described.append((item.name, item.type, f"{type(default).__qualname__} {default!r}"))
    return described


def same_schema(first: type, second: type) -> bool:
    return first.__name__ == second.__name__ and schema_fields(first) == schema_fields(second)


# ---------------------------------------------------------------------------------------------------------------
# What an entry was read from.


def _site_folders() -> list[Path]:
    folders = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    with contextlib.suppress(AttributeError):  # absent under `python -S`
        folders.add(site.getusersitepackages())
    return [Path(folder).resolve() for folder in folders]


def fingerprint(package: str, distributions: Callable[[str], Iterable[str] | None]) -> dict[str, Any] | None:
    """What identifies the code of top-level ``package`` as installed now: ``{"distributions": {name:
    version}}`` for one in site-packages (``distributions(package)`` names them), else ``{"sources": hash}``
    of its ``.py`` files; ``None`` if it cannot be found. Only the top-level name is looked up: ``find_spec``
    of a submodule would import its parents."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
    if not locations:
        return None
    site_folders = _site_folders()
    if all(any(Path(location).resolve().is_relative_to(folder) for folder in site_folders) for location in locations):
        names = sorted(distributions(package) or ())
        if names:
            try:
                return {"distributions": {name: metadata.version(name) for name in names}}
            except metadata.PackageNotFoundError:
                return None
    return {"sources": hash_sources(locations)}


def top_level_packages(modules: Iterable[str]) -> list[str]:
    """The packages whose code an entry depends on beyond the file's key: not metalab, not the standard library."""
    tops = {module.split(".")[0] for module in modules}
    return sorted(top for top in tops
                  if top != "metalab" and top not in sys.stdlib_module_names and top not in ("builtins", "__main__"))


# ---------------------------------------------------------------------------------------------------------------


class SchemaCache:
    """Generated schemas by target, from ``path`` when still valid (see the module docstring), else from
    ``generate`` (which imports the target); :meth:`save` writes the file if anything was generated."""

    def __init__(self, generate: SchemaGenerator, path: Path | None = None, key: str | None = None) -> None:
        self.generate = generate
        self.key = key or metalab_key()
        self.path = path or cache_folder() / f"schemas-{self.key[:16]}.json"
        self.entries: dict[str, dict[str, Any]] = self._read()
        self.changed = False
        self._current: dict[str, dict[str, Any] | None] = {}  # package → its fingerprint now, looked up once

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            content = json.loads(self.path.read_text())
            if content["key"] == self.key and isinstance(content["schemas"], dict):
                return content["schemas"]
        except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable, half-written by hand ...: regenerated
            pass
        return {}

    def get(self, target: str, injected: tuple[str, ...] = ()) -> type:
        """``schema_for(target, injected)``: rebuilt from the file if its entry is current, else generated."""
        name = target + (f" without {','.join(injected)}" if injected else "")
        entry = self.entries.get(name)
        try:
            if entry is not None and self._current_sources(entry):
                return decode_schema(entry["schema"])
        except Exception:  # an entry edited by hand, an Enum class moved ...: generated again
            pass
        schema, modules = self.generate(target, injected)
        entry = self._describe(schema, modules)
        if entry is not None:
            self.entries[name] = entry
            self.changed = True
        else:
            self.entries.pop(name, None)
        return schema

    def _current_sources(self, entry: dict[str, Any]) -> bool:
        sources = entry.get("sources")
        if not isinstance(sources, dict):
            return False
        for package, recorded in sources.items():
            if package not in self._current:  # the distributions recorded are the ones to ask for their version
                names = recorded.get("distributions") if isinstance(recorded, dict) else None
                self._current[package] = fingerprint(package, lambda _, names=names: names)
            if self._current[package] != recorded:
                return False
        return True

    def _describe(self, schema: type, modules: set[str]) -> dict[str, Any] | None:
        """The file's entry for ``schema``, or ``None`` where it cannot be kept: a type or default JSON cannot
        describe, a package that cannot be found, or a rebuilt schema that would differ from the generated one."""
        try:
            description = encode_schema(schema)
            if not same_schema(decode_schema(json.loads(json.dumps(description))), schema):
                return None
        except Exception:  # whatever the reason, the schema is generated in each process instead
            return None
        if any(module.split(".")[0] == "__main__" for module in modules):
            return None  # a script's own classes: no file to check them against
        sources = {}
        for package in top_level_packages(modules):
            found = fingerprint(package, _installed_distributions().get)
            if found is None:
                return None
            sources[package] = self._current[package] = found
        return {"schema": description, "sources": sources}

    def save(self) -> None:
        """Write the file (atomically: another process reads the old file or the new, never half) if anything
        was generated; keep the entries another process wrote meanwhile. A folder that cannot be written is
        skipped silently."""
        if not self.changed:
            return
        entries = self._read() | self.entries
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"key": self.key, "format": FORMAT, "schemas": entries}, indent=1,
                                          sort_keys=True))
            os.replace(partial, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()
            return
        self.changed = False
        self._prune()

    def _prune(self) -> None:
        """Remove the files of other keys (older sources, other checkouts) untouched for :data:`PRUNE_AFTER_S`."""
        for other in self.path.parent.glob("schemas-*.json"):
            with contextlib.suppress(OSError):
                if other != self.path and other.stat().st_mtime < time.time() - PRUNE_AFTER_S:
                    other.unlink()


_DISTRIBUTIONS: dict[str, list[str]] | None = None


def _installed_distributions() -> dict[str, list[str]]:
    """Top-level package → the distributions that install it (~0.2 s, so only when a schema is generated)."""
    global _DISTRIBUTIONS
    if _DISTRIBUTIONS is None:
        _DISTRIBUTIONS = metadata.packages_distributions()
    return _DISTRIBUTIONS
