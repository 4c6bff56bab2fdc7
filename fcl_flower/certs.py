"""Certificates and keys for a deployed federation: a CA, the SuperLink's TLS certificate,
and one node-authentication key pair per SuperNode.

Layout written by ``generate_certs(out, ...)`` (all names fixed, so scripts can rely on them)::

    out/ca.crt                    CA certificate: give it to every SuperNode and `flwr` CLI user
    out/ca.key                    CA private key (0600): keep it offline on the coordinator
    out/superlink.crt             SuperLink TLS certificate, signed by the CA, SANs below
    out/superlink.key             SuperLink TLS private key (0600)
    out/supernodes/<site>         SuperNode private key, OpenSSH format (0600): stays at the site
    out/supernodes/<site>.pub     SuperNode public key, OpenSSH format: register it on the SuperLink

The SuperLink certificate always covers ``localhost``, ``127.0.0.1`` and ``::1`` plus every
extra SAN given (IP addresses are recognised, anything else is a DNS name). SuperNode keys
are ECDSA P-384, the kind ``flwr supernode register`` and ``flower-supernode
--auth-supernode-private-key`` accept. Nothing is overwritten unless ``force`` is set.
Flower-free; only the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
SUPERNODE_DIR = "supernodes"
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CertsError(ValueError):
    """Certificates could not be written (existing files, bad names); the message says which."""


@dataclass(frozen=True)
class CertPaths:
    """Where ``generate_certs`` puts everything under ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def superlink_cert(self) -> Path:
        return self.root / SUPERLINK_CERT

    @property
    def superlink_key(self) -> Path:
        return self.root / SUPERLINK_KEY

    def supernode_key(self, site: str) -> Path:
        return self.root / SUPERNODE_DIR / site

    def supernode_pub(self, site: str) -> Path:
        return self.root / SUPERNODE_DIR / f"{site}.pub"

    def supernode_sites(self) -> list[str]:
        """Names of the sites that have a key pair here, sorted."""
        folder = self.root / SUPERNODE_DIR
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.pub") if (folder / p.stem).is_file())


def site_names(sites: int | None = None, names: Sequence[str] | None = None) -> list[str]:
    """``names`` checked, or ``site_00 .. site_{N-1}`` (the synthetic data's folder names)."""
    if names:
        out = [n.strip() for n in names if n.strip()]
    else:
        out = [f"site_{i:02d}" for i in range(sites or 0)]
    for name in out:
        if not SITE_NAME.match(name):
            raise CertsError(f"site name {name!r} must be letters, digits, '_', '-' or '.' (no leading punctuation)")
    if len(set(out)) != len(out):
        raise CertsError(f"site names are not unique: {out}")
    return out


def split_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    """``DEFAULT_SANS`` plus ``sans`` as x509 names: IP addresses as IPs, the rest as DNS."""
    seen: list[str] = []
    for san in [*DEFAULT_SANS, *sans]:
        san = san.strip()
        if san and san not in seen:
            seen.append(san)
    names: list[x509.GeneralName] = []
    for san in seen:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san.strip("[]"))))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", san):
                raise CertsError(f"--san {san!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(san))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600 if private else 0o644)  # the umask may have narrowed the mode
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertsError(
            "refusing to overwrite existing keys/certificates (pass --force to replace them): "
            + ", ".join(existing)
        )


def make_ca(paths: CertPaths, days: int = 3650, common_name: str = "fcl-flower federation CA") -> None:
    """Write a self-signed CA (``ca.crt``, ``ca.key``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(paths.ca_key, _pem_key(key), private=True)
    _write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_superlink_cert(paths: CertPaths, sans: Iterable[str] = (), days: int = 825) -> list[str]:
    """Write ``superlink.crt``/``superlink.key`` signed by the CA; return the SANs as text."""
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    alt_names = split_sans(sans)
    user_dns = [n.value for n in alt_names[len(DEFAULT_SANS):] if isinstance(n, x509.DNSName)]
    first_dns = user_dns[0] if user_dns else "localhost"  # SANs decide; the CN is for people
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first_dns)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.superlink_key, _pem_key(key), private=True)
    _write(paths.superlink_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return [str(n.value) for n in alt_names]


def make_supernode_key(paths: CertPaths, site: str) -> None:
    """Write an ECDSA P-384 key pair for ``site`` in OpenSSH formats (private key 0600)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(paths.supernode_key(site), private, private=True)
    _write(paths.supernode_pub(site), public + f" fcl-flower-{site}\n".encode(), private=False)


def generate_certs(
    out: Path, sites: Sequence[str], sans: Iterable[str] = (), force: bool = False,
    supernode_keys_only: bool = False,
) -> CertPaths:
    """Write the CA, the SuperLink certificate and one key pair per site under ``out``.

    ``supernode_keys_only`` writes only the SuperNode key pairs (what a hospital runs to
    make its own key; only the ``.pub`` file goes to the coordinator).

    Raises:
        CertsError: a file to be written exists and ``force`` is false (nothing is
            written then), or a site name / SAN is not valid.
    """
    paths = CertPaths(Path(out).expanduser().resolve())
    sans = list(sans)
    split_sans(sans)  # validate before writing anything
    targets = [p for s in sites for p in (paths.supernode_key(s), paths.supernode_pub(s))]
    if not supernode_keys_only:
        targets += [paths.ca_cert, paths.ca_key, paths.superlink_cert, paths.superlink_key]
    _refuse_existing(targets, force)
    paths.root.mkdir(parents=True, exist_ok=True)
    if not supernode_keys_only:
        make_ca(paths)
        make_superlink_cert(paths, sans)
    for site in sites:
        make_supernode_key(paths, site)
    return paths


def ensure_certs(out: Path, sites: Sequence[str], sans: Iterable[str] = ()) -> CertPaths:
    """Reuse the CA/SuperLink certificate and keys under ``out``; create what is missing.

    What ``deploy-local`` calls: a resumed demo keeps its certificates and registered keys.
    """
    paths = CertPaths(Path(out).expanduser().resolve())
    server = (paths.ca_cert, paths.ca_key, paths.superlink_cert, paths.superlink_key)
    if not all(p.is_file() for p in server):
        if paths.ca_cert.is_file() and paths.ca_key.is_file():
            make_superlink_cert(paths, sans)
        else:
            generate_certs(out, [], sans, force=True)
    for site in sites:
        if not (paths.supernode_key(site).is_file() and paths.supernode_pub(site).is_file()):
            make_supernode_key(paths, site)
    return paths


def describe_certificate(path: Path) -> str:
    """One line: subject, issuer, SANs and expiry of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_text = ", ".join(str(n.value) for n in sans)
    except x509.ExtensionNotFound:
        san_text = "-"
    return (
        f"{path.name}: subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}, "
        f"SANs [{san_text}], valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )
