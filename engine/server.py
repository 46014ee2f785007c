"""The engine's HTTP server: a FastAPI app over one `Engine`, served by uvicorn on loopback.

`create_app(engine, settings)` builds the app; `serve(args)` is what ``python -m engine serve``
runs (`add_serve_arguments` declares its options). The protocol itself is defined in
`engine/protocol.py` and explained in docs/protocol.md. All GPU work goes through the single
worker of `engine.jobs.JobQueue`; this module only checks requests (with
`engine.request_checks`), streams events and serves the files the engine wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import ipaddress
import json
import logging
import os
import queue
import re
import shutil
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__, protocol
from engine.auth import TokenFileError, load_or_create_token, token_matches
from engine.cli_args import (add_feature_cache_argument, add_model_arguments, positive_int,
                             writable_folder_problem)
from engine.jobs import JOB_ID_RE, JobError, JobQueue, json_default, lock_state_dir
from engine.json_body import parse_json
from engine.parent import parent_pid_from_environment, stop_on_stdin_eof_requested, watch_parent, watch_stdin
from engine.request_checks import request_factory, validate_ask, validate_batch
from engine.tls import TLSFileError, check_pair
from engine.uploads import receive_upload

log = logging.getLogger("engine.server")

MAX_JSON_BODY_BYTES = 4 * 1024 * 1024
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


# ---------------------------------------------------------------------------------------------
# Settings and defaults


def default_state_dir() -> Path:
    """Where batch jobs are kept: the user's data dir (``GEOVQA_STATE_DIR`` overrides)."""
    override = os.environ.get("GEOVQA_STATE_DIR")
    return Path(override) if override else protocol.user_dir("data") / "geovqa" / "server"


@dataclass
class Settings:
    """Everything the app needs besides the engine."""

    host: str = protocol.DEFAULT_HOST
    port: int = protocol.DEFAULT_PORT
    allow_remote: bool = False
    state_dir: Path = field(default_factory=default_state_dir)
    output_dir: Path | None = None  # default: <state_dir>/outputs
    upload_dir: Path | None = None  # default: <state_dir>/uploads
    max_upload_bytes: int = protocol.MAX_UPLOAD_BYTES
    token: str | None = None  # default: read or create protocol.token_path()
    tls_cert: Path | None = None  # PEM certificate and its key: serve over https (engine/tls.py)
    tls_key: Path | None = None
    # an /ask stream silent this long gets a heartbeat event (protocol.heartbeat_interval)
    heartbeat_s: float = field(default_factory=protocol.heartbeat_interval)

    def __post_init__(self) -> None:
        # Absolute: the paths in responses (heatmap_path, results_path) are read by clients
        # that run in another working directory.
        self.state_dir = Path(self.state_dir).resolve()
        if self.output_dir is None:
            self.output_dir = self.state_dir / "outputs"
        if self.upload_dir is None:
            self.upload_dir = self.state_dir / "uploads"
        self.output_dir = Path(self.output_dir).resolve()
        self.upload_dir = Path(self.upload_dir).resolve()


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The app


