"""A site's privacy policy, set in its node config and enforced at the site (never by the server).

Node config keys (all optional):

| key | meaning |
|---|---|
| ``require-dp`` | refuse every non-DP training request (``dp_required``) and every evaluate message |
| ``epsilon-budget`` | total ε over all contributions; implies ``require-dp`` |
| ``delta-budget`` | total δ over all contributions |
| ``max-epsilon`` | largest ε one contribution may spend (``epsilon_too_large``) |
| ``max-delta`` | δ ceiling per contribution, default 1e-5 (``delta_too_large``) |
| ``declared-examples`` | the example count a DP reply reveals and is weighted by |
| ``state-dir`` | the site's durable state: ``privacy-budget.json`` and its seal, ``contributions.jsonl`` |

A site that requires DP always has a budget: ``epsilon-budget``, else
:data:`~tangent.training.budget.DEFAULT_EPSILON_BUDGET` (a site the server could ask forever
would have no guarantee at all), and it needs a ``state-dir`` to keep its record in. The record
is created there at the first DP request (or by the deploy scripts, ``PrivacyBudget.create``);
``epsilon-budget``/``delta-budget`` can then only lower it. Once a record or its seal exists in
``state-dir`` it binds (and implies ``require-dp``) even when the node config names no budget,
and deleting the record refuses rather than starting again (tangent.training.budget).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from client.site import SiteError

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


@dataclass(frozen=True)
class DPRequest:
    """What the server asked for, after the site's policy accepted it."""

    target_epsilon: float
    #: the server's δ (0 = the site's default rule)
    requested_delta: float
    max_grad_norm: float
    #: the most δ this contribution may spend (the site's ceiling)
    delta_ceiling: float


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = False
    epsilon_budget: float | None = None
    delta_budget: float | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    declared_examples: int | None = None
    state_dir: Path | None = None
    #: a budget record (or its seal) exists in state_dir: it binds even without ``epsilon-budget``
    has_record: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SitePolicy":
        """Parse the node config; a malformed value is refused (``bad_node_config``)."""
        from tangent.training.budget import PrivacyBudget

        epsilon_budget = _positive(node_config, "epsilon-budget")
        state_dir = str(node_config.get("state-dir", "") or "")
        state = Path(state_dir).expanduser() if state_dir else None
        has_record = state is not None and PrivacyBudget(state / PrivacyBudget.FILE_NAME, "").started()
        policy = cls(require_dp=(_flag(node_config, "require-dp") or epsilon_budget is not None
                                 or has_record),
                     epsilon_budget=epsilon_budget,
                     delta_budget=_probability(node_config, "delta-budget"),
                     max_epsilon=_positive(node_config, "max-epsilon"),
                     max_delta=_probability(node_config, "max-delta"),
                     declared_examples=_count(node_config, "declared-examples"),
                     state_dir=state, has_record=has_record)
        if policy.delta_budget is not None and epsilon_budget is None:
            raise SiteError("bad_node_config", "node config sets 'delta-budget' without "
                                               "'epsilon-budget'")
        return policy

    @property
    def delta_ceiling(self) -> float:
        from tangent.training.privacy import DELTA_CAP

        return self.max_delta if self.max_delta is not None else DELTA_CAP

    def check_request(self, config: Mapping[str, Any]) -> DPRequest | None:
        """The DP request in a train config if this site accepts it; None for an accepted non-DP
        request. Raises SiteError (dp_required, epsilon_too_large, delta_too_large, bad_request)."""
        if not _flag(config, "dp", code="bad_request"):
            if self.require_dp:
                why = ("an epsilon-budget" if self.epsilon_budget is not None else
                       "a privacy-budget record" if self.has_record else "require-dp")
                raise SiteError("dp_required", f"this site trains only with differential privacy "
                                               f"({why} in its node config); the request has dp=false")
            return None
        if "dp-epsilon" not in config:
            raise SiteError("bad_request", "a dp=true request has no 'dp-epsilon'")
        epsilon = _number(config["dp-epsilon"], "dp-epsilon", "bad_request")
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise SiteError("bad_request", f"dp-epsilon must be a positive finite number, got {epsilon}")
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            raise SiteError("epsilon_too_large", f"requested ε={epsilon:g} per contribution exceeds "
                                                 f"this site's max-epsilon={self.max_epsilon:g}")
        delta = _number(config.get("dp-delta", 0.0), "dp-delta", "bad_request")
        if not 0 <= delta < 1:
            raise SiteError("bad_request", f"dp-delta must be in [0, 1), got {delta}")
        if delta > self.delta_ceiling:
            raise SiteError("delta_too_large", f"requested δ={delta:g} exceeds this site's ceiling "
                                               f"max-delta={self.delta_ceiling:g}")
        clip = _number(config.get("dp-max-grad-norm", 1.0), "dp-max-grad-norm", "bad_request")
        if not (clip > 0 and math.isfinite(clip)):
            raise SiteError("bad_request", f"dp-max-grad-norm must be positive, got {clip}")
        return DPRequest(target_epsilon=epsilon, requested_delta=delta, max_grad_norm=clip,
                         delta_ceiling=self.delta_ceiling)

    def budget(self, site: str):
        """The site's PrivacyBudget (None for a site that does not require DP). A site that
        requires DP and has never had a record gets one now, with ``epsilon-budget`` or the
        default total; one that had a record and lost it is refused (BudgetMissing)."""
        if not self.require_dp:
            return None
        from tangent.training.budget import DEFAULT_EPSILON_BUDGET, PrivacyBudget

        if self.state_dir is None:
            raise SiteError("budget_missing", "this site requires DP but its node config has no "
                                              "'state-dir': the spent budget has nowhere durable to live")
        path = self.state_dir / PrivacyBudget.FILE_NAME
        if not PrivacyBudget(path, site).started():
            try:
                PrivacyBudget.create(path, site, self.epsilon_budget or DEFAULT_EPSILON_BUDGET,
                                     self.delta_budget)
            except FileExistsError:
                pass  # another request of this site created it first: it binds all the same
        return PrivacyBudget(path, site, epsilon_cap=self.epsilon_budget, delta_cap=self.delta_budget)


