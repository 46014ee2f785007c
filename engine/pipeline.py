"""The engine's main path: one question about one raster, end to end, as a stream of events.

    raster -> RasterImage -> TileLayout + tiles -> VisionFeatures -> Selection (strategy, budget)
      -> inputs_embeds -> streamed answer + heatmap GeoTIFF + anchors GeoJSON

`Engine.ask` yields the protocol's event dicts (`status`, `token`, `result`; see
engine/protocol.py) and raises typed exceptions for bad input or faults (RasterError,
SelectionError, RequestError, Cancelled, OutOfMemory), which the CLI prints and the server maps to
error codes. It also exposes the reusable steps (`prepare_visual`, `build_inputs`) that
fine-tuning and evaluation share with inference, so training sees the same tokens as `ask`.

Caching (used by the server for repeated questions on the same raster):
* vision features + geometry per (file identity, AOI, bands) -> a hit skips reading and the tower;
* for question-independent strategies, the selection and the LM's KV cache of the image prefix
  (system prompt + visual tokens) -> a hit skips selection and the prefill of every visual token.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import re
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from engine import __version__
from engine.cache import FeatureCache, PrefixStore, content_key, feature_cache_cap, raster_key
from engine.loader import base_model
from engine.protocol import (DEFAULT_STRATEGY, PROTOCOL_VERSION, STRATEGIES, tokens_per_tile_of,
                             validate_question)
from engine.weights import DEFAULT_WEIGHTS

log = logging.getLogger("engine.pipeline")

# Heatmaps / anchors the engine wrote are working files (the plugin copies what it keeps next to
# the project): those older than GEOVQA_OUTPUT_RETENTION_DAYS are removed when an engine starts
# and, by the server's job queue (engine/jobs.py), while it serves.
RETENTION_VARIABLE = "GEOVQA_OUTPUT_RETENTION_DAYS"
DEFAULT_OUTPUT_RETENTION_DAYS = 14.0
# how long a closed (cancelled) question waits for its stage thread (a read, a batch of tiles in
# the vision tower: seconds on a GPU) to notice the cancel and end
STAGE_JOIN_TIMEOUT_S = 120.0
# the names `_output_stem` + write_heatmap give the engine's files; pruning touches only these, so a
# user's own "survey_heatmap.tif" in a folder given as --output-dir is never deleted
ENGINE_OUTPUT_NAME = re.compile(r"^\d{8}-\d{6}-[a-z0-9-]{1,40}-[0-9a-f]{6}_(heatmap\.tif|anchors\.geojson)$")


class RequestError(ValueError):
    """A request that cannot be answered as given; `code` is one of protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def cache_dir() -> Path:
    """Where the engine keeps the demo model and its outputs (GEOVQA_CACHE_DIR overrides)."""
    override = os.environ.get("GEOVQA_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "geovqa"


# ---------------------------------------------------------------------------------------------
# AskRequest fields the engine's own callers set, never read from a client's JSON: a client that
# could name an upload's content hash could be served another raster's cached features; the
# selection text is eval's (the protocol's question is what the strategies score against)
SERVER_ONLY_FIELDS = ("raster_identity", "selection_text")


@dataclass
class AskRequest:
    """One question about one raster (the JSON body of POST /ask, minus transport fields)."""

    raster_path: str
    question: str
    aoi: dict | None = None
    # None in the visual-token fields means "not given": the loaded adapter's training setting
    # (geovqa_training.json), else the engine's default (`Engine.resolve_visual`)
    bands: list[int] | None = None
    strategy: str | None = None  # None: the adapter's, else DEFAULT_STRATEGY
    budget: int | None = None
    tokens_per_tile: int | None = None  # None: the adapter's, else the checkpoint's own (MAX_TOKENS of its config)
    max_new_tokens: int = 256
    seed: int | None = 0
    request_id: str | None = None
    faithful_empty_slots: bool | None = None  # None: the adapter's, else False
    # the raster's content hash when it was uploaded (set by the server, not a protocol field): an
    # upload lands in a new temporary file each time, so its path and mtime never repeat and the
    # caches would never serve a second question about it
    raster_identity: str | None = None
    # the text question-guided strategies (pyramid, budget) score the image against, when it is
    # not the question itself (not a protocol field): eval's prompt adds the options and an answer
    # instruction, the same words for every item, which should not steer the selection
    selection_text: str | None = None

    def validated(self) -> "AskRequest":
        """A copy with the question stripped; RequestError for anything a person must fix."""
        try:
            q = validate_question(self.question)  # the protocol's rule, shared with the server
        except ValueError as exc:
            code, _, message = str(exc).partition(": ")
            hint = "Shorten the question." if code == "question_too_long" else None
            raise RequestError(code, message, hint) from None
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise RequestError(
                "unknown_strategy",
                f"Unknown token strategy {self.strategy!r}.",
                f"Choose one of: {', '.join(STRATEGIES)}.",
            )
        for name in ("budget", "tokens_per_tile"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError("bad_request", f"{name} must be a positive whole number, not {v!r}.")
        if self.faithful_empty_slots is not None and not isinstance(self.faithful_empty_slots, bool):
            raise RequestError("bad_request", "faithful_empty_slots must be true or false, "
                                              f"not {self.faithful_empty_slots!r}.")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens <= 4096:
            raise RequestError("bad_request", "max_new_tokens must be between 1 and 4096.")
        if not self.raster_path:
            raise RequestError("bad_request", "No raster was given.")
        if self.aoi is not None and not isinstance(self.aoi, dict):
            raise RequestError("bad_aoi", "The area of interest must be an object "
                                          "with 'window', 'polygon_wkt' or 'geojson'.")
        return AskRequest(**{**asdict(self), "question": q})

    @classmethod
    def from_json(cls, data: dict) -> "AskRequest":
        """Build from a protocol ASK body; unknown fields are an error (typos get caught)."""
        if not isinstance(data, dict):
            raise RequestError("bad_request", "The request body must be a JSON object.")
        known = set(cls.__dataclass_fields__) - set(SERVER_ONLY_FIELDS)
        extra = set(data) - known
        if extra:
            raise RequestError("bad_request", f"Unknown request fields: {', '.join(sorted(extra))}.")
        if "question" not in data:
            raise RequestError("empty_question", "Please type a question.")
        return cls(**{"raster_path": data.get("raster_path") or "", **data}).validated()


def max_read_pixels(pinpoints=None) -> int:
    """/health's ``max_read_pixels``: the largest canvas's area among the model's pinpoints (the
    ones `read_and_encode` passes): `read_for_tiling` reads no window at more pixels than that."""
    from engine.tiling import anyres_pinpoints

    pins = anyres_pinpoints() if pinpoints is None else pinpoints
    return max(int(w) * int(h) for w, h in pins)


# ---------------------------------------------------------------------------------------------
@dataclass
class VisualInput:
    """Everything between the raster and the language model for one question."""

    selection: Any  # engine.selection.Selection
    geometry: Any  # engine.geometry.TokenGeometry
    timings: dict[str, float] = field(default_factory=dict)


def read_and_encode(model, raster_path: str, *, aoi=None, bands=None, cancel=None,
                    progress: Callable[[int, int], None] | None = None, batch_size: int = 16,
                    check_plan: Callable[[Any], None] | None = None):
    """Raster -> (geometry, features, timings): read for tiling, tile, run the vision tower.

    `check_plan(layout)` runs on the tiling plan before the tower (see `refuse_from_plan`): what it
    raises ends the request without the tower's minutes on a large raster."""
    from engine.geometry import TokenGeometry
    from engine.raster import read_for_tiling
    from engine.tiling import make_tiles, plan_tiles
    from engine.vision import encode_tiles

    t0 = time.perf_counter()
    # the checkpoint's own anyres canvases (config.json image_grid_pinpoints), in its order
    pins = getattr(getattr(model, "config", None), "image_grid_pinpoints", None) or None
    image = read_for_tiling(raster_path, aoi=aoi, bands=bands, pinpoints=pins, cancel=cancel)
    layout = plan_tiles(image.size, pins, choose_from=image.window[2:])  # the canvas of the full-res window
    if check_plan is not None:
        check_plan(layout)
    geometry = TokenGeometry.build(image, layout)
    tiles = make_tiles(image.pixels, layout)
    t1 = time.perf_counter()
    features = encode_tiles(model, tiles, batch_size=batch_size, progress=progress, cancel=cancel)
    t2 = time.perf_counter()
    return geometry, features, {"read": t1 - t0, "vision": t2 - t1}


def refuse_from_plan(strategy, n_tiles: int, budget: int | None, *, model=None, tokenizer=None,
                     question: str = "") -> None:
    """Refuse, from the tiling plan alone, a request whose visual tokens are already known not to
    fit, with the error the later stages would raise after the vision tower (minutes for a large
    raster on a GPU) and the prefill: the strategy's own SelectionError (`none` with a budget
    below its tiles x 144 tokens), and, given `model` and `tokenizer`, ContextTooLong for a
    prompt (image + question) longer than the model reads. Only strategies whose count follows
    from the number of tiles (``planned_tokens``) are checked; the others are left to `select`.
    The patches a tile are `model`'s own (`model_patches_per_tile`), as `select` will see them;
    without a model, the released 576."""
    from engine.generate import check_context
    from engine.prompt import split_prompt

    planned = getattr(strategy, "planned_tokens", None)
    n_visual = (planned(n_tiles, budget, model_patches_per_tile(model)) if planned is not None
                else None)
    if n_visual is None or model is None or tokenizer is None:
        return
    pieces = split_prompt(tokenizer, question)
    check_context(model, len(pieces.before) + int(n_visual) + len(pieces.after))


def refuse_empty_selection(selection, strategy: str) -> None:
    """A strategy that drops invalid patches keeps no token when no patch of the image is at least
    half valid data (thin stripes or scattered pixels of data among nodata): the model would
    answer without seeing the image, so the request is refused instead (`no_valid_pixels`)."""
    if int(selection.n_tokens) > 0:
        return
    raise RequestError(
        "no_valid_pixels",
        "No patch the model sees (a 14 x 14 px square of its 336 px tiles) is at least half "
        f"valid data, so strategy '{strategy}' kept no visual token and the model would answer "
        "without seeing the image.",
        "Choose an area where the data is denser, or check the layer's nodata value.",
    )


def model_patches_per_tile(model) -> int:
    """Patches a tile the model's vision tower gives: ``patch_grid ** 2`` (its image size over its
    patch size, squared: 576 for the released 336 px CLIP with 14 px patches); 576 when there is
    no model or it does not say."""
    from engine.selection.common import PATCHES

    base = base_model(model)  # under an optional peft wrapper
    grid = getattr(base, "patch_grid", None)
    return int(grid) ** 2 if isinstance(grid, int) and grid > 0 else PATCHES


def model_tokens_per_tile(model) -> int:
    """The tokens a tile the loaded checkpoint was trained with (MAX_TOKENS of its
    ``mm_patch_merge_type``: 24 for GeoLLaVA-8K): what --tokens-per-tile means when not given."""
    return tokens_per_tile_of(getattr(getattr(model, "config", None), "mm_patch_merge_type", None))


def make_strategy(name: str, *, tokens_per_tile: int | None = None, seed: int | None = None,
                  **extra: Any):
    """Instantiate a strategy, passing only the parameters its constructor takes."""
    from engine.selection import get_strategy
    from engine.selection.base import _REGISTRY, available

    available()  # loads the built-in strategies
    factory = _REGISTRY.get(name)
    params = {"tokens_per_tile": tokens_per_tile, "seed": seed, **extra}
    if factory is not None:
        try:
            accepted = inspect.signature(factory).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
                params = {k: v for k, v in params.items() if k in accepted}
        except (TypeError, ValueError):
            pass
    params = {k: v for k, v in params.items() if v is not None}
    return get_strategy(name, **params)


def prepare_visual(model, raster_path: str, question: str, *, strategy: str = DEFAULT_STRATEGY,
                   budget: int | None = None, tokens_per_tile: int | None = None,
                   seed: int | None = 0, aoi=None, bands=None, cancel=None,
                   tokenizer=None, faithful_empty_slots: bool = False) -> VisualInput:
    """Raster + question -> selected visual tokens (after the projector) and their geometry.

    Fine-tuning calls this so it sees exactly the tokens inference sees. A budget the strategy
    cannot fit is refused before the vision tower (the length of a training sample is the
    caller's to judge), and a selection with no visual token (no patch at least half valid data)
    after it, with `ask`'s RequestError (`no_valid_pixels`): a sample the model never sees is no
    training on its image."""
    strat = make_strategy(strategy, tokens_per_tile=tokens_per_tile or model_tokens_per_tile(model), seed=seed,
                          tokenizer=tokenizer, faithful_empty_slots=faithful_empty_slots)
    geometry, features, timings = read_and_encode(
        model, raster_path, aoi=aoi, bands=bands, cancel=cancel,
        check_plan=lambda layout: refuse_from_plan(strat, layout.n_tiles, budget, model=model))
    t0 = time.perf_counter()
    selection = strat.select(features, geometry, question, budget, model=model)
    refuse_empty_selection(selection, strategy)
    timings["select"] = time.perf_counter() - t0
    return VisualInput(selection=selection, geometry=geometry, timings=timings)


def build_inputs(model, tokenizer, question: str, selection, answer: str | None = None):
    """Prompt + visual tokens (+ answer for training) -> (inputs_embeds, labels, n_prefix).

    `labels` is None without an answer; with one, it is -100 everywhere except the answer's
    tokens and the closing `<|im_end|>` (loss only on the assistant turn). `n_prefix` is the
    length of the image prefix (system + user header + visual tokens)."""
    import torch

    from engine.prompt import STOP_TOKEN, encode_template, encode_text, split_prompt

    pieces = split_prompt(tokenizer, question)
    after = list(pieces.after)
    answer_ids: list[int] = []
    if answer is not None:
        answer_ids = encode_text(tokenizer, answer) + encode_template(tokenizer, STOP_TOKEN)
    embeds = model.build_inputs_embeds(pieces.before, selection.embeds, after + answer_ids)
    n_prefix = len(pieces.before) + int(selection.embeds.shape[0])
    labels = None
    if answer is not None:
        total = int(embeds.shape[1])
        labels = torch.full((1, total), -100, dtype=torch.long, device=embeds.device)
        labels[0, total - len(answer_ids):] = torch.tensor(answer_ids, device=embeds.device)
    return embeds, labels, n_prefix


# ---------------------------------------------------------------------------------------------
class Engine:
    """A loaded model plus caches; answers one question at a time (the server queues them)."""

    def __init__(self, weights_dir: str | os.PathLike | None = None, *, device: str = "auto",
                 quantization: str = "auto", adapter: str | os.PathLike | None = None,
                 demo_ok: bool = True, output_dir: str | os.PathLike | None = None,
                 feature_cache_bytes: int | None = None, loaded=None,
                 prune_old_outputs: bool = True) -> None:
        """`prune_old_outputs`: remove the engine's own files older than GEOVQA_OUTPUT_RETENTION_DAYS
        from `output_dir` (working files); False for a folder of files to keep (eval's heatmaps).

        `feature_cache_bytes`: the cap of the vision-feature cache (RAM); None takes
        GEOVQA_FEATURE_CACHE_BYTES, else 4 GiB (`engine.cache.feature_cache_cap`); 0 turns it
        off. The memory check counts it when the model loads on the CPU."""
        from engine.loader import load_model

        retention_days = output_retention_days()  # a bad setting stops us before the model loads
        cache_cap = feature_cache_cap(feature_cache_bytes)  # so does this one
        self.weights_dir, self.demo = resolve_weights(weights_dir, demo_ok=demo_ok)
        self.loaded = loaded or load_model(self.weights_dir, device=device,
                                           quantization=quantization, adapter=adapter,
                                           ram_cache_bytes=cache_cap)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.output_dir = Path(output_dir) if output_dir else cache_dir() / "outputs"
        if prune_old_outputs:
            prune_outputs(self.output_dir, retention_days)
        # what the loaded adapter was trained on (its geovqa_training.json), None without one
        self.adapter_settings = (self.loaded.info or {}).get("adapter_settings")
        self.features = FeatureCache(max_bytes=cache_cap)
        self.prefixes = PrefixStore()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ health
    def health(self) -> dict:
        from engine.devices import gpu_free_bytes
        from engine.loader import checkpoint_present
        from engine.selection import available

        info = self.loaded.info
        dev = info.get("device", "cpu")
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "model": info.get("model_name", "GeoLLaVA-8K"),
            "demo_model": bool(self.demo or info.get("demo")),
            "weights_present": checkpoint_present(DEFAULT_WEIGHTS) or
            (not self.demo and checkpoint_present(self.weights_dir)),
            # absolute: the plugin shows it, and a path relative to the engine's working folder
            # says nothing to a client elsewhere
            "weights_dir": str(Path(self.weights_dir).resolve()),
            "device": dev,
            "gpu_name": info.get("gpu_name"),
            "gpu_free_bytes": gpu_free_bytes(dev) if str(dev).startswith("cuda") else None,
            "quantization": info.get("quantization"),
            "four_bit": bool(info.get("four_bit")),
            "compute": info.get("compute"),
            "attention": info.get("attention"),
            "adapter": info.get("adapter"),
            "adapter_settings": self.adapter_settings,
            "strategies": [s for s in STRATEGIES if s in available()],
            "max_read_pixels": max_read_pixels(getattr(getattr(self.model, "config", None),
                                                       "image_grid_pinpoints", None) or None),
            "feature_cache_bytes": self.features.max_bytes,
            "message": ("tiny random demo model: answers are meaningless; run `make weights`"
                        if self.demo else None),
        }

    # ------------------------------------------------------------------------------ ask
    def ask(self, req: AskRequest, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Answer `req`, yielding protocol events; the last one is `result`."""
        from engine.errors import is_oom

        req = req.validated()
        with self._lock:
            self._applied_budget = req.budget
            try:
                yield from self._ask(req, cancel)
            except Exception as exc:
                if is_oom(exc):  # the retry hint halves the budget that ran (an adapter's, when it gave it)
                    exc.applied_budget = self._applied_budget
                    self.release_device_memory(exc)
                raise

    def release_device_memory(self, exc: BaseException | None = None) -> None:
        """After an out-of-memory error: drop what the engine holds on the device, so the retry
        (and `engine.errors.free_gpu_memory`, which empties torch's cache) finds it free. That is
        the image-prefix KV caches (`prefixes`; the feature cache holds CPU tensors) and, given
        the error, the tensors its traceback's frames still hold (the request's embeddings, the
        prefix in use): the server keeps the error until it has answered."""
        self.prefixes.clear()
        if exc is not None:
            traceback.clear_frames(exc.__traceback__)

    def resolve_visual(self, req: AskRequest) -> tuple[AskRequest, list[str]]:
        """`req` with its visual-token fields filled in, and notes for the person asking.

        A field the request leaves out (None) takes the loaded adapter's training setting
        (`adapter_settings`), else the engine's default (strategy geollava, no budget, the
        checkpoint's tokens a tile, empty slots dropped, the engine's band choice); a field it
        gives is kept. A note says where an explicit value differs from what the adapter was
        trained on, or where the adapter's bands do not fit the raster."""
        import dataclasses

        trained = self.adapter_settings
        if not trained:
            return dataclasses.replace(req, strategy=req.strategy or DEFAULT_STRATEGY,
                                       faithful_empty_slots=bool(req.faithful_empty_slots)), []
        from engine.adapter_settings import VISUAL_KEYS, settings_text, with_adapter_defaults

        values = with_adapter_defaults({key: getattr(req, key) for key in VISUAL_KEYS}, trained)
        differs: list[str] = []
        notes: list[str] = []
        for key in VISUAL_KEYS:
            given, learned = getattr(req, key), trained.get(key)
            if given is None or (key in ("bands", "tokens_per_tile") and learned is None):
                continue  # the adapter's value, or trained on the engine's choice: nothing to compare with
            if (list(given) if key == "bands" else given) != learned:
                differs.append(_setting_text(key, given))
        if req.bands is None and values["bands"] is not None:
            count, alpha = _band_layout(req.raster_path)
            learned = ", ".join(map(str, values["bands"]))
            if count is not None and max(values["bands"]) > count:
                notes.append(f"note: the adapter was trained on bands {learned}; this raster has {count}, "
                             "so the engine's default bands are used")
                values["bands"] = None
            elif alpha & set(values["bands"]):  # an RGBA raster's alpha is no colour
                notes.append(f"note: the adapter was trained on bands {learned}; band "
                             f"{', '.join(map(str, sorted(alpha & set(values['bands']))))} of this raster is its "
                             "alpha (transparency), so the engine's default bands are used")
                values["bands"] = None
        values["strategy"] = values["strategy"] or DEFAULT_STRATEGY
        values["faithful_empty_slots"] = bool(values["faithful_empty_slots"])
        if differs:
            notes.insert(0, f"note: this request asks for {', '.join(differs)}, but the adapter was trained "
                            f"with {settings_text(trained)}; its answers may be worse than on the visual "
                            "tokens it learned on (leave these settings out to use the adapter's)")
        return dataclasses.replace(req, **values), notes

    def _ask(self, req: AskRequest, cancel: threading.Event | None) -> Iterator[dict]:
        from engine.errors import Cancelled
        from engine.generate import check_context, prefill_prefix, stream_generate
        from engine.prompt import stop_token_ids
        from engine.heatmap import write_heatmap

        rid = req.request_id
        ev = lambda type_, **kw: {"type": type_, "request_id": rid, **kw}  # noqa: E731
        t_start = time.perf_counter()
        timings: dict[str, float] = {}

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the question was cancelled")

        path = _check_raster_path(req.raster_path)
        req, notes = self.resolve_visual(req)
        aoi_note = _aoi_crs_note(req.aoi, path)
        if aoi_note:
            notes.append(aoi_note)
        self._applied_budget = req.budget
        for note in notes:
            yield ev("status", stage="read", progress=None, message=note)
        tokens_per_tile = req.tokens_per_tile or model_tokens_per_tile(self.model)
        strat = make_strategy(req.strategy, tokens_per_tile=tokens_per_tile, seed=req.seed,
                              tokenizer=self.tokenizer,
                              faithful_empty_slots=req.faithful_empty_slots)
        fkey = (content_key(req.raster_identity, req.aoi, req.bands) if req.raster_identity
                else raster_key(path, req.aoi, req.bands))
        cached = self.features.get(fkey) if fkey is not None else None
        yield ev("status", stage="read", progress=None, message="reading the raster")
        if cached is not None:
            geometry, features = cached
            features = features.to(device=self.loaded.info.get("device", "cpu"))
            timings.update(read=0.0, vision=0.0)
        else:
            def check_plan(layout) -> None:
                refuse_from_plan(strat, layout.n_tiles, req.budget, model=self.model,
                                 tokenizer=self.tokenizer, question=req.question)

            geometry, features, t = yield from _with_progress(
                lambda progress: read_and_encode(self.model, path, aoi=req.aoi, bands=req.bands,
                                                 cancel=cancel, progress=progress,
                                                 check_plan=check_plan),
                lambda done, total: ev("status", stage="vision", progress=done / total,
                                       message=f"vision tower: {done}/{total} tiles"),
            )
            timings.update(t)
            # (None: a source nothing tells the change of; a cap of 0: no cache, so no CPU copy)
            if fkey is not None and self.features.max_bytes > 0:
                self.features.put(fkey, (geometry, features.to(device="cpu")))
        check_cancel()

        reusable = not getattr(strat, "question_dependent", True) and fkey is not None
        pkey = (fkey, req.strategy, tokens_per_tile, req.seed, req.budget,
                req.faithful_empty_slots)
        entry = self.prefixes.get(pkey) if reusable else None
        yield ev("status", stage="select", progress=None,
                 message=f"selecting visual tokens ({req.strategy})")
        t0 = time.perf_counter()
        if entry is not None:
            selection, prefix = entry
        else:
            selection = strat.select(features, geometry, req.selection_text or req.question, req.budget,
                                     model=self.model)
            refuse_empty_selection(selection, req.strategy)
            prefix = None
        timings["select"] = time.perf_counter() - t0
        check_cancel()

        embeds, _, n_prefix = build_inputs(self.model, self.tokenizer, req.question, selection)
        check_context(self.model, int(embeds.shape[1]))  # before the prefix prefill, not after it
        if reusable and prefix is None:
            t0 = time.perf_counter()
            prefix = prefill_prefix(self.model, embeds[:, :n_prefix])
            timings["prefix_prefill"] = time.perf_counter() - t0
            self.prefixes.put(pkey, (selection, prefix))
        yield ev("status", stage="prefill", progress=None, message="reading the image tokens")
        stream = stream_generate(self.model, self.tokenizer, embeds,
                                 max_new_tokens=req.max_new_tokens, cancel=cancel, prefix=prefix,
                                 vocab_limit=self.loaded.vocab_limit, seed=req.seed,
                                 stop_ids=stop_token_ids(self.tokenizer) | self.loaded.generation.eos_token_ids,
                                 repetition_penalty=self.loaded.generation.repetition_penalty)
        try:
            for piece in stream:
                yield ev("token", text=piece)
        finally:
            stream.close()
        gen = stream.result
        timings["prefill"] = gen.prefill_s + timings.pop("prefix_prefill", 0.0)
        timings["generate"] = gen.generate_s

        yield ev("status", stage="write", progress=None, message="writing the heatmap")
        t0 = time.perf_counter()
        files = write_heatmap(selection, geometry, self.output_dir, _output_stem(req.question))
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        yield ev(
            "result",
            answer=gen.text,
            tokens={
                "visual_candidates": int(selection.candidates),
                "visual_kept": int(selection.n_tokens),
                "prompt": int(gen.n_prompt_tokens),
                "generated": int(gen.n_new_tokens),
            },
            timings={k: round(float(v), 4) for k, v in timings.items()},
            peak_memory_bytes=gen.peak_memory_bytes,
            cache={"features": cached is not None, "kv_prefix": entry is not None},
            heatmap_path=str(files.tif_path),
            heatmap_file=Path(files.tif_path).name,
            anchors_path=str(files.geojson_path),
            anchors_file=Path(files.geojson_path).name,
            anchors=files.geojson,
            crs_wkt=geometry.crs_wkt,
            bands=list(geometry.bands) or None,
            palette=bool(geometry.palette),
            strategy=req.strategy,
            budget=req.budget,
            stopped=gen.stopped,
        )


# ---------------------------------------------------------------------------------------------
def resolve_weights(weights_dir, *, demo_ok: bool = True) -> tuple[Path, bool]:
    """Pick the checkpoint: the given dir, else GEOVQA_WEIGHTS, else weights/GeoLLaVA-8K, else the
    tiny random demo model (built on first use) when `demo_ok`. Returns (dir, is_demo).

    Only the default folder falls back to the demo, and only when it is missing or holds nothing
    of a checkpoint (`checkpoint_started`). A folder the user named (--weights, GEOVQA_WEIGHTS)
    must hold a checkpoint, and a damaged one anywhere is refused with what is wrong with it:
    answers from the random demo model in place of the real one would be worse than an error."""
    from engine.loader import WeightsMissingError, checkpoint_present, checkpoint_started
    from engine.tiny import build_tiny_checkpoint

    if weights_dir is not None:
        if not _is_default_weights(weights_dir):
            return _chosen_checkpoint(Path(weights_dir), "--weights")
        # `make serve` names the default folder: without a checkpoint there, as if not given
        if checkpoint_started(DEFAULT_WEIGHTS):
            return _checked_checkpoint(DEFAULT_WEIGHTS, REPAIR_HINT)
    env = os.environ.get("GEOVQA_WEIGHTS")
    if env:
        return _chosen_checkpoint(Path(env), "GEOVQA_WEIGHTS")
    if checkpoint_started(DEFAULT_WEIGHTS):
        return _checked_checkpoint(DEFAULT_WEIGHTS, REPAIR_HINT)
    if not demo_ok:
        raise WeightsMissingError(
            f"no weights: no GeoLLaVA-8K checkpoint in {DEFAULT_WEIGHTS}. "
            "Run `make weights` (needs internet, about 16 GB)."
        )
    demo = cache_dir() / "tiny-geollava"
    if not checkpoint_present(demo):  # the engine's own cache: a broken one is simply rebuilt
        build_tiny_checkpoint(demo, seed=0)
    return demo, True


REPAIR_HINT = "Run `make weights` again to repair the download."


def _is_default_weights(path) -> bool:
    return Path(path).expanduser().resolve() == DEFAULT_WEIGHTS.resolve()


def _chosen_checkpoint(path: Path, source: str) -> tuple[Path, bool]:
    """A checkpoint folder the user named (`source`): it must hold one; never the demo instead."""
    from engine.loader import WeightsMissingError, checkpoint_started

    path = path.expanduser()
    if not checkpoint_started(path):
        state = "does not exist" if not path.exists() else "holds no GeoLLaVA-8K checkpoint (config.json + safetensors)"
        instead = ("leave --weights out to use weights/GeoLLaVA-8K or the demo model" if source == "--weights"
                   else "unset GEOVQA_WEIGHTS to use weights/GeoLLaVA-8K or the demo model")
        raise WeightsMissingError(
            f"no weights: {path} (given by {source}) {state}. Check the path, run `make weights` "
            f"to download the checkpoint, or {instead}."
        )
    return _checked_checkpoint(path, f"Point {source} at a complete GeoLLaVA-8K checkpoint, or run "
                                     "`make weights` to download one.")


def _checked_checkpoint(path: Path, hint: str) -> tuple[Path, bool]:
    """(path, is_demo) when `path` is a usable checkpoint, else its loader error plus `hint`."""
    from engine.loader import CheckpointError, check_checkpoint
    from engine.tiny import is_tiny_checkpoint

    try:
        check_checkpoint(path)
    except CheckpointError as exc:
        message = str(exc)
        if "make weights" not in message:  # the loader's own advice, where it gives one, stands
            message = f"{message.rstrip('. ')}. {hint}"
        raise type(exc)(message) from exc
    return path, is_tiny_checkpoint(path)


def output_retention_days() -> float:
    """GEOVQA_OUTPUT_RETENTION_DAYS as a number of days (default 14; 0 keeps everything).

    Read when an engine starts, not at import, so a bad value stops only what prunes outputs
    (not ``--help`` or ``tiny``), and with a message that names the variable."""
    from engine.env_settings import env_number, finite_number

    return env_number(RETENTION_VARIABLE, DEFAULT_OUTPUT_RETENTION_DAYS, finite_number,
                      "a number of days (for example 14, or 0 to keep every output file)")


def prune_outputs(out_dir: Path, max_age_days: float) -> int:
    """Remove the engine's own heatmap/anchor files (named as the engine names them) older than
    `max_age_days` from `out_dir` (nothing else is touched; 0 or less keeps everything). Returns
    how many were removed."""
    if max_age_days <= 0 or not out_dir.is_dir():
        return 0
    cutoff = time.time() - max_age_days * 86400
    removed = 0
    for f in out_dir.iterdir():
        if not ENGINE_OUTPUT_NAME.match(f.name):
            continue
        try:
            if f.is_file() and f.stat().st_mtime < cutoff:
                f.unlink()
                removed += 1
        except OSError:  # in use or already gone: leave it
            pass
    return removed


def _setting_text(key: str, value: Any) -> str:
    if key == "bands":
        return "bands " + ", ".join(str(b) for b in value)
    if key == "faithful_empty_slots":
        return "faithful empty slots " + ("on" if value else "off")
    return f"{key.replace('_', ' ')} {value}"


def _band_layout(path: str) -> tuple[int | None, set[int]]:
    """(band count, the numbers of its alpha bands) of the raster; (None, set()) when it cannot
    be read here (the read that follows reports why)."""
    try:
        import rasterio

        from engine.band_choice import alpha_bands

        with rasterio.open(path) as ds:
            return int(ds.count), alpha_bands(ds)
    except Exception:  # noqa: BLE001 - the raster read that follows gives the error
        return None, set()


def _aoi_crs_note(aoi, path: str) -> str | None:
    """The note that a GeoJSON area of interest naming another CRS is reprojected into the
    raster's (engine/aoi_crs.py); None when it is not, or the raster cannot be read here (the
    read that follows reports why)."""
    if not isinstance(aoi, dict) or not isinstance(aoi.get("geojson"), dict) \
            or aoi["geojson"].get("crs") is None:
        return None
    try:
        from engine.aoi_crs import aoi_crs_note
        from engine.georeferencing import georeferencing
        from engine.raster_open import open_raster

        src = open_raster(path)
        try:
            crs_wkt = georeferencing(src)[1]
        finally:
            src.close()
        return aoi_crs_note(aoi, crs_wkt)
    except Exception:  # noqa: BLE001 - the raster read that follows gives the error
        return None


def _check_raster_path(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise RequestError("raster_unreadable", f"The raster {path} does not exist.",
                           "Check the path; the engine reads files on its own host.")
    if p.is_dir():
        raise RequestError("not_a_raster", f"{path} is a folder, not a raster file.")
    return str(p)


def _output_stem(question: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", question.lower()).strip("-")[:40] or "question"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{uuid.uuid4().hex[:6]}"


def _with_progress(work: Callable[[Callable[[int, int], None]], Any],
                   to_event: Callable[[int, int], dict]):
    """Run `work(progress)` in a thread, yielding `to_event(done, total)` for each progress call;
    return its result (or raise its exception). Lets a long stage report progress mid-stream.

    Closed early (a cancelled question: the caller has set the cancel event `work` checks), it
    waits for the thread to end, up to `STAGE_JOIN_TIMEOUT_S`, before it returns: `Engine.ask`
    releases the engine's lock only then, so the next question's stage never runs beside it."""
    q: queue.Queue = queue.Queue()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work(lambda done, total: q.put((done, total)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc
        finally:
            q.put(None)

    th = threading.Thread(target=run, name="geovqa-stage", daemon=True)
    th.start()
    try:
        while (item := q.get()) is not None:
            yield to_event(*item)
    except GeneratorExit:  # closed by the consumer (not Ctrl-C, which ends the process anyway)
        th.join(STAGE_JOIN_TIMEOUT_S)
        if th.is_alive():
            log.warning("a cancelled question's stage has not ended after %.0f s; the next "
                        "question starts beside it", STAGE_JOIN_TIMEOUT_S)
        raise
    th.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
