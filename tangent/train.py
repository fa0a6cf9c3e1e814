"""Local training of the trainable part of a tangent (or NLFT) ViT.

One loop serves every case: inputs are either images (run through the frozen trunk first) or
cached trunk tokens (fed straight to ``model.linearized``), and differential privacy is a
wrapper (:mod:`tangent.privacy`) that swaps in Opacus's module, optimizer, criterion and
Poisson data loader around the same loop.

The TAFT recipe: Adam, batch 32, rescaled square loss, learning rate ×0.1 after 50% and 83%
of the schedule; optionally an L2 penalty on Δw and a projection of Δw onto an L2 ball.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tangent import losses

LOSSES = ("rsl", "ce", "mse")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    loss: str = "rsl"
    kappa: float = 15.0
    alpha: float = 1.0
    #: weight of the L2 penalty ``l2 * l2_penalty(Δw)`` (0 = off)
    l2: float = 0.0
    #: after every step Δw is projected onto the L2 ball of this radius (None = off)
    radius: float | None = None
    seed: int = 0
    #: fractions of the schedule after which the learning rate is multiplied by ``decay``
    milestones: tuple[float, ...] = (0.5, 0.83)
    decay: float = 0.1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.radius is not None and self.radius <= 0:
            raise ValueError("radius must be positive (or None for no projection)")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Step decay: ×decay once ``step`` has passed each milestone fraction of the schedule."""
        passed = sum(step >= m * total_steps for m in self.milestones)
        return self.lr * self.decay ** passed


@dataclass
class TrainResult:
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch
    examples_per_s: float
    epsilon: float | None  # ε actually spent (DP only)
    delta: float | None
    num_examples: int
    wall_s: float
    steps: int = 0
    noise_multiplier: float | None = None
    grad_sample_mode: str | None = None
    #: per epoch: {"epoch", "loss", "accuracy", "lr" (of the epoch's last step), "examples",
    #: "empty_batches" (Poisson sampling under DP can draw empty batches)}
    history: list[dict] = field(default_factory=list)


class ArrayDataset(Dataset):
    """(inputs[i], labels[i]) over a tensor, numpy array, memmap or TokenDataset.

    ``__getitems__`` reads a whole batch with one fancy index, so a memmap is read once per
    batch rather than once per example.
    """

    def __init__(self, inputs, labels):
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs = inputs
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        index = np.asarray(indices, dtype=np.int64)
        return list(zip(take_rows(self.inputs, index), self.labels[index]))


def take_rows(inputs, index: np.ndarray) -> torch.Tensor:
    """inputs[index] as a float32 tensor, for a tensor, numpy array, memmap or TokenDataset."""
    rows = inputs[torch.from_numpy(index) if torch.is_tensor(inputs) else index]
    if not torch.is_tensor(rows):
        rows = torch.from_numpy(np.asarray(rows))
    return rows.to(torch.float32)


def loss_fn(name: str, kappa: float = 15.0, alpha: float = 1.0):
    """Mean loss ``(logits, labels) -> scalar`` by name."""
    if name == "rsl":
        return lambda logits, labels: losses.rsl_loss(logits, labels, kappa=kappa, alpha=alpha)
    if name == "ce":
        return losses.cross_entropy
    if name == "mse":
        return losses.mse_loss
    raise ValueError(f"unknown loss {name!r}")


def trainable_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.linearized.parameters() if p.requires_grad]


def delta_norm(model) -> float:
    """‖Δw‖₂ over every trainable parameter (they are the Δ of a tangent model)."""
    return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in trainable_parameters(model)))


