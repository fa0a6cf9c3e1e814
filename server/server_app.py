"""Flower ServerApp: training rounds into the ledger, or an unlearning run that only subtracts.

    flwr run . --run-config "mode='train' ledger-path='runs/ledger.sqlite'"
    flwr run . --run-config "mode='unlearn' remove-sites='3,7'"
    flwr run . --run-config "mode='unlearn' withdrawal-requests='w3.json' site-registry='registry.json'"

Train: every sampled site fine-tunes TAFT from w0 and sends its Δw; :class:`LedgerFedAvg`
validates and records each reply in the ledger (replacing a site's earlier contribution),
publishes the composed Δ, the sites evaluate it on their local test splits, and the server
evaluates it centrally on its test set (server.evaluation: ``test-dataset``, Fashion-MNIST by default).
Unlearn: no site trains; the listed sites (``remove-sites``: the operator's own decision) and the
sites of the signed withdrawal requests (``withdrawal-requests``: files on the server, verified
against ``site-registry`` by server.withdrawal; refused ones change nothing and are reported)
are subtracted from the ledger and the new model is evaluated. Either way a JSON report is written (``report-path``, see server.config).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server import config as cfg
from server.evaluation import CentralEvaluation
from server.ledger import Ledger
from server.strategy import LedgerFedAvg, StreamingGrid

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


def _delta(arrays: ArrayRecord) -> dict:
    import torch
    return {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    mode = str(run_config.get("mode", "train"))
    if mode not in cfg.MODES:
        raise ValueError(f"run config mode={mode!r}: use one of {cfg.MODES}")
    started = time.time()
    from tangent.spec import build_model

    spec = cfg.model_spec(run_config)
    model, base_digest = build_model(spec, cached=False)
    ledger_path = cfg.resolve(str(run_config.get("ledger-path", "runs/ledger.sqlite")))
    expected_spec = {k: tuple(v.shape) for k, v in model.delta_state_dict().items()}
    max_norm = float(run_config.get("max-delta-norm", 0.0) or 0.0) or None
    run_id = context.run_id
    report = {"mode": mode, "run_id": run_id, "spec": spec.to_config(), "base_digest": base_digest,
              "ledger_path": str(ledger_path), "run_config": dict(run_config)}
    log.info("%s run %s: ledger %s, base digest %s", mode, run_id, ledger_path, base_digest)
    evaluation = CentralEvaluation.start(model, base_digest, spec.img_size, run_config)  # builds in the background

    with Ledger.open(ledger_path, max_delta_norm=max_norm, expected_base_digest=base_digest,
                     weighting=str(run_config.get("weighting", "examples")),
                     expected_spec=expected_spec) as ledger:
        if mode == "unlearn":
            report |= _unlearn(ledger, cfg.remove_sites(run_config), evaluation, run_id,
                               requests=cfg.withdrawal_requests(run_config),
                               registry=str(run_config.get("site-registry", "") or ""),
                               ledger_path=ledger_path)
        else:
            report |= _train(grid, ledger, spec, base_digest, evaluation, run_config)
        version = ledger.current_version()
        report["ledger"] = {"version": version.version, "event": version.event,
                            "active_sites": sorted((s.site_id for s in ledger.sites()
                                                    if s.active_contribution_id is not None), key=_site_order),
                            "total_weight": version.total_weight}
    report["central_evaluation"] = evaluation.summary()
    report["wall_s"] = time.time() - started
    path = cfg.report_path(run_config, ledger_path, run_id, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    log.info("report written to %s", path)


def _train(grid: Grid, ledger: Ledger, spec, base_digest: str, evaluation, run_config) -> dict:
    min_nodes = int(run_config.get("min-nodes", 2))
    strategy = LedgerFedAvg(ledger, spec.to_config(), base_digest,
                            fraction_train=float(run_config.get("fraction-train", 1.0)),
                            fraction_evaluate=float(run_config.get("fraction-evaluate", 1.0)),
                            min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                            min_available_nodes=min_nodes)
    central: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Round 0 (before any train message) is the previous run's model, already evaluated and
        # reported by it: evaluating it here would make the sites wait for the test inputs.
        if server_round == 0 or len(arrays) == 0 or not evaluation.enabled:
            return None
        if (result := evaluation(_delta(arrays))) is None:
            return None
        central[server_round] = result
        log.info("round %d: central accuracy %.4f on %d test images", server_round,
                 central[server_round]["accuracy"], central[server_round]["num-examples"])
        return MetricRecord(central[server_round])

    initial = ArrayRecord(ledger.composed_delta()) if ledger.current_version().total_weight else ArrayRecord()
    strategy.start(grid=StreamingGrid(grid), initial_arrays=initial, num_rounds=int(run_config.get("num-rounds", 1)),
                   timeout=float(run_config.get("round-timeout", 3600)),
                   train_config=ConfigRecord(cfg.train_config(run_config)), evaluate_fn=evaluate_fn)
    rounds = [strategy.rounds[r].as_dict() for r in sorted(strategy.rounds)]
    last = max(central) if central else None
    return {"rounds": rounds, "central": {str(k): v for k, v in central.items()},
            "accuracy": central[last]["accuracy"] if last else None,
            "rejected": sum(len(r["rejections"]) for r in rounds)}


def _unlearn(ledger: Ledger, sites: list[str], evaluation, run_id, *, requests: list[str] = (),
             registry: str = "", ledger_path: Path | None = None) -> dict:
    if not sites and not requests:
        raise ValueError("mode='unlearn' needs remove-sites='<id>,<id>,...' or "
                         "withdrawal-requests='<file>,<file>,...'")
    if requests and not registry:
        raise ValueError("withdrawal-requests need site-registry='<registry.json>' to verify their signatures")
    removed, not_found = [], []
    before = ledger.current_version().version
    withdrawals = _apply_withdrawals(ledger, requests, registry, ledger_path) if requests else []
    removed += [w["site_id"] for w in withdrawals if w["accepted"]]
    for site in sites:
        if ledger.remove(site, reason=f"unlearning run {run_id}"):
            removed.append(site)
            log.info("removed site %s from the ledger", site)
        else:
            not_found.append(site)
            log.warning("site %s has no active contribution: nothing to remove", site)
    result = {"removed_sites": removed, "not_found": not_found, "version_before": before,
              "withdrawals": withdrawals,
              "withdrawals_refused": sum(not w["accepted"] for w in withdrawals)}
    if ledger.current_version().total_weight and (central := evaluation(ledger.composed_delta())) is not None:
        result["central"] = {"0": central}
        result["accuracy"] = central["accuracy"]
        log.info("after removal: central accuracy %.4f", result["accuracy"])
    else:
        result["accuracy"] = None
        log.warning("nothing evaluated after removal (empty ledger or no test data)")
    return result


def _apply_withdrawals(ledger: Ledger, requests: list[str], registry: str, ledger_path: Path) -> list[dict]:
    """Verify each signed request and subtract its site; a refused one changes nothing."""
    from server.withdrawal import (NonceStore, SiteRegistry, WithdrawalRefused, apply_withdrawal,
                                   nonce_store_path, read_request)

    sites = SiteRegistry(cfg.resolve(registry))
    if not sites.sites() and sites.admin_public_key() is None:
        raise ValueError(f"site-registry {registry!r} holds no registered keys: cannot verify any withdrawal")
    decisions = []
    with NonceStore(nonce_store_path(ledger_path)) as nonces:
        for request_path in requests:
            decision = {"request": request_path, "site_id": None, "accepted": False, "detail": ""}
            document = None
            try:
                document = read_request(cfg.resolve(request_path))
                request = apply_withdrawal(document, ledger, sites, nonces)
                decision |= {"site_id": request.site_id, "accepted": True, "signer": request.signer}
            except WithdrawalRefused as err:  # a readable one is logged and recorded by server.withdrawal
                if document is None:
                    log.warning("withdrawal %s REFUSED: %s", request_path, err)
                payload = document.get("payload") if isinstance(document, dict) else None
                decision |= {"site_id": payload.get("site_id") if isinstance(payload, dict) else None,
                             "detail": str(err)}
            decisions.append(decision)
    return decisions


def _site_order(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)
