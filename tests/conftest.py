import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them; deterministic, small tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def pretrained_vit():
    """The real DINOv2 ViT-S/14 at the default resolution (converted once, cached)."""
    from tangent.pretrained import load_pretrained
    return load_pretrained()
