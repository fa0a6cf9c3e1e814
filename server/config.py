"""Run-config helpers for the ServerApp: what goes to the sites, which mode is in force, where files go.

Every key lives in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case, overridable with
``flwr run . --run-config "key=value"``).

The run config comes from whoever submitted the run, so the file paths in it are confined: every
path (``ledger-path``, ``exact-head-ledger-path``, ``report-path``, ``site-registry``,
``withdrawal-requests``) is resolved against ``state-dir`` — symlinks followed — and refused when it
lands outside it, and a report can never overwrite either ledger or one of its companion files
(WAL, signing key, signed head, the withdrawal nonce store), whatever name or link points there.
The exact head's statistics ledger (issue 15) can never be, or share a file with, the Δ ledger.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tangent.protocol.spec import ModelSpec

#: run-config keys forwarded to the sites in the train ``config`` ConfigRecord
TRAIN_CONFIG_KEYS = ("epochs", "batch-size", "lr", "loss", "kappa", "rsl-alpha", "l2", "radius", "guard-ridge", "seed",
                     "dp", "dp-epsilon", "dp-delta", "dp-max-grad-norm")
MODES = ("train", "unlearn")
#: deployment: replies are bound to their authenticated SuperNode through the site registry;
#: simulation: the local simulation federation, whose sites are partition ids
FEDERATION_MODES = ("deployment", "simulation")
DEFAULT_STATE_DIR = "~/.local/state/taft-fl/server"
DEFAULT_LEDGER = "ledger.sqlite"
DEFAULT_EXACT_HEAD_LEDGER = "exact_head.sqlite"


class PathRefused(ValueError):
    """A run-config path that the ServerApp will not use (outside the state dir, or the ledger's)."""


def model_spec(run_config: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec.from_config(run_config).resolved()  # a weights file: its sha256 and pretrained config


def train_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: run_config[key] for key in TRAIN_CONFIG_KEYS if key in run_config}


def federation_mode(run_config: Mapping[str, Any]) -> str:
    """``federation-mode``: "deployment" (the default for anything but the local simulation)."""
    mode = str(run_config.get("federation-mode", "deployment") or "deployment")
    if mode not in FEDERATION_MODES:
        raise ValueError(f"run config federation-mode={mode!r}: use one of {FEDERATION_MODES}")
    return mode


def _flag(run_config: Mapping[str, Any], key: str) -> bool:
    value = run_config.get(key, False)
    return value is True or str(value).strip().lower() in ("true", "1")


def dp_required(run_config: Mapping[str, Any]) -> bool:
    """A run with ``dp=true`` accepts only differentially private replies."""
    return _flag(run_config, "dp")


def central_evaluation_enabled(run_config: Mapping[str, Any]) -> bool:
    """``central-evaluation`` (default true): whether the ServerApp evaluates the composed models on
    its test set. The simulation driver turns it off and evaluates from the ledgers itself, after
    the run's processes have stopped (``simulations.run --evaluation driver``)."""
    value = run_config.get("central-evaluation", True)
    return value is True or str(value).strip().lower() in ("true", "1")


def exact_head_requested(run_config: Mapping[str, Any]) -> bool:
    """``exact-head`` as written in the run config (absent: off, as before issue 15)."""
    return _flag(run_config, "exact-head")


def exact_head_enabled(run_config: Mapping[str, Any]) -> bool:
    """Whether the sites send exact-head statistics this run: ``exact-head=true`` and not a DP run.

    A DP run (``dp=true``) asks for no statistics (contract 7b): the Gaussian release of the
    statistics is measured offline (benchmarks/exact_head.py), not wired into Flower yet.
    """
    return exact_head_requested(run_config) and not dp_required(run_config)


def feature_spec(run_config: Mapping[str, Any]):
    """The exact head's ``tangent.exact_head.features.FeatureSpec`` from the run config's keys (its KEYS)."""
    from tangent.exact_head.feature_spec import FeatureSpec

    return FeatureSpec.from_config(run_config)


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


# ----------------------------------------------------------------------------- paths

def state_dir(run_config: Mapping[str, Any]) -> Path:
    """``state-dir`` (created 0700 if absent), absolute with symlinks resolved."""
    value = str(run_config.get("state-dir", "") or DEFAULT_STATE_DIR)
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise PathRefused(f"state-dir={value!r} must be an absolute path (or start with ~)")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path.resolve()


def confine(state: Path, value: str, key: str) -> Path:
    """``value`` resolved against ``state`` (symlinks followed); PathRefused outside it."""
    if not value or "\x00" in value:
        raise PathRefused(f"{key}={value!r} is not a path")
    path = Path(value).expanduser()
    resolved = (path if path.is_absolute() else state / path).resolve()
    if not resolved.is_relative_to(state) or resolved == state:
        raise PathRefused(f"{key}={value!r} resolves to {resolved}, outside the server's state directory "
                          f"{state}: refused")
    return resolved


def ledger_path(run_config: Mapping[str, Any], state: Path) -> Path:
    return confine(state, str(run_config.get("ledger-path", "") or DEFAULT_LEDGER), "ledger-path")


def exact_head_ledger_path(run_config: Mapping[str, Any], state: Path, ledger: Path) -> Path:
    """``exact-head-ledger-path`` (default "exact_head.sqlite"), confined like ``ledger-path``.

    Refused when it, or any of its companion files, is the Δ ledger or one of the Δ ledger's
    companions (or the other way round): two ledgers writing one file would corrupt both, and
    a shared signing key or head file would let one ledger's head stand for the other's.
    """
    value = str(run_config.get("exact-head-ledger-path", "") or DEFAULT_EXACT_HEAD_LEDGER)
    path = confine(state, value, "exact-head-ledger-path")
    if _ledgers_collide(path, ledger):
        raise PathRefused(f"exact-head-ledger-path={value!r} names {path}, which collides with the Δ ledger "
                          f"{ledger} or its companion files: refused")
    return path


def _ledgers_collide(a: Path, b: Path) -> bool:
    """Whether two ledgers would share a file: one's name is a prefix of the other's in the same
    directory (every companion is ``<ledger name><suffix>``), or their file lists meet."""
    if a.parent == b.parent and (a.name.startswith(b.name) or b.name.startswith(a.name)):
        return True
    return bool({p.resolve() for p in ledger_files(a)} & {p.resolve() for p in ledger_files(b)})


def site_registry_path(run_config: Mapping[str, Any], state: Path) -> Path | None:
    value = str(run_config.get("site-registry", "") or "")
    return confine(state, value, "site-registry") if value else None


def withdrawal_request_path(value: str, state: Path) -> Path:
    return confine(state, value, "withdrawal-requests")


def ledger_files(ledger: Path) -> list[Path]:
    """The ledger's own files (database, SQLite companions, signed head, signing key) and the
    withdrawals' nonce store with its companions."""
    from server.ledger import ledger_file_paths
    from server.trust.withdrawal import nonce_store_path

    return [*ledger_file_paths(ledger), *ledger_file_paths(nonce_store_path(ledger))]


def report_path(run_config: Mapping[str, Any], state: Path, ledger: Path, run_id: Any, mode: str,
                protected: tuple[Path, ...] = (), other_ledgers: tuple[Path, ...] = ()) -> Path:
    """``report-path`` if set, else ``<ledger dir>/reports/<mode>-<run id>.json``.

    Refused when it would name the ledger (or one of ``other_ledgers``: the exact head's), one of
    its companion files (any file whose name starts with the ledger's, beside it: that covers
    companions added later too) or a ``protected`` file (the site registry, a withdrawal request).
    """
    value = str(run_config.get("report-path", "") or "")
    if not value:
        return ledger.parent / "reports" / f"{mode}-{run_id}.json"
    path = confine(state, value, "report-path")
    kept = (ledger, *other_ledgers)
    named = any(path.parent == led.parent and path.name.startswith(led.name) for led in kept)
    if named or any(path in ledger_files(led) for led in kept) or path in {p.resolve() for p in protected}:
        raise PathRefused(f"report-path={value!r} names {path}, a file the server keeps (the ledger, its "
                          "companions, the site registry or a request): refused")
    return path
