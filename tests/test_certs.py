"""``fcl-flower certs``: CA, SuperLink certificate and SuperNode keys in the formats Flower reads."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fcl_flower.certs import CertPaths, CertsError, ensure_certs, generate_certs, site_names, split_sans
from fcl_flower.cli import main


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def test_layout_sans_and_modes(tmp_path):
    paths = generate_certs(tmp_path / "c", ["hospital-a", "hospital-b"], ["link.example.org", "10.1.2.3", "fd00::7"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.superlink_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # signed by our CA
    dns, ips = _sans(server)
    assert dns == {"localhost", "link.example.org"}
    assert ips == {"127.0.0.1", "::1", "10.1.2.3", "fd00::7"}
    server_key = load_pem_private_key(paths.superlink_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (paths.ca_key, paths.superlink_key, paths.supernode_key("hospital-a"), paths.supernode_key("hospital-b")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert paths.supernode_sites() == ["hospital-a", "hospital-b"]


def test_supernode_keys_are_openssh_p384_pairs(tmp_path):
    paths = generate_certs(tmp_path, site_names(sites=2))
    for site in ("site_00", "site_01"):
        private = load_ssh_private_key(paths.supernode_key(site).read_bytes(), None)
        public = load_ssh_public_key(paths.supernode_pub(site).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert paths.supernode_pub(site).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert private.public_key().public_numbers() == public.public_numbers()


def test_keys_are_accepted_by_flower_loaders(tmp_path):
    """The very functions flower-supernode and `flwr supernode register` use to read them."""
    from flwr.cli.supernode.register import try_load_public_key

    paths = generate_certs(tmp_path, ["a"])
    assert try_load_public_key(paths.supernode_pub("a"))
    key = load_ssh_private_key(paths.supernode_key("a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    paths = generate_certs(tmp_path, ["a"])
    before = paths.supernode_key("a").read_bytes()
    with pytest.raises(CertsError, match="--force"):
        generate_certs(tmp_path, ["a"])
    with pytest.raises(CertsError, match="supernodes/a"):
        generate_certs(tmp_path, ["a"], supernode_keys_only=True)
    assert paths.supernode_key("a").read_bytes() == before
    generate_certs(tmp_path, ["a"], force=True)
    assert paths.supernode_key("a").read_bytes() != before


def test_supernode_keys_only_and_ensure(tmp_path):
    paths = generate_certs(tmp_path / "site", ["x"], supernode_keys_only=True)
    assert paths.supernode_pub("x").is_file() and not paths.ca_cert.exists()
    ensured = ensure_certs(tmp_path / "fed", ["a", "b"])
    ca = ensured.ca_cert.read_bytes()
    again = ensure_certs(tmp_path / "fed", ["a", "b", "c"])  # reuses the CA, adds c
    assert again.ca_cert.read_bytes() == ca and again.supernode_sites() == ["a", "b", "c"]


def test_names_and_sans_are_validated():
    assert site_names(sites=3) == ["site_00", "site_01", "site_02"]
    with pytest.raises(CertsError):
        site_names(names=["ok", "../evil"])
    with pytest.raises(CertsError):
        site_names(names=["a", "a"])
    with pytest.raises(CertsError):
        split_sans(["not a host"])
    kinds = {type(n).__name__ for n in split_sans(["[::1]", "h.example"])}
    assert kinds == {"DNSName", "IPAddress"}
    assert ipaddress.ip_address("::1")


def test_cli(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--site-names", "a,b", "--san", "192.168.1.10"]) == 0
    text = capsys.readouterr().out
    assert "192.168.1.10" in text and "supernodes/a.pub" in text
    assert CertPaths(out).supernode_sites() == ["a", "b"]
    assert main(["certs", "--out", str(out), "--sites", "2"]) == 2  # the CA exists: refused
    assert "--force" in capsys.readouterr().err
    assert not (out / "supernodes" / "site_00").exists()
