"""Test certificates and SuperNode keys for a deployment (``fedglmm certs DIR``).

Writes, with the ``cryptography`` package (installed with Flower):

* ``ca.key`` / ``ca.pem``: a private certificate authority (EC P-384, ten years).  ``ca.key`` signs the
  server certificate and is needed for nothing else: keep it offline.
* ``server.key`` / ``server.pem``: the SuperLink's TLS key and certificate, valid for the given host
  names and addresses and always for ``localhost``, ``127.0.0.1`` and ``::1``.  ``server.key`` stays on
  the coordinator machine.
* for each site S: ``S.key`` (its SuperNode's private authentication key, OpenSSH format; it goes to that
  site only) and ``S.pub`` (the public key, given to the coordinator);
* ``authorized_keys.csv``: every site's public key, one per line, for ``fedglmm coordinator start
  --auth-keys``.

These are for tests and small deployments; an institution's own CA can issue ``server.pem`` instead.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from pathlib import Path

from ..errors import InputError

_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _server_certificate(ca_key, ca_name, hosts, now, until):
    """The coordinator's key and TLS certificate, signed by the CA, for localhost and ``hosts``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[str] = []
    for h in ["localhost", "127.0.0.1", "::1", *hosts]:
        if h not in names:
            names.append(h)
    alt = []
    for h in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    common = hosts[0] if hosts else "localhost"
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
              .add_extension(x509.SubjectAlternativeName(alt), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA384()))
    return server_key, server


def write_certs(folder: Path, hosts: list[str] = (), sites: list[str] = (), days: int = 3650) -> list[Path]:
    """Write the CA, the server certificate and the sites' key pairs into ``folder``; the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    for s in sites:
        if not _SITE_NAME.match(s):
            raise InputError(f"site name '{s}' may use letters, digits, '.', '_' and '-' only")
    if len(set(sites)) != len(sites):
        raise InputError("a site name is given twice")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create '{folder}': {e.strerror or e}") from None

    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)
    pem = serialization.Encoding.PEM
    no_pass = serialization.NoEncryption()

    def key_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pass)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedglmm federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    server_key, server = _server_certificate(ca_key, ca_name, hosts, now, until)

    written = []

    def out(name: str, data: bytes, private: bool) -> None:
        path = folder / name
        _write(path, data, private)
        written.append(path)

    out("ca.key", key_pem(ca_key), True)
    out("ca.pem", ca.public_bytes(pem), False)
    out("server.key", key_pem(server_key), True)
    out("server.pem", server.public_bytes(pem), False)
    lines = []
    for s in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_pass)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH) + f" {s}".encode()
        out(f"{s}.key", private, True)
        out(f"{s}.pub", public + b"\n", False)
        lines.append(public.decode())
    if sites:
        out("authorized_keys.csv", ("\n".join(lines) + "\n").encode(), False)
    return written


def read_public_keys(path: Path) -> list[tuple[str, bytes]]:
    """The (name, key) pairs of an ``authorized_keys.csv`` (OpenSSH public keys, one per line or comma)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read --auth-keys '{path}': {e.strerror or e}") from None
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for item in line.split(","):
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            parts = item.split()
            try:
                key = load_ssh_public_key(" ".join(parts[:2]).encode())
            except (ValueError, IndexError):
                raise InputError(f"--auth-keys '{path}' line {lineno}: not an OpenSSH public key") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InputError(f"--auth-keys '{path}' line {lineno}: not an EC (NIST curve) key")
            name = parts[2] if len(parts) > 2 else f"key {len(keys) + 1}"
            keys.append((name, key))
    if not keys:
        raise InputError(f"--auth-keys '{path}' holds no public key")
    return keys
