"""The ``device`` setting: parsing, and the device path of the cache build,
training (non-DP and DP), evaluation, exact-head features and the ClientApp.

The CPU tests run everywhere: the parsing, refusals, and that naming the CPU changes nothing
(bit for bit) against the default path. The CUDA tests are skipped without a GPU (CI is
CPU-only); on a GPU machine run ``pytest tests/tangent/data/test_device.py``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tangent.data.token_cache import FeatureCache
from tangent.data.device import full_fp32, module_device, resolve_device
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.training.privacy import PrivacyConfig
from tangent.training.trainer import TrainConfig, fit, predict_logits
from tests.helpers import random_tokens, tiny_model, tiny_vit, uint8_images

IMG = 28
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def assert_delta_close(a: dict, b: dict, rel: float):
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).norm()) <= rel * float(b[k].norm()) + 1e-6, k


# ------------------------------------------------------------------ parsing (runs everywhere)
@pytest.mark.parametrize("value", ["cpu", " CPU ", "Cpu", torch.device("cpu")])
def test_cpu_spellings(value):
    assert resolve_device(value) == torch.device("cpu")


def test_auto_is_cuda_exactly_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("value", ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cpu:0", "mps",
                                   "cuda0", "auto:0", 0, None])
def test_bad_values_are_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="node config device"):
        resolve_device(value, setting="node config device")


@no_cuda
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_an_error_not_the_cpu(value):
    with pytest.raises(ValueError, match=r"run config device = .* CUDA is not available"):
        resolve_device(value, setting="run config device")


def test_full_fp32_turns_tf32_off_on_cuda_only_and_restores_it():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with full_fp32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with full_fp32(torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ CPU: naming the CPU changes nothing
@pytest.mark.slow
def test_device_cpu_gives_bit_identical_delta_to_the_default_path():
    """Non-DP from cached tokens, with the guard (whose pass now collects on the CPU)."""
    tokens, labels = random_tokens(48)
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2)
    default, named = tiny_model(), tiny_model()
    a = fit(default, tokens, labels, config, from_cache=True, progress=False)
    b = fit(named, tokens, labels, config, from_cache=True, progress=False, device="cpu")
    da, db = default.delta_state_dict(), named.delta_state_dict()
    assert a.guard is not None and a.history == b.history and a.guard == b.guard
    assert all(torch.equal(da[k], db[k]) for k in da)
    assert torch.equal(predict_logits(default, tokens, from_cache=True),
                       predict_logits(named, tokens, from_cache=True, device="cpu"))


@pytest.mark.slow
def test_dp_fit_with_device_cpu_runs_and_keeps_everything_on_the_cpu():
    """(DP cannot be compared bit for bit: its sampling and noise are secret by design.)"""
    tokens, labels = random_tokens(48)
    model = tiny_model()
    result = fit(model, tokens, labels, TrainConfig(epochs=2, batch_size=16),
                 privacy=PrivacyConfig(target_epsilon=4.0), from_cache=True, progress=False, device="cpu")
    assert 2.0 < result.epsilon <= 4.0
    assert module_device(model).type == "cpu"
    assert all(v.device.type == "cpu" for v in model.delta_state_dict().values())


@pytest.mark.slow
def test_device_cpu_from_images_is_bit_identical():
    from tangent.data.sets import preprocess

    images = preprocess(uint8_images(24), IMG)
    labels = torch.arange(24) % 10
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2)
    default, named = tiny_model(), tiny_model()
    fit(default, images, labels, config, from_cache=False, progress=False)
    fit(named, images, labels, config, from_cache=False, progress=False, device=torch.device("cpu"))
    da, db = default.delta_state_dict(), named.delta_state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_cache_build_on_the_cpu_is_unchanged_and_records_its_device(tmp_path):
    model, images = tiny_model(), uint8_images()
    default = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path / "a",
                                         batch_size=16, progress=False)
    named = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path / "b",
                                       batch_size=16, progress=False, device="cpu")
    assert default.key == named.key and np.array_equal(default.tokens, named.tokens)
    assert json.loads((named.directory / "manifest.json").read_text())["device"] == "cpu"


def test_features_on_the_cpu_are_unchanged():
    extractor = FeatureExtractor(tiny_vit(dtype=torch.float32), FeatureSpec(random_features=16, projection=8), img_size=IMG)
    tokens, _ = random_tokens(10)
    assert np.array_equal(extractor.compute(tokens, batch_size=4),
                          extractor.compute(tokens, batch_size=4, device="cpu"))


def test_compile_step_is_refused_under_dp():
    tokens, labels = random_tokens(16)
    with pytest.raises(ValueError, match="compile_step is for non-DP"):
        fit(tiny_model(), tokens, labels, TrainConfig(epochs=1, compile_step=True),
            privacy=PrivacyConfig(target_epsilon=4.0), from_cache=True, progress=False)


@pytest.mark.slow
def test_compiled_step_gives_the_same_training_on_the_cpu():
    """torch.compile (mode reduce-overhead: inductor's C++ code on a CPU) of the per-batch forward
    and loss: the same losses and Δ as eager, up to float reassociation. The last batch has
    another shape (48 = 2·20 + 8): a second graph, same result."""
    tokens, labels = random_tokens(48)
    config = TrainConfig(epochs=2, batch_size=20, lr=1e-2, guard_ridge=0.0)
    eager, compiled = tiny_model(), tiny_model()
    a = fit(eager, tokens, labels, config, from_cache=True, progress=False)
    b = fit(compiled, tokens, labels, TrainConfig(**{**config.__dict__, "compile_step": True}),
            from_cache=True, progress=False)
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4)
    assert [h["accuracy"] for h in b.history] == [h["accuracy"] for h in a.history]
    assert_delta_close(compiled.delta_state_dict(), eager.delta_state_dict(), rel=1e-3)


# ------------------------------------------------------------------ settings: site, server, simulation
def test_site_device_node_config_wins_and_bad_values_are_site_errors():
    from client.site import SiteError
    from client.task import site_device
    from tangent.protocol.config import ConfigError

    assert site_device({}, {}).type == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    assert site_device({"device": "cpu"}, {"device": "auto"}) == torch.device("cpu")
    assert site_device({}, {"device": "cpu"}) == torch.device("cpu")
    with pytest.raises(SiteError, match="node config device") as err:
        site_device({"device": "tpu"}, {"device": "cpu"})
    assert err.value.code == "bad_device"
    with pytest.raises(ConfigError, match="^device: "):  # refused by the run-config parser, as on the server
        site_device({}, {"device": "gpu"})


@no_cuda
def test_a_train_message_for_cuda_on_a_cpu_site_is_refused_before_any_work():
    """The real train handler with a real RecordDict: an error reply, not a silent CPU run."""
    from flwr.app import ConfigRecord, RecordDict

    from client.task import train

    content = RecordDict({"spec": ConfigRecord({"base-digest": "not-even-checked"}),
                          "config": ConfigRecord({"epochs": 1})})
    reply = train(content, {"site-id": "a", "device": "cuda"}, {})
    error = reply.config_records["error"]
    assert error["code"] == "bad_device" and "CUDA is not available" in error["reason"]
    assert error["site-id"] == "a"


@pytest.mark.slow
@no_cuda
def test_central_evaluation_without_the_named_gpu_loses_the_evaluation_not_the_run(tmp_path):
    from server.evaluation import CentralEvaluation

    # the child process resolves the device before it builds anything
    evaluation = CentralEvaluation.start({}, "digest", {"device": "cuda"}, workdir=tmp_path)
    assert evaluation.wait(120)
    assert evaluation({}) is None and "CUDA is not available" in evaluation.error


def test_simulation_gpus_per_client_reaches_flowers_simulation_config():
    """The federation the driver writes, parsed the way `flwr run --federation-config` does."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    from simulations.driver.cli import parse_args
    from simulations.driver.config import federation_config
    from simulations.driver.processes import toml_value

    def parsed(argv):
        federation = federation_config(parse_args(argv))
        text = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
        return federation, simulation_config_from_json(
            {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()})

    federation, config = parsed(["--num-clients", "4", "--gpus-per-client", "0.25", "--device", "cuda"])
    assert config.num_supernodes == 4 and config.client_resources_num_gpus == pytest.approx(0.25)
    federation, config = parsed(["--num-clients", "4"])
    assert "client-resources-num-gpus" not in federation  # today's federation, unchanged
    assert parse_args(["--device", "cuda:1", "--gpus-per-client", "1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parse_args(["--gpus-per-client", "-1"])
    with pytest.raises(SystemExit):  # Ray would hide every GPU from the sites
        parse_args(["--device", "cuda"])


def test_run_config_default_is_auto():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"]["device"] == "auto"


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@cuda
def test_cache_build_on_cuda_equals_the_cpu_tokens(tmp_path):
    model, images = tiny_model(), uint8_images()
    cpu = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path / "cpu",
                                     batch_size=16, progress=False)
    gpu = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path / "gpu",
                                     batch_size=16, progress=False, device="cuda")
    assert module_device(model.trunk).type == "cpu"  # the trunk went back
    assert json.loads((gpu.directory / "manifest.json").read_text())["device"] == "cuda"
    np.testing.assert_allclose(np.asarray(gpu.tokens), np.asarray(cpu.tokens), rtol=1e-4, atol=1e-4)


@cuda
def test_non_dp_fit_on_cuda_returns_cpu_delta_close_to_the_cpu_fit():
    tokens, labels = random_tokens(48)
    # SGD: the update is linear in the gradient, so the devices differ by rounding only (Adam's
    # normalisation would turn a gradient that is 0 on one and 1e-9 on the other into lr-sized steps)
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, optimizer="sgd")
    on_cpu, on_gpu = tiny_model(), tiny_model()
    a = fit(on_cpu, tokens, labels, config, from_cache=True, progress=False)
    b = fit(on_gpu, tokens, labels, config, from_cache=True, progress=False, device="cuda")
    assert module_device(on_gpu).type == "cuda"
    delta = on_gpu.delta_state_dict()
    assert all(v.device.type == "cpu" for v in delta.values())
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-3)
    assert_delta_close(delta, on_cpu.delta_state_dict(), rel=1e-2)
    logits = predict_logits(on_gpu, tokens, from_cache=True)
    assert logits.device.type == "cpu"
    torch.testing.assert_close(logits, predict_logits(on_cpu, tokens, from_cache=True), rtol=1e-2, atol=1e-3)


