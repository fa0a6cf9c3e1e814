"""Flower ClientApp: one site. Thin wiring; the work is in :mod:`client.task` and ``tangent``.

Node config (deployment): ``site-id``, ``data-path`` (.npz or ImageFolder), optional
``test-data-path``, ``cache-dir``, and the site's privacy policy (:mod:`client.policy`:
``require-dp``, ``epsilon-budget``, ``delta-budget``, ``max-epsilon``, ``max-delta``,
``declared-examples``, ``state-dir``). In simulation Flower sets ``partition-id``/``num-partitions``
and the site is its partition of Fashion-MNIST.
"""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(task.train(msg.content, context.node_config, context.run_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(task.evaluate(msg.content, context.node_config, context.run_config), reply_to=msg)
