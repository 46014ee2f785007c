"""Self-signed TLS certificates for the tests (engine and plugin), standard library only.

`make_pair` writes a certificate and its unencrypted private key (PEM) with the `openssl`
command line, or with the `cryptography` package where no `openssl` is found but that package
is installed; it returns None when neither is there, and the tests that need one skip.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

HOSTS = ("127.0.0.1", "localhost")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_pair(dest: Path, name: str = "engine", hosts=HOSTS) -> tuple[Path, Path] | None:
    """(certificate, key) in `dest`, made out for `hosts` (subjectAltName), valid two days."""
    dest.mkdir(parents=True, exist_ok=True)
    cert, key = dest / f"{name}-cert.pem", dest / f"{name}-key.pem"
    openssl = shutil.which("openssl")
    if openssl:
        san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-subj", f"/CN={hosts[0]}", "-addext", f"subjectAltName={san}",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        os.chmod(key, 0o600)
        return cert, key
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(key, 0o600)
    return cert, key


def encrypted_copy(key: Path, dest: Path, passphrase: str = "secret") -> Path | None:
    """`key` protected by `passphrase` (may be empty; needs `openssl`; None without it)."""
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    subprocess.run([openssl, "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{passphrase}",
                    "-out", str(dest)], check=True, capture_output=True, timeout=60)
    return dest
