"""Differential privacy for local training: Opacus DP-SGD over the whole local schedule, the
site's δ rule, and its durable (ε, δ) budget (:mod:`tangent.training.budget`, re-exported here).

:func:`make_private` wraps the module, optimizer, criterion and data loader that
:func:`tangent.training.trainer.fit` already uses, so DP training is the same loop with Opacus's pieces
swapped in: Poisson sampling, per-sample clipping to ``max_grad_norm`` (ghost clipping when
Opacus can, per-sample gradients through hooks otherwise) and Gaussian noise calibrated so
that the full schedule (all epochs) spends at most ``target_epsilon`` at δ.
As in the TAFT paper's DP experiments the loss is cross-entropy.

What the server may know and what it must not:

* **Randomness.** The Gaussian noise and the Poisson sampling draw from one ``torch.Generator``
  seeded with 64 bits from the OS (:func:`secret_generator`) per contribution; nothing in any
  message (the server's ``seed`` included) determines it, so the server cannot regenerate the
  noise or refit the update. Opacus' ``secure_mode`` would need torchcsprng, which no longer
  builds against current torch. On a GPU the noise is drawn on the GPU (Opacus draws it where
  the gradients are) from a CUDA generator seeded the same way, independent of the CPU one that
  drives the Poisson sampling.
* **Public count.** Everything the accountant and the optimizer use is a function of a *public*
  example count ``N_pub`` (the count the site declared, or a public bucket of n — see
  :func:`public_count`), never of the secret n: the sample rate q = 1/⌈N_pub/B⌉, the steps per
  epoch ⌈N_pub/B⌉, the gradient scale 1/⌊q·N_pub⌋, hence σ and ε, and the default δ. So σ, ε
  and δ in a reply reveal nothing about n beyond N_pub.
* **One accountant per contribution.** A contribution may release more than the DP-SGD run on the
  same rows: a :class:`Companion` (the DP exact head's Gaussian release, one full-batch Gaussian
  step) is added to the same accountant's history, so the contribution's ε is the composition of
  both at one δ, never their sum, and DP-SGD's σ is calibrated so that the composition spends at
  most ``target_epsilon``.
"""
from __future__ import annotations

import functools
import logging
import math
import secrets
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from torch import nn

from tangent.training.budget import BudgetExhausted, BudgetMissing, PrivacyBudget

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
__all__ = ["ACCOUNTANTS", "BudgetExhausted", "BudgetMissing", "Companion", "PrivacyBudget", "PrivacyConfig",
           "accountant_evaluations", "calibrated_noise", "composed_epsilon", "PrivateTraining", "default_delta",
           "make_private", "public_count", "secret_generator"]

#: the default δ never exceeds this, whatever N_pub is
DELTA_CAP = 1e-5


def default_delta(num_public: int) -> float:
    """δ = min(1e-5, 1/(10·N_pub)).

    δ is the probability that the ε guarantee fails outright, so it must be far below 1/n (a
    mechanism that publishes one random record in full has δ = 1/n). 1/(10·N_pub) alone would be
    1e-3 at N_pub = 100; the 1e-5 cap keeps it small for every realistic site. It uses the public
    count, not the secret n, so δ reveals nothing about n.
    """
    if num_public < 1:
        raise ValueError(f"the public example count must be positive, got {num_public}")
    return min(DELTA_CAP, 1.0 / (10 * num_public))


def public_count(num_examples: int, declared: int | None = None) -> int:
    """The example count a DP site may reveal: the declared count if any, else n rounded down
    to a power of two.

    A power of two changes only when n crosses 2^k: adding or removing one record changes it
    only if n is exactly 2^k or 2^k − 1, and it never reveals more than ⌊log2 n⌋. Rounding to
    significant digits would reveal small n exactly (2 digits: every n < 100) and change every
    100 records above 1,000. The price is a weight off by less than 2×, the same for everyone
    whose shards have similar size. A registered/declared count reveals nothing at all.
    """
    if declared is not None:
        if int(declared) < 1:
            raise ValueError(f"declared example count must be positive, got {declared}")
        return int(declared)
    if num_examples < 1:
        raise ValueError("cannot train on an empty data set")
    return 1 << (int(num_examples).bit_length() - 1)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with 64 bits of OS entropy (``secrets``): unknown to
    everyone, fresh for every contribution."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


@dataclass(frozen=True)
class Companion:
    """Another mechanism of the same contribution, on the same rows: one Gaussian release of
    sensitivity 1 with noise ``noise_multiplier`` (sample rate 1, one step: its RDP α/(2z²) and its
    privacy-loss distribution are exact). ``epsilon``: what it spends alone at the contribution's δ
    (the analytic Gaussian mechanism), recorded beside the composition."""

    name: str
    noise_multiplier: float
    epsilon: float

    @property
    def history(self) -> tuple[float, float, int]:
        """Its entry in an Opacus accountant's history: (noise multiplier, sample rate, steps)."""
        return (float(self.noise_multiplier), 1.0, 1)


