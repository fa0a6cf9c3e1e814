"""Flower ServerApp: training rounds into the ledger, or an unlearning run that only subtracts.

    flwr run . <superlink> --run-config "site-registry='registry.json'"            # deployment (default)
    flwr run . <superlink> --run-config "mode='unlearn' withdrawal-requests='w3.json' site-registry='registry.json'"
    flwr run . --run-config "federation-mode='simulation' mode='unlearn' remove-sites='3,7'"

Train: every sampled site fine-tunes TAFT from w0 and sends its Δw; :class:`LedgerFedAvg`
validates and records each reply in the ledger (replacing a site's earlier contribution),
publishes the composed Δ, the sites evaluate it on their local test splits, and the server
evaluates it centrally on its test set (server.evaluation: ``test-dataset``, Fashion-MNIST by default).
Unlearn: no site trains; the listed sites (``remove-sites``: the operator's own decision) and the
sites of the signed withdrawal requests (``withdrawal-requests``: files on the server, verified
against ``site-registry`` by server.trust.withdrawal; refused ones change nothing and are reported)
are subtracted from the ledger and the new model is evaluated. Either way a JSON report is written
(``report-path``; also when the run fails, with the error).

``federation-mode`` says who a site is. In a deployment (the default) the site registry binds each
reply to the SuperNode that sent it (server.trust.identity) and ``remove-sites`` is refused: only a
withdrawal request signed by the site or by the operator's admin key removes a site. The local
simulation keeps partition ids and obeys ``remove-sites``. Every path in the run config lives in
``state-dir`` (server.config).

The ServerApp's own process never imports torch (535 MiB resident for the
library alone, kept for the whole run once imported): w0's digest and Δ shapes, φ's digest and
every central evaluation are computed in short-lived child processes (server.model_process,
server.evaluation); the composed Δ stays numpy here.

Exact head (``exact-head=true``; in a DP run only with ``dp-head-share`` > 0, as the DP head's
Gaussian releases: server.exact_head.DPHeadRequest, docs/dp_head.md): the train message also announces φ
(FeatureSpec keys + ``feature-digest``), every non-DP reply carries the site's sufficient
statistics beside its Δw, and they go to a second ledger (``exact-head-ledger-path``); central
evaluation reports ``accuracy_exact_head`` beside the TAFT accuracy. Removal (``remove-sites``,
withdrawals) takes a site out of both ledgers (server.ledger.ledgers). An unlearning run opens the
statistics ledger whenever its file exists, whatever ``exact-head`` says, so no removal can leave a
site's statistics behind. A training run with the exact head off (``exact-head=false`` or a DP run)
leaves the statistics ledger as it is: it keeps each site's last exact-head statistics (their ε is
∞ in its privacy totals) until the site contributes with the exact head on again or is removed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server import config as cfg
from server import model_process, quarantine, simulation_engine
from server.evaluation import CentralEvaluation
from server.exact_head import ExactHead, describe_features, dp_head_request
from server.trust.identity import SenderBinding
from server.ledger import Ledger, LedgerError
from server.ledger.ledgers import HELD_LINK, Ledgers, held_path_of, link, stats_path_of
from server.strategy import LedgerFedAvg, StreamingGrid, composed_arrays, privacy_received
from server.trust.nonces import NonceStore, nonce_store_path
from server.trust.registry import SiteRegistry
from server.trust.withdrawal import WithdrawalRefused, apply_withdrawal, read_request
from tangent.protocol.config import RunConfig, as_run_config
from tangent.protocol.limits import check_site_id, site_order

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


def _delta(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One run; its report is written whatever happens (a failed run's report says why)."""
    started = time.time()
    mode = str(context.run_config.get("mode", "train"))
    report: dict = {"mode": mode, "run_id": context.run_id, "run_config": dict(context.run_config)}
    state, path = None, None
    try:
        # the state directory first, so that a refused run config still leaves its report there
        state = cfg.state_dir({key: context.run_config[key] for key in ("state-dir",) if key in context.run_config})
        # parsed once, here: an unknown key or a value out of range refuses the run, naming the key
        run_config = RunConfig.parse(context.run_config)
        ledger_path = cfg.ledger_path(run_config, state)
        stats_path = cfg.exact_head_ledger_path(run_config, state, ledger_path)
        registry_path = cfg.site_registry_path(run_config, state)
        path = cfg.report_path(run_config, state, ledger_path, context.run_id, mode,
                               protected=tuple(p for p in (registry_path, state / cfg.FEDERATION_RECORD)
                                               if p is not None),
                               other_ledgers=(stats_path,))
        if run_config.federation_mode == "deployment" and mode == "train" and registry_path is None:
            raise ValueError("federation-mode='deployment' trains only with a site-registry (written by "
                             "deploy.register): every reply is bound to its SuperNode through it")
        # before any ledger opens: a run in another federation mode changes nothing
        cfg.pin_federation_mode(state, run_config.federation_mode, registry_path)
        _run(grid, context.run_id, run_config, mode, state, ledger_path, registry_path, report, stats_path)
    except BaseException as err:  # recorded, then re-raised: the run still fails
        report["error"] = {"type": type(err).__name__, "message": str(err)[:4000]}
        log.error("%s run %s failed: %s: %s", mode, context.run_id, type(err).__name__, err)
        raise
    finally:
        report["wall_s"] = time.time() - started
        _write_report(report, path or _fallback_report_path(state, context.run_id, mode))


def _run(grid: Grid, run_id, run_config, mode: str, state: Path, ledger_path: Path,
         registry_path: Path | None, report: dict, stats_path: Path | None = None) -> None:
    """The run itself; fills ``report`` as it goes, so a failure keeps what was done before it.

    Everything that needs torch (w0, φ's backbone, the evaluation) runs in child processes
    (server.model_process): this process never imports it, so none of it stays resident."""
    run_config = as_run_config(run_config)
    federation = cfg.federation_mode(run_config)
    witness = cfg.witness_path(state)
    report["witness"] = None if witness is None else str(witness)
    if witness is None and federation == "deployment":
        log.warning("no witness ($TAFT_WITNESS): a rollback of the ledger and its head file would pass `verify`")
    # A deployment trusts the registry only as the operator signed it (deploy.register).
    registry = SiteRegistry(registry_path, signed=federation == "deployment") if registry_path is not None else None
    spec = cfg.model_spec(run_config)
    timeout = run_config.round_timeout
    started = time.perf_counter()
    described = model_process.call(model_process.describe_model, spec.to_config(), run_config.to_config(),
                                   _exact_head_wanted(run_config, mode, stats_path), timeout=timeout)
    base_digest = described["base_digest"]
    expected_spec = {k: tuple(v) for k, v in described["delta_shapes"].items()}
    report["model_setup_s"] = time.perf_counter() - started
    max_norm = run_config.max_delta_norm or None  # 0 = no bound
    report |= {"federation_mode": federation, "state_dir": str(state), "spec": spec.to_config(),
               "base_digest": base_digest, "ledger_path": str(ledger_path),
               "site_registry": None if registry_path is None else str(registry_path)}
    log.info("%s run %s (%s): ledger %s, base digest %s", mode, run_id, federation, ledger_path, base_digest)
    exact_head = run_exact_head(spec, run_config, mode, stats_path, report, described=described["exact_head"])
    evaluation = CentralEvaluation.start(spec.to_config(), base_digest, run_config,  # builds in the background
                                         exact_head=exact_head is not None, timeout=timeout, workdir=state)

    with ExitStack() as opened:
        opened.callback(evaluation.close)  # its private copy of the test rows goes with the run  # both ledgers open before anything changes: a removal reaches both
        ledger = opened.enter_context(Ledger.open(ledger_path, max_delta_norm=max_norm, expected_base_digest=base_digest,
                                                  weighting=run_config.weighting, expected_spec=expected_spec,
                                                  model_spec=spec.to_config(), witness=witness))
        stats_ledger = None if exact_head is None else opened.enter_context(Ledger.open(
            stats_path, family="stats", model_card=exact_head.model_card,
            expected_base_digest=exact_head.feature_digest, witness=witness))
        ledger.set_admission_policy(max_delta_norm=max_norm)  # every later path in applies it too
        if stats_ledger is not None:
            link(ledger, stats_ledger)  # the operator's tools find it from the Δ ledger
        elif mode == "unlearn" and (unopened := stats_path_of(ledger)) is not None:
            raise LedgerError(f"this state's statistics ledger is {unopened}, not the run's exact-head-ledger-path: "
                              f"a removal must reach both model families")
        held = None
        if cfg.quarantine_enabled(run_config) or held_path_of(ledger) is not None:  # a removal reaches it too
            held = _open_quarantine(opened, ledger, stats_ledger, exact_head, max_norm, expected_spec, base_digest,
                                    witness)
        ledgers = Ledgers(ledger, stats_ledger, held)
        if mode == "unlearn":
            report |= unlearn(ledgers, cfg.remove_sites(run_config), evaluation, run_id,
                               requests=cfg.withdrawal_requests(run_config), registry=registry,
                               ledger_path=ledger_path, state=state, federation=federation, exact_head=exact_head)
        else:
            binding = SenderBinding(registry) if federation == "deployment" else None
            train(grid, ledgers, spec, base_digest, evaluation, run_config, binding, report, exact_head=exact_head)
        report["ledger"] = _ledger_summary(ledger)
        if stats_ledger is not None:
            report["exact_head_ledger"] = _ledger_summary(stats_ledger)
    report["central_evaluation"] = evaluation.summary()


