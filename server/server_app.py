"""Flower ServerApp: training rounds into the ledger, or an unlearning run that only subtracts.

    flwr run . <superlink> --run-config "site-registry='registry.json'"            # deployment (default)
    flwr run . <superlink> --run-config "mode='unlearn' withdrawal-requests='w3.json' site-registry='registry.json'"
    flwr run . --run-config "federation-mode='simulation' mode='unlearn' remove-sites='3,7'"

Train: every sampled site fine-tunes TAFT from w0 and sends its Δw; :class:`LedgerFedAvg`
validates and records each reply in the ledger (replacing a site's earlier contribution),
publishes the composed Δ, the sites evaluate it on their local test splits, and the server
evaluates it centrally on the Fashion-MNIST test split (``eval-subset`` rows, 0 = all).
Unlearn: no site trains; the listed sites (``remove-sites``: the operator's own decision) and the
sites of the signed withdrawal requests (``withdrawal-requests``: files on the server, verified
against ``site-registry`` by server.withdrawal; refused ones change nothing and are reported)
are subtracted from the ledger and the new model is evaluated. Either way a JSON report is written
(``report-path``; also when the run fails, with the error).

``federation-mode`` says who a site is. In a deployment (the default) the site registry binds each
reply to the SuperNode that sent it (server.identity) and ``remove-sites`` is refused: only a
withdrawal request signed by the site or by the operator's admin key removes a site. The local
simulation keeps partition ids and obeys ``remove-sites``. Every path in the run config lives in
``state-dir`` (server.config).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server import config as cfg
from server.identity import SenderBinding
from server.ledger import Ledger
from server.strategy import LedgerFedAvg, StreamingGrid
from server.withdrawal import (NonceStore, SiteRegistry, WithdrawalRefused, apply_withdrawal, nonce_store_path,
                               read_request)
from tangent.protocol import check_site_id, site_order

log = logging.getLogger("taft.server")


def _show_project_logs() -> None:
    """INFO lines of the ``taft.*`` loggers, on stderr (once per process).

    Only the ``taft`` logger gets a handler. A root handler at INFO (``logging.basicConfig``)
    also printed every Flower line a second time and every httpx request of Flower's log
    uploader, whose own line then had to be uploaded: 2,097 of the 2,233 lines of a 50-site
    train log were such requests.
    """
    project = logging.getLogger("taft")
    if not project.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        project.addHandler(handler)
        project.setLevel(logging.INFO)


_show_project_logs()

app = ServerApp()


class CentralEvaluation:
    """Accuracy of w0 + Δ on the Fashion-MNIST test split (or a seeded subset of it).

    Reads the trunk-token cache when ``cache-dir`` holds one (the simulation driver builds it),
    otherwise runs the trunk once over the chosen test images and keeps the tokens.
    """

    def __init__(self, model, base_digest: str, img_size: int, run_config):
        from tangent.inputs import model_inputs
        from tangent.cache import images_digest
        from tangent.data import load_fashion_mnist

        images, labels = load_fashion_mnist("test")
        subset = int(run_config.get("eval-subset", 0) or 0)
        indices = np.arange(len(labels))
        if 0 < subset < len(labels):
            rng = np.random.default_rng(int(run_config.get("seed", 0)))
            indices = np.sort(rng.choice(len(labels), subset, replace=False))
        directory = str(run_config.get("cache-dir", "") or "")
        self.model, self.labels = model, labels[indices]
        if directory:
            self.inputs, self.from_cache = model_inputs(model, base_digest, images, indices, img_size,
                                                   Path(directory).expanduser(),
                                                   data_digest=images_digest(images))
        else:
            import torch

            from tangent.data import preprocess
            log.info("central evaluation: no cache-dir, running the trunk over %d test images", len(indices))
            with torch.no_grad():
                self.inputs = torch.cat([model.trunk(preprocess(images[indices[i:i + 256]], img_size))
                                         for i in range(0, len(indices), 256)])
            self.from_cache = True

    def __call__(self, delta: dict) -> dict:
        from tangent.train import evaluate

        start = time.perf_counter()
        self.model.load_delta(delta)
        loss, accuracy = evaluate(self.model, self.inputs, self.labels, from_cache=self.from_cache)
        return {"accuracy": accuracy, "loss": loss, "num-examples": len(self.labels),
                "eval-s": time.perf_counter() - start}


def _delta(arrays: ArrayRecord) -> dict:
    import torch
    return {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One run; its report is written whatever happens (a failed run's report says why)."""
    run_config = context.run_config
    started = time.time()
    mode = str(run_config.get("mode", "train"))
    report: dict = {"mode": mode, "run_id": context.run_id, "run_config": dict(run_config)}
    state, path = None, None
    try:
        if mode not in cfg.MODES:
            raise ValueError(f"run config mode={mode!r}: use one of {cfg.MODES}")
        state = cfg.state_dir(run_config)
        ledger_path = cfg.ledger_path(run_config, state)
        registry_path = cfg.site_registry_path(run_config, state)
        path = cfg.report_path(run_config, state, ledger_path, context.run_id, mode,
                               protected=tuple(p for p in (registry_path,) if p is not None))
        _run(grid, context.run_id, run_config, mode, state, ledger_path, registry_path, report)
    except BaseException as err:  # recorded, then re-raised: the run still fails
        report["error"] = {"type": type(err).__name__, "message": str(err)[:4000]}
        log.error("%s run %s failed: %s: %s", mode, context.run_id, type(err).__name__, err)
        raise
    finally:
        report["wall_s"] = time.time() - started
        _write_report(report, path or _fallback_report_path(state, context.run_id, mode))


