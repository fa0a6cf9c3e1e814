"""`python -m simulations.experiments`: exact ridge statistics, the CLS-only NLFT path, and a
`--quick` run of all five experiments whose CSVs, plots and generated sections are checked."""
from __future__ import annotations

import re
from math import comb

import numpy as np
import pytest
import torch

from simulations.experiments import common as C
from simulations.experiments import report as R
from simulations.experiments.__main__ import main
from simulations.experiments.suite import NAMES, plan


def test_ridge_statistics_compose_and_remove_exactly():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(600, 16, generator=gen) * 3 + 1
    labels = torch.randint(0, 10, (600,), generator=gen)
    parts = np.array_split(np.random.default_rng(0).permutation(600), 7)
    shards = [C.ridge_stats(phi[p], labels[p]) for p in parts]
    central = C.ridge_stats(phi, labels)
    total = C.sum_stats(shards)
    assert total.n == central.n == 600
    assert total.rel_diff(central) <= 1e-13
    w_total, w_central = C.ridge_solve(total, 2.0), C.ridge_solve(central, 2.0)
    assert float((w_total - w_central).abs().max()) <= 1e-9
    # removal by subtraction == the statistics of the remaining shards, and so is the solution
    removed = total - shards[2] - shards[5]
    keep = np.concatenate([p for i, p in enumerate(parts) if i not in (2, 5)])
    fresh = C.ridge_stats(phi[keep], labels[keep])
    assert removed.n == len(keep) and removed.rel_diff(fresh) <= 1e-12
    assert float((C.ridge_solve(removed, 2.0) - C.ridge_solve(fresh, 2.0)).abs().max()) <= 1e-8
    # and the check can fail: leaving a shard in is visible
    assert (total - shards[2]).rel_diff(fresh) > 1e-3
    # the bias is not penalised: a huge λ leaves the class frequencies
    w = C.ridge_solve(central, 1e12)
    freq = torch.bincount(labels, minlength=10).double() / 600
    assert torch.allclose(w[-1], freq, atol=1e-6)


def test_expected_hit_fraction_matches_combinatorics():
    sizes, total = [3, 5, 12], 20
    for m in (1, 4, 9):
        exact = np.mean([1 - comb(total - n, m) / comb(total, m) for n in sizes])
        assert C.expected_hit_fraction(sizes, m, total) == pytest.approx(exact, rel=1e-9)
    assert C.expected_hit_fraction([10, 10], 15, 20) == 1.0


def test_cls_only_nlft_equals_stock_forward_and_gradients():
    import timm
    from tangent.model.nlft import NLFTTail, NLFTViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28,
                            num_classes=0, depth=2, embed_dim=48, num_heads=3).eval()
    model = NLFTViT.from_timm(vit, 10, linearized_blocks=1, reinit=True, seed=0)
    tokens = model.trunk(torch.randn(4, 3, 28, 28))
    grads = {}
    for cls in (NLFTTail, C.ClsOnlyNLFTTail):
        model.linearized.__class__ = cls
        model.linearized.zero_grad()
        out = model.linearized(tokens)
        out.square().sum().backward()
        grads[cls] = (out.detach(), {n: p.grad.clone() for n, p in model.linearized.named_parameters()
                                     if p.grad is not None})
    model.linearized.__class__ = NLFTTail
    C.cls_only_nlft(model)  # checks itself against the stock forward
    assert type(model.linearized) is C.ClsOnlyNLFTTail
    (a, ga), (b, gb) = grads[NLFTTail], grads[C.ClsOnlyNLFTTail]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6), name


def _tiny_taft():
    import timm
    from tangent.model.vit import TangentViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28,
                            num_classes=0, depth=2, embed_dim=48, num_heads=3).eval()
    return TangentViT.from_timm(vit, 10, linearized_blocks=1, reinit=True, seed=0)


def _random_delta(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.delta_state_dict().items()}


