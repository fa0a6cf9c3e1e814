"""Who sent a reply, and may it count: a site id is bound to the authenticated SuperNode.

In a deployment the SuperLink authenticates every SuperNode by its registered key and stamps
each reply with that node's id (``msg.metadata.src_node_id``); the site id inside the reply is
only the site's claim. The site registry (deploy.register) is the source of truth: site id <->
public key <-> node id, with the site's example cap and whether its key was revoked. A reply
counts only if its sender node is registered, its declared site id is registered and is the one
registered for that node, the key is not revoked, and it claims no more examples than the registered cap.

In the local simulation there is no authentication and no registry: sites are partition ids and
``SenderBinding`` is not used.
"""
from __future__ import annotations

from server.replies import Rejected
from server.trust.registry import SiteRegistry


class SenderBinding:
    """The registry's view of senders: checks replies and says which nodes may be sampled."""

    def __init__(self, registry: SiteRegistry):
        self.registry = registry

    def site_of(self, node_id: int) -> str | None:
        """The site registered for this node (the only sender identity the server can trust)."""
        return self.registry.site_for_node(node_id)

    def check(self, node_id: int, declared_site: str) -> str:
        """The registered site id for ``node_id`` if its replies may count; raises :class:`Rejected`."""
        registered = self.site_of(node_id)
        if registered is None:
            raise Rejected("unknown_site", f"node {node_id} is not registered to any site "
                                           f"(it declared site {declared_site})", declared_site)
        if self.registry.entry(declared_site) is None:
            raise Rejected("unknown_site", f"site {declared_site} is not registered (node {node_id} is site "
                                           f"{registered})", declared_site)
        if declared_site != registered:
            raise Rejected("site_identity_mismatch", f"node {node_id} is registered as site {registered} "
                                                     f"but declared site {declared_site}", declared_site)
        if self.registry.is_revoked(registered):
            raise Rejected("site_revoked", f"the key of site {registered} was revoked", registered)
        return registered

    def check_cap(self, site: str, num_examples: int) -> None:
        """A site weighs at most what the operator registered for it (``max_examples``)."""
        cap = self.registry.max_examples(site)
        if cap is not None and num_examples > cap:
            raise Rejected("num_examples_over_cap", f"{num_examples} examples declared, registered cap {cap}",
                           site)

    def not_eligible(self, node_id: int, withdrawn: set[str]) -> str | None:
        """Why this node must not be sampled ("unknown_node", "site_revoked", "site_withdrawn"), None if
        it may be.

        A node the SuperLink authenticated but the registry does not know is not sampled: a train or
        evaluate message carries the spec and, for evaluation, the composed model, which go to
        registered sites only. It is listed in the round's ``not_sampled`` for the operator.
        """
        site = self.site_of(node_id)
        if site is None:
            return "unknown_node"
        if self.registry.is_revoked(site):
            return "site_revoked"
        if site in withdrawn:
            return "site_withdrawn"
        return None
