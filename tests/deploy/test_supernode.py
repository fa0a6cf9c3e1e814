"""deploy.supernode: the site's state dir (0700, outside the repo, budget record on creation) and
the node config it hands the ClientApp."""
import argparse
import pytest

from deploy.supernode import BUDGET_FILE, REPO, diagnose, node_config, prepare_state_dir


def test_a_fresh_state_dir_is_private(tmp_path):
    path = tmp_path / "taft" / "site-3"
    prepare_state_dir(path, "3", None, None)
    assert path.is_dir() and path.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "taft").stat().st_mode & 0o777 == 0o700  # the state root it created, too


def test_a_state_dir_inside_the_app_directory_is_refused():
    with pytest.raises(ValueError, match="inside the app directory"):
        prepare_state_dir(REPO / "deploy" / "state" / "site-3", "3", 8.0, None)
    assert not (REPO / "deploy" / "state" / "site-3").exists()


def test_the_budget_record_is_created_once_with_the_fresh_dir(tmp_path):
    privacy = pytest.importorskip("tangent.training.privacy")
    if not hasattr(privacy, "PrivacyBudget"):
        pytest.skip("tangent.training.privacy.PrivacyBudget (helper dp) not in this tree")
    path = tmp_path / "site-3"
    prepare_state_dir(path, "3", 8.0, 1e-5)
    record = path / BUDGET_FILE
    assert record.exists() and "8" in record.read_text()
    before = record.read_bytes()
    assert "existing" in prepare_state_dir(path, "3", 99.0, None)  # an existing record is never reset
    assert record.read_bytes() == before


def _args(tmp_path, data_path):
    return argparse.Namespace(site_id="3", data_path=data_path, state_dir=tmp_path, epsilon_budget=8,
                              delta_budget=None, max_epsilon=2.0, max_delta=None, require_dp=True,
                              declared_examples=500, cache_dir="/cache", extra_node_config=[])


def test_node_config_parses_with_flowers_own_parser(tmp_path):
    from flwr.common.config import parse_config_args

    data_path = '/data/my "site" \\ 3 = x.npz'
    parsed = parse_config_args([node_config(_args(tmp_path, data_path))])
    assert parsed == {"site-id": "3", "data-path": data_path, "state-dir": str(tmp_path),
                      "epsilon-budget": 8.0, "max-epsilon": 2.0, "require-dp": True, "declared-examples": 500,
                      "cache-dir": "/cache"}


def test_a_value_flower_cannot_carry_is_refused(tmp_path):
    with pytest.raises(ValueError, match="single quote"):
        node_config(_args(tmp_path, "/data/site's.npz"))


def test_a_supernode_that_stopped_leaves_no_pid_file(tmp_path):
    """`kill $(cat <state-dir>/supernode.pid)` must never name a process number the stopped wrapper
    no longer owns (a revoked site's SuperNode stops by itself). A real flower-supernode that cannot
    reach a SuperLink gives up after --max-wait-time."""
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()  # nobody listens there
    state = tmp_path / "site-3"
    result = subprocess.run([sys.executable, "-m", "deploy.supernode", "--site-id", "3", "--insecure",
                             "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(tmp_path / "ca.crt"),
                             "--key", str(tmp_path / "site-3.key"), "--data-path", str(tmp_path / "site.npz"),
                             "--state-dir", str(state), "--max-wait-time", "2",
                             "--runtime-port", str(free_port())],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert state.is_dir(), result.stdout + result.stderr  # it started (and wrote its pid file) ...
    assert not (state / "supernode.pid").exists(), result.stdout + result.stderr  # ... and removed it on exit


# The tail of a real --insecure SuperNode against the federation's TLS proxy: on a loaded host the
# proxy reset the connection instead of answering 400, and the site got no explanation.
RESET_TAIL = """WARNING :   Connection attempt failed, retrying in 4.93 seconds
WARNING :   Giving up reconnection after 10.00 seconds and 6 tries.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[Errno 104] Connection reset by peer
The SuperNode could not establish a connection to the SuperLink."""


@pytest.mark.parametrize("tail", [RESET_TAIL, "httpx.HTTPStatusError: '400 Bad Request' for url 'http://x'",
                                  "Server disconnected without sending a response."])
def test_every_way_a_tls_proxy_turns_away_plain_text_is_explained(tail):
    text = diagnose(tail, address="127.0.0.1:9092", host="127.0.0.1", ca="ca.crt", pub="", site="1")
    assert text is not None and "plain-text" in text and "--root-certificates" in text
