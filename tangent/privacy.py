"""Differential privacy for local training: Opacus DP-SGD over the whole local schedule, and
a persistent per-site ε budget.

:func:`make_private` wraps the module, optimizer, criterion and data loader that
:func:`tangent.train.fit` already uses, so DP training is the same loop with Opacus's pieces
swapped in: Poisson sampling, per-sample clipping to ``max_grad_norm`` (ghost clipping when
Opacus can, per-sample gradients through hooks otherwise) and Gaussian noise calibrated so
that the full schedule (all epochs) spends at most ``target_epsilon`` at ``target_delta``.
As in the TAFT paper's DP experiments the loss is cross-entropy.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")


@dataclass
class PrivacyConfig:
    target_epsilon: float
    #: None: 1/(10·n) for a local data set of n examples (must stay well below 1/n)
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    #: ghost clipping (no per-sample gradients materialised); falls back to hooks if Opacus
    #: cannot wrap the module that way
    ghost: bool = True
    #: a fixed noise multiplier instead of one calibrated to target_epsilon (ε is still reported)
    noise_multiplier: float | None = None

    def __post_init__(self):
        if not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be positive")

    def delta_for(self, num_examples: int) -> float:
        delta = self.target_delta or 1.0 / (10 * num_examples)
        if delta >= 1.0 / num_examples:
            raise ValueError(f"target_delta={delta} must be below 1/n = {1.0 / num_examples}")
        return delta


@dataclass
class PrivateTraining:
    """Opacus's replacements for the training loop's pieces, and what they spend."""

    engine: PrivacyEngine
    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: object
    data_loader: torch.utils.data.DataLoader
    noise_multiplier: float
    grad_sample_mode: str
    delta: float

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (by the configured accountant)."""
        return float(self.engine.accountant.get_epsilon(delta=self.delta))

    def close(self) -> nn.Module:
        """Remove Opacus's hooks and per-sample buffers; returns the plain module."""
        return self.module.to_standard_module()


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer,
                 data_loader: torch.utils.data.DataLoader, config: PrivacyConfig, *,
                 epochs: int, seed: int = 0) -> PrivateTraining:
    """Wrap (module, optimizer, data_loader) for DP-SGD over ``epochs`` epochs.

    The Poisson sampler keeps ``data_loader``'s generator and the noise gets its own generator
    seeded from ``seed``, so a run is reproducible (this is not Opacus's secure mode).
    """
    delta = config.delta_for(len(data_loader.dataset))
    modes = ["ghost", "hooks"] if config.ghost else ["hooks"]
    for mode in modes:
        engine = PrivacyEngine(accountant=config.accountant)
        criterion = nn.CrossEntropyLoss()
        kwargs = dict(module=module, optimizer=optimizer, data_loader=data_loader,
                      criterion=criterion, max_grad_norm=config.max_grad_norm,
                      poisson_sampling=True, grad_sample_mode=mode,
                      noise_generator=torch.Generator().manual_seed(seed + 0x5EED))
        try:
            if config.noise_multiplier is None:
                wrapped = engine.make_private_with_epsilon(
                    target_epsilon=config.target_epsilon, target_delta=delta, epochs=epochs,
                    **kwargs)
            else:
                wrapped = engine.make_private(noise_multiplier=config.noise_multiplier, **kwargs)
        except (NotImplementedError, ValueError, RuntimeError) as error:
            if mode == modes[-1]:
                raise
            log.warning("Opacus cannot use %s clipping here (%s); falling back to hooks",
                        mode, error)
            continue
        if mode == "ghost":
            dp_module, dp_optimizer, criterion, dp_loader = wrapped
        else:
            dp_module, dp_optimizer, dp_loader = wrapped
        return PrivateTraining(engine=engine, module=dp_module, optimizer=dp_optimizer,
                               criterion=criterion, data_loader=dp_loader,
                               noise_multiplier=float(dp_optimizer.noise_multiplier),
                               grad_sample_mode=mode, delta=delta)
    raise AssertionError("unreachable")


class BudgetExhausted(RuntimeError):
    """Training would spend more ε than the site's budget allows."""


class EpsilonBudget:
    """Persistent record of the ε a site has spent, under sequential composition.

    One JSON file may hold several sites. Every read-modify-write holds an fcntl lock and
    replaces the file atomically, so the record survives restarts and concurrent writers.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike, site_id: str, budget: float):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self.path = Path(path)
        self.site_id = str(site_id)
        self.budget = float(budget)

    @property
    def spent(self) -> float:
        return sum(c["epsilon"] for c in self._site(self._read())["contributions"])

    @property
    def remaining(self) -> float:
        return max(self.budget - self.spent, 0.0)

    def check(self, planned_epsilon: float) -> None:
        """Raise BudgetExhausted if spending ``planned_epsilon`` more would exceed the budget."""
        spent = self.spent
        if spent + planned_epsilon > self.budget * (1 + 1e-9):
            raise BudgetExhausted(
                f"site {self.site_id!r}: privacy budget exhausted — spent ε={spent:.4g} of "
                f"{self.budget:.4g}, this contribution would add ε={planned_epsilon:.4g} "
                f"(remaining {max(self.budget - spent, 0.0):.4g}); refusing to train")

    def record(self, epsilon: float, **meta) -> float:
        """Add one contribution's spent ε; returns the new total."""
        if epsilon < 0 or epsilon != epsilon:
            raise ValueError(f"invalid epsilon {epsilon}")
        with self._locked():
            record = self._read()
            site = self._site(record)
            site["budget"] = self.budget
            site["contributions"].append({"epsilon": float(epsilon), "time": time.time(), **meta})
            record["sites"][self.site_id] = site
            self._write(record)
        return self.spent

    def _site(self, record: dict) -> dict:
        return record["sites"].get(self.site_id, {"budget": self.budget, "contributions": []})

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": self.VERSION, "sites": {}}
        record = json.loads(self.path.read_text())
        if record.get("version") != self.VERSION:
            raise ValueError(f"{self.path}: unknown ε-budget file version {record.get('version')}")
        return record

    def _write(self, record: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
