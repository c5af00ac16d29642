"""A tiny certificate authority (ECDSA P-256) for TLS on loopback: the simulator's HTTPS/WSS
certificate and the local control plane's serving and client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class CertificateAuthority:
    """A tiny CA (ECDSA P-256) for the apiserver's serving and client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self,
        common_name: str,
        organizations: list[str] | None = None,
        hosts: list[str] | None = None,
        client: bool = False,
    ) -> tuple[bytes, bytes]:
        """Returns (cert PEM, key PEM) for a server (``hosts``) or a client (``client=True``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations or []]
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            # Strict X.509 checking (Python 3.13's default) needs both identifiers (RFC 5280 4.2.1.1-2).
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                )
                if self._has_ski()
                else x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    def _has_ski(self) -> bool:
        try:
            self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return False
        return True

    @classmethod
    def load_or_create(cls, directory: Path, name: str) -> CertificateAuthority:
        """Reuses ``ca.crt``/``ca.key`` in ``directory`` (so clients keep trusting it), else makes them."""
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if isinstance(key, ec.EllipticCurvePrivateKey) and cls(key, cert)._has_ski():
                return cls(key, cert)  # a CA from before key identifiers is made anew
        ca = cls.create(name)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(ca.cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem(ca.key))
        return ca

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def server_context(ca: CertificateAuthority, directory: Path, hosts: list[str]) -> ssl.SSLContext:
    """An SSL context serving a certificate for ``hosts`` signed by ``ca``; writes ca.crt there."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue(hosts[0], hosts=hosts)
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    (directory / "server.key").chmod(0o600)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    return context


def truenas_default_certificate() -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) shaped like the ``truenas_default`` certificate a fresh TrueNAS makes for
    its UI and API: self-signed RSA 2048 / SHA-256, the iX subject with CN=localhost, SAN
    DNS:localhost, EKU serverAuth only, 397 days, no basicConstraints and no key identifiers
    (truenas_crypto_utils generate_self_signed.py; plugins/crypto_/generate_self_signed.py in 25.04)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iXsystems Inc. dba TrueNAS"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "info@truenas.com"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Tennessee"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Maryville"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=397))
        .serial_number(secrets.randbelow(2**30 - 1000) + 1000)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .public_key(key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)
