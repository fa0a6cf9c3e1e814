"""What a site does for a ``train`` or ``evaluate`` message, as plain functions of records.

Protocol (docs/design.md): the server sends ``RecordDict({"spec", "config"})`` (+ ``"delta"``,
the composed Δ, for evaluate). A train reply is ``RecordDict({"delta", "metrics", "meta"})``,
plus ``"stats"`` and ``"stats-meta"`` (the exact head's sufficient statistics, docs/exact_head.md)
when the spec says ``exact-head`` and the run is not DP; every refusal is a reply
``RecordDict({"error": ConfigRecord(code, reason, site-id)})`` so the
server can record it, never an exception that would cost the round other sites' work. A DP
site's refusal holds only its code and that code's fixed text (:data:`PRIVATE_REFUSALS`): a
refusal must not depend on the data it protects.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import secrets
import time
import traceback
from typing import Any, Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client import dp_head
from client.policy import SitePolicy, answers_privately
from client.site import RUN_SPEC_FILE, SiteError, load_split, parse_node_config, parse_run_config, parse_train_request, site_id
from tangent.protocol.config import ConfigError, TrainRequest, as_run_config, parse_bool
from tangent.protocol.spec import ModelSpec, fresh_model

log = logging.getLogger("taft.client")

#: the site's private map contribution-id -> shard, in its state-dir
CONTRIBUTIONS_FILE = "contributions.jsonl"

#: the train request's keys that configure local training (recorded in a reply's train-config)
TRAINING_KEYS = ("epochs", "batch-size", "lr", "loss", "kappa", "rsl-alpha", "l2", "radius", "guard-ridge", "seed")


def error_reply(code: str, reason: str, site: str | None = None) -> RecordDict:
    record = {"code": code, "reason": reason}
    if site is not None:
        record["site-id"] = site
    return RecordDict({"error": ConfigRecord(record)})


#: What a DP site may say when it refuses: one fixed text per code, computed from nothing the
#: site holds. Every other failure (anything once the data is read: a missing or malformed file,
#: an exception in training) is :data:`PRIVATE_FAILURE`, with its own fixed text: its details
#: (paths, labels, counts, tracebacks) go to the site's log only.
PRIVATE_REFUSALS = {
    "bad_request": "the request is malformed or incomplete",
    "bad_node_config": "this site's node config is malformed",
    "bad_run_config": "the run config is malformed",
    "dp_required": "this site trains only with differential privacy; the request has dp=false",
    "epsilon_too_large": "the requested epsilon exceeds this site's per-contribution limit",
    "delta_too_large": "the requested delta exceeds this site's limit",
    "budget_exhausted": "this site's privacy budget does not cover the request",
    "budget_missing": "this site's privacy-budget record is missing, damaged or rolled back",
    "base_digest_mismatch": "this site's base-model digest differs from the server's",
    "feature_digest_mismatch": "this site's feature digest differs from the server's",
    "bad_device": "this site's device setting is invalid",
    "evaluate_refused": "a DP site does not evaluate: its test data would be released without noise",
}
PRIVATE_FAILURE = ("site_failed", "this site could not contribute (details are in its own log)")


def _refusal_reply(content: RecordDict, node_config: Mapping[str, Any], code: str, reason: str,
                   site: str) -> RecordDict:
    """The error reply for a refusal: as it is, or, on a DP site, with the code's fixed text."""
    config = content.config_records.get("config", ConfigRecord())
    if not answers_privately(node_config, config):
        return error_reply(code, reason, site)
    if code in PRIVATE_REFUSALS:
        return error_reply(code, PRIVATE_REFUSALS[code], site)
    return error_reply(*PRIVATE_FAILURE, site)


def _refusals(handler):
    """Turn every failure of ``handler`` into an error reply (known ones with their own code).

    The node config and the run config are parsed here, once per message, by the parser the
    server uses (tangent.protocol.config): a key or value it refuses is refused here too."""
    def wrapped(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]):
        try:
            node_config = parse_node_config(node_config).to_config()
            site = site_id(node_config)
        except SiteError as err:
            # a node config that cannot be read may hold a DP policy: answer as a DP site would
            log.warning("site refuses: %s", err)
            return error_reply(err.code, PRIVATE_REFUSALS.get(err.code, PRIVATE_FAILURE[1]))
        try:
            run_config = parse_run_config(run_config).to_config()
            return handler(content, node_config, run_config, site)
        except SiteError as err:
            log.warning("site %s refuses: %s", site, err)
            return _refusal_reply(content, node_config, err.code, str(err), site)
        except Exception as err:  # noqa: BLE001 — reported to the server, not swallowed
            from tangent.training.budget import BudgetExhausted, BudgetMissing

            for kind, code in ((BudgetExhausted, "budget_exhausted"), (BudgetMissing, "budget_missing")):
                if isinstance(err, kind):
                    log.warning("site %s refuses: %s", site, err)
                    return _refusal_reply(content, node_config, code, str(err), site)
            log.exception("site %s failed", site)
            return _refusal_reply(content, node_config, "internal", f"{type(err).__name__}: {err}\n"
                                  f"{traceback.format_exc(limit=4)}", site)
        finally:
            # The data loader leaves reference cycles that hold this site's batches and token
            # dataset; a Ray worker runs many sites, so free them now rather than at some later
            # collection (measured when rows were still read through the memory map: ~0.7 GB of
            # mapped cache pages per worker otherwise).
            gc.collect()
            _freeze_survivors_once()
            _release_free_heap()
    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _freeze_survivors_once() -> None:
    """After a worker's first site: move every object still alive (the imported torch, Flower and
    Ray modules, ~440k objects) out of the cyclic collector's reach (``gc.freeze``), so that each
    later ``gc.collect`` scans only what later sites allocate. A full collection over that heap
    took 0.23 s, twice a site: measured 42 % of a Ray worker's CPU time in a 100-site run of
    60-image sites. Frozen objects are still freed by reference counting; only cycles among
    them, made after the freeze, would stay. A flag, not ``gc.get_freeze_count()``: that walks
    the whole frozen list (measured: ~70 ms a site)."""
    global _survivors_frozen
    if not _survivors_frozen:
        gc.freeze()
        _survivors_frozen = True


_survivors_frozen = False


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS. A Ray worker serves many sites one after
    the other; without this its heap keeps the high-water mark of every site's batches and
    replies (measured: 270-560 MB of [heap] per worker in a 6-site run)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _check_spec(content: RecordDict, node_config: Mapping[str, Any]) -> tuple[ModelSpec, Any, str]:
    """w0 from the server's spec (with this site's backbone weights file, node config
    ``backbone-weights``), refused unless our digest equals the server's."""
    if "spec" not in content.config_records:
        raise SiteError("bad_request", "message has no 'spec' ConfigRecord")
    record = content.config_records["spec"]
    try:
        spec = ModelSpec.from_config(record).at_site(node_config)
    except (ValueError, TypeError) as err:  # ConfigError is a ValueError
        raise SiteError("bad_request", f"spec {err}") from None
    check_backbone_weights(spec)
    from tangent.model.checkpoint import CheckpointError

    try:
        model, digest = fresh_model(spec)
    except CheckpointError as err:  # the file is the run's but does not build here (its config)
        raise SiteError("bad_backbone", str(err)) from err
    expected = str(record.get("base-digest", ""))
    if digest != expected:
        raise SiteError("base_digest_mismatch",
                        f"local w0 digest {digest} differs from the server's {expected or '(none)'} for "
                        f"{spec}: different pretrained weights or library versions at this site")
    return spec, model, digest


def check_backbone_weights(spec: ModelSpec) -> None:
    """A weights-file backbone: refused before anything is built unless this site's file is the
    one the server announced (its sha256), with both named."""
    if not spec.backbone_weights:
        return
    from tangent.model.checkpoint import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(spec.backbone_weights)
    except CheckpointError as err:
        raise SiteError("missing_backbone", f"{err} (node config backbone-weights)") from err
    if ckpt.sha256 != spec.backbone_sha256:
        raise SiteError("base_digest_mismatch",
                        f"this site's backbone weights {ckpt.weights} (sha256 {ckpt.sha256}) are not the "
                        f"run's {spec.backbone} weights (sha256 {spec.backbone_sha256 or '(none announced)'}): "
                        "give this site the run's file (node config backbone-weights)")


def site_device(node_config: Mapping[str, Any], run_config: Mapping[str, Any]):
    """Where this site runs the model: node config ``device``, else the run config's (auto)."""
    from tangent.data.device import resolve_device

    if node_config.get("device"):
        value, setting = node_config["device"], "node config device"
    else:
        value, setting = as_run_config(run_config).device, "run config device"
    try:
        return resolve_device(str(value), setting=setting)
    except ValueError as err:
        raise SiteError("bad_device", str(err)) from err


_EXTRACTORS: dict[tuple, Any] = {}


def feature_extractor(spec: ModelSpec, feature_spec, model=None):
    """The exact head's FeatureExtractor for (model spec, feature spec), built once per process
    (a Ray worker serves many sites) and its digest hashed once; one at a time. With ``model``
    (this process's cached w0 of the same spec) the backbone tensors equal to w0's are shared
    with it: one copy of the pretrained weights per worker instead of two."""
    from tangent.exact_head.features import FeatureExtractor

    key = (spec, feature_spec)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()
        extractor = FeatureExtractor.from_spec(spec, feature_spec)
        extractor.digest()
        if model is not None and model.w0_module is not None:
            extractor.share_tensors_with(model.w0_module)
        _EXTRACTORS[key] = extractor
    return _EXTRACTORS[key]


def _check_features(content: RecordDict, spec: ModelSpec, model=None):
    """The FeatureExtractor the spec asks for (None when exact-head is off), refused unless our
    feature digest equals the server's (sharing w0's equal tensors when ``model`` is given)."""
    from tangent.exact_head.feature_spec import FeatureSpec

    record = content.config_records["spec"]
    try:
        if not parse_bool("exact-head", record.get("exact-head", False)):
            return None
    except ConfigError as err:
        raise SiteError("bad_request", f"spec {err}") from None
    try:
        feature_spec = FeatureSpec.from_config(record)
    except (ValueError, TypeError) as err:
        raise SiteError("bad_request", f"feature spec: {err}") from err
    extractor = feature_extractor(spec, feature_spec, model)
    expected = str(record.get("feature-digest", ""))
    if extractor.digest() != expected:
        raise SiteError("feature_digest_mismatch",
                        f"local feature digest {extractor.digest()} differs from the server's "
                        f"{expected or '(none)'} for {feature_spec}: different pretrained weights, random "
                        "features or library versions at this site")
    return extractor


def stats_records(extractor, data, num_classes: int, node_config: Mapping[str, Any] | None = None) -> dict:
    """The exact head's part of a train reply: ``stats`` in the Gram form (int64 arrays of
    SufficientStats.to_arrays) or the row form (int32 ``rows`` + int64 ``labels``,
    tangent/exact_head/row_form.py; the site's node config ``stats-form`` chooses), and
    ``stats-meta`` = the grid + the feature digest."""
    from client.stats import site_quantized_rows, site_statistics, stats_form
    from tangent.exact_head.row_form import row_arrays
    from tangent.exact_head.statistics import grid_meta

    spec = extractor.spec
    meta = ConfigRecord(grid_meta(extractor.dim, num_classes, spec.clip_norm, spec.frac_bits)
                        | {"feature-digest": extractor.digest()})
    if stats_form(node_config or {}, data.num_examples, extractor.dim, num_classes) == "rows":
        arrays = row_arrays(*site_quantized_rows(extractor, data), spec.frac_bits)
    else:
        arrays = site_statistics(extractor, data, num_classes).to_arrays()
    record = ArrayRecord({name: Array(array) for name, array in arrays.items()}, keep_input=False)
    return {"stats": record, "stats-meta": meta}


def train_config(request: TrainRequest):
    """The TrainConfig of a parsed train request: every field set from the request."""
    from tangent.training.trainer import TrainConfig

    return TrainConfig(epochs=request.epochs, batch_size=request.batch_size, lr=request.lr, loss=request.loss,
                       kappa=request.kappa, alpha=request.rsl_alpha, l2=request.l2,
                       radius=request.radius or None,  # 0 = no projection
                       guard_ridge=request.guard_ridge, seed=request.seed)


def privacy_setup(request, policy, num_examples: int):
    """The PrivacyConfig for an accepted DP request: N_pub (declared or bucketed) and δ.

    δ stays below 1/n for the true n, not only for N_pub: a declared count must cover every
    row the site trains on (``declared_too_small`` otherwise), and a power-of-two bucket
    N_pub > n/2 needs δ < 1/(2·N_pub). Both checks read N_pub and the site's own setting only."""
    from tangent.training.privacy import PrivacyConfig, default_delta, public_count

    declared = policy.declared_examples
    if declared is not None and num_examples > declared:
        raise SiteError("declared_too_small", f"the site trains on {num_examples} examples but declares "
                                              f"{declared}: δ would not be below 1/n; raise declared-examples")
    num_public = public_count(num_examples, declared)
    delta = min(request.requested_delta or default_delta(num_public), request.delta_ceiling)
    bound = num_public if declared is not None else 2 * num_public
    if delta >= 1.0 / bound:
        raise SiteError("delta_too_large", f"δ={delta:g} is not below 1/{bound} (N_pub = {num_public}"
                                           f"{'' if declared is not None else ', n < 2·N_pub'}); lower "
                                           "max-delta or dp-delta")
    return PrivacyConfig(target_epsilon=request.target_epsilon, target_delta=delta,
                         max_grad_norm=request.max_grad_norm, public_examples=num_public)


@_refusals
def train(content: RecordDict, node_config, run_config, site: str) -> RecordDict:
    """TAFT from w0 (never from the global model) on the local data; reply with Δw only.

    The site's policy (client.policy) is checked before any data is touched, and a budgeted
    site's (ε, δ) is charged atomically before the first step (tangent.training.budget). A DP reply holds
    only the mechanism's output and public values (contract in README, "Differential privacy").
    """
    import torch

    from tangent.training.trainer import fit

    start = time.perf_counter()
    # the site's policy first: a request it refuses costs no model build and touches no data
    policy = SitePolicy.from_node_config(node_config)
    config = content.config_records["config"] if "config" in content.config_records else ConfigRecord()
    # the DP head's request keys are read by client.dp_head; every other key by the one parser
    train_request = parse_train_request({k: v for k, v in config.items() if k not in dp_head.REQUEST_KEYS})
    request = policy.check_request(train_request)
    head = None if request is None else dp_head.head_request(content, config)
    budget = None
    if request is not None:
        budget = policy.budget(site)
        if budget is not None:  # the contribution (DP-TAFT and the head composed) must fit before any data is touched
            budget.check(request.target_epsilon, request.requested_delta or request.delta_ceiling)
    cfg = train_config(train_request)
    device = site_device(node_config, run_config)
    spec, model, digest = _check_spec(content, node_config)
    # a DP run sends statistics only as the DP head's release (client/dp_head.py)
    extractor = _check_features(content, spec, model) if request is None or head is not None else None
    if head is not None and extractor is None:  # before any data is read or budget charged
        raise SiteError("bad_request", "a DP head request needs exact-head in the spec")
    if extractor is not None and request is None:
        remember_run_spec(policy.state_dir, content.config_records["spec"])
    model.to(device)  # before load_split: a cache this site has to build is built there too
    # a DP site leaves out rows it cannot use one by one (covered by its ε) instead of refusing
    data = load_split("train", model, digest, spec.img_size, node_config, run_config,
                      drop_unusable=request is not None)
    privacy = None if request is None else privacy_setup(request, policy, data.num_examples)
    if head is not None:  # one accountant: the head's release is composed with DP-SGD (client/dp_head.py)
        privacy.companions = (head.companion(privacy.target_epsilon, privacy.target_delta),)
    contribution_id = None if privacy is None else secrets.token_hex(16)
    torch.manual_seed(cfg.seed)  # the non-DP path only: DP draws from OS entropy
    result = fit(model, data.inputs, data.labels, cfg, privacy=privacy, from_cache=data.from_cache,
                 budget=budget, contribution_id=contribution_id, progress=False, device=device)
    delta = model.delta_state_dict()
    train_config_json = json.dumps({k: train_request[k] for k in TRAINING_KEYS}, sort_keys=True)
    log.info("site %s: %d examples, loss %.4f, acc %.3f, %.1f s", site, result.num_examples,
             result.loss, result.accuracy, result.wall_s)
    if privacy is not None:
        _remember_contribution(policy, contribution_id, data, result, privacy)
        reply = {"delta": ArrayRecord(delta), **dp_reply(site, digest, contribution_id, privacy, result,
                                                         train_config_json)}
        if head is not None:  # already charged: the contribution's entry is the composition
            reply["meta"]["dp-taft-epsilon"] = float(result.epsilon_parts["dp-sgd"])
            reply |= dp_head.release(extractor, data, spec.num_classes, head, privacy.companions[0].epsilon,
                                     privacy.target_delta, contribution_id)
            dp_head.remember_request(policy.state_dir, content.config_records["spec"], head,
                                     privacy.companions[0].epsilon, privacy.target_delta)
        return RecordDict(reply)
    metrics = MetricRecord({
        # the loss of the Δ actually sent: after the short-schedule guard when it moved it
        "num-examples": int(result.num_examples),
        "train-loss": float(result.guard["loss"] if result.guard else result.loss),
        "train-accuracy": float(result.accuracy),
        "epsilon": math.inf, "delta": 0.0,  # no DP: no guarantee
        "wall-s": time.perf_counter() - start, "fit-s": float(result.wall_s),
        "examples-per-s": float(result.examples_per_s)})
    meta = ConfigRecord({
        "site-id": site, "shard-fingerprint": data.shard_fingerprint, "base-digest": digest,
        "data-digest": data.data_digest, "source": data.source, "from-cache": data.from_cache,
        "dp": False, "dp-epsilon": 0.0, "dp-max-grad-norm": 0.0, "dp-noise-multiplier": 0.0,
        "train-config": train_config_json, "pid": os.getpid()})
    reply = {"delta": ArrayRecord(delta), "metrics": metrics, "meta": meta}
    if extractor is not None:
        # after training, with its memory given back first: the statistics' products (p×p
        # float64 and int64) must not stack on the training peak of the worker
        del result, delta
        gc.collect()
        _release_free_heap()
        reply |= stats_records(extractor, data, spec.num_classes, node_config)
    return RecordDict(reply)


