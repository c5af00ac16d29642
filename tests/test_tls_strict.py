"""Issue 13, item 4: the simulator's certificates verify under strict X.509 checking
(``ssl.VERIFY_X509_STRICT``, the default of Python 3.13's ``create_default_context``), both a
private CA + leaf as tls.py makes them and a certificate shaped like TrueNAS's own default one."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from truenas_incus_operator.truenas import client as client_module
from truenas_incus_operator.truenas import ssl_context
from truenas_simulator import Simulator, SimulatorServer
from truenas_simulator.tls import CertificateAuthority, server_context, truenas_default_certificate

from .fakes import connect_to


def strict(cadata: str) -> ssl.SSLContext:
    """The operator's own context (verification on), made strict as Python 3.13 makes it."""
    context = ssl_context(cadata)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


async def handshake(server: SimulatorServer, context: ssl.SSLContext, hostname: str) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context, server_hostname=hostname)
    writer.close()
    await writer.wait_closed()


async def test_private_ca_and_leaf_verify_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typical private CA: the CA has a Subject Key Identifier, the leaf an Authority Key
    Identifier naming it (RFC 5280 4.2.1.1/4.2.1.2, which OpenSSL's strict mode enforces). The
    operator's client, its ssl_context() made strict, connects and logs in."""

    def strict_context(ca_pem: str | None = None, insecure_skip_verify: bool = False) -> ssl.SSLContext:
        context = ssl_context(ca_pem, insecure_skip_verify)
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        return context

    monkeypatch.setattr(client_module, "ssl_context", strict_context)
    ca = CertificateAuthority.create("strict test CA")
    context = server_context(ca, tmp_path, ["localhost", "127.0.0.1"])
    server = await SimulatorServer(Simulator("25.10"), ssl_context=context).start()
    try:
        await handshake(server, strict(ca.cert_pem.decode()), "127.0.0.1")
        client = await connect_to(server.ws_url, server.sim.api_key, ca_pem=ca.cert_pem.decode())
        try:
            assert client.system_version == "TrueNAS-25.10.1"
        finally:
            await client.close()
    finally:
        await server.stop()


def test_truenas_default_certificate_has_truenas_shape() -> None:
    """truenas_crypto_utils generate_self_signed.py (used by plugins/crypto_/default_cert.py from
    TS-25.10.0; plugins/crypto_/generate_self_signed.py in TS-25.04.0): RSA 2048, SHA-256,
    self-signed, CN=localhost with the iX subject, SAN DNS:localhost, EKU serverAuth, 397 days,
    and no basicConstraints or key identifiers."""
    cert_pem, _ = truenas_default_certificate()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "iXsystems Inc. dba TrueNAS"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert {type(e.value) for e in cert.extensions} == {x509.SubjectAlternativeName, x509.ExtendedKeyUsage}
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 397


async def test_truenas_default_certificate_verifies_strictly_when_pinned(tmp_path: Path) -> None:
    """Trusting the appliance's self-signed default certificate (the caPem an operator user would
    copy from the UI) works under strict verification: RFC 5280 lets a self-signed certificate
    omit the key identifiers. Its only name is localhost."""
    cert_pem, key_pem = truenas_default_certificate()
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server = await SimulatorServer(Simulator("26.0"), ssl_context=context).start()
    try:
        await handshake(server, strict(cert_pem.decode()), "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(server, strict(cert_pem.decode()), "127.0.0.1")  # not in its SAN
    finally:
        await server.stop()


PY313 = Path.home() / ".pyenv" / "versions" / "3.13.0" / "bin" / "python3.13"


@pytest.mark.skipif(not PY313.exists(), reason="no Python 3.13 on this machine")
def test_python_3_13_default_context_accepts_the_simulator_certificates(tmp_path: Path) -> None:
    """Python 3.13's ssl.create_default_context() sets VERIFY_X509_STRICT itself: a plain 3.13
    client must complete the handshake against the simulator's CA + leaf."""
    from truenas_simulator.runner import SimulatorThread

    with SimulatorThread(Simulator("25.10"), tls=True, cert_dir=tmp_path) as running:
        assert running.ca_file is not None
        port = running.url.rsplit(":", 1)[1]
        script = (
            "import socket, ssl, sys\n"
            f"ctx = ssl.create_default_context(cafile={str(running.ca_file)!r})\n"
            "assert ctx.verify_flags & ssl.VERIFY_X509_STRICT\n"
            f"with socket.create_connection(('127.0.0.1', {port})) as raw:\n"
            "    with ctx.wrap_socket(raw, server_hostname='127.0.0.1') as tls:\n"
            "        print(tls.version())\n"
        )
        done = subprocess.run([str(PY313), "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("TLSv1.")