def fit(model, inputs, labels, config: TrainConfig, *, privacy=None, from_cache: bool,
        budget=None, contribution_id: str | None = None, progress: bool = True) -> TrainResult:
    """Train ``model.linearized`` in place.

    inputs: cached trunk tokens [N, T, d] (tensor, memmap, TokenDataset) when ``from_cache``,
    else preprocessed images [N, 3, H, W]. With ``privacy`` (a PrivacyConfig) the same loop
    runs under Opacus (DP-SGD over the whole schedule, cross-entropy, see tangent.privacy);
    its sampling and noise come from OS entropy, not from ``config.seed``. ``budget`` (a
    PrivacyBudget) is charged the schedule's planned (ε, δ) under ``contribution_id`` before the
    first step (refusing past the budget) and settled to what was spent after the last.
    """
    start = time.perf_counter()
    dataset = ArrayDataset(inputs, labels)
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty data set")
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model.linearized has no trainable parameters")
    if config.optimizer == "adam":
        # fused: one kernel over all tensors; the per-tensor loop was ~30% of a cached step
        optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr)
    criterion = loss_fn(config.loss, config.kappa, config.alpha)
    head, trunk = model.linearized, model.trunk

    private = None
    if privacy is not None:
        from tangent.privacy import make_private  # Opacus is only imported for DP runs

        private = make_private(head, optimizer, loader, privacy, epochs=config.epochs)
        head, optimizer, criterion, loader = (private.module, private.optimizer,
                                              private.criterion, private.data_loader)
        if budget is not None:
            if contribution_id is None:
                raise ValueError("a budgeted DP fit needs a contribution_id")
            try:  # one locked check-and-charge before any step; a crash after it stays charged
                budget.reserve(contribution_id, private.planned_epsilon(config.epochs * len(loader)),
                               private.delta)
            except BaseException:
                private.close()
                raise
    base_optimizer = getattr(optimizer, "original_optimizer", optimizer)
    # The penalty's gradient is added right before the parameter update, i.e. after Opacus
    # has clipped and noised the data gradient: it is data-independent and must not be clipped.
    hook = (base_optimizer.register_step_pre_hook(_l2_gradient_hook(params, config.l2))
            if config.l2 > 0 else None)

    trunk_was_training, head_was_training = trunk.training, model.linearized.training
    trunk.eval()
    head.train()
    total_steps = config.epochs * len(loader)
    step, seen, history = 0, 0, []
    try:
        with tqdm(total=total_steps, desc="train", unit="step", disable=not progress) as bar:
            for epoch in range(config.epochs):
                loss_sum, correct, count, empty = 0.0, 0, 0, 0
                for x, y in loader:
                    lr = config.lr_at(step, total_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    # An empty Poisson batch must still take its DP step (noise only): run one
                    # zero-weighted placeholder example, whose gradient is exactly zero.
                    weight = 1.0
                    if len(y) == 0:
                        x, y, weight = x.new_zeros((1, *x.shape[1:])), y.new_zeros(1), 0.0
                    if not from_cache:
                        with torch.no_grad():
                            x = trunk(x)
                    optimizer.zero_grad(set_to_none=True)
                    logits = head(x)
                    loss = criterion(logits, y) * weight
                    loss.backward()
                    optimizer.step()
                    if config.radius is not None:
                        losses.project_to_ball(params, config.radius)
                    step += 1
                    bar.update(1)
                    empty += weight == 0.0
                    if weight:
                        loss_sum += loss.item() * len(y)
                        correct += int((logits.detach().argmax(-1) == y).sum())
                        count += len(y)
                seen += count
                history.append({"epoch": epoch, "loss": loss_sum / max(count, 1),
                                "accuracy": correct / max(count, 1), "lr": lr,
                                "examples": count, "empty_batches": empty})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}",
                                acc=f"{history[-1]['accuracy']:.3f}")
        epsilon = delta = None
        if private is not None:
            epsilon, delta = private.epsilon(), private.delta
            if budget is not None:
                budget.settle(contribution_id, epsilon, delta, steps=step)
    finally:
        if hook is not None:
            hook.remove()
        if private is not None:
            private.close()
        trunk.train(trunk_was_training)
        model.linearized.train(head_was_training)
    wall_s = time.perf_counter() - start
    return TrainResult(loss=history[-1]["loss"], accuracy=history[-1]["accuracy"],
                       examples_per_s=seen / wall_s, epsilon=epsilon, delta=delta,
                       num_examples=len(dataset), wall_s=wall_s, steps=step,
                       noise_multiplier=None if private is None else private.noise_multiplier,
                       grad_sample_mode=None if private is None else private.grad_sample_mode,
                       history=history)


def _l2_gradient_hook(params: list[nn.Parameter], weight: float):
    def hook(optimizer, args, kwargs):
        with torch.enable_grad():
            penalty = weight * losses.l2_penalty(params)
            grads = torch.autograd.grad(penalty, params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad + g
    return hook


@torch.no_grad()
def predict_logits(model, inputs, *, from_cache: bool, batch_size: int = 256,
                   progress: bool = False) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for every input, in order."""
    was_training = model.training
    model.eval()
    out = []
    try:
        starts = range(0, len(inputs), batch_size)
        for begin in tqdm(starts, desc="predict", disable=not progress):
            x = take_rows(inputs, np.arange(begin, min(begin + batch_size, len(inputs))))
            out.append(model.linearized(x if from_cache else model.trunk(x)))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model, inputs, labels, from_cache: bool, *, loss: str = "ce", kappa: float = 15.0,
             alpha: float = 1.0, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on (inputs, labels)."""
    logits = predict_logits(model, inputs, from_cache=from_cache, batch_size=batch_size)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    value = float(loss_fn(loss, kappa, alpha)(logits, labels))
    return value, float((logits.argmax(-1) == labels).float().mean())