def test_taft_head_reading_frozen_rows_is_unchanged_at_w0_and_linear_in_delta():
    from tangent import compose

    model = _tiny_taft()
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    tokens = model.trunk(images)
    with torch.no_grad():
        plain = model.linearized(tokens)
    digest = model.base_digest()
    model.read_frozen_rows(3)
    assert model.base_digest() != digest  # the option is part of w0's identity
    frozen = torch.randn(5, 3, 48, generator=torch.Generator().manual_seed(2)) * 3
    inputs = torch.cat([tokens, frozen], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.linearized(inputs), plain, atol=1e-6)  # zero columns at w0
        # the frozen rows reach the logits through the head's Δ (and only linearly)
        d1, d2 = _random_delta(model, 3), _random_delta(model, 4)
        assert d1["head.weight"].shape == (10, 48 * 4)
        outs = []
        for d in (d1, d2, compose([d1, d2], [1.0, 3.0])):
            model.load_delta(d)
            outs.append(model.linearized(inputs).double())
        # composing Δs (weights 1:3) == the same average of the two models' logits: exact TAFT
        assert torch.allclose(outs[2], (outs[0] + 3 * outs[1]) / 4, atol=1e-5)
        moved = inputs.clone()
        moved[:, -3:] += 1.0
        assert not torch.allclose(model.linearized(moved), outs[2].float(), atol=1e-3)
    with pytest.raises(RuntimeError, match="frozen rows"):
        model(images)
    with pytest.raises(RuntimeError, match="already"):
        model.read_frozen_rows(1)


def test_exact_head_helpers_sum_subtract_and_fuse(tmp_path):
    from tangent.exact_head.features import FeatureSpec

    spec = FeatureSpec(clip_norm=2.0, frac_bits=16)
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((300, 12)).astype(np.float32) / 4
    labels = rng.integers(0, 10, 300)
    central = C.exact_stats(phi, labels, spec)
    parts = np.array_split(rng.permutation(300), 7)
    total = None
    for i in rng.permutation(7):
        shard = C.exact_stats(phi[parts[i]], labels[parts[i]], spec)
        total = shard if total is None else total + shard
    assert total == central
    keep = np.setdiff1d(np.arange(300), parts[3])
    assert central - C.exact_stats(phi[parts[3]], labels[parts[3]], spec) == C.exact_stats(phi[keep], labels[keep], spec)
    assert not central - C.exact_stats(phi[parts[3][1:]], labels[parts[3][1:]], spec) == C.exact_stats(
        phi[keep], labels[keep], spec)
    head = C.exact_solve(central)
    assert 0.0 <= C.exact_accuracy(head, phi, labels) <= 1.0 and head.lam > 0
    assert C.exact_spec() == FeatureSpec()  # the run's default spec


def test_sections_replace_only_their_own_block():
    text = R.HEADER + "\nhand-written notes\n"
    text = R.replace_section(text, "privacy", "P1")
    text = R.replace_section(text, "composition", "C1")
    assert text.index("C1") < text.index("P1")  # canonical order
    again = R.replace_section(text, "composition", "C2")
    assert "C1" not in again and "C2" in again and "P1" in again and "hand-written notes" in again
    assert again.count(R.begin("composition")) == 1


def test_lanes():
    assert plan(NAMES, 2) == [("composition", "retraining"), ("dp_scale", "privacy", "removal")]
    assert plan(["removal"], 2) == [("removal",)]
    assert plan(NAMES, 1) == [tuple(NAMES)]


