"""End-to-end engine path with the tiny checkpoint: events, caches, equivalence, bad input, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from engine.errors import Cancelled, ContextTooLong
from engine.jobs import error_for_exception
from engine.pipeline import AskRequest, Engine, RequestError, build_inputs, prepare_visual
from engine.raster_errors import RasterOpenError
from engine.selection import SelectionError

try:
    from tests.engine.rasters import write_geotiff
except ImportError:  # pragma: no cover
    from rasters import write_geotiff

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    return Engine(tiny_checkpoint, output_dir=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (3, 500, 700), dtype=np.uint8)
    arr[:, 100:140, 300:360] = 250  # a bright object
    path = tmp_path_factory.mktemp("rasters") / "scene.tif"
    write_geotiff(path, arr, crs="EPSG:32633")
    return path


def _ask(engine, scene, question="How many buildings?", **kw):
    kw.setdefault("max_new_tokens", 6)
    return list(engine.ask(AskRequest(str(scene), question, **kw)))


def test_ask_streams_status_tokens_then_result(engine, scene):
    events = _ask(engine, scene)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "result" and "status" in kinds and "token" in kinds
    assert kinds.index("token") > kinds.index("status")
    result = events[-1]
    pieces = "".join(e["text"] for e in events if e["type"] == "token")
    assert pieces == result["answer"] and result["answer"]
    tok = result["tokens"]
    # 700 x 500 -> 3 x 2 tiles of 336 px (see the reference note's 800 x 600 example)
    assert tok["visual_candidates"] == 6 * 144
    assert 0 < tok["visual_kept"] <= 6 * 24
    assert tok["prompt"] > tok["visual_kept"] and tok["generated"] == 6
    assert set(result["timings"]) >= {"read", "vision", "select", "prefill", "generate", "total"}
    with rasterio.open(result["heatmap_path"]) as ds, rasterio.open(scene) as src:
        assert ds.crs == src.crs
        assert ds.width == 3 * 24 and ds.height == 2 * 24
    anchors = json.loads(Path(result["anchors_path"]).read_text())
    assert anchors == result["anchors"]
    ranks = [f["properties"]["rank"] for f in anchors["features"]]
    # tokens standing only for padding / nodata patches are not drawn
    assert 0 < len(ranks) <= tok["visual_kept"] and len(set(ranks)) == len(ranks)
    assert max(ranks) < tok["visual_kept"]


def test_second_question_hits_feature_and_prefix_caches_and_answers_the_same(engine, scene):
    engine.features.clear()
    engine.prefixes.clear()
    first = _ask(engine, scene, "Is there water?", strategy="geollava")[-1]
    second = _ask(engine, scene, "Is there water?", strategy="geollava")[-1]
    assert first["cache"] == {"features": False, "kv_prefix": False}
    assert second["cache"] == {"features": True, "kv_prefix": True}
    assert second["timings"]["vision"] == 0.0
    # reusing the image prefix's KV cache must not change the answer
    engine.prefixes.clear()
    fresh = _ask(engine, scene, "Is there water?", strategy="geollava")[-1]
    assert fresh["cache"] == {"features": True, "kv_prefix": False}
    assert fresh["answer"] == second["answer"] == first["answer"]


def test_a_feature_cache_of_zero_bytes_encodes_every_question_again(tiny_checkpoint, tiny_loaded, scene,
                                                                   tmp_path):
    eng = Engine(tiny_checkpoint, loaded=tiny_loaded, output_dir=tmp_path, feature_cache_bytes=0)
    first = _ask(eng, scene, "Is there water?", strategy="anchored")[-1]
    second = _ask(eng, scene, "Is there water?", strategy="anchored")[-1]
    assert first["cache"]["features"] is False and second["cache"]["features"] is False
    assert second["timings"]["vision"] > 0.0 and len(eng.features) == 0
    assert second["answer"] == first["answer"]
    assert eng.health()["feature_cache_bytes"] == 0


def test_serves_feature_cache_option_reaches_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    import argparse

    from engine import server

    monkeypatch.setenv("GEOVQA_FEATURE_CACHE_BYTES", "999")  # the option wins over the variable
    parser = argparse.ArgumentParser()
    server.add_serve_arguments(parser)
    args = parser.parse_args(["--weights", str(tiny_checkpoint), "--device", "cpu",
                              "--quantization", "fp32", "--state-dir", str(tmp_path),
                              "--feature-cache-bytes", "123456789"])
    eng = server.build_engine(args, server.settings_from_args(args))
    assert eng.features.max_bytes == 123456789
    assert eng.health()["feature_cache_bytes"] == 123456789
    args.feature_cache_bytes = None  # left out: GEOVQA_FEATURE_CACHE_BYTES
    assert server.build_engine(args, server.settings_from_args(args)).features.max_bytes == 999


def test_a_raster_whose_files_cannot_all_be_stamped_is_never_served_from_the_caches(engine, scene, monkeypatch):
    """A VRT over a /vsicurl/ source has no key (cache.raster_key None): nothing tells when the
    source changes, so each question reads it again and nothing is kept."""
    import engine.pipeline as P

    monkeypatch.setattr(P, "raster_key", lambda *a: None)
    engine.features.clear()
    engine.prefixes.clear()
    for _ in range(2):
        result = _ask(engine, scene, "Is there water?", strategy="geollava")[-1]
        assert result["cache"] == {"features": False, "kv_prefix": False}
    assert len(engine.features) == 0 and len(engine.prefixes) == 0


def test_question_dependent_strategy_does_not_reuse_prefix(engine, scene):
    engine.prefixes.clear()
    _ask(engine, scene, "Where is the harbour?", strategy="pyramid", budget=50)
    again = _ask(engine, scene, "Where is the harbour?", strategy="pyramid", budget=50)[-1]
    assert again["cache"]["features"] is True and again["cache"]["kv_prefix"] is False
    assert again["tokens"]["visual_kept"] <= 50


def test_none_tokens_equal_plain_clip_projector_and_pool(engine, scene):
    """`none` = LongVA's path: CLIP layer -2 patches -> projector -> 2x2 average pool per tile."""
    from engine.raster import read_for_tiling
    from engine.tiling import make_tiles, plan_tiles
    from engine.vision import preprocess

    model = engine.model
    vis = prepare_visual(model, str(scene), "q", strategy="none", budget=None)
    image = read_for_tiling(str(scene))
    tiles = make_tiles(image.pixels, plan_tiles(image.size))
    clip = model.model.vision_tower.vision_tower
    with torch.no_grad():
        hs = clip(preprocess(tiles), output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = model.model.mm_projector(hs)  # (1 + T, 576, H)
        grid = proj[1:].reshape(-1, 24, 24, proj.shape[-1]).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    expected = pooled.reshape(-1, proj.shape[-1])
    assert vis.selection.embeds.shape == expected.shape
    torch.testing.assert_close(vis.selection.embeds, expected, rtol=1e-5, atol=1e-5)


def test_engine_forward_equals_plain_qwen2_forward(engine, scene):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = engine.model, engine.tokenizer
    vis = prepare_visual(model, str(scene), "What is this?", strategy="none", budget=None)
    embeds, _, _ = build_inputs(model, tok, "What is this?", vis.selection)
    cfg = Qwen2Config(**{k: v for k, v in model.config.to_dict().items()
                         if k in Qwen2Config().to_dict() and k not in ("model_type", "architectures")})
    plain = Qwen2ForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("model.vision_tower", "model.mm_projector", "reghead"))}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    with torch.no_grad():
        a = model(inputs_embeds=embeds).logits
        b = plain(inputs_embeds=embeds).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_build_inputs_labels_only_the_answer(engine, scene):
    model, tok = engine.model, engine.tokenizer
    vis = prepare_visual(model, str(scene), "q", strategy="uniform", budget=20)
    embeds, labels, n_prefix = build_inputs(model, tok, "Is it a port?", vis.selection, answer="Yes")
    answer_ids = tok("Yes<|im_end|>", add_special_tokens=False).input_ids
    assert labels.shape == embeds.shape[:2]
    assert labels[0, -len(answer_ids):].tolist() == answer_ids
    assert (labels[0, : -len(answer_ids)] == -100).all()
    # the image prefix: system + user header + the visual tokens, not one question token more
    from engine.prompt import split_prompt

    assert n_prefix == len(split_prompt(tok, "Is it a port?").before) + vis.selection.n_tokens


