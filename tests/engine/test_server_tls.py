"""`serve --tls-cert FILE --tls-key FILE`: the engine answers over https (and not over plain
http), and a pair it could not use stops the start before the model loads, with one
``error: ...`` line. Certificates are made in the test (`tls_certs`: the `openssl` command or
the `cryptography` package; the tests skip without either)."""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serverutil import REPO_ROOT, free_port, stub_server  # noqa: E402
from tls_certs import encrypted_copy, make_pair  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two unrelated self-signed pairs for 127.0.0.1 / localhost: 'engine' and 'other'."""
    folder = tmp_path_factory.mktemp("certs")
    engine, other = make_pair(folder, "engine"), make_pair(folder, "other")
    if engine is None or other is None:
        pytest.skip("neither the openssl command nor the cryptography package is installed")
    return {"engine": engine, "other": other, "folder": folder}


@pytest.fixture(scope="module")
def https_engine(certs):
    cert, key = certs["engine"]
    srv = stub_server(0.01, "--tls-cert", str(cert), "--tls-key", str(key), module="engine",
                      subcommand=["serve"], ca_file=cert)
    srv.start()
    yield srv
    srv.cleanup()


def test_health_and_requests_are_served_over_https(https_engine):
    assert https_engine.url.startswith("https://")
    status, health = https_engine.request("GET", "/health", token=False)
    assert status == 200 and health["protocol"] == 1
    status, body = https_engine.request("GET", "/jobs/0123456789abcdef")  # the token travels too
    assert status == 404 and body["error"]["code"] == "not_found"
    assert https_engine.request("GET", "/jobs/0123456789abcdef", token="wrong")[0] == 401
    status, events = https_engine.ask({"raster_path": "/nowhere.tif", "question": "What?"})
    assert status in (200, 400, 422)  # an answer over https, whatever it says of the raster


def test_plain_http_gets_no_answer_from_an_https_engine(https_engine):
    conn = http.client.HTTPConnection("127.0.0.1", https_engine.port, timeout=10)
    try:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/health")
            conn.getresponse()
    finally:
        conn.close()
    assert https_engine.request("GET", "/health", token=False)[0] == 200  # still serving


def test_the_certificate_presented_is_the_one_given(https_engine, certs):
    """A client that trusts another certificate refuses the engine's: it really is that one."""
    context = ssl.create_default_context(cafile=str(certs["other"][0]))
    conn = http.client.HTTPSConnection("127.0.0.1", https_engine.port, timeout=10, context=context)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", "/health")
    finally:
        conn.close()


