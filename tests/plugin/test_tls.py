"""An engine on an https:// URL: the client trusts the system's store or the *CA certificate*
setting's PEM file (a self-signed engine), never skips the check, and says in a sentence what to
do when TLS is why a connection fails (not trusted, another host's certificate, plain HTTP on an
https URL, an https engine asked with http://, a CA file that cannot be used).

Certificates are made here (tests/engine/tls_certs.py: `openssl` or `cryptography`; skipped
without either). The stand-in engine is wrapped in TLS; one test runs the real `engine serve
--tls-cert --tls-key` (over its stand-in model) with the plugin's client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ENGINE_PY, StubEngine, python_errors, set_settings, wait_until, write_raster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tls_certs import make_pair  # noqa: E402

LABEL = "CA certificate (PEM)"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """'engine': for 127.0.0.1 and localhost; 'other': an unrelated one; 'elsewhere': made out
    for gpu.example.org only."""
    folder = tmp_path_factory.mktemp("certs")
    pairs = {"engine": make_pair(folder, "engine"), "other": make_pair(folder, "other"),
             "elsewhere": make_pair(folder, "elsewhere", hosts=("gpu.example.org",))}
    if None in pairs.values():
        pytest.skip("neither the openssl command nor the cryptography package is installed")
    return pairs


@pytest.fixture
def https_stub(tmp_path, certs):
    eng = StubEngine(tmp_path / "stub_out", tls=certs["engine"])
    yield eng
    eng.close()


def ask_events(client, tmp_path):
    from geovqa.engine_protocol import build_ask_request

    raster = write_raster(tmp_path / "scene.tif")
    return list(client.ask(build_ask_request("What is there?", raster), upload=False).events())


def test_the_client_talks_to_an_https_engine_with_the_ca_setting(https_stub, certs, tmp_path):
    from geovqa.settings import Settings, make_client

    assert https_stub.url.startswith("https://")
    set_settings(engine_url=https_stub.url, token=https_stub.token, ca_cert=str(certs["engine"][0]))
    client = make_client(Settings.load())
    assert client.health()["status"] == "ok"
    events = ask_events(client, tmp_path)
    assert events[-1]["type"] == "result" and "64 x 48 pixels" in events[-1]["answer"]
    assert len(https_stub.requests) == 1  # the token went over TLS and was accepted
    # the same engine by its other name in the certificate
    set_settings(engine_url=https_stub.url.replace("127.0.0.1", "localhost"))
    assert make_client(Settings.load()).health()["status"] == "ok"


def test_without_the_ca_setting_a_self_signed_engine_is_not_trusted(https_stub, plugin, tmp_path):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    set_settings(engine_url=https_stub.url, token=https_stub.token, ca_cert="")
    client = make_client(Settings.load())
    with pytest.raises(EngineError) as exc:
        client.health()
    err = exc.value
    assert err.code == "tls_untrusted"
    assert err.message == (f"The engine at {https_stub.url} presents a certificate this computer does "
                           "not trust (self-signed certificate).")
    assert "copy its certificate file (the one given to --tls-cert, never the key)" in err.hint
    assert f"Settings > Options > GeoVQA > {LABEL}" in err.hint
    with pytest.raises(EngineError) as asked:
        ask_events(client, tmp_path)
    assert asked.value.code == "tls_untrusted"
    assert https_stub.requests == []  # nothing, token included, went to an untrusted engine
    dock = plugin.dock
    with python_errors() as errors:
        dock.refresh_health()
        wait_until(lambda: dock._health_task is None, 10, "the health check")
    assert errors == []
    assert dock.status_level == "down" and "does not trust" in dock.status_label.text()


def test_a_remote_https_engine_not_trusted_is_said_so_while_a_local_engine_runs(https_stub, plugin, tmp_path):
    """A local engine still running (started earlier), the engine URL switched to a remote https
    engine whose self-signed certificate is not chosen yet: the status line said the local engine
    was starting instead of the TLS reason."""
    from test_lifecycle import _stand_in_for_the_plugins_engine

    proc = _stand_in_for_the_plugins_engine(plugin, tmp_path)
    try:
        set_settings(engine_url=https_stub.url, token=https_stub.token, ca_cert="")
        dock = plugin.dock
        wait_until(lambda: dock._health_task is None, 15, "the running health check")
        dock.refresh_health()
        wait_until(lambda: dock._health_task is None, 15, "the health check")
        text = dock.status_label.text()
        assert "starting" not in text and "does not trust" in text, text
    finally:
        proc.shutdown(wait_ms=200)


def test_a_ca_file_of_another_certificate_says_it_is_not_the_engines(https_stub, certs):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    other = str(certs["other"][0])
    set_settings(engine_url=https_stub.url, token=https_stub.token, ca_cert=other)
    with pytest.raises(EngineError) as exc:
        make_client(Settings.load()).health()
    assert exc.value.code == "tls_untrusted"
    assert f"({other}) is not the one the engine uses" in exc.value.hint


def test_a_certificate_for_another_host_is_a_host_mismatch(tmp_path, certs):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    eng = StubEngine(tmp_path / "stub_out", tls=certs["elsewhere"])
    try:
        set_settings(engine_url=eng.url, token=eng.token, ca_cert=str(certs["elsewhere"][0]))
        with pytest.raises(EngineError) as exc:
            make_client(Settings.load()).health()
    finally:
        eng.close()
    assert exc.value.code == "tls_host_mismatch"
    assert exc.value.message.startswith(
        f"The engine's certificate is not made out for 127.0.0.1, the host in the engine URL {eng.url} "
        "(IP address mismatch")
    assert "with 127.0.0.1 in its subjectAltName" in exc.value.hint


def test_a_localhost_url_is_dialled_at_127_0_0_1_and_checked_as_localhost(tmp_path, opened_addresses):
    """A localhost URL is connected to 127.0.0.1 (where the local engine listens; Windows and
    macOS look localhost up as ::1 first), and the TLS server name stays localhost: a certificate
    made out for localhost only still verifies (checked against 127.0.0.1 it would not)."""
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    pair = make_pair(tmp_path / "certs", "localhost-only", hosts=("localhost",))
    if pair is None:
        pytest.skip("neither the openssl command nor the cryptography package is installed")
    eng = StubEngine(tmp_path / "stub_out", tls=pair)
    try:
        set_settings(engine_url=f"https://localhost:{eng.port}", token=eng.token, ca_cert=str(pair[0]))
        assert make_client(Settings.load()).health()["status"] == "ok"
        assert opened_addresses == [("127.0.0.1", eng.port)] and eng.hosts == [f"localhost:{eng.port}"]
        set_settings(engine_url=eng.url)  # https://127.0.0.1:port: not a name in the certificate
        with pytest.raises(EngineError) as exc:
            make_client(Settings.load()).health()
        assert exc.value.code == "tls_host_mismatch"
    finally:
        eng.close()


def test_an_https_url_to_an_engine_speaking_plain_http_says_so(stub_engine, certs):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    url = stub_engine.url.replace("http://", "https://")
    set_settings(engine_url=url, ca_cert=str(certs["engine"][0]))
    with pytest.raises(EngineError) as exc:
        make_client(Settings.load()).health()
    assert exc.value.code == "tls_not_https"
    assert exc.value.message == (f"The engine at 127.0.0.1:{stub_engine.port} speaks plain HTTP, not "
                                 f"HTTPS, so {url} cannot reach it.")
    assert "--tls-cert and --tls-key" in exc.value.hint and "http://" in exc.value.hint


def test_an_http_url_to_an_https_engine_says_to_use_https(https_stub):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    url = https_stub.url.replace("https://", "http://")
    set_settings(engine_url=url, token=https_stub.token)
    with pytest.raises(EngineError) as exc:
        make_client(Settings.load()).health()
    assert exc.value.code == "tls_needs_https"
    assert exc.value.message == f"The engine at {url} only speaks HTTPS (it was started with --tls-cert)."
    assert f"Change the engine URL to {https_stub.url} in Settings" in exc.value.hint


def test_a_plain_engine_that_went_away_is_still_not_reachable(stub_engine):
    """The http/https probes only name TLS when TLS is the reason."""
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    client = make_client(Settings.load())
    stub_engine.close()
    with pytest.raises(EngineError) as exc:
        client.health()
    assert exc.value.code == "engine_down"


@pytest.mark.parametrize("kind", ["missing", "folder", "not_pem"])
def test_a_ca_file_that_cannot_be_used_is_named(https_stub, certs, tmp_path, kind):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    path = {"missing": tmp_path / "nope.pem", "folder": tmp_path, "not_pem": tmp_path / "notes.txt"}[kind]
    if kind == "not_pem":
        path.write_text("not a certificate\n")
    why = {"missing": "does not exist", "folder": "is a folder, not a certificate file",
           "not_pem": "holds no PEM certificate"}[kind]
    set_settings(engine_url=https_stub.url, token=https_stub.token, ca_cert=str(path))
    client = make_client(Settings.load())  # made: the file is read at the first https connection
    with pytest.raises(EngineError) as exc:
        client.health()
    assert exc.value.code == "tls_ca_file"
    assert exc.value.message.startswith(f"The CA certificate file {path} {why}")
    assert "clear that setting to trust the system's certificate authorities" in exc.value.hint
    set_settings(engine_url="http://127.0.0.1:1")  # an http URL never reads it
    with pytest.raises(EngineError) as down:
        make_client(Settings.load()).health()
    assert down.value.code == "engine_down"


def test_the_ca_certificate_on_the_options_page(qgis_app, tmp_path):
    from geovqa.settings import Settings
    from geovqa.settings_page import SettingsForm
    from qgis.PyQt.QtWidgets import QFormLayout

    form = SettingsForm()
    assert form.ca_cert.filePath() == ""  # the default: the system's trust store
    layout = form.layout()
    assert isinstance(layout, QFormLayout) and layout.labelForField(form.ca_cert).text() == LABEL
    form.ca_cert.setFilePath(str(tmp_path / "engine-cert.pem"))
    form.apply()
    assert Settings.load().ca_cert == str(tmp_path / "engine-cert.pem")
    assert SettingsForm().ca_cert.filePath() == str(tmp_path / "engine-cert.pem")


def test_diagnostics_name_the_ca_certificate(plugin, tmp_path):
    assert "CA certificate: system trust store" in plugin.dock.diagnostics_text()
    set_settings(ca_cert=str(tmp_path / "engine-cert.pem"))
    assert f"CA certificate: {tmp_path / 'engine-cert.pem'}" in plugin.dock.diagnostics_text()


def test_the_local_token_is_still_never_sent_to_a_remote_https_engine(qgis_app, tmp_path, monkeypatch, certs):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_text("LOCAL-ENGINE-SECRET\n")
    set_settings(engine_url="https://198.51.100.7:8765", token="", ca_cert=str(certs["engine"][0]))
    assert Settings.load().resolved_token() == ""
    with pytest.raises(EngineError) as err:
        make_client().job("abc")  # refused before any connection is made
    assert err.value.code == "unauthorized" and "another computer" in err.value.message


def test_the_real_engine_served_over_https(tmp_path, certs):
    """`python -m engine serve --tls-cert --tls-key` (uvicorn on its pre-bound socket, over the
    engine tests' stand-in model) with the plugin's client: trusted with the setting, not without."""
    import subprocess

    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    if not ENGINE_PY.exists() or subprocess.run([str(ENGINE_PY), "-c", "import engine.server"],
                                                capture_output=True, timeout=120).returncode != 0:
        pytest.skip(f"the engine cannot be imported with {ENGINE_PY}")
    from serverutil import stub_server

    cert, key = certs["engine"]
    srv = stub_server(0.0, "--tls-cert", str(cert), "--tls-key", str(key), module="engine",
                      subcommand=["serve"], python=str(ENGINE_PY), ca_file=cert)
    srv.start()
    try:
        set_settings(engine_url=srv.url, token=srv.token, ca_cert=str(cert))
        client = make_client(Settings.load())
        assert client.health()["protocol"] == 1
        events = ask_events(client, tmp_path)
        assert events[-1]["type"] == "result", events[-1]
        set_settings(ca_cert="")
        with pytest.raises(EngineError) as exc:
            make_client(Settings.load()).health()
        assert exc.value.code == "tls_untrusted" and "does not trust" in exc.value.message
        set_settings(engine_url=srv.url.replace("https://", "http://"))
        with pytest.raises(EngineError) as exc:
            make_client(Settings.load()).health()
        assert exc.value.code == "tls_needs_https"
    finally:
        srv.cleanup()


def test_an_expired_certificate_says_to_make_a_new_one(qgis_app):
    """(The verify code OpenSSL gives an expired certificate; one cannot be made with every openssl.)"""
    import ssl

    from geovqa.client import EngineClient
    from geovqa.tls import certificate_error

    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code, exc.verify_message = 10, "certificate has expired"
    err = certificate_error(EngineClient("https://gpu.example.org:8765", ca_file="/c.pem"), exc)
    assert err.code == "tls_untrusted"
    assert err.message == ("The engine at https://gpu.example.org:8765 presents a certificate this computer "
                           "does not trust (certificate has expired).")
    assert err.hint.startswith("Make a new certificate on the engine's computer and start the engine with it")
    assert "check the clocks of both computers" in err.hint


def test_the_tls_probes_dial_localhost_at_127_0_0_1(stub_engine, opened_addresses):
    """After a failed https connection the plugin probes the port (plain HTTP? TLS at all?) to
    say what went wrong; the probes dialled ``localhost`` as the system resolves it (::1 first on
    Windows and macOS, where no local engine listens), not at 127.0.0.1 as the client does."""
    from geovqa.tls import speaks_plain_http, speaks_tls

    port = int(stub_engine.url.rsplit(":", 1)[1])
    assert speaks_plain_http("localhost", port)
    assert not speaks_tls("localhost", port)  # a plain HTTP engine
    assert opened_addresses == [("127.0.0.1", port), ("127.0.0.1", port)]


def test_an_https_engine_port_that_accepts_and_never_shakes_hands_is_not_called_unreachable():
    """The connection to an https engine URL is made, and the TLS handshake then gets no answer (a
    hung program holds the port): the engine was reached, so it is said to accept the connection
    without answering, not to be unreachable with a hint to start it."""
    import socket

    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(4)  # the kernel completes the connection; nobody ever reads or answers
    try:
        client = EngineClient(f"https://127.0.0.1:{hole.getsockname()[1]}", timeout=1.0)
        with pytest.raises(EngineError) as err:
            client.health()
    finally:
        hole.close()
    assert err.value.code == "no_answer", (err.value.code, str(err.value))
    assert "did not answer within" in str(err.value) and "not reachable" not in str(err.value)
