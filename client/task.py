"""What a site does for a ``train`` or ``evaluate`` message, as plain functions of records.

Protocol (docs/design.md): the server sends ``RecordDict({"spec", "config"})`` (+ ``"delta"``,
the composed Δ, for evaluate). A train reply is ``RecordDict({"delta", "metrics", "meta"})``,
plus ``"stats"`` and ``"stats-meta"`` (the exact head's sufficient statistics, docs/exact_head.md)
when the spec says ``exact-head`` and the run is not DP; every refusal is a reply
``RecordDict({"error": ConfigRecord(code, reason, site-id)})`` so the
server can record it, never an exception that would cost the round other sites' work.
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

from client.policy import SitePolicy
from client.site import SiteError, load_split, site_id
from tangent.protocol.spec import ModelSpec, fresh_model

log = logging.getLogger("taft.client")

#: the site's private map contribution-id -> shard, in its state-dir
CONTRIBUTIONS_FILE = "contributions.jsonl"

#: config keys -> TrainConfig fields
TRAIN_KEYS = {"epochs": "epochs", "batch-size": "batch_size", "lr": "lr", "loss": "loss",
              "kappa": "kappa", "rsl-alpha": "alpha", "l2": "l2", "radius": "radius",
              "guard-ridge": "guard_ridge"}


def error_reply(code: str, reason: str, site: str | None = None) -> RecordDict:
    record = {"code": code, "reason": reason}
    if site is not None:
        record["site-id"] = site
    return RecordDict({"error": ConfigRecord(record)})


def _refusals(handler):
    """Turn every failure of ``handler`` into an error reply (known ones with their own code)."""
    def wrapped(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]):
        try:
            site = site_id(node_config)
        except SiteError as err:
            return error_reply(err.code, str(err))
        try:
            return handler(content, node_config, run_config, site)
        except SiteError as err:
            log.warning("site %s refuses: %s", site, err)
            return error_reply(err.code, str(err), site)
        except Exception as err:  # noqa: BLE001 — reported to the server, not swallowed
            from tangent.training.budget import BudgetExhausted, BudgetMissing

            for kind, code in ((BudgetExhausted, "budget_exhausted"), (BudgetMissing, "budget_missing")):
                if isinstance(err, kind):
                    log.warning("site %s refuses: %s", site, err)
                    return error_reply(code, str(err), site)
            log.exception("site %s failed", site)
            return error_reply("internal", f"{type(err).__name__}: {err}\n"
                                           f"{traceback.format_exc(limit=4)}", site)
        finally:
            # The data loader leaves reference cycles that hold this site's batches and token
            # dataset; a Ray worker runs many sites, so free them now rather than at some later
            # collection (measured when rows were still read through the memory map: ~0.7 GB of
            # mapped cache pages per worker otherwise).
            gc.collect()
            _release_free_heap()
    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


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
    except (ValueError, TypeError) as err:
        raise SiteError("bad_request", f"model spec: {err}") from err
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
    from tangent.data.device import DEFAULT, resolve_device

    if str(node_config.get("device", "") or ""):
        value, setting = node_config["device"], "node config device"
    else:
        value, setting = run_config.get("device", DEFAULT) or DEFAULT, "run config device"
    try:
        return resolve_device(str(value), setting=setting)
    except ValueError as err:
        raise SiteError("bad_device", str(err)) from err


_EXTRACTORS: dict[tuple, Any] = {}


def feature_extractor(spec: ModelSpec, feature_spec):
    """The exact head's FeatureExtractor for (model spec, feature spec), built once per process
    (a Ray worker serves many sites) and its digest hashed once; one at a time."""
    from tangent.exact_head.features import FeatureExtractor

    key = (spec, feature_spec)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()
        extractor = FeatureExtractor.from_spec(spec, feature_spec)
        extractor.digest()
        _EXTRACTORS[key] = extractor
    return _EXTRACTORS[key]


def _check_features(content: RecordDict, spec: ModelSpec):
    """The FeatureExtractor the spec asks for (None when exact-head is off), refused unless our
    feature digest equals the server's."""
    from tangent.exact_head.feature_spec import FeatureSpec

    record = content.config_records["spec"]
    if not bool(record.get("exact-head", False)):
        return None
    try:
        feature_spec = FeatureSpec.from_config(record)
    except (ValueError, TypeError) as err:
        raise SiteError("bad_request", f"feature spec: {err}") from err
    extractor = feature_extractor(spec, feature_spec)
    expected = str(record.get("feature-digest", ""))
    if extractor.digest() != expected:
        raise SiteError("feature_digest_mismatch",
                        f"local feature digest {extractor.digest()} differs from the server's "
                        f"{expected or '(none)'} for {feature_spec}: different pretrained weights, random "
                        "features or library versions at this site")
    return extractor


