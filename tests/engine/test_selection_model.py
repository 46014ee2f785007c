"""Every strategy end to end with the tiny model on a small synthetic raster: real vision
features, the real reghead / CLIP q,v / projector / LM text scoring, geometry and heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.selection import get_strategy
from engine.selection import clusters as C
from engine.selection.geollava import pick_clusters

STRATS = ["geollava", "background", "anchored", "pyramid", "budget", "uniform", "random", "none"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory, tiny_model):
    from engine.geometry import TokenGeometry
    from engine.raster import read_for_tiling
    from engine.synth import make_scene
    from engine.tiling import make_tiles, plan_tiles
    from engine.vision import encode_tiles

    sc = make_scene(tmp_path_factory.mktemp("synth") / "scene.tif", (800, 560), objects=4, seed=2)
    image = read_for_tiling(str(sc.path))
    layout = plan_tiles(image.size)
    geometry = TokenGeometry.build(image, layout)
    feats = encode_tiles(tiny_model, make_tiles(image.pixels, layout), batch_size=8)
    return sc, geometry, feats


@pytest.mark.parametrize("name", STRATS)
def test_strategy_end_to_end(name, scene, tiny_model, tiny_tokenizer, tmp_path):
    from engine.heatmap import write_heatmap
    from engine.synth import object_recall

    sc, geometry, feats = scene
    t = feats.n_tiles
    budget = None if name == "none" else 40
    strat = get_strategy(name, tokenizer=tiny_tokenizer) if name in ("pyramid", "budget") \
        else get_strategy(name)
    sel = strat.select(feats, geometry, "How many boats are there?", budget, model=tiny_model)
    assert 0 < sel.n_tokens <= (budget or t * 144)
    assert sel.embeds.shape[1] == tiny_model.config.hidden_size
    assert torch.isfinite(sel.embeds).all()
    for m in sel.members:
        assert len(set((np.asarray(m) // 576).tolist())) <= 1
    r = object_recall(sel, geometry, sc.objects)
    assert 0.0 <= r <= 1.0
    files = write_heatmap(sel, geometry, tmp_path, name)
    assert files.tif_path.is_file() and files.geojson["features"]
    # deterministic
    again = strat.select(feats, geometry, "How many boats are there?", budget, model=tiny_model)
    assert [m.tolist() for m in again.members] == [m.tolist() for m in sel.members]
    assert torch.equal(again.embeds, sel.embeds)


def test_geollava_uses_reghead_and_projects_cluster_means(scene, tiny_model):
    _, geometry, feats = scene
    sel = get_strategy("geollava").select(feats, geometry, "q", None, model=tiny_model)
    q, v = tiny_model.select_layer_qv()
    pick = pick_clusters(feats.cls, feats.patches, q, v, affinity=tiny_model.affinity, k=24)
    torch.testing.assert_close(sel.embeds, tiny_model.project(pick.vectors))
    flat = feats.patches.reshape(-1, feats.dim)
    for k in range(0, sel.n_tokens, max(1, sel.n_tokens // 7)):
        torch.testing.assert_close(tiny_model.project(flat[torch.as_tensor(sel.members[k])].mean(0, keepdim=True))[0],
                                   sel.embeds[k], rtol=1e-4, atol=1e-5)
    assert sel.n_tokens <= feats.n_tiles * 24
    # the clustering used the checkpoint's reghead: same labels as the pure function
    labels, counts, _, _ = C.cluster(tiny_model.affinity(feats.patches).float(), 24)
    assert sel.info["clusters_total"] == int(counts.sum())
    faithful = get_strategy("geollava", faithful_empty_slots=True).select(
        feats, geometry, "q", None, model=tiny_model)
    assert faithful.n_tokens == feats.n_tiles * 24


def test_none_unlimited_is_the_unpruned_path(scene, tiny_model):
    _, geometry, feats = scene
    sel = get_strategy("none").select(feats, geometry, "q", None, model=tiny_model)
    t = feats.n_tiles
    proj = tiny_model.project(feats.patches).reshape(t, 24, 24, -1).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(proj, 2).flatten(2).transpose(1, 2).reshape(t * 144, -1)
    torch.testing.assert_close(sel.embeds, ref)
    # uniform without a budget pools the very same 2 x 2 cells (before the projector), each
    # over its valid patches only (`none` keeps LongVA's whole cells)
    uni = get_strategy("uniform").select(feats, geometry, "q", None, model=tiny_model)
    valid = geometry.patch_valid.reshape(-1)
    none_cells = {tuple(m[valid[m]]) for m in sel.members if valid[m].any()}
    assert {tuple(m) for m in uni.members} == none_cells


def test_text_score_is_a_distribution_over_tokens(scene, tiny_model, tiny_tokenizer):
    from engine.selection.textscore import TextScorer

    _, _, feats = scene
    vis = tiny_model.project(feats.patches[0, :50])
    s = TextScorer(tiny_model, "Where is the boat?", tiny_tokenizer)(vis)
    assert s.shape == (50,) and torch.isclose(s.sum(), torch.tensor(1.0), atol=1e-4)
    s2 = TextScorer(tiny_model, "Where is the boat?", tiny_tokenizer)(vis)
    assert torch.equal(s, s2)


def test_tokenizer_found_next_to_the_checkpoint(scene, tiny_model, tiny_tokenizer):
    """The pipeline passes no tokenizer: the scorer loads the one saved with the checkpoint."""
    from engine.selection.textscore import TextScorer, question_ids

    ids = question_ids(tiny_model, "Where is the boat?")
    assert ids.tolist() == tiny_tokenizer("Where is the boat?", add_special_tokens=False)["input_ids"]
    _, geometry, feats = scene
    a = get_strategy("budget").select(feats, geometry, "Where is the boat?", 30, model=tiny_model)
    b = get_strategy("budget", tokenizer=tiny_tokenizer).select(feats, geometry, "Where is the boat?",
                                                                30, model=tiny_model)
    assert [m.tolist() for m in a.members] == [m.tolist() for m in b.members]
    vis = feats.patches[0, :40]
    sc = TextScorer(tiny_model, "Where is the boat?")
    torch.testing.assert_close(sc.score_features(vis), sc(tiny_model.project(vis)))


def test_every_token_of_the_question_steers_the_score(scene, tiny_model, tiny_tokenizer, monkeypatch):
    """The scorer reads the first layer's inputs, word embeddings without context: it used to
    keep the question's last 8 tokens only, so a long question was judged by its last words and
    two questions ending alike (a benchmark's answer instruction) were scored the same."""
    import engine.selection.textscore as T
    from engine.selection.textscore import TextScorer

    _, _, feats = scene
    vis = tiny_model.project(feats.patches[0, :200])
    tail = " Answer with the option's letter from the given choices directly."
    a = TextScorer(tiny_model, "Where is the airport runway?" + tail, tiny_tokenizer)(vis)
    b = TextScorer(tiny_model, "How many ships are docked in the harbour?" + tail, tiny_tokenizer)(vis)
    assert not torch.allclose(a, b)
    # a long question is scored in chunks small enough for its logits; the result is the same
    monkeypatch.setattr(T, "LOGITS_PER_CHUNK", 2**16)  # a 7B model's 28 heads, in small
    sc = TextScorer(tiny_model, "Where is the boat? " * 60, tiny_tokenizer)
    assert sc.chunk_size(8192) == 256
    whole = torch.softmax(sc._logits(vis), dim=-1).mean(dim=(0, 1))
    torch.testing.assert_close(sc(vis, chunk=64), whole)


def test_a_lora_adapter_keeps_the_first_layer_scorer(scene, tiny_checkpoint, tiny_tokenizer):
    """Under peft (ask/serve/eval --adapter) `model.model` is the wrapped LlavaQwenForCausalLM,
    not the decoder: the scorer fell back to the stub's cosine similarity without a word, and a
    LoRA that changes nothing changed which tokens `budget` kept."""
    from peft import LoraConfig, get_peft_model

    from engine.loader import load_model
    from engine.selection.textscore import TextScorer

    _, geometry, feats = scene
    model = load_model(tiny_checkpoint, device="cpu", quantization="fp32").model
    vis = model.project(feats.patches[0, :30])
    plain = TextScorer(model, "Where is the boat?", tiny_tokenizer)
    ref_scores = plain(vis)
    ref = get_strategy("budget", tokenizer=tiny_tokenizer).select(feats, geometry, "Where is the boat?", 40,
                                                                 model=model)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"]))  # LoRA B = 0: no change
    sc = TextScorer(wrapped, "Where is the boat?", tiny_tokenizer)
    assert sc.layer is plain.layer
    torch.testing.assert_close(sc(vis), ref_scores)
    got = get_strategy("budget", tokenizer=tiny_tokenizer).select(feats, geometry, "Where is the boat?", 40,
                                                                 model=wrapped)
    assert [m.tolist() for m in got.members] == [m.tolist() for m in ref.members]
