"""The engine URL and token from the options page: one reading of the URL for the client and for
*Start local engine*, readable errors for a bad port, and a pasted token cleaned of invisible
characters (a bad one must not break the health check, which needs no token)."""

from __future__ import annotations

import pytest
from conftest import fake_engine_python, set_settings, wait_until


@pytest.mark.parametrize("url, expected", [
    ("", ("http", "127.0.0.1", 8765, "")),
    ("http://127.0.0.1", ("http", "127.0.0.1", 8765, "")),
    ("http://localhost/", ("http", "localhost", 8765, "")),
    ("http://[::1]:9000", ("http", "::1", 9000, "")),
    ("https://gpu.example.org/geovqa/", ("https", "gpu.example.org", 443, "/geovqa")),
    ("http://gpu.example.org", ("http", "gpu.example.org", 80, "")),
])
def test_engine_address(url, expected):
    from geovqa.addresses import engine_address

    assert engine_address(url) == expected


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:87650", "invalid port"),
    ("http://127.0.0.1:abc", "invalid port"),
    ("ftp://127.0.0.1:8765", "must start with http"),
    ("http://:8765", "names no host"),
    ("http://127.0.0.1:0", "invalid port"),  # urllib takes port 0 (a review found it saved)
    ("http://127.0.0.1 :8765", "space in its host"),
    ("http://gpu example.org/", "space in its host"),
])
def test_a_bad_engine_url_is_an_engine_error(url, message):
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError

    with pytest.raises(EngineError, match=message) as exc:
        EngineClient(url)
    assert exc.value.code == "bad_url"


@pytest.mark.parametrize("url, host, port", [
    ("http://127.0.0.1", "127.0.0.1", "8765"),
    ("http://localhost/", "127.0.0.1", "8765"),
    ("http://[::1]:9000", "::1", "9000"),
])
def test_start_local_engine_listens_where_the_client_calls(tmp_path, url, host, port):
    from geovqa.engine_process import engine_command
    from geovqa.settings import Settings

    fake_engine_python(tmp_path / ".venv" / "bin" / "python")
    _, args, _ = engine_command(Settings(engine_url=url, engine_dir=str(tmp_path)))
    assert args[args.index("--host") + 1] == host and args[args.index("--port") + 1] == port


@pytest.mark.parametrize("url, extra, message", [
    # the engine would serve plain http while the client speaks TLS: "starting" for ever
    ("https://127.0.0.1:9911", "", "is https://, but a local engine serves plain http"),
    ("http://127.0.0.1:9911", "--tls-cert c.pem --tls-key k.pem", "serves https, but the engine URL"),
    # argparse takes the last --port: the engine would listen where the client never calls
    ("http://127.0.0.1:9911", "--port 9000", "has --port 9000, but the engine URL"),
    ("http://127.0.0.1:9911", "--device cpu --port=9000", "has --port 9000, but the engine URL"),
    # argparse takes an abbreviation that only one option begins with
    ("http://127.0.0.1:9911", "--po 9000", "has --port 9000, but the engine URL"),
    ("http://127.0.0.1:9911", "--p=9000", "has --port 9000, but the engine URL"),
    ("http://127.0.0.1:9911", "--tls-ce c.pem --tls-key k.pem", "serves https, but the engine URL"),
])
def test_start_local_engine_refuses_to_serve_elsewhere_than_the_engine_url(tmp_path, url, extra, message):
    from geovqa.engine_process import EngineProcessError, engine_command, memory_check_command
    from geovqa.settings import Settings

    fake_engine_python(tmp_path / ".venv" / "bin" / "python")
    s = Settings(engine_url=url, engine_dir=str(tmp_path), extra_args=extra)
    with pytest.raises(EngineProcessError, match=message):
        engine_command(s)
    memory_check_command(s)  # serves nothing: Check memory still works


