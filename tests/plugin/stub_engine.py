"""A small protocol-following stand-in for the engine server, for plugin tests that must not
depend on torch (engine down/slow, supersede, error events). Standard library + GDAL only.

It really reads the raster it is asked about (size, georeference) and writes a real heatmap
GeoTIFF and anchors GeoJSON in the raster's CRS, so layer alignment is tested for real; the
answer text is a plain description of the raster, not a model output. It takes uploads
(multipart ``request`` + ``raster``, as an engine on another computer does): each is kept in
``uploads`` (its request, bytes' SHA-256 and size, the saved file) and answered about. The
end-to-end tests use the real engine (see conftest.real_engine). ``tls=(cert, key)`` serves it
over https, as ``serve --tls-cert --tls-key`` does.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from osgeo import gdal


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler that answers JSON (`_json`): the base of the stand-in engines."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StubEngine:
    def __init__(self, out_dir: Path, token: str = "stub-token", token_delay: float = 0.0, tls=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.token_delay = token_delay
        self.requests: list[dict] = []
        self.default_strategy = "geollava"  # used for a request without one (an adapter's: set it)
        self.uploads: list[dict] = []
        self.status = "ok"
        self.max_upload_bytes = 1 << 30
        self.max_read_pixels = None  # /health's max_read_pixels; None: left out, as an older engine does
        self.health_calls = 0
        self.hosts: list[str] = []  # the Host header of each request, as it came
        self.fail_with: dict | None = None
        # True: the real engine's status events (engine/pipeline.py: read, the vision tower tile
        # batch by tile batch, select, prefill, the answer tokens, write); else one "read" at 20 %
        self.engine_stages = False
        # the "queued" events of each answer: the jobs ahead of it, as the queue moves up (0: it starts)
        self.queue_positions = [0]
        self.no_anchors = False  # True: an anchors GeoJSON with no feature (no anchor kept)
        # seconds: the X-Heartbeat-S header of each answer, as the engine sends it (None: not sent,
        # as an older engine)
        self.heartbeat_s = None
        stub = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802
                stub.hosts.append(self.headers.get("Host"))
                if self.path == "/health":
                    stub.health_calls += 1
                    self._json(200, stub.health())
                else:
                    self._json(404, {"error": {"code": "not_found", "message": "no such path", "hint": None}})

            def do_POST(self):  # noqa: N802
                stub.hosts.append(self.headers.get("Host"))
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    self._json(401, {"error": {"code": "unauthorized", "message": "Wrong token.", "hint": None}})
                    return
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ctype = self.headers.get("Content-Type", "")
                body = stub.receive_upload(ctype, data) if ctype.startswith("multipart/") else json.loads(data)
                stub.requests.append(body)
                if self.path != "/ask":
                    self._json(404, {"error": {"code": "not_found", "message": "no such path", "hint": None}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                if stub.heartbeat_s is not None:
                    self.send_header("X-Heartbeat-S", f"{stub.heartbeat_s:g}")
                self.end_headers()
                try:
                    for ev in stub.events(body):
                        line = (json.dumps(ev) + "\n").encode()
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:  # the handshake happens in accept(); a failed one drops that client
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def receive_upload(self, content_type: str, data: bytes) -> dict:
        """The request of a multipart upload, with ``raster_path`` the saved raster part."""
        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                 for p in msg.iter_parts()}
        request = json.loads(parts["request"])
        folder = self.out_dir / "uploads"
        folder.mkdir(exist_ok=True)
        saved = folder / f"{len(self.uploads)}.tif"
        saved.write_bytes(parts["raster"])
        self.uploads.append({"request": dict(request), "sha256": hashlib.sha256(parts["raster"]).hexdigest(),
                             "size": len(parts["raster"]), "path": str(saved)})
        return dict(request, raster_path=str(saved))

    def health(self) -> dict:
        return {"status": self.status, "protocol": 1, "version": "stub", "model": "stub-engine",
                "demo_model": True, "weights_present": False, "weights_dir": None, "device": "cpu",
                "gpu_name": None, "gpu_free_bytes": None, "quantization": "fp32", "four_bit": False,
                "attention": "eager", "queue_length": 0, "strategies": ["geollava"], "message": None,
                "max_upload_bytes": self.max_upload_bytes,
                **({"max_read_pixels": self.max_read_pixels} if self.max_read_pixels else {})}

    def events(self, req: dict):
        rid = req.get("request_id")
        for position in self.queue_positions:
            yield {"type": "queued", "request_id": rid, "position": position}
        if self.fail_with:
            yield dict(self.fail_with, type="error", request_id=rid)
            return
        ds = gdal.Open(req["raster_path"])
        if ds is None:
            yield {"type": "error", "request_id": rid, "code": "raster_unreadable",
                   "message": f"Cannot open {req['raster_path']}", "hint": None}
            return
        if self.engine_stages:
            yield {"type": "status", "request_id": rid, "stage": "read", "progress": None,
                   "message": "reading the raster"}
            for done in (1, 2):
                yield {"type": "status", "request_id": rid, "stage": "vision", "progress": done / 2,
                       "message": f"vision tower: {done}/2 tiles"}
            yield {"type": "status", "request_id": rid, "stage": "select", "progress": None,
                   "message": f"selecting visual tokens ({req.get('strategy')})"}
            yield {"type": "status", "request_id": rid, "stage": "prefill", "progress": None,
                   "message": "reading the image tokens"}
        else:
            yield {"type": "status", "request_id": rid, "stage": "read", "progress": 0.2, "message": "reading"}
        col, row, w, h = 0, 0, ds.RasterXSize, ds.RasterYSize
        aoi = req.get("aoi") or {}
        if "window" in aoi:
            col, row, w, h = aoi["window"]
        answer = f"The area is {w} x {h} pixels with {ds.RasterCount} bands."
        for word in answer.split(" "):
            time.sleep(self.token_delay)
            yield {"type": "token", "request_id": rid, "text": word + " "}
        if self.engine_stages:
            yield {"type": "status", "request_id": rid, "stage": "write", "progress": None,
                   "message": "writing the heatmap"}
        heat, anchors = self._write_outputs(ds, rid, (col, row, w, h))
        yield {"type": "result", "request_id": rid, "answer": answer,
               "tokens": {"visual_candidates": 576, "visual_kept": 4, "prompt": 40, "generated": 10},
               "timings": {"read": 0.0, "vision": 0.0, "select": 0.0, "prefill": 0.0, "generate": 0.0, "total": 0.1},
               "peak_memory_bytes": None, "cache": {"features": False, "kv_prefix": False},
               "heatmap_path": str(heat), "heatmap_file": heat.name, "anchors_path": str(anchors),
               "anchors_file": anchors.name, "anchors": json.loads(anchors.read_text()),
               "crs_wkt": ds.GetProjection(), **self.bands_seen(ds, req.get("bands")),
               # the strategy used: as the engine, the adapter's (default_strategy) when left out
               "strategy": req.get("strategy") or self.default_strategy, "budget": req.get("budget")}

    @staticmethod
    def bands_seen(ds, bands) -> dict:
        """The result's ``bands`` and ``palette``, chosen as the engine does (engine/band_choice.py
        choose_bands): the request's bands (one as grey), else the bands tagged red, green and
        blue, else the first three non-alpha ones; one band as grey, or a paletted one's colours."""
        if bands:
            return {"bands": list(bands) * 3 if len(bands) == 1 else list(bands), "palette": False}
        interp = [ds.GetRasterBand(i + 1).GetColorInterpretation() for i in range(ds.RasterCount)]
        rgb = [interp.index(c) + 1 if c in interp else None
               for c in (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)]
        if all(rgb):
            return {"bands": rgb, "palette": False}
        colour = [i + 1 for i, c in enumerate(interp) if c != gdal.GCI_AlphaBand] or [1]
        if len(colour) >= 3:
            return {"bands": colour[:3], "palette": False}
        first = ds.GetRasterBand(colour[0])
        palette = interp[colour[0] - 1] == gdal.GCI_PaletteIndex and first.GetColorTable() is not None
        return {"bands": [colour[0]] * 3, "palette": bool(palette)}

    def _write_outputs(self, ds, rid, window):
        gt = ds.GetGeoTransform()
        heat = self.out_dir / f"{rid}_heatmap.tif"
        out = gdal.GetDriverByName("GTiff").Create(str(heat), ds.RasterXSize, ds.RasterYSize, 1, gdal.GDT_Float32)
        out.SetGeoTransform(gt)
        out.SetProjection(ds.GetProjection())
        band = out.GetRasterBand(1)
        band.SetNoDataValue(-1.0)
        arr = np.full((ds.RasterYSize, ds.RasterXSize), -1.0, dtype=np.float32)
        col, row, w, h = window
        yy, xx = np.mgrid[0:h, 0:w]
        arr[row:row + h, col:col + w] = (xx + yy) / float(w + h)
        band.WriteArray(arr)
        out = None
        feats = []
        for i, (c0, r0) in enumerate([] if self.no_anchors else [(col, row), (col + w // 2, row + h // 2)]):
            c1, r1 = c0 + max(1, w // 4), r0 + max(1, h // 4)
            ring = [[gt[0] + c * gt[1], gt[3] + r * gt[5]] for c, r in [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]]
            feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                          "properties": {"rank": i, "score": 1.0 - i * 0.1, "role": "anchor", "tile": 0, "n_patches": 4}})
        anchors = self.out_dir / f"{rid}_anchors.geojson"
        anchors.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        return heat, anchors
