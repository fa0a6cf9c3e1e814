"""Frozen multi-level features φ(x) of the pretrained backbone, for the exact head.

φ is a fixed function of the image: the pretrained backbone (DINOv2 ViT-S/14 by default, or the
run's weights file; the same weights every site loads, see tangent/model/pretrained.py), no Δ
flows into it. Pieces (each a d-vector, d the backbone's width: 384 for ViT-S):

- ``final_cls``   CLS token after the last block and the final norm;
- ``final_mean``  mean of the patch tokens after the last block and the final norm;
- ``input_cls``   CLS token entering the last block (the trunk output the feature cache holds),
                  through the last block's own first LayerNorm (``norm1``);
- ``input_mean``  mean of those normed patch tokens;
- ``final_quad``  the final patch tokens averaged over the four quadrants of the patch grid
                  (adaptive 2×2 average pooling: 4 × 384, each quadrant a 384-vector);
- ``input_quad``  the same for the normed tokens entering the last block.

The quadrant pieces keep coarse *where* information that a global mean throws away. Measured on
all 60k / 10k Fashion-MNIST images at img 56 (docs/exact_head.md): the four global pieces reach
0.876, + both quadrant pieces (p = 4,608, no random features) 0.895, with λ by GCV.

The last block is the *pretrained* one (TAFT's ``reinit`` re-draws that block for the tangent
model; the trunk — blocks 0..10 — is the same for both, so the TAFT token cache feeds φ too).
Its forward pass is timm's own ``Block`` (no ViT code is duplicated here).

Public normalization (never data-derived): every piece is divided by its own per-example RMS
(so each piece has norm √384 and the concatenation of m pieces norm √(384·m)), and the whole
vector is scaled by 1/√(384·m): the base features have norm exactly 1. That keeps the clip norm,
the fixed-point grid and the DP sensitivity meaningful without reading any site's data — the
alternative, standardizing by data statistics, would need a second federated pass (and, under
DP, a second release). Random ReLU features ``relu(Ω z + β)`` of the normalized base vector z use
a seeded Gaussian Ω (entries N(0, 1), so Ωz ~ N(0, 1) per row since ‖z‖ = 1) and β ~ N(0, 1)
(numpy's PCG64 stream of ``random_seed``); they are scaled by a fixed 1/64 so that 4,096 of them
have norm ≈ 1, like the base vector (E relu(N(0, 2))² = 1). The ridge solve later
standardizes every coordinate with the *summed* statistics (tangent/exact_head/statistics.py), so the
relative scale of the pieces only matters for clipping and quantization.

``FeatureSpec`` is part of the exact head's model spec; ``FeatureExtractor.digest()`` hashes the
backbone weights, the spec, the preprocessing and Ω's bytes (so two machines whose generators
disagree are refused rather than silently mixed).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from tangent.exact_head.feature_spec import (  # noqa: F401 (re-exported: the spec lives without torch)
    ALL_PIECES, KEYS, PIECES, POOL_WIDTH, QUAD_PIECES, RANDOM_FEATURE_SCALE, FeatureSpec)


class FeatureExtractor:
    """φ for images or for cached trunk tokens [N, T, d] (the tokens entering the last block)."""

    def __init__(self, backbone: torch.nn.Module, spec: FeatureSpec, *, img_size: int,
                 backbone_name: str = "vit_small_patch14_dinov2", identity: dict | None = None):
        from tangent.model.vit import Trunk

        self.spec = spec
        self.img_size = img_size
        self.backbone_name = backbone_name
        #: a weights-file backbone's identity (tangent.protocol.spec.ModelSpec.identity), hashed
        #: into the digest; empty for the default backbone, whose digest is unchanged
        self.identity = dict(identity or {})
        self.backbone = backbone.eval().requires_grad_(False)
        self.trunk = Trunk(self.backbone, len(self.backbone.blocks) - 1)
        self.embed_dim = int(self.backbone.embed_dim)
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        if getattr(self.backbone, "cls_token", None) is None and any(p.endswith("_cls") for p in spec.pieces):
            raise ValueError(f"{backbone_name} has no class token: the pieces {spec.pieces} ask for one "
                             "(use the _mean and _quad pieces)")
        self.base_dim = spec.base_dim(self.embed_dim)
        pieces_dim = spec.pieces_dim(self.embed_dim)
        # its own stream of the seed, so that the random features' stream is unchanged
        self.projection = (torch.from_numpy(np.random.default_rng([spec.random_seed, 1]).standard_normal(
            (pieces_dim, spec.projection)).astype(np.float32)) if spec.projection else None)
        # numpy's Generator fills row by row: the first k rows of a larger draw are the same, so
        # specs that differ only in k share their first random features (nested frontier).
        draw = np.random.default_rng(spec.random_seed).standard_normal((spec.random_features, self.base_dim + 1))
        self.omega = torch.from_numpy(draw[:, :-1].astype(np.float32))
        self.beta = torch.from_numpy(draw[:, -1].astype(np.float32))
        self._digest: str | None = None

    @classmethod
    def from_spec(cls, model_spec, spec: FeatureSpec) -> "FeatureExtractor":
        """From a tangent.protocol.spec.ModelSpec (backbone, its weights, img_size): the pretrained
        weights, unchanged."""
        from tangent.protocol.spec import load_spec_backbone

        return cls(load_spec_backbone(model_spec), spec, img_size=model_spec.img_size,
                   backbone_name=model_spec.backbone, identity=model_spec.identity())

    def share_tensors_with(self, module: torch.nn.Module) -> int:
        """Point every backbone tensor that ``module`` holds under the same name with the same
        values (e.g. a TangentViT's w0, whose frozen blocks are the pretrained ones unless it was
        re-initialised) at ``module``'s storage, and return the bytes this frees. A Ray worker
        holds w0 and this extractor for every site it serves: two copies of the backbone (89 MB
        each for ViT-S) that are one. Values are unchanged (so is the digest); neither side
        writes its frozen weights, and moving ``module`` to another device gives it new tensors
        while these keep the old storage."""
        theirs = module.state_dict()
        freed = 0
        for name, tensor in [*self.backbone.named_parameters(), *self.backbone.named_buffers()]:
            other = theirs.get(name)
            if (other is None or other.shape != tensor.shape or other.dtype != tensor.dtype
                    or other.device != tensor.device or other.data_ptr() == tensor.data_ptr()
                    or not torch.equal(other, tensor)):
                continue
            tensor.data = other.detach()
            freed += tensor.numel() * tensor.element_size()
        return freed

    @property
    def dim(self) -> int:
        return self.spec.dim(self.embed_dim)

    def digest(self) -> str:
        """sha256 over the backbone weights, Ω and β, and the options (spec, preprocessing).
        Hashed once per extractor (every weight is read; nothing here changes them)."""
        if self._digest is not None:
            return self._digest
        from tangent.data.sets import preprocessing_spec
        from tangent.model.vit import state_digest

        state = dict(self.backbone.state_dict())
        state["exact_head.omega"], state["exact_head.beta"] = self.omega, self.beta
        if self.projection is not None:
            state["exact_head.projection"] = self.projection
        options = {"family": "exact-head-features", "version": 1, "backbone": self.backbone_name,
                   "features": self.spec.to_config(), "preprocessing": preprocessing_spec(self.img_size)}
        if self.identity:
            options["backbone_identity"] = self.identity
        self._digest = state_digest(state, options)
        return self._digest

    def trunk_matches(self, trunk: torch.nn.Module) -> bool:
        """Whether ``trunk`` (e.g. a TangentViT's) computes the same tokens: then its cache applies."""
        ours, theirs = self.trunk.state_dict(), trunk.state_dict()
        return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    @torch.no_grad()
    def pieces(self, tokens: Tensor) -> dict[str, Tensor]:
        """Every piece of trunk tokens [B, T, d], each d-vector divided by its per-example RMS (a
        public rule: no cross-example statistics), as {name: [B, d]} ([B, 4d] for a quadrant
        piece: its four quadrants' vectors, each normalized, top-left to bottom-right)."""
        block = self.backbone.blocks[-1]
        tokens = tokens.float()
        need_final = any(p.startswith("final") for p in self.spec.pieces)
        source = {"final": self.backbone.norm(block(tokens)) if need_final else None,
                  "input": block.norm1(tokens)}
        out = {}
        for piece in self.spec.pieces:
            where, pool = piece.split("_")
            x = source[where]
            if pool == "quad":
                v = self.quadrants(x[:, self.num_prefix_tokens:])
            else:
                v = (x[:, 0] if pool == "cls" else x[:, self.num_prefix_tokens:].mean(dim=1))[:, None]
            v = v / v.pow(2).mean(dim=2, keepdim=True).sqrt().clamp_min(1e-12)
            out[piece] = v.flatten(1)
        return out

    @staticmethod
    def quadrants(patches: Tensor) -> Tensor:
        """[B, g·g, d] patch tokens of a square grid -> [B, 4, d]: adaptive 2×2 average pooling
        (any g; at img 56 the grid is 4×4, so each quadrant is the mean of 2×2 patches)."""
        b, n, d = patches.shape
        g = int(round(n ** 0.5))
        if g * g != n:
            raise ValueError(f"quadrant pooling needs a square patch grid, got {n} patch tokens")
        grid = patches.transpose(1, 2).reshape(b, d, g, g)
        return torch.nn.functional.adaptive_avg_pool2d(grid, 2).reshape(b, d, 4).transpose(1, 2)

    @torch.no_grad()
    def assemble(self, pieces: dict[str, Tensor]) -> Tensor:
        """φ [B, p] from :meth:`pieces`: the spec's pieces concatenated and scaled to norm 1,
        then the random ReLU features of that vector."""
        return self.expand(self.join(pieces))

    @torch.no_grad()
    def join(self, pieces: dict[str, Tensor]) -> Tensor:
        """The normalized base vector z [B, base_dim] of :meth:`pieces` (before random features)."""
        z = torch.cat([pieces[name] for name in self.spec.pieces], dim=1)
        z = z / float(np.sqrt(z.shape[1]))
        if self.projection is not None:
            z = z @ self.projection
            z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z

    @torch.no_grad()
    def base(self, tokens: Tensor) -> Tensor:
        """z [B, base_dim] of trunk tokens [B, T, d]: what the φ cache stores (tangent/exact_head/phi_cache.py)."""
        return self.join(self.pieces(tokens))

    @torch.no_grad()
    def expand(self, z: Tensor) -> Tensor:
        """φ [B, p] of base vectors z [B, base_dim]: z followed by its seeded random ReLU features."""
        if self.spec.random_features == 0:
            return z
        r = torch.relu(z @ self.omega.T + self.beta) * RANDOM_FEATURE_SCALE
        return torch.cat([z, r], dim=1)

    @torch.no_grad()
    def from_tokens(self, tokens: Tensor) -> Tensor:
        """φ [B, p] (float32) of trunk tokens [B, T, d]: ``expand(base(tokens))``."""
        return self.expand(self.base(tokens))

    @torch.no_grad()
    def from_images(self, images: Tensor) -> Tensor:
        """φ of preprocessed images [B, 3, H, W] (tangent.data.sets.preprocess)."""
        return self.from_tokens(self.trunk(images))

    @torch.no_grad()
    def compute(self, rows, *, batch_size: int = 64, tokens: bool = True, ids=None,
                device: torch.device | str | None = None) -> np.ndarray:
        """φ [N, p] float32 of token rows [N, T, d] (a TokenDataset, array or tensor) or, with
        ``tokens=False``, of preprocessed images.

        A row's φ must not depend on which other rows are computed with it: a site that forgets
        samples recomputes its remaining rows and must get the same integers, and the driver's
        central statistics must equal the sites'. Float kernels round differently for another
        batch *shape* (measured: a batch of 1 changed 104 of 1.4 M quantized entries by one grid
        step) and, with more than one thread, for another *position* in the batch (measured on
        2 threads: 30 of 77 rows differed in the last bit). So every batch has ``batch_size``
        rows, the row with data-set index ``ids[i]`` (default: i) sits at position
        ``ids[i] % batch_size`` of its batch, and the kernels run on one thread
        (:func:`slotted_batches`).

        ``device`` (a torch.device or a setting, see tangent.data.device; None = the CPU): where φ is
        computed; the result is always on the CPU. A GPU's φ equals the CPU's only up to float
        rounding (a few grid steps after quantization), so a site must compute every φ of one
        contribution, and of its later forgetting, on the same kind of device.
        """
        from tangent.data.device import full_fp32

        fn = self.from_tokens if tokens else self.from_images
        with self._placed(device) as device, full_fp32(device):
            return slotted_batches(lambda batch: fn(batch.to(device)).cpu(), rows, self.dim, batch_size, ids)

    @torch.no_grad()
    def compute_base(self, rows, *, batch_size: int = 64, ids=None) -> np.ndarray:
        """z [N, base_dim] float32 of token rows, by :meth:`compute`'s rule."""
        return slotted_batches(self.base, rows, self.base_dim, batch_size, ids)

    @torch.no_grad()
    def expand_rows(self, z, *, batch_size: int = 64, ids=None) -> np.ndarray:
        """φ [N, p] float32 of base rows z [N, base_dim] (array, tensor or TokenDataset), by
        :meth:`compute`'s rule, so that ``expand_rows(compute_base(x)) == compute(x)`` bit for bit."""
        return slotted_batches(self.expand, z, self.dim, batch_size, ids)

    @contextmanager
    def _placed(self, device):
        """The backbone, Ω, β and the projection on ``device`` for the duration, then back on the
        CPU (where digest(), trunk_matches() and every other caller expect them)."""
        from tangent.data.device import resolve_device

        device = torch.device("cpu") if device is None else resolve_device(device)
        if device.type == "cpu":
            yield device
            return
        saved = self.omega, self.beta, self.projection
        self.backbone.to(device)  # the trunk shares its tensors
        self.omega, self.beta = self.omega.to(device), self.beta.to(device)
        if self.projection is not None:
            self.projection = self.projection.to(device)
        try:
            yield device
        finally:
            self.backbone.to("cpu")
            self.omega, self.beta, self.projection = saved


def slotted_batches(fn, rows, width: int, batch_size: int, ids=None) -> np.ndarray:
    """``fn`` over ``rows`` such that a row's result depends on nothing but the row and its id:
    batches of exactly ``batch_size`` rows (empty positions hold a copy of a row of the batch),
    row i at position ``ids[i] % batch_size``, one torch thread (the kernels' work split, hence
    their rounding, depends on the thread count). ``ids`` default to 0..N-1: consecutive rows
    fill consecutive batches, as a plain padded loop would."""
    n = len(rows)
    out = np.empty((n, width), dtype=np.float32)
    if n == 0:
        return out
    ids = np.arange(n) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"need one id per row: {n} rows, ids of shape {ids.shape}")
    slots = ids % batch_size
    # the k-th row (in order) of each slot goes to batch k: slots within a batch are distinct
    by_slot = np.argsort(slots, kind="stable")
    first = np.searchsorted(slots[by_slot], slots[by_slot], side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[by_slot] = np.arange(n) - first
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2), side="left")
    with _ONE_THREAD:  # the thread count is process-wide: one caller at a time sets and restores it
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _run_batches(fn, rows, out, slots, by_rank, bounds, batch_size)
        finally:
            torch.set_num_threads(threads)
    return out


_ONE_THREAD = threading.Lock()


def _run_batches(fn, rows, out, slots, by_rank, bounds, batch_size) -> None:
    for k in range(len(bounds) - 1):
        members = by_rank[bounds[k]:bounds[k + 1]]
        batch = rows[members]
        batch = torch.as_tensor(np.asarray(batch)) if not isinstance(batch, Tensor) else batch
        full = batch[:1].expand(batch_size, *batch.shape[1:]).clone()
        position = torch.from_numpy(slots[members])
        full[position] = batch
        out[members] = fn(full)[position].numpy()