@pytest.mark.parametrize("url, extra", [
    ("https://127.0.0.1:9911", "--tls-cert c.pem --tls-key k.pem"),
    ("https://localhost:9911", "--tls-cert=c.pem --tls-key=k.pem"),
    ("http://127.0.0.1:9911", "--port 9911"),
    ("http://127.0.0.1:9911", "--por 9911 --log-level debug"),
    ("https://127.0.0.1:9911", "--tls-cer c.pem --tls-key k.pem"),
])
def test_start_local_engine_takes_extra_arguments_that_agree_with_the_engine_url(tmp_path, url, extra):
    from geovqa.engine_process import engine_command
    from geovqa.settings import Settings

    fake_engine_python(tmp_path / ".venv" / "bin" / "python")
    _, args, _ = engine_command(Settings(engine_url=url, engine_dir=str(tmp_path), extra_args=extra))
    assert args[args.index("--port") + 1] == "9911" and args[-len(extra.split()):] == extra.split()


def test_start_local_engine_with_a_bad_port_says_so(plugin, qgis_iface, tmp_path):
    fake_engine_python(tmp_path / ".venv" / "bin" / "python")
    set_settings(engine_url="http://127.0.0.1:abc", engine_dir=str(tmp_path))
    from qgis.core import Qgis

    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.start_engine() is False  # used to raise ValueError out of the menu action
    texts = bar.get_messages(Qgis.MessageLevel.Critical)
    assert any("invalid port" in t for t in texts), texts


def test_health_check_with_a_bad_port_shows_the_reason(plugin):
    set_settings(engine_url="http://127.0.0.1:87650")
    dock = plugin.dock
    dock.refresh_health()  # used to raise out of the timer slot on every tick
    assert dock.status_level == "down"
    assert "invalid port" in dock.status_label.text()


def test_an_engine_url_whose_path_finds_no_health_says_to_check_the_path(plugin, stub_engine):
    """An engine URL saved with a path (here .../health, as tested with curl): the status line only
    said 'There is no such endpoint.', nothing about the URL's path."""
    set_settings(engine_url=stub_engine.url + "/health", token=stub_engine.token)
    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None, 15, "the health check")
    text = dock.status_label.text()
    assert dock.status_level == "down"
    assert f"Nothing answers {stub_engine.url}/health/health" in text, text
    assert "Check the path in the engine URL" in text and f"such as {stub_engine.url}," in text, text


def test_pasted_invisible_characters_are_dropped_from_the_token(stub_engine):
    from geovqa.client import clean_token
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import Settings, make_client

    assert clean_token(" abc\u200bdef\ufeff\n") == "abcdef"
    set_settings(token=stub_engine.token + "\u200b\n")
    client = make_client(Settings.load())
    events = list(client.ask(build_ask_request("What?", "/nowhere.tif")).events())
    assert events[-1]["type"] in ("result", "error") and events[-1].get("code") != "unauthorized"


def test_a_token_no_engine_could_have_is_refused_clearly(stub_engine, plugin):
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import Settings, make_client

    set_settings(token="abc\u2013def")  # an en dash from a word processor
    client = make_client(Settings.load())
    assert client.health()["status"] == "ok"  # /health needs no token: the engine is up
    with pytest.raises(EngineError) as exc:
        list(client.ask(build_ask_request("What?", "/nowhere.tif")).events())
    assert exc.value.code == "unauthorized" and "token" in str(exc.value)
    plugin.dock.refresh_health()
    wait_until(lambda: plugin.dock._health_task is None, 10, "the health check")
    assert plugin.dock.status_level != "down"


def test_the_local_engine_token_is_never_sent_to_another_host(qgis_app, tmp_path, monkeypatch):
    """Empty token field + remote URL: the token file of the engine on this computer was sent."""
    from conftest import set_settings
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_text("LOCAL-ENGINE-SECRET\n")
    set_settings(engine_url="http://198.51.100.7:8765", token="")
    assert Settings.load().resolved_token() == ""
    with pytest.raises(EngineError) as err:
        make_client().job("abc")  # refused before any connection is made
    assert err.value.code == "unauthorized" and "another computer" in err.value.message
    assert "Engine token" in err.value.hint
    set_settings(engine_url="http://127.0.0.1:8765")  # the local engine keeps reading its file
    assert Settings.load().resolved_token() == "LOCAL-ENGINE-SECRET"
    (tmp_path / "remote_token").write_text("REMOTE\n")  # a token file chosen by the user is used
    set_settings(engine_url="http://198.51.100.7:8765", token_file=str(tmp_path / "remote_token"))
    assert Settings.load().resolved_token() == "REMOTE"