def answers_privately(node_config: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Does the site answer this message as a DP site: its policy requires DP, or the request
    asks for it? When either cannot be read, yes: the conservative answer."""
    try:
        return SitePolicy.from_node_config(node_config).require_dp or _flag(config, "dp", "bad_request")
    except SiteError:
        return True


def _number(value: Any, key: str, code: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SiteError(code, f"{key}={value!r} is not a number") from None


def _flag(config: Mapping[str, Any], key: str, code: str = "bad_node_config") -> bool:
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise SiteError(code, f"{key}={value!r} is not a boolean")


def _positive(config: Mapping[str, Any], key: str) -> float | None:
    if key not in config or config[key] in ("", None):
        return None
    value = _number(config[key], key, "bad_node_config")
    if not (value > 0 and math.isfinite(value)):
        raise SiteError("bad_node_config", f"{key} must be a positive finite number, got {value}")
    return value


def _probability(config: Mapping[str, Any], key: str) -> float | None:
    if key not in config or config[key] in ("", None):
        return None
    value = _number(config[key], key, "bad_node_config")
    if not 0 < value < 1:
        raise SiteError("bad_node_config", f"{key} must be in (0, 1), got {value}")
    return value


def _count(config: Mapping[str, Any], key: str) -> int | None:
    if key not in config or config[key] in ("", None):
        return None
    value = _number(config[key], key, "bad_node_config")
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= 2 ** 24:
        raise SiteError("bad_node_config", f"{key} must be an integer in [1, 2^24], got {config[key]!r}")
    return int(value)
