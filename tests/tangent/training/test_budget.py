"""The site's durable (ε, δ) budget record (tangent.training.budget) on real files, real processes and
threads: atomic reserve/settle, no overspend under concurrency, a missing or corrupt record
refuses, owner-only permissions."""

import json
import multiprocessing
import os
import stat
import threading

import pytest

from tangent.training.budget import BudgetExhausted, BudgetMissing, PrivacyBudget
from tangent.training.privacy import PrivacyConfig
from tangent.training.trainer import TrainConfig, delta_norm, fit
from tests.helpers import random_tokens, tiny_model


def record_path(tmp_path):
    return tmp_path / "state" / PrivacyBudget.FILE_NAME


def test_create_is_owner_only_and_refuses_to_reset(tmp_path):
    path = record_path(tmp_path)
    budget = PrivacyBudget.create(path, "site-a", 3.0, delta_budget=1e-4)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    budget.reserve("c1", 1.0, 1e-5)
    budget.settle("c1", 0.9, 1e-5)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # rewrites keep 0600
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(budget.seal_path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        PrivacyBudget.create(path, "site-a", 100.0)
    assert PrivacyBudget(path, "site-a").spent == (0.9, 1e-5)  # nothing was reset
    path.unlink()  # the seal alone still says a record existed
    with pytest.raises(FileExistsError):
        PrivacyBudget.create(path, "site-a", 100.0)


def test_a_crash_between_the_record_and_its_seal_keeps_the_newer_record(tmp_path):
    path = record_path(tmp_path)
    budget = PrivacyBudget.create(path, "site-a", 3.0)
    budget.reserve("c1", 1.0, 1e-5)
    old_seal = budget.seal_path.read_bytes()
    budget.reserve("c2", 1.0, 1e-5)
    budget.seal_path.write_bytes(old_seal)  # the record was written, the seal not yet
    assert PrivacyBudget(path, "site-a").spent[0] == 2.0
    budget.reserve("c3", 0.5, 0.0)  # and the next write seals it again
    assert json.loads(budget.seal_path.read_text())["entries"] == 3


def test_reserve_refuses_past_the_budget_and_survives_restart(tmp_path):
    path = record_path(tmp_path)
    PrivacyBudget.create(path, "site-a", 3.0)
    budget = PrivacyBudget(path, "site-a")
    budget.reserve("c1", 2.0, 1e-5)
    with pytest.raises(BudgetExhausted, match="site-a.*spent ε=2 of 3"):
        budget.reserve("c2", 1.5, 1e-5)
    restarted = PrivacyBudget(path, "site-a")  # new object, same file; c1 never settled
    assert restarted.spent[0] == 2.0 and restarted.remaining_epsilon == 1.0
    restarted.reserve("c2", 1.0, 1e-5)
    with pytest.raises(BudgetExhausted):
        restarted.check(0.01, 0.0)
    charges = restarted.charges()
    assert [(c["id"], c["state"]) for c in charges.values()] == [("c1", "reserved"), ("c2", "reserved")]


def test_delta_is_budgeted_and_a_node_config_cap_only_lowers(tmp_path):
    path = record_path(tmp_path)
    PrivacyBudget.create(path, "site-a", 10.0, delta_budget=2e-5)
    budget = PrivacyBudget(path, "site-a")
    budget.reserve("c1", 1.0, 1e-5)
    budget.reserve("c2", 1.0, 1e-5)
    with pytest.raises(BudgetExhausted, match="δ budget"):
        budget.reserve("c3", 1.0, 1e-6)
    capped = PrivacyBudget(path, "site-a", epsilon_cap=2.5)
    with pytest.raises(BudgetExhausted):
        capped.check(1.0, 0.0)
    raised = PrivacyBudget(path, "site-a", epsilon_cap=1000.0, delta_cap=1.0)  # cannot raise
    with pytest.raises(BudgetExhausted):
        raised.check(0.0, 1e-6)


@pytest.mark.parametrize("damage", ["delete", "garbage", "other-site", "empty-list-removed", "erased",
                                    "edited", "rolled-back", "seal-deleted", "both-replaced"])
def test_missing_or_damaged_record_refuses_instead_of_resetting(tmp_path, damage):
    path = record_path(tmp_path)
    budget = PrivacyBudget.create(path, "site-a", 3.0)
    before = path.read_bytes()
    budget.reserve("c1", 2.9, 1e-5)
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_text("{not json")
    elif damage == "other-site":
        PrivacyBudget.create(tmp_path / "b" / "r.json", "site-b", 3.0)
        os.replace(tmp_path / "b" / "r.json", path)
    elif damage == "empty-list-removed":
        record = json.loads(path.read_text())
        del record["entries"]
        path.write_text(json.dumps(record))
    elif damage in ("erased", "edited"):  # a valid record with less spent
        record = json.loads(path.read_text())
        if damage == "erased":
            record["entries"] = []
        else:
            record["entries"][0]["epsilon"] = 0.0
        path.write_text(json.dumps(record))
    elif damage == "rolled-back":
        path.write_bytes(before)
    elif damage == "seal-deleted":
        budget.seal_path.unlink()
    else:  # a fresh record of the same site in place of the spent one
        PrivacyBudget.create(tmp_path / "b" / PrivacyBudget.FILE_NAME, "site-a", 3.0)
        os.replace(tmp_path / "b" / PrivacyBudget.FILE_NAME, path)
    budget = PrivacyBudget(path, "site-a")
    with pytest.raises(BudgetMissing, match="refusing to train"):
        budget.check(0.1, 0.0)
    with pytest.raises(BudgetMissing):
        budget.reserve("c2", 0.1, 0.0)


def _reserve_one(path, name, barrier, results):
    barrier.wait()
    try:
        PrivacyBudget(path, "site-a").reserve(name, 1.0, 1e-6)
        results.put((name, "ok"))
    except BudgetExhausted:
        results.put((name, "refused"))


def test_concurrent_processes_never_overspend(tmp_path):
    """Eight processes reserve ε=1 of a budget of 3 at the same instant: exactly three win."""
    path = record_path(tmp_path)
    PrivacyBudget.create(path, "site-a", 3.0)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    workers = [ctx.Process(target=_reserve_one, args=(path, f"c{i}", barrier, results))
               for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    outcomes = [results.get(timeout=5)[1] for _ in workers]
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 5
    assert PrivacyBudget(path, "site-a").spent[0] == 3.0


def test_concurrent_fits_never_overspend_and_charge_what_was_spent(tmp_path):
    """Three DP fits (threads, one record) planning ε≈1.2 each against a budget of 3: at most two
    train; the charge is the ε each actually spent, planned before its first step."""
    path = record_path(tmp_path)
    PrivacyBudget.create(path, "site-a", 3.0)
    tokens, labels = random_tokens(32)
    # σ = 3, q = 1/2, 2 steps, δ = 1e-5: ε ≈ 1.20 each (RDP), so two fit in 3 and three do not
    privacy = PrivacyConfig(target_epsilon=2.0, noise_multiplier=3.0, accountant="rdp")
    planned, outcomes = {}, {}

    class Watched(PrivacyBudget):  # the real record, remembering what fit reserved
        def reserve(self, contribution_id, epsilon, delta, **meta):
            planned[contribution_id] = epsilon
            super().reserve(contribution_id, epsilon, delta, **meta)

    barrier = threading.Barrier(3)

    def one(name):
        model = tiny_model()
        barrier.wait()
        try:
            result = fit(model, tokens, labels, TrainConfig(epochs=1, batch_size=16),
                         privacy=privacy, from_cache=True, budget=Watched(path, "site-a"),
                         contribution_id=name, progress=False)
            outcomes[name] = result.epsilon
        except BudgetExhausted:
            outcomes[name] = None
            assert delta_norm(model) == 0  # refused before any step

    threads = [threading.Thread(target=one, args=(f"c{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = [eps for eps in outcomes.values() if eps is not None]
    assert len(spent) == 2 and 1.0 < spent[0] < 1.5, outcomes
    record = list(PrivacyBudget(path, "site-a").charges().values())
    assert all(c["state"] == "settled" for c in record) and len(record) == 2
    for entry in record:
        assert entry["epsilon"] == pytest.approx(outcomes[entry["id"]], rel=1e-12)
        assert planned[entry["id"]] == pytest.approx(entry["epsilon"], rel=1e-9)
    assert PrivacyBudget(path, "site-a").spent[0] <= 3.0