def _run(grid: Grid, run_id, run_config, mode: str, state: Path, ledger_path: Path,
         registry_path: Path | None, report: dict) -> None:
    """The run itself; fills ``report`` as it goes, so a failure keeps what was done before it."""
    from tangent.spec import build_model

    federation = cfg.federation_mode(run_config)
    registry = SiteRegistry(registry_path) if registry_path is not None else None
    if federation == "deployment" and mode == "train" and registry is None:
        raise ValueError("federation-mode='deployment' trains only with a site-registry (written by "
                         "deploy.register): every reply is bound to its SuperNode through it")
    spec = cfg.model_spec(run_config)
    model, base_digest = build_model(spec, cached=False)
    expected_spec = {k: tuple(v.shape) for k, v in model.delta_state_dict().items()}
    max_norm = float(run_config.get("max-delta-norm", 0.0) or 0.0) or None
    report |= {"federation_mode": federation, "state_dir": str(state), "spec": spec.to_config(),
               "base_digest": base_digest, "ledger_path": str(ledger_path),
               "site_registry": None if registry_path is None else str(registry_path)}
    log.info("%s run %s (%s): ledger %s, base digest %s", mode, run_id, federation, ledger_path, base_digest)
    evaluation = CentralEvaluation(model, base_digest, spec.img_size, run_config)
    model.drop_frozen()  # from here on only the linearized tail runs, on cached test tokens

    with Ledger.open(ledger_path, max_delta_norm=max_norm, expected_base_digest=base_digest,
                     weighting=str(run_config.get("weighting", "examples")),
                     expected_spec=expected_spec) as ledger:
        if mode == "unlearn":
            report |= _unlearn(ledger, cfg.remove_sites(run_config), evaluation, run_id,
                               requests=cfg.withdrawal_requests(run_config), registry=registry,
                               ledger_path=ledger_path, state=state, federation=federation)
        else:
            binding = SenderBinding(registry) if federation == "deployment" else None
            _train(grid, ledger, spec, base_digest, evaluation, run_config, binding, report)
        version = ledger.current_version()
        report["ledger"] = {"version": version.version, "event": version.event,
                            "active_sites": sorted((s.site_id for s in ledger.sites()
                                                    if s.active_contribution_id is not None), key=site_order),
                            "total_weight": version.total_weight}


def _fallback_report_path(state: Path | None, run_id, mode: str) -> Path | None:
    """Where a run whose report path could not be worked out still leaves its report."""
    return None if state is None else state / "reports" / f"{mode}-{run_id}.json"


def _write_report(report: dict, path: Path | None) -> None:
    """JSON, written atomically and private (0600 in a 0700 directory); never raises."""
    if path is None:
        log.error("no state directory: the report was not written: %s", json.dumps(report, default=str)[:4000])
        return
    try:
        text = json.dumps(report, indent=1, default=str)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)  # replaces a link itself, never the file it points to
        log.info("report written to %s", path)
    except Exception as err:  # noqa: BLE001 - the report must not hide the run's own outcome
        log.error("could not write the report to %s: %s", path, err)


def _train(grid: Grid, ledger: Ledger, spec, base_digest: str, evaluation, run_config,
           binding: SenderBinding | None, report: dict) -> None:
    min_nodes = int(run_config.get("min-nodes", 2))
    strategy = LedgerFedAvg(ledger, spec.to_config(), base_digest, binding=binding,
                            require_dp=cfg.dp_required(run_config),
                            fraction_train=float(run_config.get("fraction-train", 1.0)),
                            fraction_evaluate=float(run_config.get("fraction-evaluate", 1.0)),
                            min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                            min_available_nodes=min_nodes)
    central: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if len(arrays) == 0:  # nothing composed yet: the untrained head says nothing
            return None
        central[server_round] = evaluation(_delta(arrays))
        log.info("round %d: central accuracy %.4f on %d test images", server_round,
                 central[server_round]["accuracy"], central[server_round]["num-examples"])
        return MetricRecord(central[server_round])

    initial = ArrayRecord(ledger.composed_delta()) if ledger.current_version().total_weight else ArrayRecord()
    try:
        strategy.start(grid=StreamingGrid(grid), initial_arrays=initial,
                       num_rounds=int(run_config.get("num-rounds", 1)),
                       timeout=float(run_config.get("round-timeout", 3600)),
                       train_config=ConfigRecord(cfg.train_config(run_config)), evaluate_fn=evaluate_fn)
    finally:  # a failed round still reports the rounds before it (main adds the error)
        rounds = [strategy.rounds[r].as_dict() for r in sorted(strategy.rounds)]
        last = max(central) if central else None
        report |= {"rounds": rounds, "central": {str(k): v for k, v in central.items()},
                   "accuracy": central[last]["accuracy"] if last else None,
                   "rejected": sum(len(r["rejections"]) for r in rounds)}