def dp_reply(site: str, digest: str, contribution_id: str, privacy, result,
             train_config_json: str) -> dict:
    """The metrics and meta of a DP reply: the mechanisms' (ε, δ, σ) — ``epsilon`` is the whole
    contribution's, the DP head's release composed in when there is one — the public count, and
    what the server sent or already knows — nothing else computed from the data."""
    metrics = MetricRecord({"num-examples": int(privacy.public_examples),
                            "epsilon": float(result.epsilon), "delta": float(result.delta)})
    meta = ConfigRecord({"site-id": site, "base-digest": digest, "contribution-id": contribution_id,
                         "dp": True, "dp-epsilon": float(privacy.target_epsilon),
                         "dp-max-grad-norm": float(privacy.max_grad_norm),
                         "dp-noise-multiplier": float(result.noise_multiplier),
                         "train-config": train_config_json})
    return {"metrics": metrics, "meta": meta}


def remember_run_spec(state_dir, record) -> None:
    """Save the spec of an accepted exact-head train request as ``<state-dir>/run-spec.json``
    (0600): the site's tools (client.forget) read the run's model and feature settings from it,
    never from defaults of their own. Without a state-dir nothing is saved."""
    if state_dir is None:
        return
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / RUN_SPEC_FILE
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(dict(record), handle, sort_keys=True)
    os.replace(temporary, path)


def _remember_contribution(policy, contribution_id: str, data, result, privacy) -> None:
    """The site's own note of which shard a DP contribution was trained on (for retraining a
    shard after forgetting samples): ``<state-dir>/contributions.jsonl``, 0600. Never sent."""
    if policy.state_dir is None:
        log.warning("no state-dir: the shard of DP contribution %s is not recorded", contribution_id)
        return
    policy.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = json.dumps({"contribution-id": contribution_id, "time": time.time(),
                       "shard-fingerprint": data.shard_fingerprint, "data-digest": data.data_digest,
                       "source": data.source, "num-examples": int(result.num_examples),
                       "public-examples": int(privacy.public_examples),
                       "epsilon": float(result.epsilon), "delta": float(result.delta)})
    fd = os.open(policy.state_dir / CONTRIBUTIONS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@_refusals
def evaluate(content: RecordDict, node_config, run_config, site: str) -> RecordDict:
    """The composed model (w0 + the Δ the server sends) on the site's local test split; refused
    (``evaluate_refused``) by a site whose policy requires DP, before anything else."""
    import torch

    from tangent.training.trainer import evaluate as evaluate_model

    # An exact loss and accuracy on crafted models release the test labels (ten models gave a
    # site's label counts) and nothing charges them to the budget: a DP site does not evaluate.
    if SitePolicy.from_node_config(node_config).require_dp:
        raise SiteError("evaluate_refused", "this site requires differential privacy and does not "
                                            "answer evaluate messages (exact metrics are not private)")
    device = site_device(node_config, run_config)
    spec, model, digest = _check_spec(content, node_config)
    if "delta" not in content.array_records:
        raise SiteError("bad_request", "evaluate message has no 'delta' ArrayRecord")
    record = content.array_records["delta"]
    model.to(device)
    model.load_delta({k: torch.from_numpy(record[k].numpy()) for k in record})
    data = load_split("test", model, digest, spec.img_size, node_config, run_config)
    loss, accuracy = evaluate_model(model, data.inputs, data.labels, data.from_cache, device=device)
    return RecordDict({"metrics": MetricRecord({"num-examples": data.num_examples, "eval-loss": loss,
                                                "eval-accuracy": accuracy}),
                       "meta": ConfigRecord({"site-id": site, "base-digest": digest})})