@pytest.mark.parametrize("kw,code", [
    ({"question": "   "}, "empty_question"),
    ({"question": "x" * 5000}, "question_too_long"),
    ({"strategy": "magic"}, "unknown_strategy"),
    ({"budget": 0}, "bad_request"),
    ({"max_new_tokens": 0}, "bad_request"),
    ({"faithful_empty_slots": "false"}, "bad_request"),
    ({"faithful_empty_slots": 1}, "bad_request"),
])
def test_bad_requests_have_codes(engine, scene, kw, code):
    args = {"question": "ok?", **kw}
    with pytest.raises(RequestError) as err:
        list(engine.ask(AskRequest(str(scene), **args)))
    assert err.value.code == code and str(err.value)


def test_data_too_thin_for_any_patch_is_refused_not_answered_blind(engine, tmp_path):
    """Data in one column of three among tagged nodata: every pixel read is fine, yet no patch
    is half valid, so `uniform` keeps no token. The model answered without the image before
    (visual_kept 0, no error); now the request is refused with no_valid_pixels. geollava, which
    keeps such clusters as trained, still answers."""
    arr = np.random.default_rng(0).integers(1, 255, (3, 500, 700)).astype(np.uint8)
    arr[:, :, np.arange(700) % 3 != 0] = 0
    thin = write_geotiff(tmp_path / "thin.tif", arr, nodata=0)
    with pytest.raises(RequestError) as err:
        _ask(engine, thin, "What is here?", strategy="uniform")
    assert err.value.code == "no_valid_pixels" and "'uniform' kept no visual token" in str(err.value)
    assert "nodata" in err.value.hint
    assert error_for_exception(err.value).code == "no_valid_pixels"
    assert _ask(engine, thin, "What is here?")[-1]["tokens"]["visual_kept"] > 0


def test_prepare_visual_refuses_data_too_thin_for_any_patch_as_ask_does(engine, tmp_path):
    """`prepare_visual` (fine-tuning's visual path) gave an empty selection for the raster `ask`
    refuses above, and a sample was trained on with no visual token: now it raises ask's
    no_valid_pixels. geollava keeps its tokens."""
    arr = np.random.default_rng(0).integers(1, 255, (3, 500, 700)).astype(np.uint8)
    arr[:, :, np.arange(700) % 3 != 0] = 0
    thin = write_geotiff(tmp_path / "thin.tif", arr, nodata=0)
    with pytest.raises(RequestError) as err:
        prepare_visual(engine.model, str(thin), "What is here?", strategy="uniform")
    assert err.value.code == "no_valid_pixels" and "'uniform' kept no visual token" in str(err.value)
    assert prepare_visual(engine.model, str(thin), "What is here?", strategy="geollava").selection.n_tokens > 0