def composed_epsilon(accountant: str, history, delta: float) -> float:
    """ε at δ of every (noise multiplier, sample rate, steps) in ``history`` composed by one Opacus
    accountant (PRV: the privacy-loss distributions convolved; RDP: the Rényi curves added)."""
    return _composed_epsilon(accountant, tuple(tuple(entry) for entry in history), float(delta))


def accountant_evaluations() -> int:
    """How many distinct histories this process has asked an accountant about (a repeated question
    is answered from memory: :func:`composed_epsilon`)."""
    return _composed_epsilon.cache_info().misses


# A PRV evaluation of a 320-step history takes seconds, and every site of one size in a run asks
# the same questions (calibration, plan, spent, each part alone): a pure function of its
# arguments, so a worker process answers each one once.
@functools.lru_cache(maxsize=256)
def _composed_epsilon(accountant: str, history: tuple, delta: float) -> float:
    import numpy as np

    ledger = create_accountant(accountant)
    ledger.history = list(history)
    with np.errstate(divide="ignore"):  # PRV's log(1 − q) at q = 1: a full-batch step, handled
        return float(ledger.get_epsilon(delta=delta))


@dataclass
class PrivacyConfig:
    target_epsilon: float
    #: None: :func:`default_delta` of the public count (must stay below 1/N_pub)
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    #: ghost clipping (no per-sample gradients materialised); falls back to hooks if Opacus
    #: cannot wrap the module that way
    ghost: bool = True
    #: a fixed noise multiplier instead of one calibrated to target_epsilon (ε is still reported)
    noise_multiplier: float | None = None
    #: N_pub: the example count the sample rate, gradient scale and default δ are computed from.
    #: None: the data set's own size is public (central experiments); a site always sets it.
    public_examples: int | None = None
    #: other mechanisms of the same contribution (the DP head's release), composed with DP-SGD in
    #: one accountant: DP-SGD's σ is calibrated so that all together spend ≤ target_epsilon
    companions: tuple[Companion, ...] = ()

    def __post_init__(self):
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon must be a positive finite number, got {self.target_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not self.max_grad_norm > 0:
            raise ValueError("max_grad_norm must be positive")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.public_examples is not None and self.public_examples < 1:
            raise ValueError(f"public_examples must be positive, got {self.public_examples}")

    def num_public(self, num_examples: int) -> int:
        return self.public_examples if self.public_examples is not None else num_examples

    def delta_for(self, num_public: int) -> float:
        """δ for a public count ``num_public``: the configured one, else :func:`default_delta`."""
        delta = self.target_delta or default_delta(num_public)
        if delta >= 1.0 / num_public:
            raise ValueError(f"target_delta={delta} must be below 1/N_pub = {1.0 / num_public}")
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
    sample_rate: float
    accountant: str
    companions: tuple[Companion, ...] = ()

    def epsilon(self) -> float:
        """ε spent so far at ``delta``: the steps taken composed with the companions (by the
        configured accountant)."""
        history = list(self.engine.accountant.history) + [c.history for c in self.companions]
        return composed_epsilon(self.accountant, history, self.delta)

    def planned_epsilon(self, steps: int) -> float:
        """ε that ``steps`` steps and the companions will spend: the same accountant over
        (σ, q, steps), before any step is taken — so a budget can be charged before training."""
        history = [(self.noise_multiplier, self.sample_rate, int(steps))] + [c.history for c in self.companions]
        return composed_epsilon(self.accountant, history, self.delta)

    def parts(self, steps: int) -> dict[str, float]:
        """What each mechanism would spend alone at ``delta``: DP-SGD's ``steps`` steps (the
        accountant's ε) and each companion's (its own exact ε)."""
        alone = {"dp-sgd": composed_epsilon(self.accountant, [(self.noise_multiplier, self.sample_rate, int(steps))],
                                            self.delta)}
        return alone | {c.name: float(c.epsilon) for c in self.companions}

    def close(self) -> nn.Module:
        """Remove Opacus's hooks and per-sample buffers; returns the plain module."""
        return self.module.to_standard_module()


def poisson_loader(dataset, expected_batch: int, num_public: int,
                   generator: torch.Generator) -> DPDataLoader:
    """Poisson sampling at q = 1/⌈N_pub/B⌉ for ⌈N_pub/B⌉ steps per epoch, drawn from ``generator``.

    (Opacus derives q and the steps from the loader's length, i.e. from n; and its sampler takes
    int(1/q) steps, which is one short for some q, e.g. 1/93. Both are fixed here.)"""
    steps = math.ceil(num_public / expected_batch)
    loader = DPDataLoader(dataset, sample_rate=1.0 / steps, generator=generator)
    loader.batch_sampler.steps = steps
    return loader


def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str, companions: tuple[Companion, ...] = ()) -> float:
    """σ such that ``steps`` steps at rate ``sample_rate``, composed with ``companions``, spend at
    most ``target_epsilon`` at δ.

    Opacus' ``make_private_with_epsilon`` calibrates for int(epochs/q) steps, one short of what
    its sampler takes for some q (1/93: int(92.999…) = 92): a site asked for ε = 8 spent 8.0123.
    Here σ is searched for the steps actually taken, then checked with the same accountant the
    budget is charged by, and raised until the check holds. With companions σ is bisected (on
    log σ, to 0.1%) over the composition; a companion that alone spends the target leaves DP-SGD
    nothing (ValueError)."""
    return _calibrated_noise(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant,
                             tuple(c.history for c in companions), tuple(c.name for c in companions))


