"""TAFT-1 speed against NLFT-1 and the plain model, on the DINOv2 ViT-S/14 backbone.

    python -m benchmarks.speed [--batch-size 32 --repeats 5 --epoch-batches 4 --threads 1]

All timings in one process, interleaved round by round (so drifting load on a shared machine
hits every measurement alike), medians over rounds. Prints one JSON line:

- ``train_step_ratio``: TAFT-1 training step / NLFT-1 training step of the same block, both
  from images (frozen trunk forward included).           goal ≤ 1.3
- ``inference_ratio``: TAFT-1 forward / plain timm forward.  goal ≤ 1.1
- ``cached_epoch_ratio``: TAFT-1 epoch from cached trunk tokens / NLFT-1 epoch from images
  (the tokens are computed in-process, as the feature cache would hold them).  goal ≤ 0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tangent.losses import rsl_loss
from tangent.model import TangentViT
from tangent.nlft import NLFTViT

NUM_CLASSES = 10


def load_backbone(img_size: int):
    """The real DINOv2 ViT-S/14 when available, else the same architecture with random weights."""
    try:
        from tangent.pretrained import load_pretrained
        return load_pretrained(img_size=img_size), "dinov2-pretrained"
    except Exception:  # noqa: BLE001 - any failure to get real weights falls back to random ones
        import timm
        return (timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                                  num_classes=0).eval(), "dinov2-random")


def default_img_size() -> int:
    try:
        from tangent.data import DEFAULT_IMG_SIZE
        return DEFAULT_IMG_SIZE
    except ImportError:
        return 56


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(module, optimizer, inputs, labels, trunk=None):
    optimizer.zero_grad(set_to_none=True)
    if trunk is not None:
        with torch.no_grad():
            inputs = trunk(inputs)
    rsl_loss(module(inputs), labels).backward()
    optimizer.step()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=None, help="default: tangent.data.DEFAULT_IMG_SIZE")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--epoch-batches", type=int, default=4, help="batches in a timed epoch")
    # One intra-op thread by default: on a small shared machine a second thread turns every small
    # op into a wait for the scheduler (measured: a 32x384 @ 384x10 matmul at 30 ms), which
    # penalises the many small ops of the cached TAFT step, not the work itself.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    img_size = args.img_size or default_img_size()
    backbone, weights = load_backbone(img_size)

    taft = TangentViT.from_timm(backbone, NUM_CLASSES, linearized_blocks=1, seed=0)
    nlft = NLFTViT.from_timm(backbone, NUM_CLASSES, linearized_blocks=1, seed=0)
    plain = nlft.base_model().eval()
    for m in (taft, nlft):
        m.linearized.train()
    taft_opt = torch.optim.SGD([p for p in taft.linearized.parameters() if p.requires_grad], lr=1e-4)
    nlft_opt = torch.optim.SGD([p for p in nlft.linearized.parameters() if p.requires_grad], lr=1e-4)

    B, nb = args.batch_size, args.epoch_batches
    images = torch.randn(nb, B, 3, img_size, img_size)
    labels = torch.randint(0, NUM_CLASSES, (nb, B))
    with torch.no_grad():
        cached = torch.stack([taft.trunk(x) for x in images])  # what FeatureCache would hold

    def taft_epoch_cached():
        for tokens, y in zip(cached, labels):
            train_step(taft.linearized, taft_opt, tokens, y)

    def nlft_epoch():
        for x, y in zip(images, labels):
            train_step(nlft.linearized, nlft_opt, x, y, trunk=nlft.trunk)

    def inference(model):
        with torch.inference_mode():
            model(images[0])

    measures = {
        "taft_step": lambda: train_step(taft.linearized, taft_opt, images[0], labels[0], trunk=taft.trunk),
        "nlft_step": lambda: train_step(nlft.linearized, nlft_opt, images[0], labels[0], trunk=nlft.trunk),
        "taft_forward": lambda: inference(taft),
        "plain_forward": lambda: inference(plain),
        "taft_cached_epoch": taft_epoch_cached,
        "nlft_epoch": nlft_epoch,
    }
    times = {k: [] for k in measures}
    for round_ in range(args.repeats + 2):
        for name, fn in measures.items():
            t = timed(fn)
            if round_ >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "train_step_ratio": round(med["taft_step"] / med["nlft_step"], 4),
        "inference_ratio": round(med["taft_forward"] / med["plain_forward"], 4),
        "cached_epoch_ratio": round(med["taft_cached_epoch"] / med["nlft_epoch"], 4),
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "batch_size": B, "img_size": img_size, "tokens": int(cached.shape[2]),
        "epoch_batches": nb, "repeats": args.repeats, "threads": args.threads, "weights": weights,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