@cuda
def test_compiled_step_with_cuda_graphs_trains_like_eager():
    tokens, labels = random_tokens(48)
    config = TrainConfig(epochs=2, batch_size=20, lr=1e-2, optimizer="sgd", guard_ridge=0.0)
    eager, compiled = tiny_model(), tiny_model()
    a = fit(eager, tokens, labels, config, from_cache=True, progress=False, device="cuda")
    b = fit(compiled, tokens, labels, TrainConfig(**{**config.__dict__, "compile_step": True}),
            from_cache=True, progress=False, device="cuda")
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-3)
    assert_delta_close(compiled.delta_state_dict(), eager.delta_state_dict(), rel=1e-2)


@cuda
def test_dp_fit_on_cuda_draws_secret_noise_there_and_returns_cpu_delta():
    from torch.utils.data import DataLoader

    from tangent.training.privacy import make_private
    from tangent.training.trainer import ArrayDataset, trainable_parameters

    tokens, labels = random_tokens(64)
    config = TrainConfig(epochs=2, batch_size=16)
    models = [tiny_model(), tiny_model()]
    results = [fit(m, tokens, labels, config, privacy=PrivacyConfig(target_epsilon=4.0), from_cache=True,
                   progress=False, device="cuda") for m in models]
    for result in results:
        assert 2.0 < result.epsilon <= 4.0
    deltas = [m.delta_state_dict() for m in models]
    assert all(v.device.type == "cpu" for d in deltas for v in d.values())
    # same data, same config, same server seed: fresh OS entropy makes the two updates differ
    assert any(not torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])

    # the noise generator lives on the GPU and is seeded from OS entropy every time
    seeds = []
    for _ in range(2):
        model = tiny_model().to("cuda")
        optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
        loader = DataLoader(ArrayDataset(tokens, labels), batch_size=16)
        private = make_private(model.linearized, optimizer, loader, PrivacyConfig(target_epsilon=4.0), epochs=1)
        generator = private.optimizer.generator
        assert generator.device.type == "cuda"
        seeds.append(generator.initial_seed())
        private.close()
    assert seeds[0] != seeds[1] and 0 not in seeds


