"""taft-ledger admit, when the checks of a reply refuse the held contribution: a clear refusal (exit 1),
not a traceback, and neither the composed models nor the quarantine change.

The case met when walking the deployment guide: a site trains again on the same data with the same
settings, so its held Δw is bit for bit its active one, which the Δ ledger refuses as a duplicate."""
from __future__ import annotations

from pathlib import Path

import pytest

from server import cli
from server.ledger import Ledger
from server.ledger.ledgers import HELD_LINK, Ledgers, link
from server.quarantine import FOLDER
from server.strategy import LedgerFedAvg
from tests.server.exact_head_replies import BASE, EXPECT, SPEC, delta, open_linked_pair, site_stats, train_reply

pytestmark = pytest.mark.usefixtures("flower_server_identity")


def strategy(ledgers: Ledgers, held: Ledgers | None) -> LedgerFedAvg:
    return LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats, exact_head=EXPECT,
                        quarantine=held, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)


def versions(directory: Path) -> list[tuple[int, str]]:
    out = []
    for name in ("ledger.sqlite", "exact_head.sqlite"):
        with Ledger.open(directory / name, create=False) as ledger:
            out.append((ledger.current_version().version, ledger.current_version().composed_sha256))
    return out


def test_admitting_a_held_copy_of_the_active_contribution_is_a_refusal_not_a_traceback(tmp_path, capsys):
    main = open_linked_pair(tmp_path)
    reply = lambda: train_reply(901, "1", delta(1), site_stats(1, 40))  # noqa: E731 - the same reply twice
    strategy(main, None).aggregate_train(1, [reply()])  # a run without quarantine: site 1 is active
    held = open_linked_pair(tmp_path / FOLDER)
    link(main.delta, held.delta, HELD_LINK)
    strategy(main, held).aggregate_train(1, [reply()])  # the re-run, with quarantine: held, unchecked against main
    assert [c.site_id for c in held.delta.contributions(status="active")] == ["1"]
    for ledger in (*main.all(), *held.all()):
        ledger.close()
    before, held_before = versions(tmp_path), versions(tmp_path / FOLDER)

    code = cli.main(["--ledger", str(tmp_path / "ledger.sqlite"), "admit", "1", "--reason", "reviewed"])
    err = capsys.readouterr().err
    assert code == 1 and "duplicate" in err and "Traceback" not in err and "unchanged" in err
    assert versions(tmp_path) == before and versions(tmp_path / FOLDER) == held_before
    assert cli.main(["--ledger", str(tmp_path / "ledger.sqlite"), "held"]) == 0
    assert capsys.readouterr().out.startswith("1 ")
