"""A site's privacy policy, set in its node config and enforced at the site (never by the server).

Node config keys (all optional; parsed by tangent.protocol.config, which defines them):

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from client.site import SiteError, parse_node_config, parse_train_request
from tangent.protocol.config import ConfigError, NodeConfig, TrainRequest, parse_bool


@dataclass(frozen=True)
class AcceptedDP:
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
    def from_node_config(cls, node_config: Mapping[str, Any] | NodeConfig) -> "SitePolicy":
        """From the node config (parsed by tangent.protocol.config: a malformed value is refused,
        ``bad_node_config``)."""
        from tangent.training.budget import PrivacyBudget

        node = node_config if isinstance(node_config, NodeConfig) else parse_node_config(node_config)
        state = Path(node.state_dir).expanduser() if node.state_dir else None
        has_record = state is not None and PrivacyBudget(state / PrivacyBudget.FILE_NAME, "").started()
        policy = cls(require_dp=bool(node.require_dp) or node.epsilon_budget is not None or has_record,
                     epsilon_budget=node.epsilon_budget, delta_budget=node.delta_budget,
                     max_epsilon=node.max_epsilon, max_delta=node.max_delta,
                     declared_examples=node.declared_examples, state_dir=state, has_record=has_record)
        if policy.delta_budget is not None and policy.epsilon_budget is None:
            raise SiteError("bad_node_config", "node config sets 'delta-budget' without "
                                               "'epsilon-budget'")
        return policy

    @property
    def delta_ceiling(self) -> float:
        from tangent.training.privacy import DELTA_CAP

        return self.max_delta if self.max_delta is not None else DELTA_CAP

    def check_request(self, request: TrainRequest | Mapping[str, Any]) -> AcceptedDP | None:
        """The DP request of a train request if this site accepts it; None for an accepted non-DP
        request. Raises SiteError (dp_required, epsilon_too_large, delta_too_large, bad_request:
        a value the one parser refuses, tangent.protocol.config)."""
        if not isinstance(request, TrainRequest):
            request = parse_train_request(request)
        asked = request.dp_request
        if asked is None:
            if self.require_dp:
                why = ("an epsilon-budget" if self.epsilon_budget is not None else
                       "a privacy-budget record" if self.has_record else "require-dp")
                raise SiteError("dp_required", f"this site trains only with differential privacy "
                                               f"({why} in its node config); the request has dp=false")
            return None
        if self.max_epsilon is not None and asked.epsilon > self.max_epsilon:
            raise SiteError("epsilon_too_large", f"requested ε={asked.epsilon:g} per contribution exceeds "
                                                 f"this site's max-epsilon={self.max_epsilon:g}")
        if asked.delta > self.delta_ceiling:
            raise SiteError("delta_too_large", f"requested δ={asked.delta:g} exceeds this site's ceiling "
                                               f"max-delta={self.delta_ceiling:g}")
        return AcceptedDP(target_epsilon=asked.epsilon, requested_delta=asked.delta,
                          max_grad_norm=asked.max_grad_norm, delta_ceiling=self.delta_ceiling)

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
        return SitePolicy.from_node_config(node_config).require_dp or ("dp" in config and parse_bool("dp", config["dp"]))
    except (SiteError, ConfigError):
        return True