def test_missing_and_corrupt_rasters(engine, tmp_path):
    with pytest.raises(RequestError, match="does not exist"):
        list(engine.ask(AskRequest(str(tmp_path / "nope.tif"), "q?")))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RasterOpenError):
        list(engine.ask(AskRequest(str(bad), "q?")))


def test_faithful_empty_slots_reach_geollava_with_a_prefix_cache_of_their_own(engine, scene):
    engine.prefixes.clear()
    default = _ask(engine, scene, "Is there water?")[-1]
    faithful = _ask(engine, scene, "Is there water?", faithful_empty_slots=True)[-1]
    again = _ask(engine, scene, "Is there water?")[-1]
    # 3 x 2 tiles; the tiny model's tiles hold fewer than 24 clusters, so the two differ
    assert faithful["tokens"]["visual_kept"] == 6 * 24
    assert default["tokens"]["visual_kept"] < 6 * 24
    assert faithful["cache"]["kv_prefix"] is False  # not served from the default's prefix
    assert again["cache"]["kv_prefix"] is True
    assert again["tokens"] == default["tokens"] and again["answer"] == default["answer"]
    # the zero-slot tokens stand for no patch: nothing more is drawn
    assert len(faithful["anchors"]["features"]) == len(default["anchors"]["features"])


def test_cli_flag_for_faithful_empty_slots():
    from engine.cli import build_parser

    for cmd, extra in (("ask", ["x.tif", "q?"]), ("finetune", ["d.json", "--out", "o"]),
                       ("eval", ["a.json"])):
        assert build_parser(cmd).parse_args([cmd, *extra, "--faithful-empty-slots"]).faithful_empty_slots
        assert not build_parser(cmd).parse_args([cmd, *extra]).faithful_empty_slots


def test_none_refuses_a_budget_it_cannot_honour(engine, scene):
    with pytest.raises(SelectionError):
        _ask(engine, scene, strategy="none", budget=10)


def _no_vision_tower(monkeypatch):
    import engine.vision as vision

    def tower_ran(*args, **kwargs):
        raise AssertionError("the vision tower ran")

    monkeypatch.setattr(vision, "encode_tiles", tower_ran)


def test_none_refuses_a_budget_before_the_vision_tower(engine, scene, monkeypatch):
    engine.features.clear()
    _no_vision_tower(monkeypatch)
    with pytest.raises(SelectionError) as err:
        _ask(engine, scene, strategy="none", budget=10)
    # the message select() gives: 700 x 500 -> 3 x 2 tiles of 144 tokens
    assert str(err.value).startswith("strategy 'none' keeps all 864 tokens (6 tiles x 144) and "
                                     "cannot fit a budget of 10")
    assert error_for_exception(err.value).code == "bad_request"


def _prompt_length(engine, question, n_visual):
    from engine.prompt import split_prompt

    pieces = split_prompt(engine.tokenizer, question)
    return len(pieces.before) + n_visual + len(pieces.after)


@pytest.mark.parametrize("kw, n_visual", [({"strategy": "none"}, 6 * 144),
                                          ({"faithful_empty_slots": True}, 6 * 24),
                                          ({"faithful_empty_slots": True, "budget": 100}, 100)])
def test_a_prompt_longer_than_the_context_is_refused_before_the_vision_tower(
        engine, scene, monkeypatch, kw, n_visual):
    engine.features.clear()
    n_prompt = _prompt_length(engine, "How many buildings?", n_visual)
    monkeypatch.setattr(engine.model.config, "tokenizer_model_max_length", n_prompt)
    _no_vision_tower(monkeypatch)
    with pytest.raises(ContextTooLong) as err:
        _ask(engine, scene, **kw)
    assert (err.value.n_tokens, err.value.limit) == (n_prompt, n_prompt)
    assert error_for_exception(err.value).code == "bad_request"


def test_the_plan_counts_the_models_own_patches_a_tile():
    """refuse_from_plan counted 576 patches a tile whatever the model's grid: a tower of another
    patch size had budgets refused that `select` meets (or let through ones it refuses). The
    loader now refuses such checkpoints (test_loader: a tower of another patch grid is refused
    at load); the function still counts the model's own grid."""
    from types import SimpleNamespace

    from engine.pipeline import model_patches_per_tile, refuse_from_plan
    from engine.selection import get_strategy

    none = get_strategy("none")
    grid16, grid28 = SimpleNamespace(patch_grid=16), SimpleNamespace(patch_grid=28)
    assert model_patches_per_tile(grid16) == 256 and model_patches_per_tile(None) == 576
    refuse_from_plan(none, 6, 6 * 64, model=grid16)
    with pytest.raises(SelectionError, match=r"keeps all 384 tokens \(6 tiles x 64\)"):
        refuse_from_plan(none, 6, 6 * 64 - 1, model=grid16)
    with pytest.raises(SelectionError, match=r"keeps all 1176 tokens \(6 tiles x 196\)"):
        refuse_from_plan(none, 6, 6 * 144, model=grid28)
    refuse_from_plan(none, 6, 6 * 144)  # no model: the released 576 patches a tile


def test_a_prompt_that_fits_is_planned_exactly(engine, scene, monkeypatch):
    """The plan's count is the count sent: one position to spare is enough to answer."""
    engine.features.clear()
    n_prompt = _prompt_length(engine, "How many buildings?", 6 * 24)
    monkeypatch.setattr(engine.model.config, "tokenizer_model_max_length", n_prompt + 1)
    result = _ask(engine, scene, faithful_empty_slots=True)[-1]
    assert result["tokens"]["visual_kept"] == 6 * 24 and result["tokens"]["prompt"] == n_prompt
    assert result["tokens"]["generated"] == 1


