"""The operator's terminal: text from a site, a request file or the state directory is shown with its
control characters escaped (screen clear, clipboard write, bidi override), and refused where it enters."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from deploy.health import render
from deploy.pki import create_site_key
from server import cli
from server.ledger import Ledger, RejectedContribution
from server.replies import Rejected, parse_train_reply, raise_if_error
from server.trust.withdrawal import WithdrawalRefused, create_request, load_private_key, parse_request
from tangent.protocol.text import escape_controls, is_printable
from tests.server.train_replies import BASE, delta, instruction, train_reply

CLEAR, CLIPBOARD, BIDI = "\x1b[2J\x1b[H", "\x1b]52;c;cm0gLXJmIH4=\x07", "\u202e"
HOSTILE = f"fp{CLEAR}{CLIPBOARD}{BIDI}\x9b31m"

pytestmark = pytest.mark.usefixtures("flower_server_identity")


def test_escape_controls_shows_every_control_and_keeps_text():
    shown = escape_controls(HOSTILE + " é 漢 ok")
    assert is_printable(shown) and "\x1b" not in shown and "\u202e" not in shown and "\x9b" not in shown
    assert shown.startswith("fp\\x1b[2J") and shown.endswith(" é 漢 ok") and "\\u202e" in shown
    assert escape_controls("plain text") == "plain text"


def test_taft_ledger_show_and_list_never_print_a_control_character(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        ledger.add("1", delta(1), 10, shard_fingerprint="fp-1", extra={"note": HOSTILE})
        ledger.add("2", delta(2), 10)
        ledger.remove("2", reason="operator decision")
    # a ledger written before the door was closed (or edited by a state-directory writer)
    db = sqlite3.connect(path)
    db.execute("UPDATE contributions SET shard_fingerprint = ?, train_config = ?", (HOSTILE, json.dumps({"x": HOSTILE})))
    db.execute("UPDATE contributions SET end_reason = ? WHERE site_id = '2'", (HOSTILE,))
    db.commit()
    db.close()
    for argv in (["show", "1"], ["show", "2"], ["list"], ["show", "1", "--json"], ["verify"]):
        cli.main(["--ledger", str(path), *argv])
        out = capsys.readouterr()
        assert is_printable(out.out.replace("\n", "")) and is_printable(out.err.replace("\n", "")), argv
    cli.main(["--ledger", str(path), "show", "1"])
    assert "fp\\x1b[2J" in capsys.readouterr().out  # shown, escaped


def test_hostile_strings_are_refused_where_they_enter(tmp_path):
    reply = train_reply(7, "1", delta(1))
    reply.content.config_records["meta"]["shard-fingerprint"] = HOSTILE
    with pytest.raises(Rejected) as err:
        parse_train_reply(reply, BASE)
    assert err.value.reason == "bad_meta" and "\x1b" not in err.value.detail
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(RejectedContribution) as refused:
            ledger.add("1", delta(1), 10, shard_fingerprint=HOSTILE)
        assert refused.value.reason == "bad_meta"
        ledger.add("1", delta(1), 10)
        with pytest.raises(ValueError, match="control characters"):
            ledger.remove("1", reason=f"gone{CLEAR}")
        assert ledger.contributions(status="active")  # nothing changed
    _, _ = create_site_key(tmp_path / "keys", "1")
    document = create_request("1", load_private_key(tmp_path / "keys" / "site-1.key"), f"consent{CLIPBOARD}")
    with pytest.raises(WithdrawalRefused, match="printable"):
        parse_request(document)


def test_a_sites_error_reason_is_kept_escaped():
    error = ConfigRecord({"code": "budget_exhausted", "reason": HOSTILE, "site-id": "1"})
    with pytest.raises(Rejected) as err:
        raise_if_error(Message(RecordDict({"error": error}), reply_to=instruction(7)))
    assert err.value.reason == "budget_exhausted" and is_printable(err.value.detail)


def test_deploy_health_renders_hostile_details_escaped():
    report = {"superlink_error": None, "ledger": None, "sites": [], "unknown_nodes": [], "refused_supernodes": [],
              "rejected_replies": [{"node_id": 5, "registered_site": None, "fingerprint": None, "reason": "bad_meta",
                                    "count": 1, "detail": HOSTILE}],
              "refused_withdrawals": [{"request": f"r{CLEAR}.json", "report": "x", "detail": HOSTILE}]}
    text = render(report)
    assert all(is_printable(line) for line in text.split("\n")) and "\\x1b" in text
