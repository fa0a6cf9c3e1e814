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
    subset = int(run_config.get("eval-subset", 0) or 0)
    indices = np.arange(len(labels))
    if 0 < subset < len(labels):
        rng = np.random.default_rng(int(run_config.get("seed", 0)))
        indices = np.sort(rng.choice(len(labels), subset, replace=False))
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


class CentralEvaluation:
    """``evaluation(delta) -> {"accuracy", "loss", "num-examples", "eval-s"}`` or None when the
    server has no test data (or building its inputs failed: logged, in ``error``).

    Use :meth:`start`: it returns at once and builds in a background thread. ``build`` replaces
    :func:`build_inputs` (same arguments) — tests use a deliberately slow one. ``device``: where
    the model runs (a setting, see tangent.device; default the run config's ``device``); it is
    resolved in the build, so a server without the GPU the run config names loses its
    evaluation (logged, in ``error``), not the run.
    """

    def __init__(self, model, base_digest: str, img_size: int, run_config: Mapping[str, Any], *,
                 build: Callable | None = None, device: str | None = None):
        from tangent.data import dataset_source
        from tangent.device import DEFAULT

        self.model = model
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
              build: Callable | None = None, device: str | None = None) -> "CentralEvaluation":
        """Start building the test inputs in the background; returns immediately."""
        evaluation = cls(model, base_digest, img_size, run_config, build=build, device=device)
        if evaluation.enabled:
            evaluation._thread.start()
        else:
            log.info("central evaluation off: no test data set (dataset=%r, test-dataset=%r)",
                     run_config.get("dataset"), run_config.get("test-dataset"))
            model.drop_frozen()
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
        finally:
            self.build_s = time.perf_counter() - start
            self.built_at = time.time()

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
        return {"test_dataset": self.source, "num_examples": None if self.labels is None else len(self.labels),
                "build_s": self.build_s, "error": self.error}

    def __call__(self, delta: dict) -> dict | None:
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
        return {"accuracy": accuracy, "loss": loss, "num-examples": len(self.labels),
                "eval-s": time.perf_counter() - start}
