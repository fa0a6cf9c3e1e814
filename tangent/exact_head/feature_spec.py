"""The exact head's feature spec: which frozen pieces, random features and fixed-point grid.

No torch here: the simulation driver, the ServerApp's configuration and anything that only reads
or checks a spec import this module without paying for torch (~500 MiB of resident memory in
every process that imports the CUDA wheel). tangent/exact_head/features.py computes φ from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from tangent.protocol.config import RUN_DEFAULTS, RUN_KEY

#: the global pieces (each one 384-vector)
PIECES = ("final_cls", "final_mean", "input_cls", "input_mean")
#: the quadrant pieces (each four 384-vectors)
QUAD_PIECES = ("final_quad", "input_quad")
ALL_PIECES = PIECES + QUAD_PIECES
#: how many embed-dim vectors each pooling contributes
POOL_WIDTH = {"cls": 1, "mean": 1, "quad": 4}
#: random ReLU features are scaled by 1/√4096 whatever k is (so that a spec with fewer features is
#: a prefix of one with more): ‖r‖ ≈ √(k/4096), ≈ 1 at k = 4,096 next to the base vector's 1.
RANDOM_FEATURE_SCALE = 1.0 / 64.0

#: FeatureSpec field -> kebab-case key (run config / ConfigRecord), as tangent.protocol.spec.KEYS
KEYS = {"pieces": "feature-pieces", "projection": "feature-projection", "random_features": "random-features",
        "random_seed": "random-seed", "clip_norm": "clip-norm", "frac_bits": "frac-bits"}


@dataclass(frozen=True)
class FeatureSpec:
    """Which frozen features, how many seeded random features, and their fixed-point grid.

    ``clip_norm`` C bounds ‖φ‖ (rows above it are scaled down to it); ``frac_bits`` b sets the
    grid: φ is stored as integers q = round(φ · 2^b / C), so |q_i| ≤ 2^b.
    """

    # the defaults are the run config's (pyproject.toml)
    pieces: tuple[str, ...] = tuple(RUN_DEFAULTS["feature-pieces"].split(","))
    #: > 0: a seeded Gaussian projection of the base vector to this many dimensions, renormalized
    #: to norm 1 (public, like Ω): fewer statistics and less DP noise (the noise grows with p)
    projection: int = 0
    random_features: int = RUN_DEFAULTS["random-features"]
    random_seed: int = RUN_DEFAULTS["random-seed"]
    clip_norm: float = RUN_DEFAULTS["clip-norm"]
    frac_bits: int = RUN_DEFAULTS["frac-bits"]

    def __post_init__(self):
        pieces = tuple(self.pieces)
        object.__setattr__(self, "pieces", pieces)
        if not pieces or len(set(pieces)) != len(pieces) or not set(pieces) <= set(ALL_PIECES):
            raise ValueError(f"pieces must be distinct names from {ALL_PIECES}, got {pieces!r}")
        if not (isinstance(self.projection, int) and self.projection >= 0):
            raise ValueError(f"projection must be an int ≥ 0, got {self.projection!r}")
        if not (isinstance(self.random_features, int) and self.random_features >= 0):
            raise ValueError(f"random_features must be an int ≥ 0, got {self.random_features!r}")
        if not (np.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm!r}")
        if not (isinstance(self.frac_bits, int) and 1 <= self.frac_bits <= 24):
            raise ValueError(f"frac_bits must be an int in [1, 24], got {self.frac_bits!r}")

    def pieces_dim(self, embed_dim: int = 384) -> int:
        """Width of the concatenated pieces (before any projection)."""
        return embed_dim * sum(POOL_WIDTH[piece.split("_")[1]] for piece in self.pieces)

    def base_dim(self, embed_dim: int = 384) -> int:
        return self.projection or self.pieces_dim(embed_dim)

    def dim(self, embed_dim: int = 384) -> int:
        return self.base_dim(embed_dim) + self.random_features

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FeatureSpec":
        """From a run config or a ``spec`` ConfigRecord (missing keys take the defaults); each
        run-config value parsed by its key's rule (tangent.protocol.config)."""
        values = {f: RUN_KEY[k].parse(config[k]) if k in RUN_KEY else config[k]
                  for f, k in KEYS.items() if k in config}
        if isinstance(values.get("pieces"), str):
            values["pieces"] = tuple(p for p in values["pieces"].split(",") if p)
        if "projection" in values:  # not a run-config key: only tools and benchmarks set it
            values["projection"] = int(values["projection"])
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        out = {KEYS[f]: v for f, v in asdict(self).items()}
        out["feature-pieces"] = ",".join(self.pieces)
        return out


#: The feature specs the DP exact head is measured with (``python -m benchmarks.exact_head``): small
#: φ, clipped to norm 1, because the Gaussian release's noise grows with p².
DP_FEATURE_SPECS = (FeatureSpec(pieces=PIECES[:1], clip_norm=1.0), FeatureSpec(pieces=PIECES[:2], clip_norm=1.0),
                    FeatureSpec(pieces=PIECES, clip_norm=1.0), FeatureSpec(pieces=PIECES, projection=32, clip_norm=1.0),
                    FeatureSpec(pieces=PIECES, projection=64, clip_norm=1.0),
                    FeatureSpec(pieces=PIECES, projection=128, clip_norm=1.0))
#: the best of them there (a seeded 64-dim projection of the four pieces), which the privacy
#: experiment uses
DP_FEATURE_SPEC = FeatureSpec(pieces=PIECES, projection=64, clip_norm=1.0)
