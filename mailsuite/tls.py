"""Server TLS: the configured certificate, or a self-signed one generated at first start."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from mailsuite.config import Config


def ensure_certificate(config: Config) -> tuple[Path, Path]:
    """(cert, key) paths: the configured ones, or a self-signed pair made once in data_dir."""
    if config.tls.cert:
        return Path(config.tls.cert), Path(config.tls.key)
    cert_path = config.data_path / "tls" / "selfsigned-cert.pem"
    key_path = config.data_path / "tls" / "selfsigned-key.pem"
    if not (cert_path.exists() and key_path.exists()):
        _generate_self_signed(config.server.hostname, cert_path, key_path)
    return cert_path, key_path


def _generate_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    # Write then rename, so a crash never leaves half a key that the next start would trust.
    for path, data, mode in ((key_path, key_bytes, 0o600),
                             (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)


def server_context(config: Config) -> ssl.CertificateOptions:
    """TLS 1.2+ server options for STARTTLS and implicit-TLS listeners."""
    cert_path, key_path = ensure_certificate(config)
    cert = ssl.PrivateCertificate.loadPEM(cert_path.read_bytes() + b"\n" + key_path.read_bytes())
    return ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