def run_serve(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m engine serve` over the stand-in engine; (its result, the "model loaded" marker)."""
    marker = tmp_path / "loaded"
    env = dict(os.environ, GEOVQA_CONFIG_DIR=str(tmp_path / "config"),
               GEOVQA_STUB_LOADED=str(marker),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)]))
    cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port",
           str(free_port()), "--state-dir", str(tmp_path / "state"), "--log-level", "warning",
           "--engine-factory", "server_stub:make_engine_noting_the_load", *extra]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done, marker


def test_a_key_of_another_certificate_stops_the_start_with_one_line(certs, tmp_path):
    cert, _ = certs["engine"]
    _, other_key = certs["other"]
    done, marker = run_serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert done.returncode != 0
    assert (done.stdout + done.stderr).strip().splitlines() == [
        f"error: --tls-key {other_key} is not the private key of the certificate in --tls-cert "
        f"{cert} (they are not a pair): give the key that was made with that certificate, or "
        "make both again; docs/protocol.md, 'Starting the engine', shows how to make a "
        "self-signed pair."]
    assert not marker.exists()  # refused before the model loads
    assert not (tmp_path / "state").exists()  # and before the state dir is taken


@pytest.mark.parametrize("given, missing", [("--tls-cert", "--tls-key"), ("--tls-key", "--tls-cert")])
def test_one_of_the_pair_alone_stops_the_start(certs, tmp_path, given, missing):
    cert, key = certs["engine"]
    done, marker = run_serve(tmp_path, given, str(cert if given == "--tls-cert" else key))
    assert done.returncode != 0
    assert (done.stdout + done.stderr).strip().splitlines() == [
        f"error: {given} needs {missing} too: https takes the certificate (--tls-cert) and its "
        "private key (--tls-key), both PEM files."]
    assert not marker.exists()


def test_check_pair_says_what_is_wrong(certs, tmp_path, caplog):
    from engine.tls import TLSFileError, check_pair

    cert, key = certs["engine"]
    other_cert, _ = certs["other"]
    check_pair(cert, key)  # a good pair passes
    cases = [
        ((tmp_path / "nope.pem", key), f"--tls-cert {tmp_path / 'nope.pem'} does not exist"),
        ((cert, tmp_path), f"--tls-key {tmp_path} is a folder, not the private key file"),
        ((key, cert), "holds no PEM certificate: it holds a private key (are --tls-cert and "
                      "--tls-key swapped?)"),
        ((cert, other_cert), "holds no PEM private key: it holds a certificate"),
    ]
    der = tmp_path / "cert.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(cert.read_text()))
    cases.append(((der, key), f"--tls-cert {der} holds no PEM certificate (text starting with "
                              "'-----BEGIN CERTIFICATE-----')"))
    locked = encrypted_copy(key, tmp_path / "locked-key.pem")
    if locked is not None:
        cases.append(((cert, locked), f"--tls-key {locked} is protected by a passphrase, which "
                                      "the engine cannot ask for"))
    # an empty passphrase opens the key in the check, but uvicorn would still ask on the terminal
    empty = encrypted_copy(key, tmp_path / "empty-pass-key.pem", passphrase="")
    if empty is not None:
        assert b"ENCRYPTED" in empty.read_bytes()
        cases.append(((cert, empty), f"--tls-key {empty} is protected by a passphrase, which "
                                     "the engine cannot ask for"))
    for (c, k), expected in cases:
        with pytest.raises(TLSFileError) as exc:
            check_pair(c, k)
        assert expected in str(exc.value), (c, k)
    if os.name == "posix":
        shared = tmp_path / "shared-key.pem"
        shared.write_bytes(key.read_bytes())
        shared.chmod(0o644)
        with caplog.at_level("WARNING", logger="engine.server"):
            check_pair(cert, shared)
        assert f"The TLS private key {shared} can be read by other users" in caplog.text
        assert "chmod 600" in caplog.text
        group = tmp_path / "group-key.pem"
        group.write_bytes(key.read_bytes())
        group.chmod(0o640)
        caplog.clear()
        with caplog.at_level("WARNING", logger="engine.server"):
            check_pair(cert, group)
        assert f"The TLS private key {group} can be read by other users" in caplog.text
        group.chmod(0o600)
        caplog.clear()
        with caplog.at_level("WARNING", logger="engine.server"):
            check_pair(cert, group)
        assert "can be read by other users" not in caplog.text


def test_a_key_of_another_type_is_named_as_not_the_pair(certs, tmp_path):
    """An RSA key given with the EC certificate: OpenSSL says so in other words than for a key of
    the same type, and the check must still tell the user that the two are not a pair."""
    import shutil

    from engine.tls import TLSFileError, check_pair

    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command is not installed")
    cert, _ = certs["engine"]
    rsa_key = tmp_path / "rsa-key.pem"
    subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(rsa_key)], check=True, capture_output=True, timeout=60)
    rsa_key.chmod(0o600)
    with pytest.raises(TLSFileError) as exc:
        check_pair(cert, rsa_key)
    assert f"--tls-key {rsa_key} is not the private key of the certificate in --tls-cert {cert}" \
        in str(exc.value)


def test_the_remote_warning_names_what_travels_unencrypted_and_the_remedies(tmp_path, caplog):
    from engine.server import Settings, check_binding

    with caplog.at_level("WARNING", logger="engine.server"):
        check_binding(Settings(host="0.0.0.0", port=9000, allow_remote=True, state_dir=tmp_path))
    text = caplog.text
    assert "reachable from other computers" in text
    assert "the token and the uploaded rasters travel over the network in plain text" in text
    assert "--tls-cert FILE --tls-key FILE" in text
    assert "SSH tunnel (on the other computer: ssh -L 9000:127.0.0.1:9000" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine.server"):
        check_binding(Settings(host="0.0.0.0", allow_remote=True, state_dir=tmp_path,
                               tls_cert=Path("c.pem"), tls_key=Path("k.pem")))
    assert "reachable from other computers" in caplog.text
    assert "encrypted (TLS)" in caplog.text and "plain text" not in caplog.text
