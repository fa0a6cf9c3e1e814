"""Run-config helpers for the ServerApp: what goes to the sites, which mode is in force, where files go.

Every key, its type, range and meaning is defined in tangent.protocol.config; its default is in
``[tool.flwr.app.config]`` of pyproject.toml (overridable with ``flwr run . --run-config "key=value"``).

The run config comes from whoever submitted the run, so the file paths in it are confined: every
path (``ledger-path``, ``exact-head-ledger-path``, ``report-path``, ``site-registry``,
``withdrawal-requests``) is resolved against ``state-dir`` — symlinks followed — and refused when it
lands outside it, and a report can never overwrite either ledger or one of its companion files
(WAL, signing key, signed head, the withdrawal nonce store), whatever name or link points there.
The exact head's statistics ledger can never be, or share a file with, the Δ ledger.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tangent.protocol.config import RUN_KEY, as_run_config
from tangent.protocol.spec import ModelSpec

MODES = RUN_KEY["mode"].choices
#: deployment: replies are bound to their authenticated SuperNode through the site registry;
#: simulation: the local simulation federation, whose sites are partition ids
FEDERATION_MODES = RUN_KEY["federation-mode"].choices


class PathRefused(ValueError):
    """A run-config path that the ServerApp will not use (outside the state dir, or the ledger's)."""


# Each helper takes the RunConfig the ServerApp parsed at its start (tangent.protocol.config); a
# plain mapping is parsed by the same parser (tests, the simulation driver).

def model_spec(run_config) -> ModelSpec:
    """The run's ModelSpec, resolved: a weights file's sha256 and pretrained config filled in."""
    return ModelSpec.from_config(as_run_config(run_config).to_config()).resolved()


def train_config(run_config) -> dict[str, Any]:
    """The train request's ``config`` record: every TRAIN_KEYS value, under its run-config name —
    in a DP run ``batch-size`` and ``lr`` are the run's ``dp-batch-size`` and ``dp-lr`` (DP-SGD's
    own schedule) —, and with the DP head on (:func:`dp_head_enabled`) its request keys
    (client/dp_head.py); the DP head's rows use the run's ``frac-bits`` grid."""
    run = as_run_config(run_config)
    config = run.train_request().to_config()
    if run.dp:
        config |= {"batch-size": run.dp_batch_size, "lr": run.dp_lr}
    if dp_head_enabled(run):
        config |= {"dp-head-share": run.dp_head_share, "dp-head-dim": run.dp_head_dim,
                   "dp-head-seed": run.dp_head_seed, "dp-head-frac-bits": run.frac_bits}
    return config


def federation_mode(run_config) -> str:
    return as_run_config(run_config).federation_mode


def dp_required(run_config) -> bool:
    """A run with ``dp=true`` accepts only differentially private replies."""
    return as_run_config(run_config).dp


def quarantine_enabled(run_config) -> bool:
    """``quarantine=true``: replies are held in the quarantine's ledgers until the operator admits
    them (server.quarantine); default off."""
    return as_run_config(run_config).quarantine


def central_evaluation_enabled(run_config) -> bool:
    """``central-evaluation``: whether the ServerApp evaluates the composed models on its test set.
    The simulation driver turns it off and evaluates from the ledgers itself, after the run's
    processes have stopped (``simulations.run --evaluation driver``)."""
    return as_run_config(run_config).central_evaluation


def exact_head_requested(run_config) -> bool:
    """``exact-head`` as the run config says it."""
    return as_run_config(run_config).exact_head


def dp_head_enabled(run_config) -> bool:
    """A DP run (``dp=true``) with ``exact-head=true`` and ``dp-head-share`` > 0: every site
    sends the DP head's Gaussian release of its statistics (client/dp_head.py), never exact ones."""
    run = as_run_config(run_config)
    return run.exact_head and run.dp and run.dp_head_share > 0


def exact_head_enabled(run_config) -> bool:
    """Whether the sites send statistics this run: ``exact-head=true`` outside a DP run (exact
    statistics), or the DP head (:func:`dp_head_enabled`). A DP run without the DP head asks for
    none."""
    return exact_head_requested(run_config) and (not dp_required(run_config) or dp_head_enabled(run_config))


def feature_spec(run_config):
    """The exact head's ``tangent.exact_head.feature_spec.FeatureSpec`` from the run config's keys."""
    from tangent.exact_head.feature_spec import FeatureSpec

    return FeatureSpec.from_config(as_run_config(run_config).to_config())


def _comma_list(run_config, key: str) -> list[str]:
    """``key="a, b,a"`` -> ["a", "b"]: stripped, empty items and duplicates dropped, order kept."""
    items = [s.strip() for s in as_run_config(run_config)[key].split(",") if s.strip()]
    return list(dict.fromkeys(items))


def remove_sites(run_config) -> list[str]:
    """``remove-sites="3,7"`` -> ["3", "7"] (stable site ids, order kept, duplicates dropped)."""
    return _comma_list(run_config, "remove-sites")


def withdrawal_requests(run_config) -> list[str]:
    """``withdrawal-requests="a.json,b.json"`` -> paths of signed request files on the server."""
    return _comma_list(run_config, "withdrawal-requests")


# ----------------------------------------------------------------------------- federation mode

#: the state directory's record of its federation mode, written at its first run
FEDERATION_RECORD = "federation-mode.json"


class FederationModeRefused(ValueError):
    """A run whose federation-mode is not the one its state directory was created with."""


def pin_federation_mode(state: Path, mode: str, registry: Path | None = None) -> str:
    """Refuse ``mode`` unless it is the state directory's; the first run of a directory records it.

    ``federation-mode`` comes from whoever submits the run: without the pin, adding
    ``federation-mode='simulation'`` to a deployment's run made an unsigned ``remove-sites`` remove
    a site and turned identity binding off. A state directory created before the record existed
    and holding a site registry (only deployments have one) is a deployment. A record that cannot
    be read refuses every run (fail closed); the operator restores or deletes it by hand.
    """
    record = state / FEDERATION_RECORD
    if record.is_symlink() or (record.exists() and not record.is_file()):
        raise FederationModeRefused(f"{record} is not a regular file: refused")
    if record.exists():
        try:
            pinned = json.loads(record.read_text())["federation-mode"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FederationModeRefused(f"{record} cannot be read ({type(err).__name__}): every run is "
                                        "refused until the operator restores it") from None
        if pinned != mode:
            raise FederationModeRefused(
                f"federation-mode={mode!r} refused: the state directory {state} was created by a "
                f"{pinned!r} run ({record}); a state directory never changes its federation mode")
        return mode
    legacy_deployment = any(p is not None and p.exists() for p in (registry, state / "registry.json"))
    pinned = "deployment" if legacy_deployment else mode
    try:
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another run recorded it first: check against that one
        return pin_federation_mode(state, mode, registry)
    with os.fdopen(fd, "w") as handle:
        json.dump({"federation-mode": pinned}, handle)
    if pinned != mode:
        raise FederationModeRefused(f"federation-mode={mode!r} refused: the state directory {state} holds a "
                                    "site registry, so it belongs to a deployment (recorded in "
                                    f"{record})")
    return mode


# ----------------------------------------------------------------------------- paths

def state_dir(run_config) -> Path:
    """``state-dir`` (created 0700 if absent), absolute with symlinks resolved."""
    value = as_run_config(run_config).state_dir
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


def ledger_path(run_config, state: Path) -> Path:
    return confine(state, as_run_config(run_config).ledger_path, "ledger-path")


def exact_head_ledger_path(run_config, state: Path, ledger: Path) -> Path:
    """``exact-head-ledger-path``, confined like ``ledger-path``.

    Refused when it, or any of its companion files, is the Δ ledger or one of the Δ ledger's
    companions (or the other way round): two ledgers writing one file would corrupt both, and
    a shared signing key or head file would let one ledger's head stand for the other's.
    """
    value = as_run_config(run_config).exact_head_ledger_path
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


def site_registry_path(run_config, state: Path) -> Path | None:
    value = as_run_config(run_config).site_registry
    return confine(state, value, "site-registry") if value else None


def withdrawal_request_path(value: str, state: Path) -> Path:
    return confine(state, value, "withdrawal-requests")


def ledger_files(ledger: Path) -> list[Path]:
    """The ledger's own files (database, SQLite companions, signed head, signing key) and the
    withdrawals' nonce store with its companions."""
    from server.ledger import ledger_file_paths
    from server.trust.nonces import nonce_store_path

    return [*ledger_file_paths(ledger), *ledger_file_paths(nonce_store_path(ledger))]


def witness_path(state: Path) -> Path | None:
    """The ledgers' witness, ``$TAFT_WITNESS`` (server.ledger.witness): an operator setting, never
    a run-config key, so whoever submits a run cannot turn it off or point it elsewhere. Refused
    inside the state directory: whoever can rewrite the ledger there could rewrite it too."""
    from server.ledger import witness

    path = witness.configured()
    if path is None:
        return None
    resolved = path.resolve()
    if resolved.is_relative_to(state):
        raise PathRefused(f"${witness.WITNESS_ENV}={path} lies inside the state directory {state}: a witness must be "
                          f"kept where the state directory's writer cannot reach")
    return path


#: directories of the state dir that hold keys, certificates, requests and Flower's own state: no report goes there
KEPT_DIRECTORIES = ("keys", "certs", "public-keys", "requests", "flwr-home")
MAX_REPORT_CHECK_BYTES = 64 * 1024 * 1024


def report_path(run_config, state: Path, ledger: Path, run_id: Any, mode: str,
                protected: tuple[Path, ...] = (), other_ledgers: tuple[Path, ...] = ()) -> Path:
    """``report-path`` if set, else ``<ledger dir>/reports/<mode>-<run id>.json``, both confined to
    the state directory with links resolved (a ``reports`` link out of it is refused).

    Refused when it would name the ledger (or one of ``other_ledgers``: the exact head's), one of
    its companion files (any file whose name starts with the ledger's, beside it: that covers
    companions added later too), a ``protected`` file (the site registry, a withdrawal request),
    anything in the directories that hold keys, certificates and requests
    (:data:`KEPT_DIRECTORIES`), a name not ending in ``.json``, or an existing file that is not
    an earlier report: a report may replace only a report.
    """
    value = as_run_config(run_config).report_path
    if not value:
        return confine(state, str(ledger.parent / "reports" / f"{mode}-{run_id}.json"), "report-path (default)")
    path = confine(state, value, "report-path")
    kept = (ledger, *other_ledgers)
    named = any(path.parent == led.parent and path.name.startswith(led.name) for led in kept)
    registry_files = {p.resolve() for p in protected} | {Path(f"{p}.sig").resolve() for p in protected}
    in_kept_directory = path.relative_to(state).parts[0] in KEPT_DIRECTORIES
    if named or any(path in ledger_files(led) for led in kept) or path in registry_files or in_kept_directory \
            or path.suffix != ".json" or not _is_report_or_absent(path):
        raise PathRefused(f"report-path={value!r} names {path}, a file the server keeps (the ledger, its "
                          "companions, the site registry, a key, a certificate or a request) or not a report: refused")
    return path


def _is_report_or_absent(path: Path) -> bool:
    """Whether ``path`` does not exist, or is a regular file holding a run report (JSON object
    with ``mode`` and ``run_id``): a pending request or any other file is never overwritten."""
    import json

    try:
        if path.is_symlink() or not path.is_file():
            return not path.exists() and not path.is_symlink()
        if path.stat().st_size > MAX_REPORT_CHECK_BYTES:
            return False
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and {"mode", "run_id"} <= document.keys()
