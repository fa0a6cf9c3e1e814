"""Quarantine (run config ``quarantine = true``): replies recorded with every usual check but held out of
the composed models until ``taft-ledger admit``; removal reaches the held contributions too.

Real LedgerFedAvg, real Flower train replies with exact-head statistics through protobuf, real ledgers,
the real CLI in process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server import cli
from server.ledger import Ledger
from server.ledger.ledgers import HELD_LINK, Ledgers, link, open_pair
from server.quarantine import FOLDER
from server.strategy import LedgerFedAvg
from tests.server.exact_head_replies import BASE, EXPECT, SHAPES, SPEC, delta, open_linked_pair, site_stats, train_reply

pytestmark = pytest.mark.usefixtures("flower_server_identity")


def state(tmp_path: Path) -> Ledgers:
    """A state directory as the ServerApp leaves it with quarantine on: the pair, the held pair, the links."""
    main, held = open_linked_pair(tmp_path), open_linked_pair(tmp_path / FOLDER)
    link(main.delta, held.delta, HELD_LINK)
    return Ledgers(main.delta, main.stats, held)


def close(ledgers: Ledgers) -> None:
    for ledger in ledgers.all():
        ledger.close()


def active(path: Path) -> list[str]:
    with Ledger.open(path, create=False) as ledger:
        return sorted(c.site_id for c in ledger.contributions(status="active"))


def test_held_replies_enter_the_models_only_when_admitted_and_leave_with_their_site(tmp_path, capsys):
    ledgers = state(tmp_path)
    strategy = LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats, exact_head=EXPECT,
                            quarantine=ledgers.held, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    honest, flipper = site_stats(1, 40), site_stats(2, 60)
    flipped = type(flipper)(flipper.num_features, flipper.num_classes, flipper.clip_norm, flipper.frac_bits,
                            flipper.n, np.roll(flipper.counts, 1), flipper.sums, flipper.gram,
                            np.roll(flipper.cross, 1, axis=1))  # every label moved to the next class
    too_big = {k: np.full(v, 50.0, np.float32) for k, v in SHAPES.items()}  # norm > 100: refused as usual
    strategy.aggregate_train(1, [train_reply(901, "1", delta(1), honest), train_reply(902, "2", delta(2), flipped),
                                 train_reply(903, "3", too_big, site_stats(3, 30))])
    assert strategy.rounds[1].rejected_by_reason == {"norm_too_large": 1}  # the checks of a normal run
    assert strategy.rounds[1].recorded == ["1", "2"]
    # recorded, held: nothing is composed yet
    assert ledgers.delta.contributions() == [] and ledgers.stats.contributions() == []
    assert sorted(c.site_id for c in ledgers.held.delta.contributions(status="active")) == ["1", "2"]
    close(ledgers)

    argv = ["--ledger", str(tmp_path / "ledger.sqlite")]
    assert cli.main([*argv, "held"]) == 0
    assert "1 " in capsys.readouterr().out
    assert cli.main([*argv, "admit", "1", "--reason", "reviewed: data audit passed"]) == 0
    assert active(tmp_path / "ledger.sqlite") == active(tmp_path / "exact_head.sqlite") == ["1"]
    assert active(tmp_path / FOLDER / "ledger.sqlite") == active(tmp_path / FOLDER / "exact_head.sqlite") == ["2"]
    with open_pair(tmp_path / "ledger.sqlite") as opened:
        assert opened.stats.composed_stats() == honest  # the admitted statistics, bit for bit
        for ledger in opened.all():
            ledger.verify()
    # the flipper is never admitted; its withdrawal erases it from the quarantine too
    assert cli.main([*argv, "remove", "2", "--reason", "consent withdrawn"]) == 0
    assert active(tmp_path / FOLDER / "ledger.sqlite") == active(tmp_path / FOLDER / "exact_head.sqlite") == []
    with open_pair(tmp_path / "ledger.sqlite") as opened:
        assert "2" in opened.withdrawn_sites() and opened.held.delta.withdrawn_sites() == ["2"]
    # admitting a site with nothing held is a clear error
    assert cli.main([*argv, "admit", "2", "--reason", "x"]) == 2


def test_a_missing_quarantine_is_a_refusal_not_a_skip(tmp_path):
    close(state(tmp_path))
    (tmp_path / FOLDER / "ledger.sqlite").rename(tmp_path / "moved.bin")
    assert cli.main(["--ledger", str(tmp_path / "ledger.sqlite"), "remove", "1", "--reason", "x"]) == 2


def test_a_site_withdrawn_before_the_quarantine_existed_is_not_held(tmp_path):
    """Site 2 withdrew while the state had no quarantine; the operator then turns quarantine on. Its
    next reply must be refused as withdrawn, not stored in the quarantine (where nothing knew of
    the withdrawal): a held contribution never outlives its site's consent."""
    main = open_linked_pair(tmp_path)
    main.delta.add("2", delta(2), 60, base_digest=BASE)
    main.remove("2", reason="consent withdrawn")
    held = open_linked_pair(tmp_path / FOLDER)
    link(main.delta, held.delta, HELD_LINK)
    ledgers = Ledgers(main.delta, main.stats, held)
    strategy = LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats, exact_head=EXPECT,
                            quarantine=ledgers.held, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    strategy.aggregate_train(1, [train_reply(901, "1", delta(1), site_stats(1, 40)),
                                 train_reply(902, "2", delta(2), site_stats(2, 60))])
    assert strategy.rounds[1].recorded == ["1"]
    assert strategy.rounds[1].rejected_by_reason == {"site_withdrawn": 1}
    assert held.delta.contributions(site_id="2") == [] and held.stats.contributions(site_id="2") == []
    close(ledgers)