def test_cached_features_too_long_for_the_context_skip_the_prefix_prefill(engine, scene, monkeypatch):
    import engine.generate as generate

    _ask(engine, scene)  # the features are cached now
    n_prompt = _prompt_length(engine, "How many buildings?", 6 * 144)
    monkeypatch.setattr(engine.model.config, "tokenizer_model_max_length", n_prompt - 1)

    def prefill(*args, **kwargs):
        raise AssertionError("the prefix was prefilled")

    monkeypatch.setattr(generate, "prefill_prefix", prefill)
    engine.prefixes.clear()
    with pytest.raises(ContextTooLong):
        _ask(engine, scene, strategy="none")


def test_cancel_stops_the_request(engine, scene):
    cancel = threading.Event()
    cancel.set()
    engine.features.clear()
    with pytest.raises(Cancelled):
        list(engine.ask(AskRequest(str(scene), "q?"), cancel=cancel))


def test_cancel_during_the_raster_read_stops_the_request(engine, tmp_path, monkeypatch):
    """A cancel while a huge raster is read stops the read between strips, as the server's
    cancel of a running question does (code 'cancelled'); the vision tower never runs."""
    import engine.raster_read as raster_read

    try:
        from tests.engine.rasters import write_huge_vrt
    except ImportError:  # pragma: no cover
        from rasters import write_huge_vrt

    small = write_geotiff(tmp_path / "small.tif", np.full((3, 54, 54), 90, np.uint8))
    vrt = write_huge_vrt(tmp_path / "huge.vrt", small)
    cancel = threading.Event()
    reads = []
    real = raster_read._read_bands

    def read_then_cancel(*args, **kwargs):
        reads.append(args[2])
        cancel.set()  # the user presses Cancel while the first strip is read
        return real(*args, **kwargs)

    monkeypatch.setattr(raster_read, "_read_bands", read_then_cancel)
    _no_vision_tower(monkeypatch)
    with pytest.raises(Cancelled) as err:
        list(engine.ask(AskRequest(str(vrt), "q?"), cancel=cancel))
    assert len(reads) == 1
    assert error_for_exception(err.value).code == "cancelled"


def test_from_json_rejects_unknown_fields():
    with pytest.raises(RequestError, match="Unknown request fields"):
        AskRequest.from_json({"raster_path": "a.tif", "question": "q", "budgte": 3})
    req = AskRequest.from_json({"raster_path": "a.tif", "question": "  q  ", "budget": 3})
    assert req.question == "q" and req.budget == 3


def test_cli_ask_prints_answer_and_token_counts(tiny_checkpoint, scene, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ask", str(scene), "How many ships?",
         "--weights", str(tiny_checkpoint), "--max-new-tokens", "5", "--budget", "64",
         "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "visual tokens:" in proc.stderr and "timings (s):" in proc.stderr
    import re

    # 700 x 500 -> 6 tiles of 144 candidates; the budget caps what is kept
    counts = re.search(r"visual tokens: (\d+) kept of (\d+) \(geollava\); prompt (\d+), generated (\d+)", proc.stderr)
    assert counts, proc.stderr[-600:]
    kept, candidates, prompt, generated = map(int, counts.groups())
    assert 0 < kept <= 64 and candidates == 6 * 144 and prompt > kept and generated == 5
    assert re.search(r"peak memory: \d+\.\d MiB", proc.stderr)
    # the demo model given with --weights is named as such, not "no weights found"
    assert f"NOTE: {tiny_checkpoint} is the tiny RANDOM demo model" in proc.stderr
    assert "no GeoLLaVA-8K weights found" not in proc.stderr
    assert list(tmp_path.glob("*_heatmap.tif"))


def test_cli_reports_bad_input_without_traceback(tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ask", str(bad), "q?", "--weights", str(tiny_checkpoint)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") or "\nerror:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_huge_virtual_raster_is_read_decimated(tmp_path):
    """A 27,000 x 27,000 raster (a VRT over a small file) never loads at full resolution."""
    from engine.raster import read_for_tiling, read_raster
    from engine.tiling import tiling_read_budget

    small = tmp_path / "small.tif"
    write_geotiff(small, np.full((3, 54, 54), 90, np.uint8), crs="EPSG:32633")
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{c}</ColorInterp><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{small}</SourceFilename><SourceBand>{b}</SourceBand>'
        '<SrcRect xOff="0" yOff="0" xSize="54" ySize="54"/>'
        '<DstRect xOff="0" yOff="0" xSize="27000" ySize="27000"/></SimpleSource></VRTRasterBand>'
        for b, c in ((1, "Red"), (2, "Green"), (3, "Blue")))
    vrt = tmp_path / "huge.vrt"
    vrt.write_text('<VRTDataset rasterXSize="27000" rasterYSize="27000"><SRS>EPSG:32633</SRS>'
                   '<GeoTransform>500000, 0.1, 0, 5000000, 0, -0.1</GeoTransform>'
                   f"{bands}</VRTDataset>")
    budget = tiling_read_budget((27000, 27000))
    assert budget <= 576 * 336 * 336
    img = read_raster(str(vrt), max_pixels=200_000)
    assert img.size[0] * img.size[1] <= 200_000 and img.source_size == (27000, 27000)
    # image pixel -> source pixel keeps the decimation, so footprints stay exact
    assert img.image_to_source.a == pytest.approx(27000 / img.size[0])
    assert (img.pixels == 90).all()
    full = read_for_tiling(str(vrt), aoi={"window": [0, 0, 2700, 2700]})
    assert full.size == (2700, 2700)  # a small window is read at full resolution


