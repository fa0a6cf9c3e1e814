"""Run-config helpers for the ServerApp: what goes to the sites, and where files go.

Every key lives in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case, overridable with
``flwr run . --run-config "key=value"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tangent.spec import ModelSpec

#: run-config keys forwarded to the sites in the train ``config`` ConfigRecord
TRAIN_CONFIG_KEYS = ("epochs", "batch-size", "lr", "loss", "kappa", "rsl-alpha", "l2", "radius", "seed",
                     "dp", "dp-epsilon", "dp-delta", "dp-max-grad-norm")
MODES = ("train", "unlearn")


def model_spec(run_config: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec.from_config(run_config)


def train_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: run_config[key] for key in TRAIN_CONFIG_KEYS if key in run_config}


def _comma_list(run_config: Mapping[str, Any], key: str) -> list[str]:
    """``key="a, b,a"`` -> ["a", "b"]: stripped, empty items and duplicates dropped, order kept."""
    items = [s.strip() for s in str(run_config.get(key, "")).split(",") if s.strip()]
    return list(dict.fromkeys(items))


def remove_sites(run_config: Mapping[str, Any]) -> list[str]:
    """``remove-sites="3,7"`` -> ["3", "7"] (stable site ids, order kept, duplicates dropped)."""
    return _comma_list(run_config, "remove-sites")


def withdrawal_requests(run_config: Mapping[str, Any]) -> list[str]:
    """``withdrawal-requests="a.json,b.json"`` -> paths of signed request files on the server."""
    return _comma_list(run_config, "withdrawal-requests")


def resolve(path: str) -> Path:
    """A path from the run config; relative paths are taken from the SuperLink's working directory."""
    return Path(path).expanduser().resolve()


def report_path(run_config: Mapping[str, Any], ledger_path: Path, run_id: int, mode: str) -> Path:
    """``report-path`` if set, else ``<ledger dir>/reports/<mode>-<run id>.json``."""
    value = str(run_config.get("report-path", "") or "")
    if value:
        return resolve(value)
    return ledger_path.parent / "reports" / f"{mode}-{run_id}.json"
