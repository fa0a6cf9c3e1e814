"""End to end on a brought backbone: `python -m simulations.run --backbone NAME --backbone-weights
PATH` on small timm ViTs saved to disk, with both model families (TAFT and the exact head): every
exactness flag true. The driver refuses a weights file that does not match before anything starts."""
from __future__ import annotations

import numpy as np
import pytest

from simulations.driver import REPO
from tests.backbone_files import IMG_SIZE, VARIANTS, save
from tests.simulations.own_data import pattern_images, refused, simulate


def own_data(tmp_path):
    train_images, train_labels = pattern_images(96, 4, 20, seed=1, rgb=True)
    test_images, test_labels = pattern_images(40, 4, 20, seed=2, rgb=True)
    np.savez(tmp_path / "train.npz", images=train_images, labels=train_labels)
    np.savez(tmp_path / "test.npz", images=test_images, labels=test_labels)
    return ["--dataset", str(tmp_path / "train.npz"), "--test-dataset", str(tmp_path / "test.npz")]


@pytest.mark.slow
@pytest.mark.parametrize("variant,layout,untrained", [("registers", "timm", False), ("distilled", "safetensors", False),
                                                      ("avg-pool", "state-dict", False),
                                                      # timm's init: features barely vary (the guard's
                                                      # fitted head once left the ledger's range)
                                                      ("no-layerscale-no-qkv-bias", "safetensors", True)])
def test_simulation_on_a_brought_backbone(tmp_path, variant, layout, untrained):
    weights = save(tmp_path / "weights", variant, layout=layout, untrained=untrained)
    # no --img-size: the checkpoint's pretrained input size (simulate's own 28 is overridden by 0 here)
    summary = simulate(tmp_path, *own_data(tmp_path), "--backbone", VARIANTS[variant][0],
                       "--backbone-weights", str(weights), "--img-size", "0")
    spec = summary["_train_report"]["spec"]
    assert spec["backbone"] == VARIANTS[variant][0] and spec["img-size"] == IMG_SIZE
    assert spec["backbone-weights"] == str(weights.resolve()) and len(spec["backbone-sha256"]) == 64
    assert summary["recorded_sites"] == 3 and summary["rejected"] == {}
    assert summary["max_rel_logit_diff_composed_vs_ensemble"] <= 1e-5 and summary["removal_bit_identical"]
    assert summary["exact_head"] and summary["exact_head_equals_central"] is True
    assert summary["exact_head_removal_bit_identical"] is True
    assert summary["cache_built"] is True


def test_the_driver_refuses_weights_that_do_not_match(tmp_path, capsys):
    weights = save(tmp_path / "weights", "registers")
    err = refused(tmp_path, capsys, "--backbone", "vit_small_patch16_224", "--backbone-weights", str(weights))
    assert str(weights) in err and "architecture 'vit_small_patch14_reg4_dinov2'" in err
    err = refused(tmp_path, capsys, "--backbone-weights", str(tmp_path / "absent.safetensors"))
    assert "absent.safetensors" in err and "do not exist" in err
    err = refused(tmp_path, capsys, "--backbone", VARIANTS["registers"][0], "--backbone-weights", str(weights),
                  "--run-config", f"backbone-sha256=\"{'0' * 64}\"")
    assert "pins backbone-sha256" in err


def test_flags_resolve_to_run_config_keys_without_torch(tmp_path):
    """The driver resolves the backbone from the file alone (sha256, pretrained input size)."""
    import subprocess
    import sys

    weights = save(tmp_path / "weights", "registers")
    code = ("import sys\nfrom simulations.driver import cli, config as driver_config\n"
            f"args = cli.parse_args(['--backbone', 'vit_small_patch14_reg4_dinov2', '--backbone-weights', {str(weights)!r}])\n"
            "config = driver_config.resolve_backbone(args, driver_config.pyproject_config(), {})\n"
            "print(config['img-size'], len(config['backbone-sha256']), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(IMG_SIZE), "64", "False"]