def test_tiling_follows_the_checkpoints_pinpoints(tiny_checkpoint, scene, tmp_path):
    """The canvases come from config.json's image_grid_pinpoints, not a hard-coded list."""
    from engine.loader import load_model
    from engine.pipeline import read_and_encode

    loaded = load_model(tiny_checkpoint)
    geometry, _, _ = read_and_encode(loaded.model, str(scene))
    assert geometry.layout.n_tiles == 6  # the released list: 700 x 500 -> 3 x 2
    loaded.model.config.image_grid_pinpoints = [[336, 336], [672, 672]]
    geometry, features, _ = read_and_encode(loaded.model, str(scene))
    assert (geometry.layout.cols, geometry.layout.rows) == (2, 2)
    assert features.patches.shape[0] == 4


@pytest.mark.parametrize("value, days", [(None, 14.0), ("", 14.0), ("0", 0.0), ("7.5", 7.5),
                                         (" 30 ", 30.0)])
def test_output_retention_days_reads_the_variable(monkeypatch, value, days):
    from engine.pipeline import output_retention_days

    if value is None:
        monkeypatch.delenv("GEOVQA_OUTPUT_RETENTION_DAYS", raising=False)
    else:
        monkeypatch.setenv("GEOVQA_OUTPUT_RETENTION_DAYS", value)
    assert output_retention_days() == days


@pytest.mark.parametrize("value", ["2w", "nan", "inf", "14 days"])
def test_a_bad_retention_setting_names_the_variable_before_the_model_loads(monkeypatch, value):
    """'2w' used to fail every command at import with "could not convert string to float"."""
    import engine.loader

    loads = []
    monkeypatch.setattr(engine.loader, "load_model", lambda *a, **k: loads.append(a))
    monkeypatch.setenv("GEOVQA_OUTPUT_RETENTION_DAYS", value)
    named = rf"GEOVQA_OUTPUT_RETENTION_DAYS must be a number of days.*{value!r}"
    with pytest.raises(ValueError, match=named):
        Engine(None, demo_ok=True)
    assert loads == []


def test_a_bad_retention_setting_does_not_break_importing_the_engine(tmp_path):
    """Commands that never prune outputs (info --memory, finetune, --help) import the pipeline."""
    import os

    env = dict(os.environ, GEOVQA_OUTPUT_RETENTION_DAYS="2w", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", "import engine.pipeline"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_prune_outputs_removes_only_old_engine_files(tmp_path):
    import os
    import time

    from engine.pipeline import prune_outputs

    from engine.pipeline import _output_stem

    stem = _output_stem("How many ships?")
    old_tif, old_json = tmp_path / f"{stem}_heatmap.tif", tmp_path / f"{stem}_anchors.geojson"
    new_tif, user = tmp_path / f"{_output_stem('Roads?')}_heatmap.tif", tmp_path / "notes.txt"
    # the user's own files in a folder given as --output-dir, named like heatmaps but not by us
    users_tif, users_json = tmp_path / "survey2024_heatmap.tif", tmp_path / "roads_anchors.geojson"
    for f in (old_tif, old_json, new_tif, user, users_tif, users_json):
        f.write_text("x")
    past = time.time() - 20 * 86400
    for f in (old_tif, old_json, user, users_tif, users_json):
        os.utime(f, (past, past))
    assert prune_outputs(tmp_path, 0) == 0 and old_tif.exists()
    assert prune_outputs(tmp_path, 14) == 2
    assert not old_tif.exists() and not old_json.exists()
    assert new_tif.exists() and user.exists() and users_tif.exists() and users_json.exists()


def test_tokens_a_tile_default_to_the_checkpoints_own(tiny_checkpoint, scene, tmp_path):
    """--tokens-per-tile left out means MAX_TOKENS of the checkpoint's mm_patch_merge_type (24 for
    the released unires_max24), not a fixed 24: a unires_max5 checkpoint gets 5 a tile."""
    import argparse
    import shutil

    from engine.protocol import tokens_per_tile_of
    from engine.run_settings import resolve_tokens_per_tile

    assert [tokens_per_tile_of(m) for m in ("unires_max24", "unires_max32", "unires", None, "max0")] == [
        24, 32, 24, 24, 24]
    ckpt = tmp_path / "max5"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_patch_merge_type"] = "unires_max5"
    (ckpt / "config.json").write_text(json.dumps(config))
    eng = Engine(ckpt, output_dir=tmp_path / "out")
    own = _ask(eng, scene, faithful_empty_slots=True, max_new_tokens=1)[-1]
    given = _ask(eng, scene, faithful_empty_slots=True, max_new_tokens=1, tokens_per_tile=7)[-1]
    assert own["tokens"]["visual_kept"] == 6 * 5 and given["tokens"]["visual_kept"] == 6 * 7
    # finetune / eval record the number they use, resolved from the checkpoint before loading
    args = argparse.Namespace(tokens_per_tile=None)
    resolve_tokens_per_tile(args, {"weights": str(ckpt)})
    assert args.tokens_per_tile == 5
    resolve_tokens_per_tile(args, {"weights": str(tiny_checkpoint)})
    assert args.tokens_per_tile == 5  # given (here: resolved before) stays


def test_the_engine_answers_with_the_checkpoints_generation_config(tiny_checkpoint, engine, scene, tmp_path):
    """Its repetition penalty changes the greedy answer; its eos ids end it."""
    import shutil

    plain = _ask(engine, scene, max_new_tokens=30)[-1]
    ckpt = tmp_path / "penalty"
    shutil.copytree(tiny_checkpoint, ckpt)
    gen_path = ckpt / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({**gen, "repetition_penalty": 1.3}))
    penalized = _ask(Engine(ckpt, output_dir=tmp_path / "out"), scene, max_new_tokens=30)[-1]
    assert penalized["answer"] != plain["answer"]
    first = engine.tokenizer(plain["answer"], add_special_tokens=False).input_ids[0]
    gen_path.write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"], first]}))
    ended = _ask(Engine(ckpt, output_dir=tmp_path / "out2"), scene, max_new_tokens=30)[-1]
    assert ended["answer"] == "" and plain["answer"]


