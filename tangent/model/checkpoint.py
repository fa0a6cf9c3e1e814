"""A backbone checkpoint on local disk, read without torch: which file holds the weights, its
sha256, and the pretrained config (architecture, input size, normalisation) when there is one.

The ServerApp and the simulation driver resolve a model spec with this module only (they never
import torch); tangent/model/pretrained.py loads the tensors.

Accepted layouts of ``backbone-weights``:

- a ``.safetensors`` file;
- a torch state dict (``.pth``/``.pt``/``.bin``; a dict under ``state_dict``/``model`` is unwrapped);
- timm's pretrained-config layout, as a Hugging Face hub repository of a timm model holds it: a
  directory (or its ``config.json``) with ``config.json`` (``architecture`` and
  ``pretrained_cfg`` with ``input_size``, ``mean``, ``std``) next to ``model.safetensors`` or
  ``pytorch_model.bin``; its ``model_args`` (timm constructor arguments, e.g. depth) are passed
  to ``timm.create_model``. Read offline: nothing is ever downloaded.

A ``.json`` file with the same name as a weights file next to it (``x.safetensors`` +
``x.json``) is read as its pretrained config too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: weights files of timm's pretrained-config layout, in order of preference
LAYOUT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(RuntimeError, ValueError):
    """The backbone weights could not be found, read or matched (never falls back to anything).
    A ValueError too: a bad setting, which the command-line tools report as such."""


@dataclass(frozen=True)
class Checkpoint:
    weights: Path  # the file holding the tensors
    sha256: str  # of that file's bytes: the weights' identity in the model spec
    architecture: str | None = None  # timm name from the pretrained config, when given
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: timm constructor arguments from the config (``model_args``): part of the model's identity
    model_args: tuple[tuple[str, object], ...] = ()

    @property
    def safetensors(self) -> bool:
        return self.weights.suffix == ".safetensors"


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in this process: a Ray worker
    checks the same file for every site it serves."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def read_checkpoint(location: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``location`` (a weights file, a directory or a ``config.json``)."""
    path = Path(location).expanduser()
    if not path.exists():
        raise CheckpointError(f"backbone weights {path} do not exist")
    config_file = None
    if path.is_dir() or path.suffix == ".json":
        directory = path if path.is_dir() else path.parent
        config_file = path if path.suffix == ".json" else directory / "config.json"
        found = [directory / name for name in LAYOUT_WEIGHTS if (directory / name).is_file()]
        if not found:
            raise CheckpointError(f"backbone weights {path}: no {' or '.join(LAYOUT_WEIGHTS)} in {directory}")
        weights = found[0]
    else:
        weights = path
        if path.suffix != ".safetensors" and path.suffix not in STATE_DICT_SUFFIXES:
            raise CheckpointError(f"backbone weights {path}: unknown format {path.suffix!r} (expected "
                                  f".safetensors, a torch state dict {STATE_DICT_SUFFIXES} or a directory "
                                  "with config.json)")
        sidecar = path.with_suffix(".json")
        config_file = sidecar if sidecar.is_file() else None
    config = _read_config(config_file) if config_file is not None and config_file.is_file() else {}
    if path.is_dir() and config_file is not None and not config_file.is_file():
        raise CheckpointError(f"backbone weights {path}: no config.json in the directory")
    cfg = config.get("pretrained_cfg", {}) or {}
    input_size = cfg.get("input_size") or cfg.get("test_input_size")
    img_size = None
    if input_size:
        if len(input_size) != 3 or input_size[1] != input_size[2]:
            raise CheckpointError(f"{config_file}: input_size {input_size} is not (3, S, S)")
        img_size = int(input_size[1])
    return Checkpoint(weights=weights, sha256=sha256_file(weights),
                      architecture=config.get("architecture"), img_size=img_size,
                      mean=_triple(cfg.get("mean"), config_file, "mean"),
                      std=_triple(cfg.get("std"), config_file, "std"),
                      model_args=_model_args(config.get("model_args"), config_file))


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"backbone config {path} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"backbone config {path} is not a JSON object")
    return config


def _triple(value, where, name) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise CheckpointError(f"{where}: {name} must have 3 values, got {list(value)}")
    return values


def _model_args(value, where) -> tuple[tuple[str, object], ...]:
    if not value:
        return ()
    if not isinstance(value, dict) or not all(
            isinstance(v, (str, int, float, bool)) or v is None for v in value.values()):
        raise CheckpointError(f"{where}: model_args must be an object of plain values, got {value!r}")
    return tuple(sorted(value.items()))
