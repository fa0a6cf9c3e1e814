r"""Forget samples at a site: recompute its exact-head statistics without them and sign a request.

    python -m client.forget --site 3 --key keys/site-3.key --data /data/site-3.npz \
        --state-dir /srv/site-3/state --forget-indices forget.txt --replaces <sha256> --out forget-3/

- ``--data``: the site's data set as its SuperNode reads it (``data-path``: ``.npz`` with
  ``images``/``labels`` or an ImageFolder directory).
- ``--forget-indices``: the rows to forget, as 0-based positions in that data set (one integer per
  line, ``#`` comments allowed, or a ``.npy`` integer array). Afterwards delete those rows from
  ``--data`` too, or the next training round contributes them again.
- ``--replaces``: the sha256 the server's stats ledger recorded for the site's current statistics
  (the operator reads it with ``taft-ledger --ledger <state>/exact_head.sqlite show SITE``, field
  ``delta_sha256``). A request against statistics that have changed since is refused as stale.
- The model and feature settings are the run's own, never defaults of this tool: ``--state-dir``
  (the site's node-config ``state-dir``, where the SuperNode saved the spec of the last training
  request it accepted as ``run-spec.json``) or ``--run-spec FILE`` (that file, or one the operator
  hands out). Our feature digest must equal the one recorded there (and ``--feature-digest``, the
  stats ledger's, if given) before anything is signed.
- ``--delta FILE``: a Δw safetensors the site retrained on its remaining samples; the request then
  signs its sha256 and the server replaces the site's TAFT Δw instead of retracting it.

Writes, in ``--out`` (created 0700, files 0600): ``forget-<site>.json`` (the signed request,
valid for 15 minutes and once) and ``stats-<site>.safetensors`` (the statistics of the remaining
rows, tangent/exact_head/stats_file.py). Send both (and ``--delta``) to the operator, who runs:

    taft-ledger --ledger <state>/ledger.sqlite forget forget-3.json \
        --stats stats-3.safetensors [--delta delta-3.safetensors] --registry <state>/registry.json

**On a DP site** — its state directory (``--state-dir``, its SuperNode's node config
``state-dir``; default ``$TAFT_STATE_DIR/site-<id>`` as deploy.supernode sets it) holds a
privacy-budget record or its seal, or ``--require-dp`` says its node config requires DP — exact
statistics (n and every label count) would be a release its budget does not cover, so the tool
writes a *fresh DP release* of the remaining rows instead (client.dp_head.forget_release): the
DP head's transform, weights, grid and (ε, δ) of the site's last release, saved by the SuperNode
as ``<state-dir>/dp-head-request.json``. The release is charged to the site's privacy budget on
its own (the old release stays spent); a budget that cannot pay refuses (exit 2) before the data
is read, and nothing is charged. The file is ``release-<site>.safetensors``; the operator runs
the same ``taft-ledger forget`` (the server checks it like a reply's release and retracts the
site's Δw). A DP-TAFT Δw is not retrained by this tool: ``--delta`` is refused on a DP site; the
site contributes again in a DP round. The request's ``forgotten`` is the number of rows named;
the server cannot check it against a noisy n. The budget caps of the site's node config
(``max-epsilon``, ``epsilon-budget`` caps) are not read here: only the record's budget.

The key is the site's SuperNode key (the one registered with deploy.register); the signing rule is
tangent/protocol/signed_requests.py, the same as deploy/withdraw.py's. Exit 0: written; 2: bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from client.site import RUN_SPEC_FILE
from client.stats import site_statistics  # the training round's statistics: same φ, same integers
from tangent.exact_head.feature_spec import KEYS as FEATURE_KEYS, FeatureSpec
from tangent.protocol.config import RUN_KEY
from tangent.protocol.signed_requests import SIGNERS, forget_request, load_private_key
from tangent.protocol.spec import BACKBONE_FILE_KEYS, KEYS as MODEL_KEYS, ModelSpec


def read_run_spec(path: Path) -> tuple[ModelSpec, FeatureSpec, str]:
    """(model spec, feature spec, feature digest) of a saved spec record; ValueError if incomplete:
    every key comes from the run, none from a default."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"run spec {path}: {err}") from None
    return run_spec_of(record, path)


def run_spec_of(record, path) -> tuple[ModelSpec, FeatureSpec, str]:
    """:func:`read_run_spec` of a record already read (from ``path``)."""
    if not isinstance(record, dict):
        raise ValueError(f"run spec {path}: not a JSON object")
    # a brought backbone's keys are in the record only when the run set them
    needed = [*(key for field, key in MODEL_KEYS.items() if field not in BACKBONE_FILE_KEYS),
              *(key for key in FEATURE_KEYS.values() if key in RUN_KEY), "feature-digest"]
    missing = [key for key in needed if key not in record]
    if missing:
        raise ValueError(f"run spec {path} lacks {', '.join(missing)} (a run without the exact head has no "
                         "statistics to forget)")
    return ModelSpec.from_config(record), FeatureSpec.from_config(record), str(record["feature-digest"])


