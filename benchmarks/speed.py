"""TAFT-1 speed against NLFT-1 and the plain model, on the DINOv2 ViT-S/14 backbone.

    python -m benchmarks.speed [--batch-size 32 --repeats 5 --epoch-batches 4 --threads 1]
    python -m benchmarks.speed --device cuda --img-size 224 [--compile | --cuda-graphs] --warmup 5

All timings in one process, interleaved round by round (so drifting load on a shared machine
hits every measurement alike), medians over rounds. Prints one JSON line:

- ``train_step_ratio``: TAFT-1 training step / NLFT-1 training step of the same block, both
  from images (frozen trunk forward included).           goal ≤ 1.3
- ``inference_ratio``: TAFT-1 forward / plain timm forward.  goal ≤ 1.1
- ``cached_epoch_ratio``: TAFT-1 epoch from cached trunk tokens / NLFT-1 epoch from images
  (the tokens are computed in-process, as the feature cache would hold them).  goal ≤ 0.1

``--device`` (default cpu) runs every model there; on a GPU each timing synchronizes the device
before and after. ``--compile`` wraps the TAFT-1 tail (forward + loss, whose backward AOTAutograd
compiles too) in ``torch.compile``; ``--cuda-graphs`` does so in mode "reduce-overhead", which
replays it as CUDA graphs (GPU only): with few tokens (17 at 56 px) a TAFT step is bound by
kernel launches, not by arithmetic. Either applies to TAFT-1 only; NLFT-1 and the plain model
stay eager, so the ratios say what the option buys TAFT against the usual baselines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tangent.training.losses import rsl_loss
from tangent.model.vit import TangentViT
from tangent.model.nlft import NLFTViT

NUM_CLASSES = 10


def load_backbone(img_size: int):
    """The real DINOv2 ViT-S/14 when available, else the same architecture with random weights."""
    try:
        from tangent.model.pretrained import load_pretrained
        return load_pretrained(img_size=img_size), "dinov2-pretrained"
    except Exception:  # noqa: BLE001 - any failure to get real weights falls back to random ones
        import timm
        return (timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                                  num_classes=0).eval(), "dinov2-random")


def default_img_size() -> int:
    try:
        from tangent.data.sets import DEFAULT_IMG_SIZE
        return DEFAULT_IMG_SIZE
    except ImportError:
        return 56


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall time of ``fn()``; on a GPU, of the work it queued too (synchronized before and after)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def train_step(module, optimizer, inputs, labels, trunk=None, loss_of=None):
    """One step; ``loss_of(tokens, labels)`` replaces ``rsl_loss(module(tokens), labels)`` (compiled)."""
    optimizer.zero_grad(set_to_none=True)
    if trunk is not None:
        with torch.no_grad():
            inputs = trunk(inputs)
    loss = loss_of(inputs, labels) if loss_of is not None else rsl_loss(module(inputs), labels)
    loss.backward()
    optimizer.step()


def compiled_tail(tail, mode: str | None):
    """(tokens -> logits, (tokens, labels) -> loss) of ``tail``: eager when ``mode`` is None, else
    torch.compile'd in that mode (static shapes: one graph per batch shape)."""
    def loss_of(tokens, labels):
        return rsl_loss(tail(tokens), labels)

    if mode is None:
        return tail, loss_of
    return (torch.compile(tail, mode=mode, dynamic=False),
            torch.compile(loss_of, mode=mode, dynamic=False))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=None, help="default: tangent.data.sets.DEFAULT_IMG_SIZE")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after --warmup rounds)")
    parser.add_argument("--epoch-batches", type=int, default=4, help="batches in a timed epoch")
    # One intra-op thread by default: on a small shared machine a second thread turns every small
    # op into a wait for the scheduler (measured: a 32x384 @ 384x10 matmul at 30 ms), which
    # penalises the many small ops of the cached TAFT step, not the work itself.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:i (default cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the TAFT-1 tail (default mode)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help='torch.compile the TAFT-1 tail in mode "reduce-overhead" (CUDA graphs; GPU only)')
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds first (compiling and graph recording happen there; 5 with "
                             "--compile/--cuda-graphs is plenty)")
    args = parser.parse_args(argv)
    from tangent.data.device import resolve_device

    try:
        device = resolve_device(args.device, setting="--device")
    except ValueError as err:
        parser.error(str(err))
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs a CUDA --device (CUDA graphs exist only on a GPU)")
    mode = "reduce-overhead" if args.cuda_graphs else ("default" if args.compile else None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    img_size = args.img_size or default_img_size()
    backbone, weights = load_backbone(img_size)

    taft = TangentViT.from_timm(backbone, NUM_CLASSES, linearized_blocks=1, seed=0)
    nlft = NLFTViT.from_timm(backbone, NUM_CLASSES, linearized_blocks=1, seed=0)
    plain = nlft.base_model().eval()
    for m in (taft, nlft, plain):
        m.to(device)
    for m in (taft, nlft):
        m.linearized.train()
    taft_tail, taft_loss = compiled_tail(taft.linearized, mode)
    taft_opt = torch.optim.SGD([p for p in taft.linearized.parameters() if p.requires_grad], lr=1e-4)
    nlft_opt = torch.optim.SGD([p for p in nlft.linearized.parameters() if p.requires_grad], lr=1e-4)

    B, nb = args.batch_size, args.epoch_batches
    images = torch.randn(nb, B, 3, img_size, img_size).to(device)
    labels = torch.randint(0, NUM_CLASSES, (nb, B)).to(device)
    with torch.no_grad():
        cached = torch.stack([taft.trunk(x) for x in images])  # what FeatureCache would hold

    def taft_epoch_cached():
        for tokens, y in zip(cached, labels):
            train_step(taft.linearized, taft_opt, tokens, y, loss_of=taft_loss)

    def nlft_epoch():
        for x, y in zip(images, labels):
            train_step(nlft.linearized, nlft_opt, x, y, trunk=nlft.trunk)

    def inference(model):
        with torch.inference_mode():
            model(images[0])

    def taft_inference():
        with torch.inference_mode():
            taft_tail(taft.trunk(images[0]))  # = taft(images[0]), through the (compiled) tail

    measures = {
        "taft_step": lambda: train_step(taft.linearized, taft_opt, images[0], labels[0], trunk=taft.trunk,
                                        loss_of=taft_loss),
        "nlft_step": lambda: train_step(nlft.linearized, nlft_opt, images[0], labels[0], trunk=nlft.trunk),
        "taft_forward": taft_inference,
        "plain_forward": lambda: inference(plain),
        "taft_cached_epoch": taft_epoch_cached,
        "nlft_epoch": nlft_epoch,
    }
    times = {k: [] for k in measures}
    for round_ in range(args.repeats + args.warmup):
        for name, fn in measures.items():
            t = timed(fn, device)
            if round_ >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "train_step_ratio": round(med["taft_step"] / med["nlft_step"], 4),
        "inference_ratio": round(med["taft_forward"] / med["plain_forward"], 4),
        "cached_epoch_ratio": round(med["taft_cached_epoch"] / med["nlft_epoch"], 4),
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "batch_size": B, "img_size": img_size, "tokens": int(cached.shape[2]),
        "epoch_batches": nb, "repeats": args.repeats, "threads": args.threads, "weights": weights,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "taft_compile": mode, "warmup": args.warmup,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
