"""Local training of the trainable part of a tangent (or NLFT) ViT.

One loop serves every case: inputs are either images (run through the frozen trunk first) or
cached trunk tokens (fed straight to ``model.linearized``), and differential privacy is a
wrapper (:mod:`tangent.training.privacy`) that swaps in Opacus's module, optimizer, criterion and
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

from tangent.training import losses

LOSSES = ("rsl", "ce", "mse")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("step", "cosine")


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
    #: linear warm-up over the first ``warmup`` steps (capped at half of the schedule)
    warmup: int = 0
    #: "step" (×decay at the milestones) or "cosine" (to 0 after the warm-up)
    schedule: str = "step"
    #: after training (non-DP square losses): the Δ on the segment from the ridge-fitted head
    #: (λ = ``guard_ridge`` × n × mean feature variance) to the trained Δ with the least training
    #: loss (see :func:`guard`); 0 = off
    guard_ridge: float = 1.0
    #: torch.compile the per-batch forward + loss of the trainable tail (mode "reduce-overhead":
    #: CUDA graphs on a GPU, where a step on few tokens waits on kernel launches). Same results
    #: up to float rounding; non-DP only (Opacus' per-sample hooks do not compile). Off by default.
    compile_step: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.radius is not None and self.radius <= 0:
            raise ValueError("radius must be positive (or None for no projection)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0 steps")
        if not (isinstance(self.guard_ridge, (int, float)) and math.isfinite(self.guard_ridge)
                and self.guard_ridge >= 0):
            raise ValueError(f"guard_ridge must be a finite number >= 0 (0 = no guard), got {self.guard_ridge!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of step ``step`` (0-based) of ``total_steps``."""
        warmup = min(self.warmup, total_steps // 2)
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        if self.schedule == "cosine":
            done = (step - warmup) / max(total_steps - warmup, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * done))
        passed = sum(step >= m * total_steps for m in self.milestones)
        return self.lr * self.decay ** passed


@dataclass
class TrainResult:
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch
    examples_per_s: float
    epsilon: float | None  # ε actually spent (DP only): DP-SGD composed with the privacy config's companions
    delta: float | None
    num_examples: int
    wall_s: float
    steps: int = 0
    noise_multiplier: float | None = None
    grad_sample_mode: str | None = None
    #: per epoch: {"epoch", "loss", "accuracy", "lr" (of the epoch's last step), "examples",
    #: "empty_batches" (Poisson sampling under DP can draw empty batches)}
    history: list[dict] = field(default_factory=list)
    #: what :func:`guard` did ({"alpha", "trained_loss", "fitted_head_loss", "loss"}), None if off
    guard: dict | None = None
    #: DP only: what each mechanism of the contribution would spend alone ({"dp-sgd": ε, companion: ε})
    epsilon_parts: dict | None = None


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
        budget=None, contribution_id: str | None = None, progress: bool = True,
        device: torch.device | str | None = None) -> TrainResult:
    """Train ``model.linearized`` in place.

    inputs: cached trunk tokens [N, T, d] (tensor, memmap, TokenDataset) when ``from_cache``,
    else preprocessed images [N, 3, H, W]. With ``privacy`` (a PrivacyConfig) the same loop
    runs under Opacus (DP-SGD over the whole schedule, cross-entropy, see tangent.training.privacy);
    its sampling and noise come from OS entropy, not from ``config.seed``. ``budget`` (a
    PrivacyBudget) is charged the schedule's planned (ε, δ) under ``contribution_id`` before the
    first step (refusing past the budget) and settled to what was spent after the last.

    ``device`` (a torch.device or a setting, see tangent.data.device): the model is moved there and
    stays there; batches are read on the CPU and copied over. None = where the model already is.
    """
    start = time.perf_counter()
    if config.compile_step and privacy is not None:
        raise ValueError("compile_step is for non-DP training: Opacus' per-sample hooks do not compile")
    device = _place(model, device)
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
    forward = _compiled_forward(head, criterion) if config.compile_step else None

    private = None
    if privacy is not None:
        from tangent.training.privacy import make_private  # Opacus is only imported for DP runs

        private = make_private(head, optimizer, loader, privacy, epochs=config.epochs)
        head, optimizer, criterion, loader = (private.module, private.optimizer,
                                              private.criterion, private.data_loader)
        if budget is not None:
            if contribution_id is None:
                raise ValueError("a budgeted DP fit needs a contribution_id")
            try:  # one locked check-and-charge before any step; a crash after it stays charged
                steps = config.epochs * len(loader)
                planned = private.planned_epsilon(steps)
                budget.reserve(contribution_id, planned, private.delta,
                               alone=private.parts(steps) if private.companions else {"dp-sgd": planned})
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
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if not from_cache:
                        with torch.no_grad():
                            x = trunk(x)
                    optimizer.zero_grad(set_to_none=True)
                    if forward is not None:
                        logits, loss = forward(x, y)
                    else:
                        logits = head(x)
                        loss = criterion(logits, y)
                    loss = loss * weight
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
        guarded = None
        if guard_applies(model, config, private=private is not None):
            guarded = guard(model, dataset, config, from_cache=from_cache)
        epsilon = delta = parts = None
        if private is not None:
            epsilon, delta = private.epsilon(), private.delta
            parts = private.parts(step) if private.companions else {"dp-sgd": epsilon}
            if budget is not None:
                budget.settle(contribution_id, epsilon, delta, steps=step, alone=parts)
    finally:
        if hook is not None:
            hook.remove()
        if private is not None:
            private.close()
        trunk.train(trunk_was_training)
        model.linearized.train(head_was_training)
    wall_s = time.perf_counter() - start
    return TrainResult(loss=history[-1]["loss"], accuracy=history[-1]["accuracy"],
                       examples_per_s=seen / wall_s, epsilon=epsilon, delta=delta, epsilon_parts=parts,
                       num_examples=len(dataset), wall_s=wall_s, steps=step,
                       noise_multiplier=None if private is None else private.noise_multiplier,
                       grad_sample_mode=None if private is None else private.grad_sample_mode,
                       history=history, guard=guarded)