def create_app(engine: Any, settings: Settings, state_lock: IO | None = None):
    """The FastAPI app serving `engine` (no CORS: browsers on other origins are not welcome).

    `state_lock`: the state dir's lock (`engine.jobs.lock_state_dir`) when the caller holds it
    already; else the app takes it at startup, before the job worker resumes anything."""
    token = settings.token or load_or_create_token()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    output_dir = settings.output_dir.resolve()
    # the queue also applies the output retention to output_dir while serving (engine/jobs.py)
    jobs = JobQueue(engine, settings.state_dir, request_factory(engine), state_lock=state_lock,
                    output_dir=output_dir)
    try:
        engine_strategies = tuple(engine.health().get("strategies") or ())
    except Exception:  # noqa: BLE001 - health is re-read on every /health
        engine_strategies = ()
    known = tuple(s for s in protocol.STRATEGIES if not engine_strategies
                  or s in engine_strategies) or protocol.STRATEGIES

    @asynccontextmanager
    async def lifespan(app):
        jobs.start()
        # uploads left behind by a crash (jobs.start() holds the state dir, so they are stale)
        for stale in settings.upload_dir.glob("upload-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            await asyncio.to_thread(jobs.stop)

    app = FastAPI(title="GeoVQA engine", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jobs = jobs
    app.state.engine = engine
    app.state.settings = settings

    def error_response(err: JobError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=protocol.ERROR_CODES[err.code])

    @app.exception_handler(JobError)
    async def on_job_error(request: Request, exc: JobError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(JobError("not_found", "There is no such endpoint."))
        if exc.status_code == 405:
            response = error_response(JobError(
                "method_not_allowed", f"{request.method} is not allowed on {request.url.path}."))
            response.headers.update(exc.headers or {})  # Allow: the methods that are
            return response
        # anything else the framework refuses (a malformed multipart body: 400) keeps the
        # protocol's pairing of codes and statuses
        code = "internal" if exc.status_code >= 500 else "bad_request"
        return error_response(JobError(code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        # the parameters FastAPI checks itself (DELETE /jobs/{id}?remove=...), named in a sentence,
        # not pydantic's list of dicts
        problems = "; ".join(
            f"'{err.get('loc', ('?',))[-1]}' is {err.get('input')!r}: {err.get('msg', 'not valid')}"
            for err in exc.errors())
        return error_response(JobError("bad_request", f"The request is malformed: {problems}."))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(JobError("internal", f"The engine server failed: "
                                       f"{type(exc).__name__}: {exc}"))

    def content_length(request: Request) -> int:
        try:
            return max(0, int(request.headers.get("content-length") or 0))
        except ValueError:
            raise JobError("bad_request", "The Content-Length header is not a number.") from None

    def require_token(request: Request) -> None:
        if not token_matches(token, request.headers.get(protocol.TOKEN_HEADER)):
            raise JobError("unauthorized", "The engine token is missing or wrong.",
                           f"Send 'Authorization: Bearer <token>' with the token from "
                           f"{protocol.token_path()}.")

    async def read_json(request: Request) -> Any:
        size = content_length(request)
        if size > MAX_JSON_BODY_BYTES:
            raise JobError("bad_request", "The request body is too large.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_JSON_BODY_BYTES:
                raise JobError("bad_request", "The request body is too large.")
        # in a worker thread: 4 MiB of JSON takes most of a second to parse, and the event loop
        # serves every other stream and /health meanwhile
        return await asyncio.to_thread(parse_json, bytes(raw))

    def decorate(event: dict) -> dict:
        if event.get("type") == "result":
            for key in ("heatmap", "anchors"):
                path = event.get(f"{key}_path")
                if path and not event.get(f"{key}_file"):
                    p = Path(path).resolve()
                    if p.parent == output_dir:
                        event[f"{key}_file"] = p.name
        return event

    @app.get("/health")
    async def health():
        try:
            info = dict(await asyncio.to_thread(engine.health))
        except Exception as exc:  # noqa: BLE001
            info = {"status": "error", "message": f"The engine cannot report its state: {exc}"}
        info.setdefault("status", "ok")
        info["protocol"] = protocol.PROTOCOL_VERSION
        info.setdefault("version", __version__)
        info.setdefault("strategies", list(known))
        info.setdefault("adapter", None)
        info.setdefault("adapter_settings", None)
        info["queue_length"] = jobs.queue_length()
        info["max_upload_bytes"] = settings.max_upload_bytes
        info.setdefault("max_read_pixels", None)  # an engine that cannot tell: none known
        info.setdefault("feature_cache_bytes", None)
        info["heartbeat_s"] = settings.heartbeat_s
        return info

    @app.post("/ask")
    async def ask(request: Request):
        require_token(request)
        ctype = request.headers.get("content-type", "")
        upload = None
        if ctype.strip().lower().startswith("multipart/"):  # media types ignore case
            size = content_length(request)
            if size > settings.max_upload_bytes + MAX_JSON_BODY_BYTES:
                raise JobError("upload_too_large", f"The upload ({size} bytes) is larger than the "
                               f"limit of {settings.max_upload_bytes} bytes.",
                               "Clip the layer to the area of interest before uploading.")
            upload = await receive_upload(ctype, request.stream(),
                                          max_bytes=settings.max_upload_bytes,
                                          temp_root=settings.upload_dir)
            body = upload.request
        else:
            body = await read_json(request)
        try:
            fields = await asyncio.to_thread(
                validate_ask, body, known, str(upload.raster_path) if upload else None)
            ask_request = request_factory(engine)(fields)
            if upload is not None and hasattr(ask_request, "raster_identity"):
                ask_request.raster_identity = f"sha256:{upload.sha256}"
        except BaseException as exc:
            if upload is not None:
                await upload.cleanup_off_loop()
                if isinstance(exc, JobError):  # naming "the uploaded raster", not its temp file
                    raise upload.public(exc) from None
            raise
        job = jobs.submit_ask(ask_request, cleanup=upload.cleanup if upload else None,
                              public_error=upload.public if upload else None)

        def line(event: dict) -> bytes:
            return (json.dumps(decorate(event), ensure_ascii=False, default=json_default)
                    + "\n").encode("utf-8")

        async def stream():
            finished = False
            loop = asyncio.get_running_loop()
            last_sent = loop.time()
            try:
                while True:
                    try:
                        event = job.events.get_nowait()
                    except queue.Empty:
                        if await request.is_disconnected():
                            break
                        if loop.time() - last_sent >= settings.heartbeat_s:
                            # silent a while (queued behind a long job, a long prefill): say so,
                            # so a client can tell a busy engine from a dead connection
                            last_sent = loop.time()
                            yield line({"type": "heartbeat", "job_id": job.job_id,
                                        "request_id": getattr(ask_request, "request_id", None)})
                            continue
                        await asyncio.sleep(0.02)
                        continue
                    if event is None:
                        finished = True
                        break
                    last_sent = loop.time()
                    yield line(event)
            finally:
                if not finished:  # the client went away: free the GPU
                    jobs.cancel(job.job_id)

        return StreamingResponse(stream(), media_type=protocol.NDJSON_MEDIA_TYPE,
                                 headers={"Cache-Control": "no-store", "X-Job-Id": job.job_id,
                                          protocol.HEARTBEAT_HEADER: f"{settings.heartbeat_s:g}"})

    @app.post("/batch")
    async def batch(request: Request):
        require_token(request)
        body = await read_json(request)
        spec = await asyncio.to_thread(validate_batch, body, known)
        # writing the job's folder syncs spec.json and state.json to disk: off the event loop too
        job = await asyncio.to_thread(jobs.submit_batch, spec)
        return {"job_id": job.job_id, **job.info()}

    def find_job(job_id: str):
        info = jobs.info(job_id) if JOB_ID_RE.match(job_id) else None
        if info is None:
            raise JobError("not_found", f"There is no job {job_id!r}.")
        return info

    # a job not held in memory is read from its folder: off the event loop, as every disk read
    @app.get("/jobs/{job_id}")
    async def job_info(job_id: str, request: Request):
        require_token(request)
        return await asyncio.to_thread(find_job, job_id)

    @app.delete("/jobs/{job_id}")
    async def job_cancel(job_id: str, request: Request, remove: bool = False):
        """Cancel a waiting or running job; ``?remove=true`` also removes a finished batch job
        (docs/protocol.md)."""
        require_token(request)
        info = await asyncio.to_thread(jobs.cancel, job_id, remove)
        if info is None:  # no such job (JobQueue.cancel looks it up as GET does)
            raise JobError("not_found", f"There is no job {job_id!r}.")
        return info

    def results_response(job_id: str) -> JSONResponse:
        """The answer of ``GET /jobs/{id}/results``: a batch's results.jsonl read and encoded
        (megabytes and about a second for 10,000 answers), so it runs in a worker thread."""
        results = jobs.results(job_id)
        if results is None:
            raise JobError("not_found", f"Job {job_id!r} is not a batch job.")
        return JSONResponse({"job_id": job_id, "results": results})

    @app.get("/jobs/{job_id}/results")
    async def job_results(job_id: str, request: Request):
        require_token(request)
        await asyncio.to_thread(find_job, job_id)
        # off the event loop: streamed answers and /health go on meanwhile
        return await asyncio.to_thread(results_response, job_id)

    @app.get("/files/{name}")
    async def files(name: str, request: Request):
        require_token(request)
        path = output_dir / name
        if (not FILE_NAME_RE.match(name) or path.resolve().parent != output_dir
                or not path.is_file()):
            raise JobError("not_found", f"There is no output file {name!r}.")
        media = ("image/tiff" if name.lower().endswith((".tif", ".tiff"))
                 else "application/geo+json" if name.lower().endswith((".geojson", ".json"))
                 else "application/octet-stream")
        return FileResponse(path, media_type=media, filename=name)

    return app


# ---------------------------------------------------------------------------------------------
# Command line


def port_number(text: str) -> int:
    """argparse type of --port: refused before anything loads rather than when binding."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1 to 65535)")
    return port


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m engine serve``."""
    add_model_arguments(parser)
    parser.add_argument("--host", default=protocol.DEFAULT_HOST,
                        help="address to bind (loopback by default)")
    parser.add_argument("--port", type=port_number, default=protocol.DEFAULT_PORT,
                        help=f"TCP port to listen on, 1-65535 (default {protocol.DEFAULT_PORT})")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding to a non-loopback address (other computers can then "
                        "reach the engine; they still need the token)")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="PEM certificate: serve over https (with --tls-key); encrypts the token "
                        "and rasters on the way, for --allow-remote")
    parser.add_argument("--tls-key", default=None, metavar="FILE",
                        help="the PEM private key of --tls-cert (unencrypted, readable by you only)")
    parser.add_argument("--state-dir", default=None,
                        help=f"batch jobs, outputs and uploads (default {default_state_dir()})")
    parser.add_argument("--output-dir", default=None,
                        help="heatmaps and anchors (default <state-dir>/outputs)")
    parser.add_argument("--max-upload-bytes", type=positive_int, default=protocol.MAX_UPLOAD_BYTES,
                        help="largest uploaded raster accepted, in bytes (at least 1)")
    add_feature_cache_argument(parser)
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    # For tests and embedding: build the engine with "module:callable"(args, settings).
    parser.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    return Settings(
        host=args.host, port=args.port, allow_remote=args.allow_remote, state_dir=state_dir,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        max_upload_bytes=args.max_upload_bytes,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
    )


def check_binding(settings: Settings) -> None:
    """Refuse a non-loopback address without --allow-remote; warn when it is allowed."""
    if is_loopback(settings.host):
        return
    if not settings.allow_remote:
        raise SystemExit(
            f"error: refusing to listen on {settings.host}: other computers could reach the "
            "engine. Use --allow-remote if that is what you want.")
    if settings.tls_cert is not None:
        log.warning("Listening on %s: the engine is reachable from other computers. Only clients "
                    "with the token (%s) are served; traffic is encrypted (TLS).",
                    settings.host, protocol.token_path())
        return
    log.warning("Listening on %s: the engine is reachable from other computers. Only clients "
                "with the token (%s) are served, but traffic is NOT encrypted: the token and the "
                "uploaded rasters travel over the network in plain text. Start the engine with "
                "--tls-cert FILE --tls-key FILE (https), or keep it on 127.0.0.1 and reach it "
                "through an SSH tunnel (on the other computer: ssh -L %d:127.0.0.1:%d <this computer>).",
                settings.host, protocol.token_path(), settings.port, settings.port)


def check_tls(settings: Settings) -> None:
    """Refuse a --tls-cert without --tls-key (or the reverse), and a pair that uvicorn could not
    load (engine/tls.py), with one ``error: ...`` line before anything loads."""
    if settings.tls_cert is None and settings.tls_key is None:
        return
    if settings.tls_cert is None or settings.tls_key is None:
        given, missing = (("--tls-cert", "--tls-key") if settings.tls_key is None
                          else ("--tls-key", "--tls-cert"))
        raise SystemExit(f"error: {given} needs {missing} too: https takes the certificate "
                         "(--tls-cert) and its private key (--tls-key), both PEM files.")
    try:
        check_pair(settings.tls_cert, settings.tls_key)
    except TLSFileError as exc:
        raise SystemExit(f"error: {exc}") from None


def build_engine(args: argparse.Namespace, settings: Settings) -> Any:
    if args.engine_factory:
        module_name, _, attr = args.engine_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "make_engine")
        return factory(args, settings)
    from engine.pipeline import Engine

    return Engine(args.weights, device=args.device, quantization=args.quantization,
                  adapter=args.adapter, demo_ok=not args.no_demo, output_dir=settings.output_dir,
                  feature_cache_bytes=args.feature_cache_bytes)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not listening yet (uvicorn listens once the model is loaded,
    so clients are refused, not left hanging, while it loads).

    Binding before the model loads finds a port in use in a second instead of minutes later;
    failures raise SystemExit with one ``error: ...`` sentence, which the plugin shows."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name == "posix":  # restart at once despite old connections in TIME_WAIT; on Windows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # it would share the port
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: {bind_failure(host, port, exc)}") from None
    return sock


def bind_failure(host: str, port: int, exc: OSError) -> str:
    """A sentence for a person on why host:port cannot be bound."""
    if isinstance(exc, socket.gaierror):  # a host name that does not resolve
        return f"{host} is not a known address, so the engine cannot listen on it."
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is in use (another engine?). Stop the program using it, "
                "or start the engine with another --port.")
    if exc.errno == errno.EACCES:
        return (f"port {port} on {host} may not be used by this user (on Linux and macOS ports "
                "below 1024 need administrator rights); start the engine with another --port.")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this computer, so the engine cannot listen on it."
    return f"cannot listen on {host} port {port}: {exc.strerror or exc}"


def serve(args: argparse.Namespace) -> None:
    """Run the server until interrupted (``python -m engine serve``)."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    parent = parent_pid_from_environment()
    if parent is not None:  # started by the QGIS plugin: end when that QGIS dies (engine/parent.py)
        watch_parent(parent)
    if stop_on_stdin_eof_requested():  # the plugin's Stop closes our standard input (engine/parent.py)
        watch_stdin()
    check_tls(settings)
    check_binding(settings)
    try:
        settings.token = load_or_create_token()
    except TokenFileError as exc:  # one line saying what to do, as for the other start refusals
        raise SystemExit(f"error: {exc}") from None
    # Everything that can refuse the start is checked before the model loads (minutes with
    # real weights): the state dir's lock, then the port (its lock, then the socket).
    with contextlib.ExitStack() as held:  # all released on a failure, and when the server ends
        state_lock = lock_state_dir(settings.state_dir)
        app = None

        @held.callback
        def release_state_dir() -> None:
            # once the app exists, its job queue lets the lock go, and only when its worker has
            # ended: a step still running keeps the state dir until this process exits
            jobs = getattr(getattr(app, "state", None), "jobs", None)
            if jobs is not None:
                jobs.release_state_lock()
            else:
                state_lock.close()

        for folder, option in ((settings.output_dir, "--output-dir"),
                               (settings.upload_dir, "uploads folder (<state-dir>/uploads)")):
            problem = writable_folder_problem(folder, option)
            if problem:
                raise SystemExit(f"error: {problem}")
        held.enter_context(lock_port(settings.host, settings.port))
        sock = held.enter_context(bind_socket(settings.host, settings.port))
        engine = build_engine(args, settings)
        if getattr(engine, "demo", False):  # as loudly as `ask` and `make run` say it
            from engine.weights import demo_model_note

            log.warning(demo_model_note(getattr(args, "weights", None)))
        app = create_app(engine, settings, state_lock=state_lock)
        scheme = "https" if settings.tls_cert is not None else "http"
        log.info("GeoVQA engine on %s://%s:%d (token in %s, state in %s)", scheme, settings.host,
                 settings.port, protocol.token_path(), settings.state_dir)
        # uvicorn wraps the pre-bound socket in TLS itself (create_server(sock=..., ssl=...))
        tls = ({"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
               if settings.tls_cert is not None else {})
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                log_level=args.log_level, access_log=False, **tls)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C after uvicorn's own graceful shutdown: a normal end
            pass
        except OSError as exc:  # listen() failed after all
            raise SystemExit(f"error: {bind_failure(settings.host, settings.port, exc)}") from None


def lock_port(host: str, port: int):
    """A lock on `port` in the user's config folder, held while this engine runs. Two engines
    that start together would both bind the port (SO_REUSEADDR, not listening while the model
    loads) and the second would fail only after its load; the lock refuses it at once."""
    from engine.jobs import exclusive_lock

    folder = protocol.token_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(folder / f"port-{port}.lock")
    if lock is None:
        raise SystemExit(f"error: {bind_failure(host, port, OSError(errno.EADDRINUSE, 'in use'))}")
    return lock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.server", description=serve.__doc__)
    add_serve_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