def read_indices(path: Path, num_rows: int) -> np.ndarray:
    """Distinct row positions in [0, num_rows); ValueError naming the problem."""
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
        if not np.issubdtype(values.dtype, np.integer) or values.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D integer array, got {values.dtype} {values.shape}")
        rows = [int(v) for v in values]
    else:
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if text:
                try:
                    rows.append(int(text))
                except ValueError:
                    raise ValueError(f"{path}:{number}: {text[:40]!r} is not a row number") from None
    if not rows:
        raise ValueError(f"{path} names no rows to forget")
    if len(set(rows)) != len(rows):
        raise ValueError(f"{path} names a row more than once")
    if min(rows) < 0 or max(rows) >= num_rows:
        raise ValueError(f"{path} names rows outside 0..{num_rows - 1} (the data set has {num_rows})")
    return np.asarray(sorted(rows), dtype=np.int64)


def site_data(path: Path, img_size: int):
    """The site's rows as the SuperNode reads them without a token cache (client.site)."""
    from client.site import SiteData
    from tangent.data.sets import dataset_digest, load_site_data, preprocess

    images, labels = load_site_data(path)
    return SiteData(preprocess(images, img_size), labels, False, dataset_digest(images, labels),
                    np.arange(len(labels)), str(path))


def default_state_dir(site: str) -> Path:
    """Where deploy.supernode keeps a site's state (deploy.connection.site_state_dir)."""
    return Path(os.environ.get("TAFT_STATE_DIR") or "~/.local/state/taft-fl").expanduser() / f"site-{site}"


def dp_site_reason(site: str, state_dir: Path, require_dp: bool) -> str | None:
    """Why this site must not release exact statistics (None: it may)."""
    from tangent.training.budget import PrivacyBudget

    if require_dp:
        return "--require-dp: the site's node config requires differential privacy"
    if PrivacyBudget(state_dir / PrivacyBudget.FILE_NAME, site).started():
        return f"its state directory {state_dir} holds a privacy-budget record"
    return None


def _private_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.forget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", required=True, help="this site's id (as registered)")
    parser.add_argument("--key", required=True, type=Path, help="the site's SuperNode key (or the operator key)")
    parser.add_argument("--signer", choices=SIGNERS, default="site")
    parser.add_argument("--data", required=True, type=Path, help="the site's data set (.npz or ImageFolder)")
    parser.add_argument("--forget-indices", required=True, type=Path, metavar="FILE",
                        help="0-based rows of --data to forget (text, one per line, or .npy)")
    parser.add_argument("--replaces", required=True, metavar="SHA256",
                        help="the stats ledger's sha256 of the site's current statistics")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--delta", type=Path, default=None, help="a Δw retrained without the forgotten rows")
    parser.add_argument("--feature-digest", default=None, help="the stats ledger's feature digest: refuse if ours differs")
    spec = parser.add_mutually_exclusive_group(required=True)
    spec.add_argument("--state-dir", type=Path, metavar="DIR",
                      help=f"the site's state-dir (node config state-dir): the run's spec is read from "
                           f"DIR/{RUN_SPEC_FILE}; with a privacy-budget record there the site is a DP site")
    spec.add_argument("--run-spec", type=Path, metavar="FILE",
                      help="the run's spec record (JSON); the site's budget record is then looked for in "
                           "$TAFT_STATE_DIR/site-<id>")
    parser.add_argument("--require-dp", action="store_true",
                        help="the site requires differential privacy: write a fresh DP release of the remaining "
                             "rows (charged to its budget) instead of exact statistics")
    parser.add_argument("--backbone-weights", default="",
                        help="this site's copy of the run's backbone weights (node config backbone-weights; "
                             "docs/backbones.md), when the run brought its own backbone")
    return parser


