r"""Start a site's SuperNode, and say in plain words why it cannot connect when it cannot.

    python -m deploy.supernode --site-id 3 --superlink fl.example.org:9093 \
        --root-certificates ca.crt --key site-3.key --data-path /data/site-3.npz \
        --epsilon-budget 8 --cache-dir /cache

`--superlink` is the address the operator gave you: the federation's reverse proxy (which
forwards the Fleet API only), not the SuperLink's own port.

The site's state (its privacy-budget record `<state-dir>/privacy-budget.json`) lives in
`--state-dir`, default `$TAFT_STATE_DIR/site-<id>` (~/.local/state/taft-fl/site-<id>), never
inside the repository. When this command creates that directory (0700) it also initialises
the budget record with the `--epsilon-budget`/`--delta-budget` given, so later the ClientApp
never mistakes a missing record for "nothing spent".

Before starting, it checks what can be checked locally (CA file, key format, data path) and
over the network (TCP reachability, TLS handshake against the CA and the host name). Then it
runs `flower-supernode` (TLS + `--auth-supernode-private-key`, `--node-config "site-id=...
data-path=... state-dir=... epsilon-budget=... cache-dir=..."`), passes its output through,
and when it exits translates the usual failures: unregistered key, wrong CA, host name not in
the certificate, plain-text connection, wrong address. `--check` runs the checks only.
Exit status: the SuperNode's, or 2 when a pre-flight check fails.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from deploy.connection import make_private_dir, site_state_dir
from server.trust.withdrawal import load_private_key
from tangent.protocol.limits import check_site_id

REPO = Path(__file__).resolve().parents[1]
BUDGET_FILE = "privacy-budget.json"

# (pattern in the SuperNode's output, explanation). First match wins.
DIAGNOSES: list[tuple[str, str]] = [
    (r"code: 2004\]|Failed to activate SuperNode|No SuperNode found with the given public key",
     "The SuperLink refused this SuperNode's key: it is not registered (or was unregistered). "
     "Send your PUBLIC key ({pub}) to the operator, who runs "
     "`python -m deploy.register --site-id {site} --public-key <file>`."),
    (r"code: 2\d\d\d\].*registration|REGISTRATION_DISABLED",
     "The SuperLink requires registered keys; start the SuperNode with --key (your registered key)."),
    (r"Exit Code: 303|requires a secure TLS connection",
     "SuperNode authentication needs TLS: do not use --insecure; pass --root-certificates ca.crt."),
    (r"Unable to parse the private key file",
     "The key file is not an OpenSSH ECDSA private key (create one with `python -m deploy.pki site-key`)."),
    (r"Hostname mismatch|IP address mismatch|doesn't match",
     "The SuperLink's certificate does not name the address {host}. Connect with a name it covers, "
     "or ask the operator to re-issue it: `python -m deploy.pki superlink --hostname {host}`."),
    (r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
     "The SuperLink's certificate is not signed by the CA you gave (--root-certificates {ca}). "
     "Get the federation's ca.crt from the operator."),
    (r"WRONG_VERSION_NUMBER|record layer failure|http_request",
     "TLS failed: the server at {address} does not speak TLS (plain-text SuperLink?) or is not a SuperLink."),
    # Caddy (the federation's proxy) answers plain HTTP on its TLS port with 400
    (r"400 Bad Request'? for url 'http://",
     "The server answered a plain-text request with 400: a plain-text (--insecure) SuperNode "
     "talking to the federation's TLS proxy. Use TLS with --root-certificates."),
    (r"Server disconnected without sending a response",
     "The server closed the connection: a plain-text (--insecure) SuperNode talking to a TLS "
     "SuperLink, or a proxy in between. Use TLS with --root-certificates."),
    # the proxy may also drop a plain-text request without an answer (seen on a loaded host)
    (r"Connection reset by peer",
     "The server reset the connection: a plain-text (--insecure) SuperNode talking to the "
     "federation's TLS proxy or SuperLink. Use TLS with --root-certificates."),
    (r"Connection refused",
     "Nothing accepts connections at {address}: the SuperLink is down, or the host/port is wrong."),
    (r"Name or service not known|nodename nor servname|Temporary failure in name resolution|getaddrinfo",
     "Cannot resolve the SuperLink host name in {address}."),
    (r"timed out|ConnectTimeout|No route to host|Network is unreachable",
     "The SuperLink at {address} is unreachable (firewall, wrong address, or network down)."),
    (r"Runtime HTTP API failed to start|address already in use",
     "The SuperNode's local Runtime API port is busy: pick another with --runtime-port."),
]


def diagnose(output: str, **fmt: str) -> str | None:
    for pattern, text in DIAGNOSES:
        if re.search(pattern, output, flags=re.IGNORECASE):
            return text.format(**fmt)
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def preflight(address: str, ca: Path, key: Path, data_path: str | None, timeout: float = 5.0) -> list[str]:
    """Problems found before starting, in plain words (empty list = all good)."""
    problems: list[str] = []
    if not ca.is_file():
        problems.append(f"CA certificate {ca} does not exist (get ca.crt from the operator).")
    if not key.is_file():
        problems.append(f"Key {key} does not exist (create it: python -m deploy.pki site-key).")
    else:
        try:
            load_private_key(key)
        except (ValueError, TypeError) as err:
            problems.append(f"Key {key} is not an EC private key in OpenSSH/PEM format: {err}")
    if data_path and not Path(data_path).exists():
        problems.append(f"Data path {data_path} does not exist.")
    if problems:
        return problems
    try:
        host, port = _split_address(address)
    except ValueError:
        return [f"--superlink {address!r} is not HOST:PORT."]
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return [diagnose(str(err), address=address, host=host, ca=str(ca), pub="", site="")
                or f"Cannot reach {address}: {err}"]
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        msg = str(err)
        return [diagnose(msg, address=address, host=host, ca=str(ca), pub="", site="") or msg]
    except (ssl.SSLError, OSError) as err:
        return [f"TLS handshake with {address} failed ({err}): the server does not speak TLS "
                "(plain-text SuperLink?) or is not a SuperLink."]
    finally:
        sock.close()
    return []


def prepare_state_dir(state_dir: Path, site_id: str, epsilon_budget: float | None,
                      delta_budget: float | None) -> str:
    """Create the site's state directory (0700) outside the repository; on creation, write the
    privacy-budget record. Returns what was done, in words. An existing directory is left as it
    is: its budget record is durable state that only the ClientApp updates."""
    state_dir = Path(state_dir).expanduser().resolve()
    if state_dir.is_relative_to(REPO):
        raise ValueError(f"state dir {state_dir} is inside the app directory {REPO}: `flwr run` would "
                         "ship it; use a directory outside (default ~/.local/state/taft-fl/site-<id>)")
    if state_dir.exists():
        if not state_dir.is_dir():
            raise ValueError(f"state dir {state_dir} exists and is not a directory")
        return f"state dir {state_dir} (existing)"
    make_private_dir(state_dir)
    if epsilon_budget is None:
        return f"state dir {state_dir} created"
    try:
        from tangent.training.privacy import PrivacyBudget
    except ImportError:  # the budget record API (tangent.training.privacy.PrivacyBudget) is not in this tree
        return f"state dir {state_dir} created (no PrivacyBudget API here: budget record not initialised)"
    PrivacyBudget.create(state_dir / BUDGET_FILE, site_id, epsilon_budget, delta_budget)
    return (f"state dir {state_dir} created; privacy budget epsilon={epsilon_budget}"
            + (f", delta={delta_budget}" if delta_budget is not None else ""))


def _toml_str(value: str) -> str:
    """A TOML literal string ('...', no escapes). Flower splits --node-config with a regex that
    ends a quoted value at the next quote of its kind, so a value holding a quote cannot be
    passed at all: refuse it clearly instead of letting the site start with a truncated path."""
    value = str(value)
    if "'" in value or "\n" in value or "\r" in value:
        raise ValueError(f"{value!r}: a node-config value cannot contain a single quote or a newline")
    return f"'{value}'"


def node_config(args: argparse.Namespace) -> str:
    """The --node-config string the ClientApp reads (strings quoted, TOML values)."""
    items = [f"site-id={_toml_str(args.site_id)}", f"data-path={_toml_str(args.data_path)}",
             f"state-dir={_toml_str(args.state_dir)}"]
    for key, value in (("epsilon-budget", args.epsilon_budget), ("delta-budget", args.delta_budget),
                       ("max-epsilon", args.max_epsilon), ("max-delta", args.max_delta)):
        if value is not None:
            items.append(f"{key}={float(value)}")
    if args.require_dp:
        items.append("require-dp=true")
    if args.declared_examples is not None:
        items.append(f"declared-examples={int(args.declared_examples)}")
    if args.cache_dir:
        items.append(f"cache-dir={_toml_str(args.cache_dir)}")
    items += args.extra_node_config
    return " ".join(items)


def supernode_command(args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).with_name("flower-supernode")
    cmd = [str(exe) if exe.exists() else "flower-supernode", "--superlink", args.superlink]
    if args.insecure:  # only for the refusal test: a TLS SuperLink must turn this away
        cmd += ["--insecure"]
    else:
        cmd += ["--root-certificates", str(args.root_certificates),
                "--auth-supernode-private-key", str(args.key)]
    cmd += ["--node-config", node_config(args), "--port", str(args.runtime_port)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.supernode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site-id", required=True)
    parser.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    parser.add_argument("--root-certificates", type=Path, required=True, help="federation CA (ca.crt)")
    parser.add_argument("--key", type=Path, required=True, help="this site's OpenSSH ECDSA private key")
    parser.add_argument("--data-path", required=True, help="site data: .npz (images, labels) or ImageFolder dir")
    parser.add_argument("--epsilon-budget", type=float,
                        help="total DP epsilon this site allows (implies require-dp)")
    parser.add_argument("--delta-budget", type=float, help="total DP delta this site allows")
    parser.add_argument("--max-epsilon", type=float, help="most epsilon one contribution may spend")
    parser.add_argument("--max-delta", type=float, help="largest delta one contribution may use")
    parser.add_argument("--require-dp", action="store_true", help="refuse every non-private request")
    parser.add_argument("--declared-examples", type=int,
                        help="the example count DP replies carry (public; at most the registered cap)")
    parser.add_argument("--state-dir", type=Path,
                        help="site state (privacy-budget record); default $TAFT_STATE_DIR/site-<id> "
                             "(~/.local/state/taft-fl/site-<id>)")
    parser.add_argument("--cache-dir", help="feature cache directory")
    parser.add_argument("--extra-node-config", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runtime-port", type=int, default=9094,
                        help="local Runtime API port (distinct per SuperNode on one host)")
    parser.add_argument("--max-wait-time", type=float, help="give up reconnecting after this many seconds")
    parser.add_argument("--log-file", type=Path, help="also write the SuperNode's output here")
    parser.add_argument("--flwr-home", type=Path,
                        help="where this SuperNode installs app bundles (FLWR_HOME; default <state-dir>/flwr-home, "
                             "so SuperNodes on one host never share one)")
    parser.add_argument("--check", action="store_true", help="run the pre-flight checks only")
    parser.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-preflight", action="store_true", help="skip the pre-flight checks")
    args = parser.parse_args(argv)
    try:
        check_site_id(args.site_id)
    except ValueError as err:
        parser.error(str(err))
    args.state_dir = (args.state_dir or site_state_dir(args.site_id)).expanduser().resolve()
    try:
        node_config(args)
    except ValueError as err:
        parser.error(str(err))
    pub = args.key.with_name(args.key.name + ".pub")
    fmt = dict(address=args.superlink, host=args.superlink.rpartition(":")[0], ca=str(args.root_certificates),
               pub=str(pub), site=args.site_id)

    if not (args.no_preflight or args.insecure):
        problems = preflight(args.superlink, args.root_certificates, args.key, args.data_path)
        for p in problems:
            print(f"[deploy.supernode] PROBLEM: {p}", file=sys.stderr, flush=True)
        if problems:
            return 2
        print(f"[deploy.supernode] pre-flight OK: TLS to {args.superlink} verified against "
              f"{args.root_certificates}", flush=True)
    if args.check:
        return 0
    try:
        print(f"[deploy.supernode] {prepare_state_dir(args.state_dir, args.site_id, args.epsilon_budget, args.delta_budget)}",
              flush=True)
    except (ValueError, OSError) as err:
        print(f"[deploy.supernode] PROBLEM: {err}", file=sys.stderr, flush=True)
        return 2

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env["FLWR_HOME"] = str((args.flwr_home or args.state_dir / "flwr-home").resolve())
    proc = subprocess.Popen(supernode_command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env)
    pid_file = args.state_dir / "supernode.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # stop: kill $(cat …/supernode.pid)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    tail: list[str] = []
    log_file = open(args.log_file, "a") if args.log_file else None  # noqa: SIM115

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if log_file:
                log_file.write(line)
                log_file.flush()
            tail.append(line)
            del tail[:-200]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join(timeout=5)
    if code != 0:
        text = diagnose("".join(tail), **fmt) or "see the SuperNode output above."
        print(f"[deploy.supernode] site {args.site_id}: the SuperNode stopped (exit {code}). {text}",
              file=sys.stderr, flush=True)
    if log_file:
        log_file.close()
    _remove_pid_file(pid_file)
    return code


def _remove_pid_file(pid_file: Path) -> None:
    """A SuperNode that stopped (revoked, refused, killed) leaves no pid behind: a later
    `kill $(cat supernode.pid)` could otherwise hit whatever process reused the number."""
    try:
        if pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
