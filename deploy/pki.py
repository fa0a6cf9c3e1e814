"""Certificates and SuperNode keys for a TLS + SuperNode-auth deployment.

    python -m deploy.pki ca                                 # <state>/certs/ca.crt, ca.key
    python -m deploy.pki superlink                          # <state>/certs/superlink.crt
    python -m deploy.pki proxy --hostname fl.example.org    # <state>/certs/proxy.crt
    python -m deploy.pki operator-key                       # <state>/keys/operator.key
    python -m deploy.pki site-key --site-id 3               # (at the site) <root>/keys/site-3.key

<state> is the operator's state dir ($TAFT_STATE_DIR/server, default
~/.local/state/taft-fl/server), <root> is $TAFT_STATE_DIR (~/.local/state/taft-fl): never the
repository, which `flwr run` ships to every SuperNode.

`superlink` issues the certificate of the SuperLink itself, which listens on loopback only (the
proxy and the operator's CLI use it); `proxy` issues the one the sites see, with the names they
dial (`--hostname`). `operator-key` is the operator's signing key for `signer="admin"` withdrawal
requests (recorded in the registry by `deploy.register --admin`).

Every command is idempotent: an existing file is kept (and reused, e.g. the CA signs the
SuperLink certificate) unless `--force` is given. Keys are written 0600.

Formats are the ones flwr 1.41 reads:
- TLS: PEM CA certificate (`--ssl-ca-certfile`, `--root-certificates`,
  `root-certificates` in the Flower config), PEM server certificate + PKCS#8 key
  (`--ssl-certfile/--ssl-keyfile`, served by uvicorn).
- SuperNode auth: an ECDSA key on a NIST curve (P-384 here) in OpenSSH format;
  `flower-supernode --auth-supernode-private-key` loads it with `load_ssh_private_key`,
  `flwr supernode register` loads the `.pub` with `load_ssh_public_key`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.connection import DEFAULT_STATE, make_private_dir, state_root
from server.trust.withdrawal import load_private_key
from tangent.protocol.limits import check_site_id

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
OPERATOR_KEY = "operator.key"
DEFAULT_SANS = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Directories holding keys are private too (0700); a stale .tmp would keep its old mode.
    make_private_dir(path.parent)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "taft-fl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(out: Path, days: int = 3650, force: bool = False) -> Path:
    """Create a self-signed CA (key + certificate) in `out`; keep an existing one."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() and key_path.exists() and not force:
        return cert_path
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("taft-fl federation CA"))
        .issuer_name(_name("taft-fl federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def cert_sans(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def create_server_cert(
    out: Path, stem: str, hostnames: list[str] | tuple[str, ...] = (), days: int = 825,
    force: bool = False,
) -> Path:
    """Issue a TLS server certificate `<out>/<stem>.crt` (+ `.key`) from the CA in `out`.

    SANs are localhost, 127.0.0.1 and `hostnames`. An existing certificate is kept when it
    already covers every requested name, otherwise it is re-issued.
    """
    sans = list(dict.fromkeys([*DEFAULT_SANS, *hostnames]))
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    if cert_path.exists() and key_path.exists() and not force:
        if set(sans) <= set(cert_sans(cert_path)):
            return cert_path
    ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[-1] if hostnames else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in sans]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def create_superlink_cert(
    out: Path, hostnames: list[str] | tuple[str, ...] = (), days: int = 825, force: bool = False
) -> Path:
    """The SuperLink's own certificate (it listens on loopback: the proxy and the operator's CLI)."""
    return create_server_cert(out, "superlink", hostnames, days, force)


def create_proxy_cert(
    out: Path, hostnames: list[str] | tuple[str, ...] = (), days: int = 825, force: bool = False
) -> Path:
    """The reverse proxy's certificate: the one the sites see (SANs = the names they dial)."""
    return create_server_cert(out, "proxy", hostnames, days, force)


def create_operator_key(out: Path, force: bool = False) -> tuple[Path, Path]:
    """The operator's signing key (`operator.key`, `.key.pub`): signs `signer="admin"` requests.

    Same format as a site key (OpenSSH ECDSA P-384) so `deploy.withdraw create --signer admin`
    and the server's verification treat it like any other key; it is never a SuperNode key.
    """
    return _create_ssh_key(out / OPERATOR_KEY, "taft-operator", force)


def site_key_paths(out: Path, site_id: str) -> tuple[Path, Path]:
    """(private key, public key) paths of a site: `<out>/site-<id>.key` and `.key.pub`."""
    key = out / f"site-{site_id}.key"
    return key, key.with_name(key.name + ".pub")


def _create_ssh_key(key_path: Path, comment: str, force: bool) -> tuple[Path, Path]:
    """ECDSA P-384 key pair in OpenSSH format, private key 0600; keep an existing one."""
    pub_path = key_path.with_name(key_path.name + ".pub")
    if key_path.exists() and not force:
        key = load_private_key(key_path)
    else:
        key = _new_key()
        _write(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            private=True,
        )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(pub_path, pub + f" {comment}\n".encode())
    return key_path, pub_path


def create_site_key(out: Path, site_id: str, force: bool = False) -> tuple[Path, Path]:
    """A site's SuperNode auth key pair (what SuperNode auth reads); keep an existing one."""
    key_path, _ = site_key_paths(out, site_id)
    return _create_ssh_key(key_path, f"taft-site-{site_id}", force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.pki", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    certs, keys = DEFAULT_STATE / "certs", DEFAULT_STATE / "keys"
    p = sub.add_parser("ca", help="create the federation CA (ca.crt, ca.key)")
    p.add_argument("--out", type=Path, default=certs, help="default %(default)s")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    for name, what in (("superlink", "the SuperLink's TLS certificate (loopback)"),
                       ("proxy", "the reverse proxy's TLS certificate (what the sites see)")):
        p = sub.add_parser(name, help=f"issue {what} from the CA (creates the CA if absent)")
        p.add_argument("--out", type=Path, default=certs, help="default %(default)s")
        p.add_argument("--hostname", action="append", default=[],
                       help="extra SAN (DNS name or IP) clients use to reach it; repeatable")
        p.add_argument("--force", action="store_true")
    p = sub.add_parser("operator-key", help="create the operator's signing key (admin withdrawals)")
    p.add_argument("--out", type=Path, default=keys, help="default %(default)s")
    p.add_argument("--force", action="store_true", help="replace an existing key (re-register it!)")
    p = sub.add_parser("site-key", help="create a site's SuperNode auth key pair (OpenSSH ECDSA P-384)")
    p.add_argument("--site-id", required=True)
    p.add_argument("--out", type=Path, default=state_root() / "keys",
                   help="the site's key directory (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing key (re-register it!)")
    args = parser.parse_args(argv)

    if args.command == "ca":
        print(create_ca(args.out, force=args.force))
    elif args.command in ("superlink", "proxy"):
        if not (args.out / CA_CERT).exists():
            create_ca(args.out)
        issue = create_superlink_cert if args.command == "superlink" else create_proxy_cert
        path = issue(args.out, args.hostname, force=args.force)
        print(f"{path} (SANs: {', '.join(cert_sans(path))})")
    elif args.command == "operator-key":
        key, pub = create_operator_key(args.out, force=args.force)
        print(f"{key}\n{pub}")
    else:
        try:
            check_site_id(args.site_id)
        except ValueError as err:
            parser.error(str(err))
        key, pub = create_site_key(args.out, args.site_id, force=args.force)
        print(f"{key}\n{pub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
