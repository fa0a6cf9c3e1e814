"""An in-process Flower Grid for ServerApp tests: every pushed message is answered at once by the
subclass's ``_answer(msg) -> Message`` (real Flower Messages, no SuperLink)."""
from __future__ import annotations

import time
from uuid import uuid4

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class LocalGrid(Grid):
    #: the node ids the grid reports
    sites: tuple[int, ...] = ()

    def __init__(self):
        self.pushed: list[tuple[str, float]] = []  # (message type, time) of every message pushed
        self._replies: dict[str, Message] = {}

    def _answer(self, msg: Message) -> Message:  # pragma: no cover - subclasses answer
        raise NotImplementedError

    def set_run(self, run: Run) -> None:  # pragma: no cover - the ServerApp main never calls it
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(run_id=1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed.append((msg.metadata.message_type, time.time()))
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # what Flower's grids do on push
            self._replies[msg.metadata.message_id] = self._answer(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