def _open_quarantine(opened: ExitStack, ledger: Ledger, stats_ledger: Ledger | None, exact_head, max_norm,
                     expected_spec, base_digest, witness) -> Ledgers:
    """The quarantine's pair (server.quarantine), opened with this run's admission policy and linked
    from the Δ ledger, so every tool finds it."""
    folder = Path(ledger.path).resolve().parent / quarantine.FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    held_delta = opened.enter_context(Ledger.open(folder / "ledger.sqlite", max_delta_norm=max_norm,
                                                  expected_base_digest=base_digest, expected_spec=expected_spec,
                                                  weighting=ledger.settings()["weighting"], witness=witness))
    held_delta.set_admission_policy(max_delta_norm=max_norm)
    held_stats = None
    if stats_ledger is not None:
        held_stats = opened.enter_context(Ledger.open(folder / "exact_head.sqlite", family="stats",
                                                      model_card=stats_ledger.model_card,
                                                      expected_base_digest=exact_head.feature_digest,
                                                      witness=witness))
        link(held_delta, held_stats)
    link(ledger, held_delta, HELD_LINK)
    return Ledgers(held_delta, held_stats)


def _ledger_summary(ledger: Ledger) -> dict:
    version = ledger.current_version()
    return {"path": str(ledger.path), "version": version.version, "event": version.event,
            "active_sites": sorted((s.site_id for s in ledger.sites() if s.active_contribution_id is not None),
                                   key=site_order),
            "withdrawn_sites": sorted(ledger.withdrawn_sites(), key=site_order),
            "total_weight": version.total_weight}


def _exact_head_wanted(run_config, mode: str, stats_path: Path | None) -> bool:
    """Training: ``exact-head=true`` outside DP runs. Unlearning: also whenever the statistics
    ledger exists (a removal must reach it)."""
    return stats_path is not None and (cfg.exact_head_enabled(run_config)
                                       or (mode == "unlearn" and stats_path.exists()))