@functools.lru_cache(maxsize=64)  # a pure function of its arguments (see _composed_epsilon)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                      extra: tuple, names: tuple) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    def spent(sigma: float) -> float:
        return composed_epsilon(accountant, [(sigma, sample_rate, int(steps))] + list(extra), delta)

    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                 sample_rate=sample_rate, steps=int(steps), accountant=accountant)
    if extra and spent(sigma) > target_epsilon:
        low, high = sigma, 2 * sigma
        while spent(high) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e4:
                raise ValueError(f"the companions {list(names)} spend ε = {target_epsilon:g} "
                                 "(almost) alone: DP-SGD has no budget left")
        while high / low > 1.001:
            middle = math.sqrt(low * high)
            low, high = (middle, high) if spent(middle) > target_epsilon else (low, middle)
        sigma = high
    while spent(sigma) > target_epsilon:
        sigma *= 1.001
    return float(sigma)


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer,
                 data_loader: torch.utils.data.DataLoader, config: PrivacyConfig, *,
                 epochs: int) -> PrivateTraining:
    """Wrap (module, optimizer, data_loader) for DP-SGD over ``epochs`` epochs.

    Only ``data_loader.dataset`` and its ``batch_size`` (the expected Poisson batch B) are used:
    the sampling and the noise draw from a fresh :func:`secret_generator`, never from the
    loader's (server-seeded) generator. The noise is drawn where ``module``'s parameters are:
    on a GPU from a second secret generator on that GPU (a CPU generator cannot draw there).
    """
    from tangent.data.device import module_device

    num_public = config.num_public(len(data_loader.dataset))
    delta = config.delta_for(num_public)
    generator = secret_generator()  # the Poisson sampler draws on the CPU
    device = module_device(module)
    noise_generator = generator if device.type == "cpu" else secret_generator(device)
    loader = poisson_loader(data_loader.dataset, data_loader.batch_size, num_public, generator)
    sample_rate = 1.0 / len(loader)
    # the gradient sum is divided by this: a function of N_pub, never of n
    expected_batch = max(1, int(num_public * sample_rate))
    noise_multiplier = config.noise_multiplier
    if noise_multiplier is None:  # calibrated on the steps the sampler will take, all epochs
        noise_multiplier = calibrated_noise(config.target_epsilon, delta, sample_rate,
                                            epochs * len(loader), config.accountant, config.companions)
    modes = ["ghost", "hooks"] if config.ghost else ["hooks"]
    for mode in modes:
        engine = PrivacyEngine(accountant=config.accountant)
        criterion = nn.CrossEntropyLoss()
        kwargs = dict(module=module, optimizer=optimizer, data_loader=loader,
                      criterion=criterion, max_grad_norm=config.max_grad_norm,
                      poisson_sampling=False,  # the loader above already samples (secretly)
                      grad_sample_mode=mode, noise_generator=noise_generator)
        try:
            wrapped = engine.make_private(noise_multiplier=noise_multiplier, **kwargs)
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
        dp_optimizer.expected_batch_size = expected_batch
        if hasattr(dp_module, "forbid_grad_accumulation"):
            dp_module.forbid_grad_accumulation()  # what Opacus does for its own Poisson loader
        return PrivateTraining(engine=engine, module=dp_module, optimizer=dp_optimizer,
                               criterion=criterion, data_loader=dp_loader,
                               noise_multiplier=float(dp_optimizer.noise_multiplier),
                               grad_sample_mode=mode, delta=delta, sample_rate=sample_rate,
                               accountant=config.accountant, companions=tuple(config.companions))
    raise AssertionError("unreachable")