REMOVE_SITES_REFUSED = ("federation-mode='deployment' does not obey remove-sites: whoever can submit a run "
                        "would remove any site unsigned. The operator signs a withdrawal request with the "
                        "admin key (signer='admin', deploy.withdraw) and passes it as withdrawal-requests")


def _unlearn(ledger: Ledger, sites: list[str], evaluation, run_id, *, requests: list[str] = (),
             registry: SiteRegistry | None = None, ledger_path: Path | None = None, state: Path | None = None,
             federation: str = "simulation") -> dict:
    if not sites and not requests:
        raise ValueError("mode='unlearn' needs remove-sites='<id>,<id>,...' or "
                         "withdrawal-requests='<file>,<file>,...'")
    if requests and registry is None:
        raise ValueError("withdrawal-requests need site-registry='<registry.json>' to verify their signatures")
    result: dict = {"removed_sites": [], "not_found": [], "version_before": ledger.current_version().version}
    if sites and federation == "deployment":
        log.warning("remove-sites=%s REFUSED: %s", ",".join(sites), REMOVE_SITES_REFUSED)
        result["remove_sites_refused"] = {"sites": sites, "reason": REMOVE_SITES_REFUSED}
        sites = []
    withdrawals = _apply_withdrawals(ledger, list(requests), registry, ledger_path, state) if requests else []
    result["removed_sites"] += [w["site_id"] for w in withdrawals if w["accepted"]]
    for site in sites:
        if ledger.remove(site, reason=f"unlearning run {run_id}"):
            result["removed_sites"].append(site)
            log.info("removed site %s from the ledger", site)
        else:
            result["not_found"].append(site)
            log.warning("site %s has no active contribution: nothing to remove", site)
    result |= {"withdrawals": withdrawals, "withdrawals_refused": sum(not w["accepted"] for w in withdrawals)}
    if ledger.current_version().total_weight:
        result["central"] = {"0": evaluation(ledger.composed_delta())}
        result["accuracy"] = result["central"]["0"]["accuracy"]
        log.info("after removal: central accuracy %.4f", result["accuracy"])
    else:
        result["accuracy"] = None
        log.warning("the ledger is empty after removal: nothing to evaluate")
    return result


def _apply_withdrawals(ledger: Ledger, requests: list[str], registry: SiteRegistry, ledger_path: Path,
                       state: Path) -> list[dict]:
    """Verify each signed request and subtract its site; a refused one changes nothing.

    Every request file is hostile input: a path outside the state directory, an unreadable file
    and any error while one request is handled are refusals in the report, never an aborted run.
    """
    if not registry.sites() and registry.admin_public_key() is None:
        raise ValueError(f"site-registry {registry.path} holds no registered keys: cannot verify any withdrawal")
    decisions = []
    with NonceStore(nonce_store_path(ledger_path)) as nonces:
        for request_path in requests:
            decision = {"request": request_path, "site_id": None, "accepted": False, "detail": ""}
            document = None
            try:
                document = read_request(cfg.withdrawal_request_path(request_path, state))
                request = apply_withdrawal(document, ledger, registry, nonces)
                decision |= {"site_id": request.site_id, "accepted": True, "signer": request.signer}
            except (WithdrawalRefused, cfg.PathRefused) as err:  # apply_withdrawal logs and records its own
                if document is None:
                    log.warning("withdrawal %s REFUSED: %s", request_path, err)
                decision |= {"site_id": _claimed_site(document), "detail": str(err)}
            except Exception as err:  # noqa: BLE001 - one request never aborts the run
                log.exception("withdrawal %s: unexpected error", request_path)
                decision |= {"site_id": _claimed_site(document), "detail": f"internal: {type(err).__name__}: {err}"}
            decisions.append(decision)
    return decisions


def _claimed_site(document) -> str | None:
    """The site id a request names, for the report (only when it is a valid site id)."""
    payload = document.get("payload") if isinstance(document, dict) else None
    site = payload.get("site_id") if isinstance(payload, dict) else None
    try:
        return check_site_id(site)
    except ValueError:
        return None