@cuda
def test_feature_extractor_on_cuda_equals_cpu_and_stays_on_the_cpu():
    extractor = FeatureExtractor(tiny_vit(dtype=torch.float32), FeatureSpec(random_features=16, projection=8), img_size=IMG)
    digest = extractor.digest()
    tokens, _ = random_tokens(10)
    gpu = extractor.compute(tokens, batch_size=4, device="cuda")
    assert isinstance(gpu, np.ndarray)
    np.testing.assert_allclose(gpu, extractor.compute(tokens, batch_size=4), rtol=1e-4, atol=1e-5)
    assert module_device(extractor.backbone).type == "cpu" and extractor.omega.device.type == "cpu"
    assert extractor.digest() == digest


@cuda
@pytest.mark.slow
@pytest.mark.usefixtures("flower_server_identity")
def test_client_app_trains_on_cuda_from_the_node_config(tmp_path):
    """The real ClientApp, a real train Message, the real pretrained ViT-S/14 (as in
    tests/client/test_client_app.py), node config device=cuda: a normal reply with a CPU Δ."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.client_app import app
    from tangent.protocol.spec import ModelSpec, build_model

    spec = ModelSpec(img_size=56, reinit=False)
    _, digest = build_model(spec)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             labels=np.arange(64) % 10)
    node_config = {"site-id": "gpu-site", "data-path": str(tmp_path / "train.npz"),
                   "cache-dir": str(tmp_path / "cache"), "device": "cuda"}
    content = RecordDict({"spec": ConfigRecord(spec.to_config() | {"base-digest": digest}),
                          "config": ConfigRecord({"epochs": 1, "batch-size": 32, "lr": 1e-3, "seed": 0})})
    context = Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(Message(content, dst_node_id=42, message_type="train"), context)
    assert not reply.has_error(), reply.error
    assert "error" not in reply.content.config_records, reply.content.config_records.get("error")
    delta = reply.content["delta"]
    assert "head.weight" in delta and np.isfinite(delta["head.weight"].numpy()).all()
    assert reply.content["metrics"]["num-examples"] == 64
    manifest = next((tmp_path / "cache").glob("*/manifest.json"))
    assert json.loads(manifest.read_text())["device"] == "cuda"  # the site built its cache there


@no_cuda
@pytest.mark.parametrize("argv", [["--cuda-graphs"], ["--device", "cuda"], ["--device", "gpu"]])
def test_speed_benchmark_refuses_gpu_options_it_cannot_honour(argv, capsys):
    from benchmarks.speed import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--device" in capsys.readouterr().err
