import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them; deterministic, small tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def pretrained_vit():
    """The real DINOv2 ViT-S/14 at the default resolution (converted once, cached)."""
    from tangent.model.pretrained import load_pretrained
    return load_pretrained()


@pytest.fixture
def flower_server_identity():
    """Flower 1.41 stamps instruction messages with the task identity of the ServerApp process:
    set one, as a ServerApp would, for tests that build messages in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
