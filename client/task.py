"""What a site does for a ``train`` or ``evaluate`` message, as plain functions of records.

Protocol (docs/design.md): the server sends ``RecordDict({"spec", "config"})`` (+ ``"delta"``,
the composed Δ, for evaluate). A train reply is ``RecordDict({"delta", "metrics", "meta"})``;
every refusal is a reply ``RecordDict({"error": ConfigRecord(code, reason, site-id)})`` so the
server can record it, never an exception that would cost the round other sites' work.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.site import SiteError, load_split, site_id
from tangent.spec import ModelSpec, fresh_model

log = logging.getLogger("taft.client")

#: config keys -> TrainConfig fields
TRAIN_KEYS = {"epochs": "epochs", "batch-size": "batch_size", "lr": "lr", "loss": "loss",
              "kappa": "kappa", "rsl-alpha": "alpha", "l2": "l2", "radius": "radius"}


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
            from tangent.privacy import BudgetExhausted

            if isinstance(err, BudgetExhausted):
                log.warning("site %s refuses: %s", site, err)
                return error_reply("budget_exhausted", str(err), site)
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


def _check_spec(content: RecordDict) -> tuple[ModelSpec, Any, str]:
    """w0 from the server's spec, refused unless our digest equals the server's."""
    if "spec" not in content.config_records:
        raise SiteError("bad_request", "message has no 'spec' ConfigRecord")
    record = content.config_records["spec"]
    spec = ModelSpec.from_config(record)
    model, digest = fresh_model(spec)
    expected = str(record.get("base-digest", ""))
    if digest != expected:
        raise SiteError("base_digest_mismatch",
                        f"local w0 digest {digest} differs from the server's {expected or '(none)'} for "
                        f"{spec}: different pretrained weights or library versions at this site")
    return spec, model, digest


def train_config(config: Mapping[str, Any]):
    from tangent.train import TrainConfig

    values = {field: config[key] for key, field in TRAIN_KEYS.items() if key in config}
    if "radius" in values:
        values["radius"] = float(values["radius"]) or None  # 0 = no projection
    for field in ("epochs", "batch_size"):
        if field in values:
            values[field] = int(values[field])
    return TrainConfig(seed=int(config.get("seed", 0)), **values)


def privacy_setup(config: Mapping[str, Any], node_config: Mapping[str, Any], site: str):
    """(PrivacyConfig or None, EpsilonBudget or None) for this run and site."""
    if not bool(config.get("dp", False)):
        return None, None
    from tangent.privacy import EpsilonBudget, PrivacyConfig

    privacy = PrivacyConfig(target_epsilon=float(config["dp-epsilon"]),
                            target_delta=float(config.get("dp-delta", 0.0)) or None,
                            max_grad_norm=float(config.get("dp-max-grad-norm", 1.0)))
    budget = None
    if "epsilon-budget" in node_config:
        budget = EpsilonBudget(budget_path(node_config), site, float(node_config["epsilon-budget"]))
    return privacy, budget


def budget_path(node_config: Mapping[str, Any]) -> Path:
    """Where the site's ε ledger lives: node config ``state-dir``, else the TAFT cache dir."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser() / "epsilon-budget.json"
    from tangent.pretrained import cache_dir
    return cache_dir() / "sites" / "epsilon-budget.json"


@_refusals
def train(content: RecordDict, node_config, run_config, site: str) -> RecordDict:
    """TAFT from w0 (never from the global model) on the local data; reply with Δw only."""
    import torch

    from tangent.train import fit

    start = time.perf_counter()
    spec, model, digest = _check_spec(content)
    config = content.config_records["config"] if "config" in content.config_records else ConfigRecord()
    privacy, budget = privacy_setup(config, node_config, site)
    if budget is not None and budget.remaining <= 0:  # refuse before touching any data
        from tangent.privacy import BudgetExhausted
        raise BudgetExhausted(f"site {site!r}: privacy budget exhausted — spent ε={budget.spent:.4g} "
                              f"of {budget.budget:.4g}; refusing to train")
    data = load_split("train", model, digest, spec.img_size, node_config, run_config)
    cfg = train_config(config)
    torch.manual_seed(cfg.seed)
    result = fit(model, data.inputs, data.labels, cfg, privacy=privacy, from_cache=data.from_cache,
                 budget=budget, progress=False)
    delta = model.delta_state_dict()
    metrics = MetricRecord({
        "num-examples": int(result.num_examples), "train-loss": float(result.loss),
        "train-accuracy": float(result.accuracy),
        # no DP: no guarantee, ε = ∞
        "epsilon": math.inf if result.epsilon is None else float(result.epsilon),
        "delta": 0.0 if result.delta is None else float(result.delta),
        "wall-s": time.perf_counter() - start, "fit-s": float(result.wall_s),
        "examples-per-s": float(result.examples_per_s)})
    meta = ConfigRecord({
        "site-id": site, "shard-fingerprint": data.shard_fingerprint, "base-digest": digest,
        "data-digest": data.data_digest, "source": data.source, "from-cache": data.from_cache,
        "dp": privacy is not None,
        "dp-target-epsilon": 0.0 if privacy is None else float(privacy.target_epsilon),
        "dp-max-grad-norm": 0.0 if privacy is None else float(privacy.max_grad_norm),
        "dp-noise-multiplier": float(result.noise_multiplier or 0.0),
        "train-config": json.dumps({k: config[k] for k in TRAIN_KEYS if k in config} | {"seed": cfg.seed},
                                   sort_keys=True),
        "pid": os.getpid()})
    log.info("site %s: %d examples, loss %.4f, acc %.3f, %.1f s", site, result.num_examples,
             result.loss, result.accuracy, result.wall_s)
    return RecordDict({"delta": ArrayRecord(delta), "metrics": metrics, "meta": meta})


@_refusals
def evaluate(content: RecordDict, node_config, run_config, site: str) -> RecordDict:
    """The composed model (w0 + the Δ the server sends) on the site's local test split."""
    import torch

    from tangent.train import evaluate as evaluate_model

    spec, model, digest = _check_spec(content)
    if "delta" not in content.array_records:
        raise SiteError("bad_request", "evaluate message has no 'delta' ArrayRecord")
    record = content.array_records["delta"]
    model.load_delta({k: torch.from_numpy(record[k].numpy()) for k in record})
    data = load_split("test", model, digest, spec.img_size, node_config, run_config)
    loss, accuracy = evaluate_model(model, data.inputs, data.labels, data.from_cache)
    return RecordDict({"metrics": MetricRecord({"num-examples": data.num_examples, "eval-loss": loss,
                                                "eval-accuracy": accuracy}),
                       "meta": ConfigRecord({"site-id": site, "base-digest": digest})})
