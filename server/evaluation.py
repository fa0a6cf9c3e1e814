"""The ServerApp's central evaluation: accuracy of w0 + Δ on the server's own test set.

The test set is the run config's ``test-dataset`` (see ``tangent.data.dataset_source``: by
default the Fashion-MNIST test split while ``dataset`` is Fashion-MNIST; ``"none"`` or a
``dataset`` of one's own without a ``test-dataset`` = no test data, and then there is no
central evaluation at all), optionally a seeded ``eval-subset`` of it.

Its inputs are built in a background thread started with the ServerApp: reading the token
cache, or — without a ``cache-dir`` — running the frozen trunk over every test image (~2 min for
10,000 images on two cores). The train messages go out at once and the sites train while it
builds; only the first evaluation waits for it. The model's frozen weights are freed once the
inputs exist (only the linearized tail runs on cached tokens afterwards).

With the exact head on (issue 15) the same thread also computes φ of the test rows
(tangent.features.FeatureExtractor.compute): from the cached trunk tokens when the model's trunk
is the extractor's (the token rows entering the last pretrained block; TAFT with one linearized
block), else from the test images; the extractor is freed afterwards. Each evaluation then also
solves the ridge head from the statistics ledger's composed statistics (λ by GCV on the sums
alone, tangent.exact_head.solve) and reports ``accuracy_exact_head`` and ``exact_head_lambda``
beside the TAFT accuracy. A φ cache of the test set in ``cache-dir`` (tangent/phi_cache.py, when
present) is read instead of recomputing φ.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger("taft.server")


def build_inputs(model, base_digest: str, img_size: int, run_config: Mapping[str, Any], source: str):
    """(inputs, labels, from_cache) of the server's test rows; frees the model's frozen part."""
    from tangent.cache import images_digest
    from tangent.data import load_dataset
    from tangent.inputs import model_inputs

    images, labels = load_dataset(source, "test")
    num_classes = int(model.options["num_classes"])
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"test-dataset {source}: label {int(labels.max())} but the model has {num_classes} "
                         "classes (set num-classes in the run config)")
    indices = evaluation_indices(len(labels), run_config)
    directory = str(run_config.get("cache-dir", "") or "")
    if directory:
        inputs, from_cache = model_inputs(model, base_digest, images, indices, img_size,
                                          Path(directory).expanduser(), data_digest=images_digest(images))
    else:
        import torch

        from tangent.data import preprocess
        log.info("central evaluation: no cache-dir, running the trunk over %d test images", len(indices))
        from tangent.device import module_device

        device = module_device(model.trunk)
        with torch.no_grad():
            inputs = torch.cat([model.trunk(preprocess(images[indices[i:i + 256]], img_size).to(device)).cpu()
                                for i in range(0, len(indices), 256)])
        from_cache = True
    model.drop_frozen()  # from here on only the linearized tail runs, on cached test tokens
    return inputs, labels[indices], from_cache


def evaluation_indices(num_rows: int, run_config: Mapping[str, Any]) -> np.ndarray:
    """The test rows evaluated: all, or a seeded ``eval-subset`` of them (sorted)."""
    subset = int(run_config.get("eval-subset", 0) or 0)
    indices = np.arange(num_rows)
    if 0 < subset < num_rows:
        rng = np.random.default_rng(int(run_config.get("seed", 0)))
        indices = np.sort(rng.choice(num_rows, subset, replace=False))
    return indices


def evaluation_features(extractor, inputs, from_tokens: bool, img_size: int, run_config: Mapping[str, Any],
                        source: str) -> tuple[np.ndarray, str]:
    """(φ [N, p] float32 of the test rows, where it came from): the φ cache of the test set in
    ``cache-dir`` when there is one, else the rows' trunk tokens when ``from_tokens``, else the
    images (the rows :func:`evaluation_indices` picks, in the same order)."""
    from tangent.data import load_dataset, preprocess

    directory = str(run_config.get("cache-dir", "") or "")
    if directory or not from_tokens:
        images, labels = load_dataset(source, "test")
        indices = evaluation_indices(len(labels), run_config)
        if directory and (phi := _cached_features(extractor, Path(directory).expanduser(), images, indices)) is not None:
            return phi, "phi-cache"
    if from_tokens:
        return extractor.compute(inputs), "tokens"
    log.info("exact head: φ of %d test images from the images (the model's trunk is not φ's)", len(indices))
    if not len(indices):
        return np.zeros((0, extractor.dim), np.float32), "images"
    return np.concatenate([extractor.compute(preprocess(images[indices[i:i + 256]], img_size), tokens=False)
                           for i in range(0, len(indices), 256)]), "images"


def _cached_features(extractor, directory: Path, images, indices) -> np.ndarray | None:
    """φ of ``indices`` from the φ cache (tangent/phi_cache.py: z of every row, keyed on the
    feature digest and the images digest), or None when there is none (or no φ cache module)."""
    try:
        from tangent.phi_cache import PhiCache
    except ImportError:  # the φ cache comes with the sites' side of issue 15
        return None
    from tangent.cache import images_digest

    try:
        cache = PhiCache.open(directory, extractor.digest(), images_digest(images))
        return None if cache is None else cache.features(extractor, indices)
    except Exception as err:  # noqa: BLE001 — a broken cache costs the time to compute φ, not the evaluation
        log.warning("exact head: the φ cache in %s is unusable (%s: %s); computing φ", directory,
                    type(err).__name__, err)
        return None


#: rows scored at once by the exact head (bounds the float64 copy of φ: 4096 × 3584 × 8 B = 117 MB)
SCORE_CHUNK = 4096


class CentralEvaluation:
    """``evaluation(delta) -> {"accuracy", "loss", "num-examples", "eval-s"}`` or None when the
    server has no test data (or building its inputs failed: logged, in ``error``).

    Use :meth:`start`: it returns at once and builds in a background thread. ``build`` replaces
    :func:`build_inputs` (same arguments) — tests use a deliberately slow one. ``device``: where
    the model runs (a setting, see tangent.device; default the run config's ``device``); it is
    resolved in the build, so a server without the GPU the run config names loses its
    evaluation (logged, in ``error``), not the run. ``extractor`` (a
    tangent.features.FeatureExtractor): also evaluate the exact head (module docstring).
    """

    def __init__(self, model, base_digest: str, img_size: int, run_config: Mapping[str, Any], *,
                 build: Callable | None = None, device: str | None = None, extractor=None):
        from tangent.data import dataset_source
        from tangent.device import DEFAULT

        self.model = model
        self.extractor = extractor
        self.phi: np.ndarray | None = None  # φ of the test rows (exact head)
        # decided before the build frees the model's trunk
        self.phi_from_tokens = extractor is not None and extractor.trunk_matches(model.trunk)
        self.phi_s: float | None = None
        self.phi_from: str | None = None  # "phi-cache", "tokens" or "images"
        self.exact_head_error: str | None = None
        self.source = dataset_source(run_config, "test")
        self.inputs = self.labels = None
        self.from_cache = True
        self.error: str | None = None
        self.build_s: float | None = None
        self.built_at: float | None = None  # time.time() when the inputs were ready
        self._args = (model, base_digest, img_size, run_config, self.source)
        self._build = build or build_inputs
        self.device_setting = str(device or run_config.get("device", DEFAULT) or DEFAULT)
        self._thread = threading.Thread(target=self._run, name="central-evaluation-build", daemon=True)
        self._lock = threading.Lock()  # one evaluation at a time on the shared model

    @classmethod
    def start(cls, model, base_digest: str, img_size: int, run_config: Mapping[str, Any], *,
              build: Callable | None = None, device: str | None = None,
              extractor=None) -> "CentralEvaluation":
        """Start building the test inputs in the background; returns immediately."""
        evaluation = cls(model, base_digest, img_size, run_config, build=build, device=device, extractor=extractor)
        if evaluation.enabled:
            evaluation._thread.start()
        else:
            log.info("central evaluation off: no test data set (dataset=%r, test-dataset=%r)",
                     run_config.get("dataset"), run_config.get("test-dataset"))
            model.drop_frozen()
            evaluation.extractor = None
        return evaluation

    @property
    def enabled(self) -> bool:
        return self.source is not None

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            from tangent.device import resolve_device

            # the trunk (cache build) and later the tail run there; evaluate() uses the model's device
            self.model.to(resolve_device(self.device_setting, setting="run config device (central evaluation)"))
            self.inputs, self.labels, self.from_cache = self._build(*self._args)
            log.info("central evaluation ready: %d test images of %s in %.1f s", len(self.labels), self.source,
                     time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 — a run without its evaluation still records and reports
            self.error = f"{type(err).__name__}: {err}"
            log.error("central evaluation unavailable (%s): %s", self.source, self.error)
        else:
            if self.extractor is not None:
                self._exact_head_features()
        finally:
            self.extractor = None  # its backbone is not needed once φ exists
            self.build_s = time.perf_counter() - start
            self.built_at = time.time()

    def _exact_head_features(self) -> None:
        start = time.perf_counter()
        try:
            _, _, img_size, run_config, source = self._args
            self.phi, self.phi_from = evaluation_features(self.extractor, self.inputs, self.phi_from_tokens, img_size,
                                                          run_config, source)
            if len(self.phi) != len(self.labels):
                raise ValueError(f"φ of {len(self.phi)} rows for {len(self.labels)} labels")
            self.phi_s = time.perf_counter() - start
            log.info("exact head: φ [%d, %d] of the test rows in %.1f s (from %s)", *self.phi.shape, self.phi_s,
                     self.phi_from)
        except Exception as err:  # noqa: BLE001 — the TAFT evaluation goes on without the exact head
            self.phi = None
            self.exact_head_error = f"{type(err).__name__}: {err}"
            log.error("exact-head evaluation unavailable: %s", self.exact_head_error)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the inputs are built (or failed); False on timeout. Builds here and now
        if :meth:`start` was never called."""
        if self._thread.ident is None:
            if self.enabled and self.built_at is None:
                self._run()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def summary(self) -> dict:
        """For the run's report: which test set, how long its inputs took, what went wrong."""
        out = {"test_dataset": self.source, "num_examples": None if self.labels is None else len(self.labels),
               "build_s": self.build_s, "error": self.error}
        if self.phi_s is not None or self.exact_head_error is not None:
            out["exact_head"] = {"phi_s": self.phi_s, "phi_from": self.phi_from, "error": self.exact_head_error}
        return out

    def exact_head(self, stats) -> dict:
        """Accuracy of the ridge head solved from ``stats`` (SufficientStats) on the test rows;
        {} when there is no φ or the statistics cannot be solved (fewer than 2 examples)."""
        from tangent.exact_head import StatsError, solve

        if stats is None or self.phi is None:
            return {}
        start = time.perf_counter()
        try:
            head = solve(stats)
        except StatsError as err:
            log.warning("exact head not solved: %s", err)
            return {}
        predictions = np.concatenate([head.predict(self.phi[i:i + SCORE_CHUNK])
                                      for i in range(0, len(self.phi), SCORE_CHUNK)])
        labels = np.asarray(self.labels)
        return {"accuracy_exact_head": float((predictions == labels).mean()), "exact_head_lambda": head.lam,
                "exact_head_examples": int(stats.n), "exact_head_s": time.perf_counter() - start}

    def __call__(self, delta: dict, stats=None) -> dict | None:
        from tangent.train import evaluate

        if not self.enabled:
            return None
        self.wait()
        if self.error is not None:
            return None
        with self._lock:
            start = time.perf_counter()
            self.model.load_delta(delta)
            loss, accuracy = evaluate(self.model, self.inputs, self.labels, from_cache=self.from_cache)
            result = {"accuracy": accuracy, "loss": loss, "num-examples": len(self.labels),
                      "eval-s": time.perf_counter() - start}
            return result | self.exact_head(stats)