def stats_records(extractor, data, num_classes: int) -> dict:
    """The exact head's part of a train reply (contract: ``stats`` int64 arrays of
    SufficientStats.to_arrays, ``stats-meta`` = the grid + the feature digest)."""
    from client.stats import site_statistics

    stats = site_statistics(extractor, data, num_classes)
    meta = ConfigRecord(stats.meta() | {"feature-digest": extractor.digest()})
    record = ArrayRecord({name: Array(array) for name, array in stats.to_arrays().items()}, keep_input=False)
    return {"stats": record, "stats-meta": meta}


def train_config(config: Mapping[str, Any]):
    from tangent.training.trainer import TrainConfig

    values = {field: config[key] for key, field in TRAIN_KEYS.items() if key in config}
    if "radius" in values:
        values["radius"] = float(values["radius"]) or None  # 0 = no projection
    if "guard_ridge" in values:
        values["guard_ridge"] = float(values["guard_ridge"])
    for field in ("epochs", "batch_size"):
        if field in values:
            values[field] = int(values[field])
    return TrainConfig(seed=int(config.get("seed", 0)), **values)


def privacy_setup(request, policy, num_examples: int):
    """The PrivacyConfig for an accepted DP request: N_pub (declared or bucketed) and δ."""
    from tangent.training.privacy import PrivacyConfig, default_delta, public_count

    num_public = public_count(num_examples, policy.declared_examples)
    delta = min(request.requested_delta or default_delta(num_public), request.delta_ceiling)
    if delta >= 1.0 / num_public:
        raise SiteError("delta_too_large", f"δ={delta:g} is not below 1/N_pub = {1.0 / num_public:g} "
                                           f"(N_pub = {num_public}); lower max-delta or dp-delta")
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
    request = policy.check_request(config)
    budget = None
    if request is not None:
        budget = policy.budget(site)
        if budget is not None:
            budget.check(request.target_epsilon, request.requested_delta or request.delta_ceiling)
    cfg = train_config(config)
    device = site_device(node_config, run_config)
    spec, model, digest = _check_spec(content, node_config)
    # DP runs send no statistics (their DP release is measured offline, docs/exact_head.md)
    extractor = _check_features(content, spec) if request is None else None
    model.to(device)  # before load_split: a cache this site has to build is built there too
    data = load_split("train", model, digest, spec.img_size, node_config, run_config)
    privacy = None if request is None else privacy_setup(request, policy, data.num_examples)
    contribution_id = None if privacy is None else secrets.token_hex(16)
    torch.manual_seed(cfg.seed)  # the non-DP path only: DP draws from OS entropy
    result = fit(model, data.inputs, data.labels, cfg, privacy=privacy, from_cache=data.from_cache,
                 budget=budget, contribution_id=contribution_id, progress=False, device=device)
    delta = model.delta_state_dict()
    train_config_json = json.dumps({k: config[k] for k in TRAIN_KEYS if k in config}
                                   | {"seed": cfg.seed}, sort_keys=True)
    log.info("site %s: %d examples, loss %.4f, acc %.3f, %.1f s", site, result.num_examples,
             result.loss, result.accuracy, result.wall_s)
    if privacy is not None:
        _remember_contribution(policy, contribution_id, data, result, privacy)
        return RecordDict({"delta": ArrayRecord(delta), **dp_reply(
            site, digest, contribution_id, privacy, result, train_config_json)})
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
        "dp": False, "dp-target-epsilon": 0.0, "dp-max-grad-norm": 0.0, "dp-noise-multiplier": 0.0,
        "train-config": train_config_json, "pid": os.getpid()})
    reply = {"delta": ArrayRecord(delta), "metrics": metrics, "meta": meta}
    if extractor is not None:
        # after training, with its memory given back first: the statistics' products (p×p
        # float64 and int64) must not stack on the training peak of the worker
        del result, delta
        gc.collect()
        _release_free_heap()
        reply |= stats_records(extractor, data, spec.num_classes)
    return RecordDict(reply)


def dp_reply(site: str, digest: str, contribution_id: str, privacy, result,
             train_config_json: str) -> dict:
    """The metrics and meta of a DP reply: the mechanism's (ε, δ, σ), the public count, and what
    the server sent or already knows — nothing else computed from the data."""
    metrics = MetricRecord({"num-examples": int(privacy.public_examples),
                            "epsilon": float(result.epsilon), "delta": float(result.delta)})
    meta = ConfigRecord({"site-id": site, "base-digest": digest, "contribution-id": contribution_id,
                         "dp": True, "dp-target-epsilon": float(privacy.target_epsilon),
                         "dp-max-grad-norm": float(privacy.max_grad_norm),
                         "dp-noise-multiplier": float(result.noise_multiplier),
                         "train-config": train_config_json})
    return {"metrics": metrics, "meta": meta}


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
    """The composed model (w0 + the Δ the server sends) on the site's local test split."""
    import torch

    from tangent.training.trainer import evaluate as evaluate_model

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