@pytest.mark.slow
def test_quick_suite_writes_csvs_plots_and_generated_sections(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results.md"
    results.write_text("# Results\n\nkept by the generator\n")
    assert main(["--quick", "--out", str(out), "--results", str(results), "--jobs", "1",
                 "--no-progress"]) == 0
    text = results.read_text()
    assert "kept by the generator" in text
    for name in (*NAMES, "suite"):
        assert text.count(R.begin(name)) == 1 and text.count(R.end(name)) == 1
    for name in NAMES:
        assert (out / name / "results.csv").is_file() and (out / name / "meta.json").is_file()
        assert (out / name / f"{name}.png").stat().st_size > 1000

    def section(name):
        return text[text.index(R.begin(name)):text.index(R.end(name))]

    # composition: every accuracy in the section comes from the CSV; the checks hold
    rows = R.read_csv(out / "composition" / "results.csv")
    comp = section("composition")
    for r in rows:
        if r["method"] in ("taft_composed", "taft_ensemble", "ridge"):
            assert R.acc(r["accuracy"]) in comp
    assert all(r["rel_logit_diff_vs_composed"] <= 1e-5 for r in rows if r["method"] == "taft_ensemble")
    ridge = [r for r in rows if r["method"] == "ridge"]
    assert len(ridge) == 1 + 4 and len({r["accuracy"] for r in ridge}) == 1  # exact: same everywhere
    assert all(r["stats_rel_diff_vs_central"] <= 1e-12 for r in ridge if r["scheme"] != "all")
    assert "python -m simulations.experiments --quick" in comp
    # exact head: bit for bit the central statistics at every partition, hence the same accuracy
    exact = [r for r in rows if r["method"] == "exact_head"]
    assert len(exact) == 1 + 4 and len({r["accuracy"] for r in exact}) == 1
    assert all(r["stats_equal_central"] is True for r in exact)
    for method in ("taft_rich_composed", "hybrid"):
        assert len([r for r in rows if r["method"] == method]) == 4 + (method == "hybrid")
    assert any(r["method"] == "taft_rich" and r["scheme"] == "all" for r in rows)
    for r in rows:
        if r["method"] in ("exact_head", "taft_rich_composed", "hybrid"):
            assert R.acc(r["accuracy"]) in comp
    assert "bit for\n  bit: True" in comp or "bit for bit: True" in comp.replace("\n  ", " ")

    # removal: reused composition's shards; subtraction == fresh composition; averages from CSV
    meta = R.read_json(out / "removal" / "meta.json")
    assert meta["checks"]["shards_from_store"] is True
    assert meta["checks"]["max_abs_diff_subtraction_vs_fresh_compose"] <= 1e-6
    assert meta["checks"]["max_rel_diff_ridge_subtraction_vs_fresh_stats"] <= 1e-12
    assert meta["checks"]["exact_bit_identical"] is True and meta["checks"]["exact_removals_checked"] == 6
    rows = R.read_csv(out / "removal" / "results.csv")
    taft_avg = np.mean([np.mean([r["accuracy"] for r in rows if r["method"] == "taft_subtraction"
                                 and r["removed_shards"] == k]) for k in (0, 1, 2)])
    assert f"**{R.acc(taft_avg)}**" in section("removal")
    k0 = {r["accuracy"] for r in rows if r["method"] == "taft_subtraction" and r["removed_shards"] == 0}
    composed_n4 = next(r["accuracy"] for r in R.read_csv(out / "composition" / "results.csv")
                       if r["method"] == "taft_composed" and r["shards"] == 4 and r["scheme"] == "iid")
    assert k0 == {composed_n4}  # k = 0 is experiment 1's composed model

    # retraining: both methods per x, a positive speed-up, forgotten counts
    rows = R.read_csv(out / "retraining" / "results.csv")
    assert {r["forget_percent"] for r in rows} == {0, 2, 20}
    assert all(r["speedup"] > 0 for r in rows if r["forget_percent"] and r["shards"])
    assert all(r["images_retrained"] <= 240 - r["forgotten"] for r in rows if r["forget_percent"])
    exact = [r for r in rows if r["method"].startswith("exact head") and r["forget_percent"]]
    assert len(exact) == 2 and all(r["bit_identical"] is True and r["wall_s"] > 0 for r in exact)

    # privacy: three methods x (no DP, ε) x (central, federated), ε measured
    rows = R.read_csv(out / "privacy" / "results.csv")
    assert len(rows) == 4 * 2 * 2
    assert all(r["epsilon_spent"] > 0 for r in rows if r["target_epsilon"])
    exact = [r for r in rows if r["method"] == "exact_head"]
    assert {(r["setting"], r["target_epsilon"]) for r in exact} == {(st, e) for st in ("central", "federated")
                                                                    for e in (None, 8.0)}
    assert all(r["repeats"] == 5 and r["delta"] > 0 for r in exact if r["target_epsilon"])
    for r in rows:
        assert R.acc(r["accuracy"]) in section("privacy")
    assert "DP exact head (the DP run's release" in section("privacy")

    # dp_scale: the head federated / central / secure-aggregation noise and DP-TAFT, removal exact
    rows = R.read_csv(out / "dp_scale" / "results.csv")
    assert {(r["method"], r["setting"]) for r in rows if r["target_epsilon"] == 8.0} == {
        ("exact_head", "federated"), ("exact_head", "central"), ("exact_head", "secure-aggregation noise"),
        ("taft", "federated"), ("taft", "central")}
    assert all(r["models"] == 3 and r["images_per_model"] == 40 for r in rows if r["setting"] != "central")
    taft = next(r for r in rows if r["method"] == "taft")
    assert 0 < taft["epsilon_spent"] and taft["delta"] == 1e-5
    assert R.read_json(out / "dp_scale" / "meta.json")["checks"]["removal_exact"] is True
    for r in rows:
        assert R.acc(r["accuracy"]) in section("dp_scale")

    # regenerating from the CSVs reproduces the file; a changed CSV changes only its section
    assert main(["--report-only", "--quick", "--out", str(out), "--results", str(results)]) == 0
    assert results.read_text() == text
    path = out / "retraining" / "results.csv"
    rows = R.read_csv(path)
    rows[1]["accuracy"] = 0.123456
    R.write_csv(path, rows)
    assert main(["--report-only", "--only", "retraining", "--quick", "--out", str(out),
                 "--results", str(results)]) == 0
    new = results.read_text()
    assert "0.1235" in new
    strip = re.compile(re.escape(R.begin("retraining")) + ".*?" + re.escape(R.end("retraining")), re.S)
    assert strip.sub("", new) == strip.sub("", text)


# ---------------------------------------------------------------- each experiment's own pieces (fast)
def test_composition_covers_every_iid_and_dirichlet_setting():
    from simulations.experiments import composition

    settings = C.Settings()
    parts = composition.partitions(settings)
    assert [n for scheme, n, _ in parts if scheme == "iid"] == list(settings.shards)
    assert {a for scheme, _, a in parts if scheme == "dirichlet"} == set(settings.dirichlet_alphas)
    assert composition.label("iid", 10, None) == "IID, N=10"
    assert composition.label("dirichlet", 10, 0.5) == "Dirichlet α=0.5, N=10"


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # the RDP grid, not the test
def test_privacy_noise_shrinks_as_epsilon_grows():
    from simulations.experiments.privacy import noise_multiplier

    sigmas = [noise_multiplier(eps, 1000, 100, 2, "rdp") for eps in (1.0, 3.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_removal_summary_averages_over_orders():
    from simulations.experiments.removal import METHODS, summary

    rows = [{"method": m, "removed_shards": k, "accuracy": acc}
            for m in METHODS for k, acc in ((1, 0.5), (1, 0.7), (2, 0.4))]
    result = summary(rows)
    for m in METHODS:
        assert result[m][1] == pytest.approx((0.6, 0.1, 2)) and result[m][2] == (0.4, 0.0, 1)


def test_retraining_plots_accuracy_and_cost_per_method(tmp_path):
    from simulations.experiments.retraining import plot

    rows = [{"forget_percent": pct, "method": method, "accuracy": 0.8, "speedup": speed, "work_ratio": None}
            for method, speed in (("paragon: retrain all", 1.0), ("TAFT shards", 5.0)) for pct in (0.1, 1.0)]
    plot(rows, tmp_path / "retraining.png")
    assert (tmp_path / "retraining.png").read_bytes().startswith(b"\x89PNG")