def test_the_out_of_memory_retry_hint_halves_the_budget_that_ran(tiny_checkpoint, scene, tmp_path, monkeypatch):
    """With an adapter trained with a budget, a request without one runs at the adapter's budget:
    the "Retry with budget N" hint halved the request's (none: 2048 -> 1024, more than ran)."""
    import torch

    from engine.jobs import error_for_exception

    eng = Engine(tiny_checkpoint, output_dir=tmp_path / "out")
    eng.adapter_settings = {"strategy": None, "budget": 512, "tokens_per_tile": None,
                            "faithful_empty_slots": None, "bands": None}

    def out_of_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(eng.model), "forward", out_of_memory)
    with pytest.raises(Exception) as exc:
        _ask(eng, scene)
    assert error_for_exception(exc.value, None).extra["retry_budget"] == 256
    with pytest.raises(Exception) as exc:
        _ask(eng, scene, budget=300)  # given: its own
    assert error_for_exception(exc.value, 300).extra["retry_budget"] == 150


# ---------------------------------------------------------------------------------------------
# A cancelled question's stage thread ends with the question (review "soak": it went on encoding
# tiles after the job had ended and the engine's lock was free for the next question)


def stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "geovqa-stage"]


def test_closing_a_stage_early_waits_for_its_thread():
    from engine.pipeline import _with_progress

    release = threading.Event()

    def work(progress):
        progress(1, 2)
        release.wait(10)  # still busy when the consumer closes the stream
        return "done"

    stage = _with_progress(work, lambda done, total: {"done": done})
    assert next(stage) == {"done": 1}
    closer = threading.Thread(target=stage.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while the stage thread was still running"
    release.set()
    closer.join(10)
    assert not closer.is_alive() and not stage_threads()


def test_a_cancelled_questions_vision_stage_ends_before_the_engine_is_free(engine, tmp_path,
                                                                           monkeypatch):
    import engine.vision as vision

    real_encode = vision.encode_tiles
    reached, release = threading.Event(), threading.Event()

    def encode_and_hold(model, tiles, **kw):
        progress = kw.pop("progress")

        def progress_then_hold(done, total):
            progress(done, total)
            reached.set()
            release.wait(10)  # the tower is "still encoding" when the question is cancelled

        return real_encode(model, tiles, progress=progress_then_hold, **kw)

    monkeypatch.setattr(vision, "encode_tiles", encode_and_hold)
    rng = np.random.default_rng(7)  # a raster of its own: no feature-cache hit skips the tower
    raster = write_geotiff(tmp_path / "held.tif", rng.integers(0, 255, (3, 400, 400), dtype=np.uint8))
    cancel = threading.Event()
    stream = engine.ask(AskRequest(str(raster), "What is here?", strategy="none",
                                   max_new_tokens=4), cancel)
    try:
        for event in stream:
            if event["type"] == "status" and event["stage"] == "vision":
                break
        assert reached.is_set()
        cancel.set()  # what JobQueue does on DELETE /jobs/{id} or a closed connection ...
        closer = threading.Thread(target=stream.close)  # ... before it closes the stream
        closer.start()
        closer.join(0.3)
        assert closer.is_alive() and engine._lock.locked(), (
            "the stream closed (and the engine's lock was free) while its stage still encoded")
    finally:
        release.set()
    closer.join(30)
    assert not closer.is_alive() and not stage_threads() and not engine._lock.locked()


def test_an_out_of_memory_error_drops_what_the_engine_holds_on_the_device(tiny_checkpoint, scene,
                                                                          tmp_path, monkeypatch):
    """The image-prefix KV caches (up to 2 x 2 GiB on the GPU) and the tensors in the error's
    frames outlived an OOM, so the retry at a smaller budget ran with them still held."""
    import gc
    import weakref

    eng = Engine(tiny_checkpoint, output_dir=tmp_path / "out")
    _ask(eng, scene, "Is there water?", strategy="geollava")
    assert len(eng.prefixes) == 1
    (key,) = list(eng.prefixes._items)
    held = weakref.ref(eng.prefixes.get(key)[1])  # the PrefixCache the next question reuses

    def out_of_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(eng.model), "forward", out_of_memory)
    with pytest.raises(Exception) as caught:
        _ask(eng, scene, "Is there water?", strategy="geollava")  # a prefix hit, then the OOM
    assert error_for_exception(caught.value).code == "out_of_memory"
    assert len(eng.prefixes) == 0
    gc.collect()
    # gone, though the error (as the server holds it while it answers) is still alive
    assert held() is None and caught.value is not None


def test_health_names_the_weights_folder_as_an_absolute_path(tiny_checkpoint, tiny_loaded, tmp_path,
                                                             monkeypatch):
    """`serve --weights weights/x` answered "weights_dir": "weights/x", relative to the engine's
    working folder, which a client elsewhere cannot read."""
    monkeypatch.chdir(tiny_checkpoint.parent)
    eng = Engine(tiny_checkpoint.name, loaded=tiny_loaded, output_dir=tmp_path / "out")
    assert eng.health()["weights_dir"] == str(tiny_checkpoint.resolve())