def dp_forget(args, state_dir: Path, why: str) -> int:
    """A DP site: a fresh DP release of the remaining rows, charged to its budget (module docstring)."""
    from client import dp_head
    from tangent.exact_head.features import FeatureExtractor
    from tangent.exact_head.stats_file import release_bytes
    from tangent.training.budget import BudgetExhausted, BudgetMissing, PrivacyBudget

    if args.delta is not None:
        print(f"client.forget: site {args.site} is a DP site ({why}): a DP-TAFT Δw is not retrained by this "
              "tool (--delta refused); forget writes a fresh DP release of the exact head only, and the "
              "server retracts the site's Δw until it contributes again in a DP round.", file=sys.stderr)
        return 2
    try:
        if not re.fullmatch(r"[0-9a-f]{64}", args.replaces):
            raise ValueError(f"--replaces must be a lowercase hex sha256, got {args.replaces[:70]!r}")
        request_path = state_dir / dp_head.REQUEST_FILE
        if not request_path.is_file():
            raise ValueError(f"site {args.site} is a DP site ({why}) and {request_path} does not exist: it has "
                             "released no DP head (a DP run without the head sends no statistics) — nothing to "
                             "forget from the exact head; its DP-TAFT Δw leaves by retraining or withdrawal")
        spec_record, request, epsilon, delta = dp_head.remembered_request(request_path)
        budget = PrivacyBudget(state_dir / PrivacyBudget.FILE_NAME, args.site)
        budget.check(epsilon, delta)  # before any data is read: a budget that cannot pay refuses here
        model_spec, feature_spec, run_digest = run_spec_of(spec_record, request_path)
        key = load_private_key(args.key)
        data = site_data(args.data, model_spec.img_size)
        exclude = read_indices(args.forget_indices, len(data.labels))
        if args.backbone_weights:
            model_spec = model_spec.at_site({"backbone-weights": args.backbone_weights})
        extractor = FeatureExtractor.from_spec(model_spec, feature_spec)
        digest = extractor.digest()
        for expected in {run_digest, args.feature_digest} - {None}:
            if expected != digest:
                raise ValueError(f"our feature digest {digest} is not the run's {expected}")
        _, reply = dp_head.forget_release(extractor, data, model_spec.num_classes, request, epsilon, delta,
                                          budget, exclude)
        blob = release_bytes({name: reply["stats"][name].numpy() for name in reply["stats"]},
                             dict(reply["stats-meta"]))
        document = forget_request(args.site, key, signer=args.signer, forgotten=len(exclude),
                                  stats_sha256=hashlib.sha256(blob).hexdigest(), stats_replaces=args.replaces)
    except (OSError, ValueError, BudgetExhausted, BudgetMissing) as err:
        print(f"client.forget: {err}", file=sys.stderr)
        return 2
    request_file, release_file = write_request(args.out, args.site, f"release-{args.site}.safetensors", blob, document)
    print(f"wrote {request_file} and {release_file}: a fresh DP release (ε = {epsilon:g}, δ = {delta:g}, charged "
          f"to the budget) without {len(exclude)} row(s) (nonce {document['payload']['nonce']}, valid 15 minutes)")
    return 0


def write_request(out: Path, site: str, statistics_name: str, blob: bytes, document: dict) -> tuple[Path, Path]:
    """The signed request and the statistics it names, private, in ``out``: (request, statistics)."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    request_path, statistics_path = out / f"forget-{site}.json", out / statistics_name
    _private_write(statistics_path, blob)
    _private_write(request_path, (json.dumps(document, indent=2) + "\n").encode())
    return request_path, statistics_path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir = args.state_dir or default_state_dir(args.site)
    why = dp_site_reason(args.site, state_dir, args.require_dp)
    if why is not None:
        return dp_forget(args, state_dir, why)
    try:
        from tangent.exact_head.features import FeatureExtractor
        from tangent.exact_head.stats_file import stats_bytes

        if not re.fullmatch(r"[0-9a-f]{64}", args.replaces):
            raise ValueError(f"--replaces must be a lowercase hex sha256, got {args.replaces[:70]!r}")
        model_spec, feature_spec, run_digest = read_run_spec(args.run_spec or args.state_dir / RUN_SPEC_FILE)
        data = site_data(args.data, model_spec.img_size)
        exclude = read_indices(args.forget_indices, len(data.labels))
        key = load_private_key(args.key)
        delta_sha = hashlib.sha256(args.delta.read_bytes()).hexdigest() if args.delta else None
        if args.backbone_weights:  # this site's own path to the run's weights file
            model_spec = model_spec.at_site({"backbone-weights": args.backbone_weights})
        extractor = FeatureExtractor.from_spec(model_spec, feature_spec)
        digest = extractor.digest()
        for expected in {run_digest, args.feature_digest} - {None}:
            if expected != digest:
                raise ValueError(f"our feature digest {digest} is not the run's {expected}: "
                                 "other backbone weights or library versions at this site")
        stats = site_statistics(extractor, data, model_spec.num_classes, exclude=exclude)
        blob = stats_bytes(stats, digest)
        document = forget_request(args.site, key, signer=args.signer, forgotten=len(exclude),
                                  stats_sha256=hashlib.sha256(blob).hexdigest(), stats_replaces=args.replaces,
                                  delta_sha256=delta_sha)
    except (OSError, ValueError) as err:  # DataError and StatsError are ValueErrors
        print(f"client.forget: {err}", file=sys.stderr)
        return 2
    request_path, stats_path = write_request(args.out, args.site, f"stats-{args.site}.safetensors", blob, document)
    print(f"wrote {request_path} and {stats_path}: {len(exclude)} row(s) forgotten, {stats.n} remain "
          f"(nonce {document['payload']['nonce']}, valid 15 minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