def test_the_local_engine_token_is_not_sent_through_an_ssh_tunnel(qgis_app, tmp_path, monkeypatch):
    """A 127.0.0.1 URL with "Send rasters: always upload" is the documented SSH-tunnel set-up: the
    engine behind it is on another computer, and it got this computer's engine token."""
    from conftest import set_settings
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings, make_client

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_text("LOCAL-ENGINE-SECRET\n")
    set_settings(engine_url="http://127.0.0.1:8765", token="", token_file="", send_rasters="upload")
    assert Settings.load().resolved_token() == ""
    with pytest.raises(EngineError) as err:
        make_client().job("abc")  # refused before any connection is made
    assert err.value.code == "unauthorized" and "SSH tunnel" in err.value.message
    assert "Engine token" in err.value.hint
    set_settings(token="REMOTE-TYPED")  # the remote engine's token, typed in, is what goes
    assert Settings.load().resolved_token() == "REMOTE-TYPED"
    set_settings(token="", send_rasters="auto")  # the local engine keeps reading its file
    assert Settings.load().resolved_token() == "LOCAL-ENGINE-SECRET"


@pytest.mark.parametrize("content, why", [
    ("token-from-notepad\n".encode("utf-16"), "UTF-16 byte-order mark"),  # Notepad's "Unicode"
    (b"\x80\x81 not a token", "the first at byte 0"),
], ids=["utf16", "binary"])
def test_a_token_file_that_is_not_text_is_refused_clearly(stub_engine, plugin, tmp_path, qgis_iface,
                                                          content, why):
    """A token file holding bytes that are not UTF-8 raised UnicodeDecodeError out of the health
    timer (every tick), the batch dialog and Processing."""
    from conftest import python_errors
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings

    bad = tmp_path / "engine token"
    bad.write_bytes(content)
    set_settings(token="", token_file=str(bad))
    with pytest.raises(EngineError) as exc:
        Settings.load().resolved_token()
    text = str(exc.value)
    assert exc.value.code == "unauthorized" and str(bad) in text and why in text
    assert "ASCII" in text and "Engine token" in text
    _only_asking_fails_with(text, stub_engine)
    dock = plugin.dock
    with python_errors() as errors:
        dock.refresh_health()
        wait_until(lambda: dock._health_task is None, 10, "the health check")
        assert dock.status_level != "down"  # the engine is up; only the token is wrong
        assert "token: unreadable" in dock.diagnostics_text() and str(bad) in dock.diagnostics_text()
        layer_path = tmp_path / "scene.tif"
        from conftest import write_raster
        from qgis.core import QgsProject, QgsRasterLayer

        layer = QgsRasterLayer(write_raster(layer_path), "scene", "gdal")
        QgsProject.instance().addMapLayer(layer)
        dock.set_layer(layer)
        dock.ask("What?")
        wait_until(lambda: dock.turns(layer) and dock.turns(layer)[-1].get("done"), 10, "the answer")
        assert str(bad) in dock.turns(layer)[-1]["error"]
    assert errors == []


def _only_asking_fails_with(text, stub_engine):
    """With a token error `text`, the client is still made and the health check (no token) still
    sees the engine; asking fails with that same error, and nothing reaches the engine."""
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import Settings, make_client

    client = make_client(Settings.load())
    assert client.health()["status"] == "ok"  # the status line still shows the engine
    with pytest.raises(EngineError) as asked:
        list(client.ask(build_ask_request("What?", "/nowhere.tif")).events())
    assert str(asked.value) == text and stub_engine.requests == []  # nothing sent without a token