# ---------------------------------------------------------------------------------------------
# The result event's fields and timings, and the prefix cache's key


def test_the_result_names_its_files_and_the_budget_that_ran(engine, scene):
    """heatmap_file / anchors_file are the bare names a client GETs from /files; budget is the
    request's."""
    result = _ask(engine, scene, "Where are the roads?", strategy="geollava", budget=40)[-1]
    assert result["budget"] == 40 and result["strategy"] == "geollava"
    assert result["heatmap_file"] == Path(result["heatmap_path"]).name
    assert result["anchors_file"] == Path(result["anchors_path"]).name
    assert (engine.output_dir / result["heatmap_file"]).is_file()
    assert (engine.output_dir / result["anchors_file"]).is_file()
    # named as pruning (GEOVQA_OUTPUT_RETENTION_DAYS) recognises the engine's own files
    from engine.pipeline import ENGINE_OUTPUT_NAME

    assert result["heatmap_file"].endswith("_heatmap.tif") and result["anchors_file"].endswith("_anchors.geojson")
    assert ENGINE_OUTPUT_NAME.match(result["heatmap_file"]) and ENGINE_OUTPUT_NAME.match(result["anchors_file"])
    assert result["stopped"] == "length" and result["tokens"]["generated"] == 6


def test_the_timings_say_where_the_time_went(engine, scene, monkeypatch):
    """read, vision and the image prefix's prefill each in their own figure, total over all."""
    import time

    import engine.generate as G
    import engine.raster as R

    slow_read, slow_prefill = R.read_for_tiling, G.prefill_prefix

    def read(*a, **k):
        time.sleep(0.3)
        return slow_read(*a, **k)

    def prefill(*a, **k):
        time.sleep(0.3)
        return slow_prefill(*a, **k)

    monkeypatch.setattr(R, "read_for_tiling", read)
    monkeypatch.setattr(G, "prefill_prefix", prefill)
    engine.features.clear()
    engine.prefixes.clear()
    t = _ask(engine, scene, "Is there water?", strategy="geollava")[-1]["timings"]
    assert t["read"] >= 0.3 and t["vision"] < t["read"]
    assert t["prefill"] >= 0.3  # the prefix prefill belongs to this question's prefill
    stages = sum(t[k] for k in ("read", "vision", "select", "prefill", "generate", "write"))
    assert t["total"] >= stages - 0.01


@pytest.mark.parametrize("first, second", [
    ({"strategy": "geollava", "budget": 30}, {"strategy": "geollava", "budget": 60}),
    ({"strategy": "random", "budget": 60, "seed": 1}, {"strategy": "random", "budget": 60, "seed": 2}),
])
def test_a_prefix_is_reused_only_for_the_same_visual_tokens(engine, scene, first, second):
    """Another budget or seed selects other tokens: its image prefix is not the first one's."""
    engine.prefixes.clear()
    _ask(engine, scene, "Is there water?", **first)
    b = _ask(engine, scene, "Is there water?", **second)[-1]
    assert b["cache"]["kv_prefix"] is False
    again = _ask(engine, scene, "Is there water?", **second)[-1]
    assert again["cache"]["kv_prefix"] is True and again["answer"] == b["answer"]


def test_files_of_a_long_question_are_named_so_that_pruning_finds_them(tmp_path):
    """The slug is cut to the 40 characters ENGINE_OUTPUT_NAME allows; a question of no letters
    is 'question'."""
    import os
    import time

    from engine.pipeline import ENGINE_OUTPUT_NAME, _output_stem, prune_outputs

    long_stem = _output_stem("How many ships are moored along the northern quay of the harbour today?")
    empty_stem = _output_stem("???")
    assert "-question-" in empty_stem
    past = time.time() - 20 * 86400
    for stem in (long_stem, empty_stem):
        for suffix in ("_heatmap.tif", "_anchors.geojson"):
            assert ENGINE_OUTPUT_NAME.match(stem + suffix)
            (tmp_path / (stem + suffix)).write_text("x")
            os.utime(tmp_path / (stem + suffix), (past, past))
    assert prune_outputs(tmp_path, 14) == 4


def test_a_folder_is_refused_as_no_raster(engine, tmp_path):
    with pytest.raises(RequestError) as exc:
        _ask(engine, tmp_path)
    assert exc.value.code == "not_a_raster"


@pytest.mark.parametrize("n, ok", [(1, True), (4096, True), (0, False), (4097, False)])
def test_max_new_tokens_between_1_and_4096(n, ok):
    req = AskRequest("a.tif", "Is there water?", max_new_tokens=n)
    if ok:
        assert req.validated().max_new_tokens == n
    else:
        with pytest.raises(RequestError, match="between 1 and 4096"):
            req.validated()


def test_health_says_no_weights_are_present_while_the_demo_model_answers(tiny_checkpoint, tiny_loaded,
                                                                        tmp_path, monkeypatch):
    from conftest import demo_and_real

    real = demo_and_real(tmp_path, monkeypatch, tiny_checkpoint)
    demo = Engine(None, loaded=tiny_loaded, output_dir=tmp_path / "out").health()
    assert demo["demo_model"] is True and demo["weights_present"] is False
    given = Engine(real, loaded=tiny_loaded, output_dir=tmp_path / "out")
    assert given.demo is False and given.health()["weights_present"] is True


# ---------------------------------------------------------------------------------------------
# geovqa_training.json as the engine reads it back


def _training_file(folder, **fields):
    from engine.adapter_settings import write_training_settings

    record = {"format": 1, "strategy": "anchored", "budget": None, "tokens_per_tile": 4,
              "faithful_empty_slots": False, "bands": [4, 3, 2], "records_with_own_bands": 3, **fields}
    write_training_settings(folder, record)
    return folder


