"""Benchmark: first vs second question on the same raster (the feature / KV-prefix caches).

It goes through the real server path: ``python -m engine serve`` is started on a free loopback
port (temporary config and state dirs) and questions are sent to ``POST /ask``, timed by the
client from request to last event. For each round a fresh raster is written (so nothing is cached
from before), then two different questions are asked about it with the same strategy and window. The first pays for reading,
tiling and the vision tower; the second should hit the feature cache (and, for
question-independent strategies, the KV cache of the image prefix). The wall time of both, the
engine's own timings and the cache flags it reports are written to ``cache.json`` and a table in
``cache.md``. Runs on the tiny random checkpoint unless `weights` is given.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTIONS = ("What kind of area is shown in this image?", "How many buildings can you see?")


def _tiny_weights() -> Path:
    from engine.tiny import build_tiny_checkpoint, tiny_key

    root = Path(os.environ.get("GEOVQA_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
    dest = root / f"tiny-geollava-{tiny_key(0)}"
    if not (dest / "model.safetensors.index.json").is_file():
        build_tiny_checkpoint(dest, seed=0)
    return dest


def _write_raster(path: Path, width: int, height: int, seed: int) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    # smooth random field + noise: something a stretch and a tiler treat like an image
    base = rng.integers(0, 255, size=(3, height // 16 + 1, width // 16 + 1)).astype("uint8")
    data = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)[:, :height, :width]
    data = (data + rng.integers(0, 20, size=data.shape)).astype("uint8")
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4500000, 0.5, 0.5)) as ds:
        ds.write(data)


class _Server:
    """`python -m engine serve` on a free loopback port, with its own config and state dirs."""

    def __init__(self, weights: Path, device: str, workdir: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.config_dir = workdir / "config"
        env = dict(os.environ, GEOVQA_CONFIG_DIR=str(self.config_dir))
        self.log = open(workdir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--weights", str(weights), "--device", device,
             "--port", str(self.port), "--state-dir", str(workdir / "state"),
             "--log-level", "warning"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the engine server did not start; see "
                                   f"{workdir / 'server.log'}")
            try:
                self.health = self._get("/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.token = (self.config_dir / "token").read_text().strip()

    def _get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def ask(self, body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        first_token = None
        result = None
        try:
            conn.request("POST", "/ask", body=json.dumps(body), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"/ask answered {resp.status}: {resp.read()[:500]!r}")
            for line in resp:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "token" and first_token is None:
                    first_token = time.perf_counter() - t0
                elif event["type"] == "result":
                    result = event
                elif event["type"] == "error":
                    raise RuntimeError(f"the engine failed: {event['message']}")
        finally:
            conn.close()
        wall = time.perf_counter() - t0
        if result is None:
            raise RuntimeError("the engine ended without a result")
        return {"wall_s": wall, "first_token_s": first_token, "cache": result.get("cache", {}),
                "timings": result.get("timings", {}), "tokens": result.get("tokens", {})}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def run(out_dir: str | os.PathLike = "docs/benchmarks", *, weights: str | None = None,
        rounds: int = 3, size: tuple[int, int] = (1344, 1008), max_new_tokens: int = 8,
        strategies: tuple[str, ...] = ("geollava", "none"), device: str = "auto") -> dict:
    """Measure and write ``cache.json`` + ``cache.md`` into `out_dir`; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_dir = Path(weights) if weights else _tiny_weights()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="geovqa-bench-cache-") as tmp:
        server = _Server(weights_dir, device, Path(tmp))
        try:
            health = server.health
            available = set(health.get("strategies") or strategies)

            def ask(raster: Path, question: str, strategy: str, n: int) -> dict:
                return server.ask({"raster_path": str(raster), "question": question,
                                   "strategy": strategy, "max_new_tokens": n})

            # warm-up (imports, allocator) so round 1 is not penalised
            warm = Path(tmp) / "warm.tif"
            _write_raster(warm, 336, 336, seed=999)
            ask(warm, QUESTIONS[0], strategies[0], 2)
            for strategy in (s for s in strategies if s in available):
                for r in range(rounds):
                    raster = Path(tmp) / f"{strategy}-{r}.tif"
                    _write_raster(raster, size[0], size[1], seed=r)
                    first = ask(raster, QUESTIONS[0], strategy, max_new_tokens)
                    second = ask(raster, QUESTIONS[1], strategy, max_new_tokens)
                    rows.append({"strategy": strategy, "round": r, "first": first,
                                 "second": second})
        finally:
            server.close()
    summary = []
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        mine = [row for row in rows if row["strategy"] == strategy]
        f = statistics.median(row["first"]["wall_s"] for row in mine)
        s = statistics.median(row["second"]["wall_s"] for row in mine)
        summary.append({
            "strategy": strategy, "first_median_s": f, "second_median_s": s,
            "speedup": f / s if s > 0 else None,
            "feature_hits": sum(bool(row["second"]["cache"].get("features")) for row in mine),
            "kv_prefix_hits": sum(bool(row["second"]["cache"].get("kv_prefix")) for row in mine),
            "first_hits": sum(bool(row["first"]["cache"].get("features")) for row in mine),
            "rounds": len(mine),
        })
    report = {
        "benchmark": "cache", "path": "HTTP POST /ask on `python -m engine serve` (loopback)",
        "model": health.get("model"), "demo_model": health.get("demo_model"),
        "device": health.get("device"), "gpu_name": health.get("gpu_name"),
        "quantization": health.get("quantization"), "raster_size": list(size),
        "max_new_tokens": max_new_tokens, "questions": list(QUESTIONS),
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "summary": summary, "rows": rows,
    }
    (out_dir / "cache.json").write_text(json.dumps(report, indent=1))
    (out_dir / "cache.md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    lines = [
        "# Cache benchmark: second question on the same raster",
        "",
        f"Model `{report['model']}`{' (tiny random demo model)' if report['demo_model'] else ''} "
        f"on `{report['device']}`{' (' + report['gpu_name'] + ')' if report['gpu_name'] else ''}, "
        f"{report['quantization']}; raster {report['raster_size'][0]} x "
        f"{report['raster_size'][1]} px, {report['max_new_tokens']} new tokens; medians over "
        "fresh rasters of the wall time of `POST /ask` seen by a client on loopback "
        f"({report.get('cpu_count')} CPU cores, shared). Generated by "
        "`engine/benchmarks/cache.py` (`make bench`).",
        "",
        "| strategy | first question (s) | second question (s) | speed-up | feature-cache hits "
        "| KV-prefix hits | hits on first |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["summary"]:
        speed = f"{s['speedup']:.2f}x" if s["speedup"] else "n/a"
        lines.append(
            f"| {s['strategy']} | {s['first_median_s']:.3f} | {s['second_median_s']:.3f} | "
            f"{speed} | {s['feature_hits']}/{s['rounds']} | {s['kv_prefix_hits']}/{s['rounds']} "
            f"| {s['first_hits']}/{s['rounds']} |")
    lines += [
        "",
        "The first question reads the raster, tiles it and runs the vision tower; the second "
        "(a different question, same raster, window and bands) takes the vision features from "
        "the cache and, for question-independent strategies, the language model's KV cache of "
        "the image prefix. These numbers are for the model named above; with the real "
        "GeoLLaVA-8K checkpoint the ratio depends on how vision-tower time compares with "
        "generation time and has to be measured there (`--weights`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    a = parser.parse_args()
    print(json.dumps(run(a.out_dir, weights=a.weights, rounds=a.rounds, device=a.device)["summary"],
                     indent=1))
