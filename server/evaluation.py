"""The ServerApp's central evaluation: accuracy of w0 + Δ on the server's own test set.

The test set is the run config's ``test-dataset`` (see ``tangent.data.sets.dataset_source``: by
default the Fashion-MNIST test split while ``dataset`` is Fashion-MNIST; ``"none"`` or a
``dataset`` of one's own without a ``test-dataset`` = no test data, and then there is no
central evaluation at all), optionally a seeded ``eval-subset`` of it.

No torch in the ServerApp's process (it would cost ~535 MiB resident): every step that runs the model happens in
a short-lived child process (server.model_process), which exits with all of torch's memory.
:func:`prepare_test_inputs` runs once, in a child waited on by a background thread started with
the ServerApp: it builds the token cache of the test rows in ``cache-dir`` when it is cold (or,
without a ``cache-dir``, runs the frozen trunk over every test image, ~2 min for 10,000 images on
two cores) and φ's (below), and keeps what the evaluations read in a private directory under the
state directory (0700, removed at the end of the run): labels, φ, and — only without a
``cache-dir`` — the trunk tokens, so the trunk runs once per run, not once per evaluation. The
train messages go out at once and the sites train while it builds; only the first evaluation
waits for it. Each evaluation (:func:`evaluate_composed`) is one more child: it loads w0 and the
stored (or cached) test rows, runs the linearized tail with the composed Δ (numpy arrays) and
returns the figures; the exact head's solve is a numpy-only child after it
(:func:`evaluate_exact_head`), so its memory never adds to torch's. A child's error comes back as its exception's type and text (the run goes
on without that evaluation, ``evaluation_errors`` in the report); no child runs longer than the
run config's ``round-timeout``.

With the exact head on the same child also computes φ of the test rows
(tangent.exact_head.features.FeatureExtractor.compute): from the cached trunk tokens when the model's trunk
is the extractor's (the token rows entering the last pretrained block; TAFT with one linearized
block), else from the test images. Each evaluation then also
solves the ridge head from the statistics ledger's composed statistics (λ by GCV on the sums
alone, tangent.exact_head.statistics.solve) and reports ``accuracy_exact_head`` and ``exact_head_lambda``
beside the TAFT accuracy. A φ cache of the test set in ``cache-dir`` (tangent/exact_head/phi_cache.py, when
present) is read instead of recomputing φ.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from tangent.protocol.config import as_run_config

log = logging.getLogger("taft.server")


def build_inputs(model, base_digest: str, img_size: int, run_config: Mapping[str, Any], source: str):
    """(inputs, labels, from_cache) of the server's test rows; frees the model's frozen part."""
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_dataset
    from tangent.data.inputs import model_inputs

    images, labels = load_dataset(source, "test")
    num_classes = int(model.options["num_classes"])
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"test-dataset {source}: label {int(labels.max())} but the model has {num_classes} "
                         "classes (set num-classes in the run config)")
    indices = evaluation_indices(len(labels), run_config)
    directory = as_run_config(run_config).cache_dir
    if directory:
        inputs, from_cache = model_inputs(model, base_digest, images, indices, img_size,
                                          Path(directory).expanduser(), data_digest=images_digest(images))
    else:
        import torch

        from tangent.data.sets import preprocess
        log.info("central evaluation: no cache-dir, running the trunk over %d test images", len(indices))
        from tangent.data.device import module_device

        device = module_device(model.trunk)
        with torch.no_grad():
            inputs = torch.cat([model.trunk(preprocess(images[indices[i:i + 256]], img_size).to(device)).cpu()
                                for i in range(0, len(indices), 256)])
        from_cache = True
    model.drop_frozen()  # from here on only the linearized tail runs, on cached test tokens
    return inputs, labels[indices], from_cache


def evaluation_indices(num_rows: int, run_config: Mapping[str, Any]) -> np.ndarray:
    """The test rows evaluated: all, or a seeded ``eval-subset`` of them (sorted)."""
    run = as_run_config(run_config)
    subset = run.eval_subset
    indices = np.arange(num_rows)
    if 0 < subset < num_rows:
        rng = np.random.default_rng(run.seed)
        indices = np.sort(rng.choice(num_rows, subset, replace=False))
    return indices


def evaluation_features(extractor, inputs, from_tokens: bool, img_size: int, run_config: Mapping[str, Any],
                        source: str) -> tuple[np.ndarray, str]:
    """(φ [N, p] float32 of the test rows, where it came from): the φ cache of the test set in
    ``cache-dir`` when there is one, else the rows' trunk tokens when ``from_tokens``, else the
    images (the rows :func:`evaluation_indices` picks, in the same order)."""
    from tangent.data.sets import load_dataset, preprocess

    directory = as_run_config(run_config).cache_dir
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
    """φ of ``indices`` from the φ cache (tangent/exact_head/phi_cache.py: z of every row, keyed on the
    feature digest and the images digest), or None when there is none (or no φ cache module)."""
    try:
        from tangent.exact_head.phi_cache import PhiCache
    except ImportError:  # a checkout without the φ cache module: compute φ from the rows
        return None
    from tangent.data.token_cache import images_digest

    try:
        cache = PhiCache.open(directory, extractor.digest(), images_digest(images))
        return None if cache is None else cache.features(extractor, indices)
    except Exception as err:  # noqa: BLE001 — a broken cache costs the time to compute φ, not the evaluation
        log.warning("exact head: the φ cache in %s is unusable (%s: %s); computing φ", directory,
                    type(err).__name__, err)
        return None


#: rows scored at once by the exact head (bounds the float64 copy of φ: 4096 × 3584 × 8 B = 117 MB)
SCORE_CHUNK = 4096

# ----------------------------------------------------------------------------- the child processes' jobs
# Both run in a fresh process (server.model_process): torch, w0 and φ's backbone never enter the
# ServerApp's own memory. Between them the test rows live in ``workdir`` (private, under the state
# directory): labels.npy, phi.npy (exact head), tokens.npy (only without a cache-dir: the token
# cache in cache-dir holds them otherwise) and inputs.json.

def prepare_test_inputs(spec_config: dict, base_digest: str, run_config: dict, source: str, device_setting: str,
                        exact_head: bool, workdir: str, build: Callable | None = None) -> dict:
    """Build the test rows once (the token cache and the φ cache when cold), store what the
    evaluations read in ``workdir``; returns the figures of the report."""
    from tangent.data.device import resolve_device
    from tangent.protocol.spec import ModelSpec, build_model

    start = time.perf_counter()
    # resolved first: a server without the GPU the run config names loses only its evaluation
    device = resolve_device(device_setting, setting="run config device (central evaluation)")
    spec = ModelSpec.from_config(spec_config)
    model, _ = build_model(spec, cached=False)
    extractor = phi_from_tokens = None
    if exact_head:
        from tangent.exact_head.features import FeatureExtractor

        extractor = FeatureExtractor.from_spec(spec, cfg_feature_spec(run_config))
        phi_from_tokens = extractor.trunk_matches(model.trunk)  # decided before the build frees the trunk
    model.to(device)
    inputs, labels, from_cache = (build or build_inputs)(model, base_digest, spec.img_size, run_config, source)
    directory = Path(workdir)
    np.save(directory / "labels.npy", np.asarray(labels))
    if not as_run_config(run_config).cache_dir:
        np.save(directory / "tokens.npy", _numpy(inputs))
    facts = {"num_examples": len(labels), "from_cache": bool(from_cache), "build_s": time.perf_counter() - start,
             "phi_s": None, "phi_from": None, "exact_head_error": None}
    if extractor is not None:
        phi_start = time.perf_counter()
        try:
            phi, facts["phi_from"] = evaluation_features(extractor, inputs, phi_from_tokens, spec.img_size, run_config,
                                                         source)
            if len(phi) != len(labels):
                raise ValueError(f"φ of {len(phi)} rows for {len(labels)} labels")
            np.save(directory / "phi.npy", np.asarray(phi, np.float32))
            facts["phi_s"] = time.perf_counter() - phi_start
        except Exception as err:  # noqa: BLE001 — the TAFT evaluation goes on without the exact head
            facts["exact_head_error"] = f"{type(err).__name__}: {err}"
    (directory / "inputs.json").write_text(json.dumps({"from_cache": bool(from_cache)}))
    facts["built_at"] = time.time()
    return facts


def evaluate_composed(spec_config: dict, base_digest: str, run_config: dict, source: str, device_setting: str,
                      workdir: str, delta: dict) -> dict:
    """Accuracy of w0 + ``delta`` (numpy arrays) on the stored test rows."""
    import torch

    from tangent.data.device import resolve_device
    from tangent.protocol.spec import ModelSpec, build_model
    from tangent.training.trainer import evaluate

    start = time.perf_counter()
    directory = Path(workdir)
    spec = ModelSpec.from_config(spec_config)
    model, _ = build_model(spec, cached=False)
    model.to(resolve_device(device_setting, setting="run config device (central evaluation)"))
    labels = np.load(directory / "labels.npy")
    from_cache = bool(json.loads((directory / "inputs.json").read_text())["from_cache"])
    if (directory / "tokens.npy").exists():
        inputs = torch.from_numpy(np.load(directory / "tokens.npy", mmap_mode="r").copy())
        model.drop_frozen()
    else:  # the token cache in cache-dir (read lazily; build_inputs frees the trunk)
        inputs, labels, from_cache = build_inputs(model, base_digest, spec.img_size, run_config, source)
    model.load_delta({k: torch.from_numpy(np.asarray(v)) for k, v in delta.items()})
    loss, accuracy = evaluate(model, inputs, labels, from_cache=from_cache)
    return {"accuracy": accuracy, "loss": loss, "num-examples": len(labels), "eval-s": time.perf_counter() - start}


def evaluate_exact_head(workdir: str, stats) -> dict:
    """:func:`exact_head_accuracy` on the stored φ of the test rows ({} without them). numpy
    only: its own child, after the TAFT one has gone — the solve's ~500 MiB at p = 3,072 and
    torch's are never resident at the same time."""
    directory = Path(workdir)
    if not (directory / "phi.npy").exists():
        return {}
    return exact_head_accuracy(stats, np.load(directory / "phi.npy", mmap_mode="r"), np.load(directory / "labels.npy"))