def _place(model, device) -> torch.device:
    """Move ``model`` to ``device`` (None: leave it where it is); returns where it now is."""
    from tangent.data.device import module_device, resolve_device

    if device is None:
        return module_device(model.linearized)
    device = resolve_device(device)
    model.to(device)
    return device


def _compiled_forward(head, criterion):
    """``(x, y) -> (logits, loss)`` of ``head`` under torch.compile, one graph per batch shape.

    mode "reduce-overhead" replays the step's many small kernels as one CUDA graph on a GPU (the
    launch-bound case: 17 tokens at 56 px); on the CPU it is inductor's fused code. Static shapes
    (``dynamic=False``): a schedule has at most two batch shapes (full and last), and symbolic
    shapes would keep CUDA graphs from being used. (A worker that trains many sites compiles again
    for each new last-batch size; past torch._dynamo's recompile limit it runs eagerly: the same
    results, without the speed-up.)
    """
    def step(x, y):
        logits = head(x)
        return logits, criterion(logits, y)

    return torch.compile(step, mode="reduce-overhead", dynamic=False)


def guard_applies(model, config: TrainConfig, *, private: bool) -> bool:
    """The guard needs a model linear in Δ (a tangent tail with a tangent head), a square loss,
    no ball constraint to keep, and no DP (it reads the data outside the mechanism)."""
    from tangent.model.vit import TangentLinear, TangentTail

    tail = model.linearized
    return (config.guard_ridge > 0 and not private and config.loss in ("rsl", "mse") and config.radius is None
            and isinstance(tail, TangentTail) and tail.output_mode == "linear"
            and isinstance(tail.head, TangentLinear))


@torch.no_grad()
def head_pass(model, dataset, *, from_cache: bool, batch_size: int = 512):
    """(head input features φ, logits of w0, logits of w0+Δ) over the data set, float64."""
    features, primal, tangent = [], [], []
    head = model.linearized.head

    # the guard's algebra runs on the CPU in float64 wherever the model is (no-op copies on a CPU)
    def capture(_module, args, output):
        features.append(args[0].double().cpu())
        primal.append(output[0].double().cpu())
        tangent.append(torch.zeros_like(output[0], dtype=torch.float64).cpu() if output[1] is None
                       else output[1].double().cpu())

    hook = head.register_forward_hook(capture)
    was_training = model.linearized.training
    model.linearized.eval()
    device = _place(model, None)
    try:
        for begin in range(0, len(dataset), batch_size):
            x = take_rows(dataset.inputs, np.arange(begin, min(begin + batch_size, len(dataset)))).to(device)
            model.linearized(x if from_cache else model.trunk(x))
    finally:
        hook.remove()
        model.linearized.train(was_training)
    f0 = torch.cat(primal)
    return torch.cat(features), f0, f0 + torch.cat(tangent)


def ridge_head(features: torch.Tensor, residual: torch.Tensor, ridge: float):
    """(W [d, C], b [C]) minimising ‖φW + b − residual‖² + λ‖W‖², λ = ridge × n × mean variance."""
    mean_x, mean_r = features.mean(0), residual.mean(0)
    xc = features - mean_x
    gram = xc.T @ xc
    penalty = ridge * float(gram.diagonal().mean()) + 1e-12
    weight = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (residual - mean_r))
    return weight, mean_r - mean_x @ weight