def run_exact_head(spec, run_config, mode: str, stats_path: Path | None, report: dict, *,
                described: dict | None = None) -> ExactHead | None:
    """The exact head of this run (:func:`_exact_head_wanted`), or None. ``described``:
    server.exact_head.describe_features' answer when the caller has it, else it is computed in a
    child process."""
    enabled = cfg.exact_head_enabled(run_config)
    if cfg.exact_head_requested(run_config) and cfg.dp_required(run_config) and not enabled:
        log.warning("exact head OFF in this DP run (dp=true, dp-head-share=0): the sites send no statistics")
        report["exact_head"] = {"enabled": False, "reason": "dp run without dp-head-share: no statistics are sent"}
    if not _exact_head_wanted(run_config, mode, stats_path):
        report.setdefault("exact_head", {"enabled": False})
        return None
    started = time.perf_counter()
    if described is None:
        described = model_process.call(describe_features, spec.to_config(), run_config.to_config(),
                                       timeout=run_config.round_timeout)
    exact_head = ExactHead.from_description(described, spec.to_config(), dp_head_request(run_config, described))
    report["exact_head"] = exact_head.report() | {"enabled": enabled, "ledger_open": True,
                                                 "ledger_path": str(stats_path),
                                                 "setup_s": time.perf_counter() - started}
    log.info("exact head: p = %d features (%.1f MiB of statistics per site), feature digest %s…, ledger %s",
             exact_head.expectation.num_features, exact_head.bytes_per_site / 2 ** 20, exact_head.feature_digest[:12],
             stats_path)
    return exact_head


def _fallback_report_path(state: Path | None, run_id, mode: str) -> Path | None:
    """Where a run whose report path could not be worked out still leaves its report."""
    mode = mode if mode in cfg.MODES else "refused"  # the run config's mode is no file name
    return None if state is None else state / "reports" / f"{mode}-{int(run_id)}.json"


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


def train(grid: Grid, ledgers: Ledger | Ledgers, spec, base_digest: str, evaluation, run_config,
           binding: SenderBinding | None, report: dict, *, exact_head: ExactHead | None = None) -> None:
    ledgers = Ledgers.of(ledgers)
    ledger = ledgers.delta
    run_config = as_run_config(run_config)
    min_nodes = run_config.min_nodes
    announced = spec.to_config() | (exact_head.spec_keys() if exact_head is not None else {"exact-head": False})
    strategy = LedgerFedAvg(ledger, announced, base_digest, binding=binding,
                            quarantine=ledgers.held if cfg.quarantine_enabled(run_config) else None,
                            require_dp=cfg.dp_required(run_config),
                            stats_ledger=ledgers.stats if exact_head is not None else None,
                            exact_head=None if exact_head is None else exact_head.expectation,
                            train_records=None if exact_head is None else exact_head.train_records(),
                            fraction_train=run_config.fraction_train,
                            fraction_evaluate=run_config.fraction_evaluate,
                            min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                            min_available_nodes=min_nodes)
    central: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Round 0 (before any train message) is the previous run's model, already evaluated and
        # reported by it: evaluating it here would make the sites wait for the test inputs.
        if server_round == 0 or len(arrays) == 0 or not evaluation.enabled:
            return None
        if (result := evaluation(_delta(arrays), stats=_composed_stats(ledgers, exact_head))) is None:
            return None
        central[server_round] = result
        log.info("round %d: central accuracy %.4f on %d test images%s", server_round,
                 central[server_round]["accuracy"], central[server_round]["num-examples"], _exact_line(result))
        return MetricRecord(central[server_round])

    initial = composed_arrays(ledger) if ledger.current_version().total_weight else ArrayRecord()
    if simulation_engine.look_up_by_destination(grid):
        log.info("simulation engine: a site's work is looked up by its destination")
    try:
        strategy.start(grid=StreamingGrid(grid, max_in_flight=run_config.max_in_flight), initial_arrays=initial,
                       num_rounds=run_config.num_rounds,
                       timeout=run_config.round_timeout,
                       train_config=ConfigRecord(cfg.train_config(run_config)), evaluate_fn=evaluate_fn)
    finally:  # a failed round still reports the rounds before it (main adds the error)
        rounds = [strategy.rounds[r].as_dict() for r in sorted(strategy.rounds)]
        last = max(central) if central else None
        report |= {"rounds": rounds, "central": {str(k): v for k, v in central.items()},
                   "accuracy": central[last]["accuracy"] if last else None,
                   "accuracy_exact_head": central[last].get("accuracy_exact_head") if last else None,
                   "exact_head_lambda": central[last].get("exact_head_lambda") if last else None,
                   "rejected": sum(len(r["rejections"]) for r in rounds),
                   # every update received, recorded or refused (the ledger's totals: recorded only)
                   "privacy_received": privacy_received(strategy.rounds.values())}


