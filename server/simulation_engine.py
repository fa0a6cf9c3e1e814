"""Flower 1.41's simulation engine, made to look for a site's work without re-validating every
waiting instruction once per site.

The engine's feeder thread (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``)
asks the in-memory LinkState every 0.1 s, once per virtual SuperNode, for that node's next
instruction. Each ask takes the state's lock and re-validates every stored instruction (its
expiry, both ends' federation), whatever its destination. With 1,000 SuperNodes and four
instructions waiting that is 4,000 validations every 0.1 s in the ServerApp's own process (one
GIL): measured 39 % of that process's samples (docs/scale.md).

:func:`look_up_by_destination` answers an ask for a node with no undelivered instruction
addressed to it by the empty list, which is Flower's answer too, without validating the other
nodes' instructions; otherwise Flower's own method answers (and validates, expires, marks
delivered as always). Instructions for other nodes are validated when their own node asks, and
replies when they are pulled, so nothing that Flower would refuse is delivered.

Only the simulation's in-memory state is changed, and only on the instance the ServerApp's own
grid holds (the SuperLink of a deployment is another process with an SQL state; it is never
touched). A Flower whose in-memory state lacks what this relies on is left as it is.
"""
from __future__ import annotations

import inspect
import logging

log = logging.getLogger(__name__)

#: the signature of the method this wraps, as Flower 1.41 has it
_EXPECTED_PARAMETERS = ("node_id", "limit", "run_id")


def look_up_by_destination(grid) -> bool:
    """Wrap the ``get_message_ins`` of the in-memory LinkState behind a simulation ``grid``.
    Returns whether it did (False for any other grid or an unknown Flower: nothing changed)."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return False
    state = getattr(grid, "state", None)
    if type(state) is not InMemoryLinkState or "get_message_ins" in vars(state):
        return False
    flower_get = state.get_message_ins
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None or \
            tuple(inspect.signature(flower_get).parameters) != _EXPECTED_PARAMETERS:
        log.info("Flower's in-memory LinkState is not the one this was written for: left as it is")
        return False

    def get_message_ins(node_id: int, limit: int | None, *, run_id: int | None = None):
        with lock:
            addressed = any(message.metadata.dst_node_id == node_id and message.metadata.delivered_at == ""
                            for message in store.values())
        if not addressed:
            if limit is not None and limit < 1:
                raise AssertionError("`limit` must be >= 1")
            return []
        return flower_get(node_id, limit, run_id=run_id)

    state.get_message_ins = get_message_ins
    return True