def exact_head_accuracy(stats, phi: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of the ridge head solved from ``stats`` (SufficientStats) on the rows ``phi``;
    {} when the statistics cannot be solved (fewer than 2 examples). numpy only."""
    from tangent.exact_head.statistics import StatsError, solve

    start = time.perf_counter()
    try:
        if stats.dp is not None:  # the DP head's releases (server.exact_head.ExactHead.composed)
            from server.exact_head import solve_dp_head

            head = solve_dp_head(stats)
        else:
            head = solve(stats)
    except StatsError as err:
        log.warning("exact head not solved: %s", err)
        return {}
    predictions = np.concatenate([head.predict(np.asarray(phi[i:i + SCORE_CHUNK]))
                                  for i in range(0, len(phi), SCORE_CHUNK)])
    return {"accuracy_exact_head": float((predictions == np.asarray(labels)).mean()), "exact_head_lambda": head.lam,
            "exact_head_examples": int(stats.n), "exact_head_s": time.perf_counter() - start}


def cfg_feature_spec(run_config: Mapping[str, Any]):
    from server import config as cfg

    return cfg.feature_spec(run_config)


def _numpy(inputs) -> np.ndarray:
    if hasattr(inputs, "numpy"):
        return inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else inputs.numpy()
    return np.asarray(inputs)


# ----------------------------------------------------------------------------- the ServerApp's side

class CentralEvaluation:
    """``evaluation(delta, stats=None) -> {"accuracy", "loss", "num-examples", "eval-s", ...}`` or
    None when the server has no test data, or building its inputs or the evaluation failed
    (logged; in ``error`` / ``errors``: the child process's exception type and text).

    Use :meth:`start`: it returns at once and builds the test rows in a child process, waited on
    by a background thread. Every evaluation is another child process (server.model_process):
    this process never imports torch. ``delta``: {name: numpy array}; ``stats``: the composed
    tangent.exact_head.statistics.SufficientStats (or None). ``device``: where the model runs (a setting, see
    tangent.data.device; default the run config's ``device``), resolved in the child, so a server
    without the GPU the run config names loses its evaluation, not the run. ``exact_head``: also
    compute φ of the test rows and evaluate the exact head. ``build`` replaces
    :func:`build_inputs` (same arguments; a module-level function, it runs in the child).
    ``timeout``: seconds one child may take (default the run config's ``round-timeout``).
    ``workdir``: where the test rows are kept between the children (a private temporary
    directory under it is created and removed by :meth:`close`; default the system's).
    """

    def __init__(self, spec_config: Mapping[str, Any], base_digest: str, run_config: Mapping[str, Any], *,
                 exact_head: bool = False, build: Callable | None = None, device: str | None = None,
                 timeout: float | None = None, workdir: Path | str | None = None):
        from tangent.data.sets import dataset_source

        self.spec_config = dict(spec_config)
        self.base_digest = base_digest
        run = as_run_config(run_config)
        self.run_config = run.to_config()  # a plain dict for the child processes
        self.exact_head_on = bool(exact_head)
        self.switched_off = not run.central_evaluation
        self.source = None if self.switched_off else dataset_source(self.run_config, "test")
        self.device_setting = str(device or run.device)
        self.timeout = float(timeout if timeout is not None else run.round_timeout)
        self._build = build or build_inputs  # read here: a test may replace the module's build_inputs
        self._parent = None if workdir is None else Path(workdir)
        self.workdir: Path | None = None
        self.facts: dict = {}
        self.error: str | None = None
        self.errors: list[str] = []  # failed evaluations (the run goes on)
        self.build_s: float | None = None
        self.built_at: float | None = None  # time.time() when the inputs were ready
        self._thread = threading.Thread(target=self._run, name="central-evaluation-build", daemon=True)
        self._lock = threading.Lock()  # one evaluation child at a time

    @classmethod
    def start(cls, spec_config: Mapping[str, Any], base_digest: str, run_config: Mapping[str, Any],
              **options) -> "CentralEvaluation":
        """Start building the test inputs in the background; returns immediately."""
        evaluation = cls(spec_config, base_digest, run_config, **options)
        if evaluation.enabled:
            evaluation._thread.start()
        elif evaluation.switched_off:
            log.info("central evaluation off: central-evaluation=false")
        else:
            log.info("central evaluation off: no test data set (dataset=%r, test-dataset=%r)",
                     evaluation.run_config["dataset"], evaluation.run_config["test-dataset"])
        return evaluation

    @property
    def enabled(self) -> bool:
        return self.source is not None

    @property
    def labels(self):  # the report's num_examples
        return self.facts.get("num_examples")

    def _run(self) -> None:
        from server import model_process

        start = time.perf_counter()
        try:
            if self._parent is not None:
                self._parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="central-evaluation-", dir=self._parent))  # 0700
            self.facts = model_process.call(prepare_test_inputs, self.spec_config, self.base_digest, self.run_config,
                                            self.source, self.device_setting, self.exact_head_on, str(self.workdir),
                                            self._build, timeout=self.timeout)
            self.built_at = self.facts.get("built_at")
            log.info("central evaluation ready: %d test images of %s in %.1f s", self.facts["num_examples"],
                     self.source, time.perf_counter() - start)
            if self.facts.get("exact_head_error"):
                log.error("exact-head evaluation unavailable: %s", self.facts["exact_head_error"])
            elif self.facts.get("phi_s") is not None:
                log.info("exact head: φ of the test rows in %.1f s (from %s)", self.facts["phi_s"],
                         self.facts["phi_from"])
        except Exception as err:  # noqa: BLE001 — a run without its evaluation still records and reports
            failed = err if isinstance(err, model_process.ModelProcessError) else f"{type(err).__name__}: {err}"
            self.error = str(failed)  # a ModelProcessError reads "<the child's exception type>: <its text>"
            log.error("central evaluation unavailable (%s): %s", self.source, self.error)
        finally:
            self.build_s = time.perf_counter() - start
            if self.built_at is None:
                self.built_at = time.time()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the inputs are built (or failed); False on timeout. Builds here and now
        if :meth:`start` was never called."""
        if self._thread.ident is None:
            if self.enabled and self.build_s is None:
                self._run()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def summary(self) -> dict:
        """For the run's report: which test set, how long its inputs took, what went wrong."""
        out = {"test_dataset": self.source, "num_examples": self.labels, "build_s": self.build_s,
               "built_at": self.built_at, "error": self.error}
        if self.errors:
            out["evaluation_errors"] = self.errors
        if self.facts.get("phi_s") is not None or self.facts.get("exact_head_error") is not None:
            out["exact_head"] = {"phi_s": self.facts.get("phi_s"), "phi_from": self.facts.get("phi_from"),
                                 "error": self.facts.get("exact_head_error")}
        return out

    def __call__(self, delta: Mapping[str, Any], stats=None) -> dict | None:
        from server import model_process

        if not self.enabled:
            return None
        self.wait()
        if self.error is not None:
            return None
        with self._lock:
            try:
                result = model_process.call(evaluate_composed, self.spec_config, self.base_digest, self.run_config,
                                            self.source, self.device_setting, str(self.workdir),
                                            {k: np.asarray(v) for k, v in delta.items()}, timeout=self.timeout)
            except model_process.ModelProcessError as err:
                self.errors.append(str(err))
                log.error("central evaluation failed: %s", err)
                return None
            if stats is not None:
                try:
                    result |= model_process.call(evaluate_exact_head, str(self.workdir), stats, timeout=self.timeout)
                except model_process.ModelProcessError as err:  # the TAFT figures stand
                    self.errors.append(f"exact head: {err}")
                    log.error("exact-head evaluation failed: %s", err)
            return result

    def close(self) -> None:
        """Remove the stored test rows (after the build, if one is still running)."""
        if self._thread.ident is not None:
            self._thread.join(self.timeout)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