def _composed_stats(ledgers: Ledgers, exact_head: ExactHead | None):
    """The statistics ledger's composed statistics (None: exact head off, or nothing active); DP
    releases with their summed declared noise (ExactHead.composed)."""
    if ledgers.stats is None:
        return None
    return ledgers.stats.composed_stats() if exact_head is None else exact_head.composed(ledgers.stats)


def _exact_line(result: dict) -> str:
    if "accuracy_exact_head" not in result:
        return ""
    return (f"; exact head {result['accuracy_exact_head']:.4f} (λ = {result['exact_head_lambda']:.3g}, "
            f"n = {result['exact_head_examples']})")


REMOVE_SITES_REFUSED = ("federation-mode='deployment' does not obey remove-sites: whoever can submit a run "
                        "would remove any site unsigned. The operator signs a withdrawal request with the "
                        "admin key (signer='admin', deploy.withdraw) and passes it as withdrawal-requests")


def unlearn(ledgers: Ledger | Ledgers, sites: list[str], evaluation, run_id, *, requests: list[str] = (),
             registry: SiteRegistry | None = None, ledger_path: Path | None = None, state: Path | None = None,
             federation: str = "simulation", exact_head: ExactHead | None = None) -> dict:
    """Remove the listed sites and the sites of the accepted withdrawal requests from every ledger."""
    ledgers = Ledgers.of(ledgers)
    ledger = ledgers.delta
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
    withdrawals = apply_withdrawals(ledgers, list(requests), registry, ledger_path, state) if requests else []
    result["removed_sites"] += [w["site_id"] for w in withdrawals if w["accepted"]]
    for site in sites:
        try:
            check_site_id(site)
        except ValueError as err:
            result.setdefault("invalid_site_ids", []).append(str(err))
            log.warning("remove-sites: %s", err)
            continue
        had_contribution = ledgers.has_active(site)
        ledgers.remove(site, reason=f"unlearning run {run_id}")  # from both ledgers; marks it withdrawn (sticky)
        if had_contribution:
            result["removed_sites"].append(site)
            log.info("removed site %s from the ledger", site)
        else:
            result["not_found"].append(site)
            log.warning("site %s has no active contribution: nothing to subtract (it stays withdrawn)", site)
    result |= {"withdrawals": withdrawals, "withdrawals_refused": sum(not w["accepted"] for w in withdrawals)}
    if ledger.current_version().total_weight and (
            central := evaluation(ledger.composed_arrays(), stats=_composed_stats(ledgers, exact_head))) is not None:
        result["central"] = {"0": central}
        result["accuracy"] = central["accuracy"]
        result["accuracy_exact_head"] = central.get("accuracy_exact_head")
        result["exact_head_lambda"] = central.get("exact_head_lambda")
        log.info("after removal: central accuracy %.4f%s", result["accuracy"], _exact_line(central))
    else:
        result["accuracy"] = None
        log.warning("nothing evaluated after removal (empty ledger or no test data)")
    return result


def apply_withdrawals(ledger: Ledgers, requests: list[str], registry: SiteRegistry, ledger_path: Path,
                       state: Path) -> list[dict]:
    """Verify each signed request and subtract its site from every ledger; a refused one changes nothing.

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