def test_the_training_record_reads_back_as_written(tmp_path):
    from engine.adapter_settings import read_training_settings

    got = read_training_settings(_training_file(tmp_path, bands=[2]))
    assert got == {"strategy": "anchored", "budget": None, "tokens_per_tile": 4, "faithful_empty_slots": False,
                   "bands": [2], "records_with_own_bands": 3}


@pytest.mark.parametrize("field, value", [("budget", 0), ("tokens_per_tile", 0), ("budget", True),
                                          ("strategy", "magic"), ("bands", [4, 3]), ("bands", [0]),
                                          ("faithful_empty_slots", "yes")])
def test_a_training_record_that_cannot_be_used_is_refused(tmp_path, field, value):
    from engine.adapter_settings import AdapterSettingsError, read_training_settings

    with pytest.raises(AdapterSettingsError, match=f"{field} .* is not a usable value"):
        read_training_settings(_training_file(tmp_path, **{field: value}))


def test_the_settings_text_names_every_setting():
    from engine.adapter_settings import settings_text

    assert settings_text({"strategy": "anchored", "tokens_per_tile": 4, "budget": 500,
                          "faithful_empty_slots": True, "bands": [4, 3, 2]}) == (
        "strategy anchored, 4 tokens a tile, budget 500, faithful empty slots, bands 4, 3, 2")
    assert settings_text({"strategy": "geollava", "tokens_per_tile": None, "budget": None,
                          "faithful_empty_slots": False, "bands": None}) == (
        "strategy geollava, no budget, the engine's default bands")


def test_freeing_gpu_memory_first_collects_what_only_reference_cycles_hold():
    """An OOM error's traceback and frames form cycles that still hold the request's tensors."""
    import gc
    import weakref

    from engine.errors import free_gpu_memory

    class Held:
        pass

    gc.disable()
    try:
        held = Held()
        held.me = held  # a reference cycle: only the collector frees it
        ref = weakref.ref(held)
        del held
        assert ref() is not None
        free_gpu_memory()
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("strategy", ["pyramid", "budget"])
def test_question_guided_strategies_score_against_the_selection_text(engine, scene, strategy):
    """eval asks with the official prompt (options + answer instruction) but selects on the
    question and its options (`selection_text`)."""
    def anchors(question, **kw):
        result = _ask(engine, scene, question, strategy=strategy, budget=60, max_new_tokens=1, **kw)[-1]
        return [f["geometry"] for f in result["anchors"]["features"]]

    prompt = "How many ships are docked?\n(A) one\n(B) two\nAnswer with the option's letter."
    guided = anchors(prompt, selection_text="boats on the water near the bright object")
    assert guided == anchors("boats on the water near the bright object")
    assert guided != anchors(prompt)


def test_every_kind_of_out_of_memory_error_is_one():
    from engine.errors import is_oom

    assert is_oom(torch.OutOfMemoryError(""))  # by its type, whatever it says
    assert is_oom(MemoryError("Unable to allocate 4.00 GiB for an array with shape (2, 2)"))  # numpy's
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_an_adapter_trained_on_the_engines_choice_takes_given_bands_without_a_note(engine, scene, monkeypatch):
    """Bands or tokens a tile the adapter left to the engine (None in its record): a request
    that gives them differs from nothing it learned; another strategy does."""
    monkeypatch.setattr(engine, "adapter_settings", {"strategy": "anchored", "budget": None, "tokens_per_tile": None,
                                                     "faithful_empty_slots": False, "bands": None})
    req, notes = engine.resolve_visual(AskRequest(str(scene), "q?", bands=[3, 2, 1], tokens_per_tile=8))
    assert notes == []
    assert (req.strategy, req.bands, req.tokens_per_tile, req.faithful_empty_slots) == ("anchored", [3, 2, 1], 8, False)
    _, notes = engine.resolve_visual(AskRequest(str(scene), "q?", strategy="geollava"))
    assert len(notes) == 1 and "this request asks for strategy geollava" in notes[0]


def test_a_geojson_area_in_another_crs_is_reprojected_with_a_note(engine, scene):
    """A GeoJSON area whose legacy "crs" member names EPSG:4326 over a UTM raster: the engine
    says it reprojected it (engine/aoi_crs.py) and reads the area where it lies."""
    from rasterio.warp import transform

    x0, y0 = 500000 + 10 * 300, 5000000 - 10 * 100  # the bright object's corner, 10 m pixels
    xs, ys = [x0, x0 + 600, x0 + 600, x0, x0], [y0, y0, y0 - 400, y0 - 400, y0]
    lons, lats = transform("EPSG:32633", "EPSG:4326", xs, ys)
    aoi = {"geojson": {"type": "Polygon", "coordinates": [list(map(list, zip(lons, lats)))],
                       "crs": {"type": "name", "properties": {"name": "EPSG:4326"}}}}
    events = _ask(engine, scene, aoi=aoi)
    notes = [e["message"] for e in events if e["type"] == "status" and e["message"].startswith("note:")]
    assert notes == ["note: the area of interest's GeoJSON is in EPSG:4326 (its \"crs\" member); it "
                     "was reprojected into the raster's CRS (EPSG:32633)"]
    assert events[-1]["type"] == "result"
    plain = {"geojson": {"type": "Polygon", "coordinates": [list(map(list, zip(xs, ys)))]}}
    assert not [e for e in _ask(engine, scene, aoi=plain) if e["type"] == "status"
                and e["message"].startswith("note:")]
