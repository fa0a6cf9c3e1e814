"""The ``device`` setting: where a process runs the model (cache build, training, evaluation).

Values: ``"auto"`` (the first CUDA device when one is visible, else the CPU), ``"cpu"``,
``"cuda"`` (the current CUDA device) or ``"cuda:i"``. Asking for CUDA on a machine without it is
an error, never a silent fall-back to the CPU: a site that was configured for a GPU and trains
for hours on its CPU instead should hear about it at once.

Under Ray (``simulations.run --gpus-per-client``) a worker sees only the GPUs Ray assigned it
(CUDA_VISIBLE_DEVICES), so ``cuda`` there means "the GPU this worker was given".
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

_PATTERN = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def resolve_device(value: str | torch.device, *, setting: str = "device") -> torch.device:
    """The ``torch.device`` a setting names. ``setting`` names it in errors (e.g. "node config
    device"). Raises ValueError for anything but auto | cpu | cuda | cuda:i, and for CUDA when
    no CUDA device (or not device i) is visible."""
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{setting} must be a string (auto, cpu, cuda or cuda:i), got {value!r}")
    text = value.strip().lower()
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"{setting} = {value!r} is not a device: use auto, cpu, cuda or cuda:i "
                         "(i = a CUDA device index)")
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU "
               f"(driver, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!s}, or a "
               "Ray worker given no GPU: --gpus-per-client)" if torch.version.cuda
               else f"torch {torch.__version__} is a CPU-only build")
        raise ValueError(f"{setting} = {value!r} but CUDA is not available here: {why}. Set it to cpu or "
                         "auto, or run where a GPU is visible")
    index = match.group(1)
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"{setting} = {value!r} but only {torch.cuda.device_count()} CUDA "
                         f"device(s) are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(text)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters (else buffers) live; the CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def full_fp32(device: torch.device):
    """No TF32 while inside, on a CUDA ``device`` (cuDNN convolutions — the ViT's patch embedding —
    use TF32 by default on recent GPUs, ~1e-3 relative error): for outputs that are shared with,
    or must agree with, CPU processes (the trunk-token cache, exact-head features). Elsewhere a
    no-op."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