def _unreadable(path, kind, monkeypatch):
    """Make ``path`` a token file that cannot be read: a folder, or a file without read permission
    (for root, which reads it anyway, reading it is refused as the file system refuses a user)."""
    import os
    from pathlib import Path

    if kind == "a folder":
        path.mkdir(parents=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("secret\n")
    path.chmod(0)
    if os.access(path, os.R_OK):
        read_bytes = Path.read_bytes

        def refused(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refused)


@pytest.mark.parametrize("kind", ["no permission", "a folder"])
def test_a_token_file_that_cannot_be_read_is_named_with_the_reason(stub_engine, tmp_path, monkeypatch, kind):
    """A token file the user may not read counted as "no token": the engine then refused every
    question with a generic "check the engine token"."""
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings

    path = tmp_path / "engine token"
    _unreadable(path, kind, monkeypatch)
    set_settings(token="", token_file=str(path))
    with pytest.raises(EngineError) as exc:
        Settings.load().resolved_token()
    text = str(exc.value)
    assert exc.value.code == "unauthorized" and str(path) in text and "cannot be read" in text
    assert ("Permission denied" if kind == "no permission" else "Is a directory") in text, text
    assert "Engine token" in exc.value.hint
    _only_asking_fails_with(text, stub_engine)


def test_a_chosen_token_file_that_does_not_exist_is_named(stub_engine, tmp_path, monkeypatch):
    """A token file chosen in the settings that is not there (moved, mistyped, on a drive not
    mounted) counted as "no token": the engine then refused every question with a generic "check
    the engine token". The local engine's own file, missing until its first start, still means
    no token, also when it is the file chosen."""
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    path = tmp_path / "gone" / "engine token"
    set_settings(engine_url=stub_engine.url, token="", token_file=str(path))
    with pytest.raises(EngineError) as exc:
        Settings.load().resolved_token()
    text = str(exc.value)
    assert exc.value.code == "unauthorized" and str(path) in text and "does not exist" in text, text
    assert "Engine token" in exc.value.hint
    _only_asking_fails_with(text, stub_engine)
    set_settings(token_file=str(tmp_path / "cfg" / "token"))  # the local engine's own, not made yet
    assert Settings.load().resolved_token() == ""
    set_settings(token_file="")
    assert Settings.load().resolved_token() == ""


@pytest.mark.parametrize("kind", ["no permission", "a folder"])
def test_the_local_engine_token_file_that_cannot_be_read_is_named(qgis_app, tmp_path, monkeypatch, kind):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    set_settings(engine_url="http://127.0.0.1:8765", token="")
    assert Settings.load().resolved_token() == ""  # no file yet (the engine makes it): no token, no error
    _unreadable(tmp_path / "cfg" / "token", kind, monkeypatch)
    with pytest.raises(EngineError) as exc:
        Settings.load().resolved_token()
    assert str(tmp_path / "cfg" / "token") in str(exc.value) and "cannot be read" in str(exc.value)
    assert "start the engine again" in exc.value.hint


def test_the_local_engine_token_file_not_text_says_to_delete_it(qgis_app, tmp_path, monkeypatch):
    from geovqa.engine_errors import EngineError
    from geovqa.settings import Settings

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_bytes(b"\xef\xbb\xbfabc\xff")  # a BOM, then a byte no UTF-8 has
    set_settings(engine_url="http://127.0.0.1:8765", token="")
    with pytest.raises(EngineError) as exc:
        Settings.load().resolved_token()
    assert str(tmp_path / "cfg" / "token") in str(exc.value) and "the first at byte 6" in str(exc.value)
    assert "Delete the file and start the engine again" in exc.value.hint
    (tmp_path / "cfg" / "token").write_bytes(b"\xef\xbb\xbfabc\n")  # UTF-8 with BOM: still read
    from geovqa.settings import make_client

    assert make_client(Settings.load()).token == "abc"


def test_an_engine_url_naming_this_computers_own_address_is_local(qgis_app, tmp_path, monkeypatch):
    """http://192.168.1.20:8765 where that is this computer's LAN address (an engine serving on
    0.0.0.0) was taken for another computer: rasters were uploaded and the local engine's token
    file was not read. Only this computer's interface addresses count; host names are never
    looked up (slow on the user-interface thread, and the connection looks them up again)."""
    import geovqa.settings as settings_mod
    from conftest import set_settings
    from geovqa.addresses import is_own_host
    from geovqa.client import EngineClient
    from geovqa.settings import Settings, make_client, this_computer_addresses

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_text("LOCAL-ENGINE-SECRET\n")
    assert "127.0.0.1" in this_computer_addresses()  # QNetworkInterface, read from the system
    monkeypatch.setattr(settings_mod, "this_computer_addresses",
                        lambda: ("127.0.0.1", "::1", "192.168.1.20", "fe80::1%eth0"))
    set_settings(engine_url="http://192.168.1.20:8765", token="", token_file="", send_rasters="auto")
    assert Settings.load().resolved_token() == "LOCAL-ENGINE-SECRET"
    client = make_client()
    assert client.is_local and not client.uploads and client.token == "LOCAL-ENGINE-SECRET"
    set_settings(engine_url="http://192.168.1.20:8765", send_rasters="upload")  # a tunnel: no local token
    assert Settings.load().resolved_token() == ""
    for url in ("http://192.168.1.21:8765", "http://my-hostname:8765", "http://0.0.0.0:8765",
                "http://224.0.0.1:8765", "http://[::ffff:192.168.1.20]:8765"):
        set_settings(engine_url=url, send_rasters="auto")
        assert Settings.load().resolved_token() == "", url
        assert not make_client().is_local and make_client().uploads, url
    # the client alone (no addresses given) knows only loopback; the answer is kept per client
    assert not EngineClient("http://192.168.1.20:8765").is_local
    assert EngineClient("http://127.0.0.2:8765").is_local and EngineClient("http://localhost").is_local
    assert is_own_host("fe80::1%eth0", ("fe80::1%eth0",)) and not is_own_host("fe80::1%eth1", ("fe80::1%eth0",))


def test_a_localhost_url_is_dialled_at_127_0_0_1(stub_engine, opened_addresses, tmp_path):
    """Windows and macOS resolve localhost to ::1 first; the local engine listens on 127.0.0.1
    only, and Windows tried the refused ::1 for about 2 s before 127.0.0.1, on every call (health
    polls too). The client now opens its connections to 127.0.0.1 itself, and still names
    localhost in the Host header."""
    from conftest import write_raster
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request

    port = stub_engine.port
    client = EngineClient(f"http://localhost:{port}", token=stub_engine.token)
    assert client.health()["status"] == "ok"
    request = build_ask_request("What is there?", write_raster(tmp_path / "scene.tif"))
    assert list(client.ask(request, upload=False).events())[-1]["type"] == "result"
    assert opened_addresses == [("127.0.0.1", port)] * 2
    assert stub_engine.hosts == [f"localhost:{port}"] * 2
    # any other host is dialled as it is typed
    opened_addresses.clear()
    assert EngineClient(f"http://127.0.0.1:{port}").health()["status"] == "ok"
    assert opened_addresses == [("127.0.0.1", port)] and stub_engine.hosts[-1] == f"127.0.0.1:{port}"


def test_this_computers_real_address_is_local(qgis_app):
    """The same with the addresses QNetworkInterface reports here (skipped without a non-loopback one)."""
    import ipaddress

    from geovqa.settings import is_loopback_url, this_computer_addresses

    own = [a for a in this_computer_addresses() if ipaddress.ip_address(a).version == 4
           and not ipaddress.ip_address(a).is_loopback]
    if not own:
        pytest.skip("this computer has no non-loopback IPv4 address")
    assert is_loopback_url(f"http://{own[0]}:8765")


def test_a_long_lived_client_asks_whether_the_local_engine_still_runs_when_refused(qgis_app):
    """The batch dialog and Processing make one client for a whole run: "the local engine is still
    loading" was decided when it was made, and every later row said so after the engine had died."""
    from conftest import free_port

    from geovqa.engine_errors import EngineError
    from geovqa.engine_process import EngineProcess
    from geovqa.settings import make_client

    port = free_port()
    s = set_settings(engine_url=f"http://127.0.0.1:{port}")
    proc = EngineProcess()
    proc.serving = ("http", "127.0.0.1", port)  # started from QGIS, loading
    try:
        client = make_client(s)
        with pytest.raises(EngineError) as loading:
            client.health()
        assert "still loading the model" in str(loading.value)
        proc.serving = None  # it died (or was stopped)
        with pytest.raises(EngineError) as down:
            client.health()
        assert "still loading" not in str(down.value) and "not reachable" in str(down.value)
    finally:
        proc.serving = None


@pytest.mark.parametrize("host, text", [("127.0.0.1", "127.0.0.1:8765"), ("::1", "[::1]:8765")])
def test_a_suggested_engine_address_is_one_the_options_take(host, text):
    """The 404 hint suggested http://::1:8765 for an IPv6 engine, which the options refuse."""
    from geovqa.addresses import engine_address, host_port

    assert host_port(host, 8765) == text
    assert engine_address(f"http://{text}")[1:3] == (host, 8765)


@pytest.mark.parametrize("url, base", [
    ("http://127.0.0.1:8765/health", "http://127.0.0.1:8765"),
    ("http://gpu-box:8765/geovqa/ask/", "http://gpu-box:8765/geovqa"),
    ("http://127.0.0.1:8765/jobs/3f2a9c", "http://127.0.0.1:8765"),
    ("https://gpu-box/geovqa/files/heat.tif", "https://gpu-box/geovqa"),
    ("http://127.0.0.1:8765/ask/more", ""),
    ("http://127.0.0.1:8765/geovqa", ""),
])
def test_an_endpoint_pasted_at_the_end_of_the_engine_url_is_found(url, base):
    """A URL copied from a curl call ends in an endpoint (a job's or a file's with its id or name
    after it): the engine URL is what comes before it; '' for a URL that ends in none."""
    from geovqa.addresses import endpoint_in_url

    assert endpoint_in_url(url) == base


def test_control_characters_pasted_with_the_token_are_dropped():
    """A token pasted from a terminal can bring control characters along (a NUL, an escape, a bell):
    they are dropped with the spaces, not refused as characters no token has."""
    from geovqa.client import clean_token

    assert clean_token("abc\x00def\x1b\x07 ") == "abcdef"


@pytest.mark.parametrize("health, budget", [
    ({"max_read_pixels": 64_000_000}, 64_000_000),
    ({"max_read_pixels": 0}, None),
    ({"max_read_pixels": -1}, None),
    ({"max_read_pixels": True}, None),
    ({"max_read_pixels": "64000000"}, None),
    ({}, None),
    (None, None),
])
def test_the_engines_read_budget_is_a_positive_number_of_pixels_or_none(health, budget):
    """/health's max_read_pixels caps renders and uploads: only a positive integer counts (a JSON
    true is no pixel count: a budget of 1 pixel would shrink every render to one pixel)."""
    from geovqa.client import health_read_budget

    assert health_read_budget(health) == budget


def test_extra_arguments_ending_in_an_option_without_its_value_are_no_crash():
    """'--port' (or --tls-cert) at the end of the extra engine arguments, its value forgotten,
    names no port: the plugin does not fail on it (the engine says what is missing); a port
    quoted with spaces is still that port."""
    from geovqa.engine_process import check_serve_arguments, option_value

    assert option_value(["--weights", "/w", "--port"], "--port", shortest="--p") is None
    assert option_value(["--po", "9000", "--port"], "--port", shortest="--p") == "9000"
    check_serve_arguments("http://127.0.0.1:8765", "http", 8765, ["--weights", "/w", "--port"])
    check_serve_arguments("http://127.0.0.1:8765", "http", 8765, ["--port", " 8765 "])