@torch.no_grad()
def guard(model, dataset, config: TrainConfig, *, from_cache: bool) -> dict:
    """Never send a Δ whose training loss is above that of the w0 head fitted on the same data.

    Δ_head = only the head's Δ, the ridge fit of target − f(x; w0) on w0's head features (the
    head of w0, fitted; everything else at w0). If the trained Δ has the lower training loss it
    is left untouched (a = 1: what the 10-epoch default always gives). Otherwise — few Adam
    steps at lr 3e-3 overshoot: 25 steps left the training loss at ~560 against ~23 at w0 — it
    is replaced by the best point of the segment Δ(a) = a·Δ_trained + (1−a)·Δ_head: the model is
    linear in Δ and the loss a square loss, so the training loss is a quadratic in a, minimised
    in closed form over [0, 1]. Costs one forward pass of the linearized tail over the data.
    """
    features, f0, trained = head_pass(model, dataset, from_cache=from_cache)
    target = square_loss_target(dataset.labels, f0.shape[-1], config)
    weight, bias = ridge_head(features, target - f0, config.guard_ridge)
    fitted = f0 + features @ weight + bias
    class_weight = 1.0 + ((config.alpha if config.loss == "rsl" else 1.0) - 1.0) * (target != 0).double()
    step, residual = trained - fitted, target - fitted

    def loss(logits):
        return float((class_weight * (logits - target).pow(2)).mean())

    alpha, denominator = 1.0, float((class_weight * step * step).sum())
    if loss(trained) > loss(fitted) and denominator > 0:  # a Δ that fits better is left as it is
        alpha = min(1.0, max(0.0, float((class_weight * step * residual).sum()) / denominator))
    delta = model.linearized.head.delta
    alpha = max(alpha, _least_alpha_in_range(delta, weight, bias))

    if alpha < 1.0:
        for param in trainable_parameters(model):
            # + 0.0 turns the -0.0 that a = 0 leaves in every negative entry into +0.0: the
            # same value, but a Δ of signed zeros compresses ~20× worse in the ledger
            param.mul_(alpha).add_(0.0)
        delta.weight.add_(((1 - alpha) * weight.T).to(delta.weight))
        if delta.bias is not None:
            delta.bias.add_(((1 - alpha) * bias).to(delta.bias))
    return {"alpha": alpha, "trained_loss": loss(trained), "fitted_head_loss": loss(fitted),
            "loss": loss(fitted + alpha * step)}


def _least_alpha_in_range(delta, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """The least a in [0, 1] whose head Δ(a) = a·Δ_trained + (1−a)·Δ_fitted has every entry within
    the ledger's range (tangent.protocol.limits.MAX_DELTA_VALUE); 1.0 when only a = 1 is.

    The fitted head scales like 1 / (feature spread): on a backbone whose features barely vary
    (a checkpoint near its random initialisation) it reached 570–1,000, and every site's reply
    was refused ``out_of_range``. max|Δ(a)| is convex in a, so the a within range form an
    interval that holds 1 whenever the trained Δ is in range: bisect for its lower end."""
    from tangent.protocol.limits import MAX_DELTA_VALUE

    limit = 0.999 * MAX_DELTA_VALUE  # float32 rounding of the sent values stays inside
    trained = [delta.weight.double().cpu()] + ([delta.bias.double().cpu()] if delta.bias is not None else [])
    fitted = [weight.T.double().cpu()] + ([bias.double().cpu()] if delta.bias is not None else [])

    def peak(a: float) -> float:
        return max(float((a * t + (1 - a) * f).abs().max()) for t, f in zip(trained, fitted))

    if peak(0.0) <= limit or peak(1.0) > limit:
        return 0.0 if peak(0.0) <= limit else 1.0
    low, high = 0.0, 1.0  # peak(low) > limit >= peak(high)
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if peak(middle) <= limit else (middle, high)
    return high


def square_loss_target(labels: torch.Tensor, num_classes: int, config: TrainConfig) -> torch.Tensor:
    """The logits the square loss pulls towards: κ·onehot (RSL) or onehot (MSE)."""
    target = torch.nn.functional.one_hot(labels, num_classes).double()
    return target * (config.kappa if config.loss == "rsl" else 1.0)


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
                   progress: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for every input, in order, on the CPU. ``device``: as
    in :func:`fit` (the model is moved there; None = where it is)."""
    device = _place(model, device)
    was_training = model.training
    model.eval()
    out = []
    try:
        starts = range(0, len(inputs), batch_size)
        for begin in tqdm(starts, desc="predict", disable=not progress):
            x = take_rows(inputs, np.arange(begin, min(begin + batch_size, len(inputs)))).to(device)
            out.append(model.linearized(x if from_cache else model.trunk(x)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model, inputs, labels, from_cache: bool, *, loss: str = "ce", kappa: float = 15.0,
             alpha: float = 1.0, batch_size: int = 256,
             device: torch.device | str | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on (inputs, labels); ``device`` as in :func:`fit`."""
    logits = predict_logits(model, inputs, from_cache=from_cache, batch_size=batch_size, device=device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    value = float(loss_fn(loss, kappa, alpha)(logits, labels))
    return value, float((logits.argmax(-1) == labels).float().mean())
