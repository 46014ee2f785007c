"""Processing runs as the toolbox, models and tasks make them, after the move of non-file renders into processAlgorithm
(render.PreparedRender): cancel during a render, a layer removed while running, concurrent runs,
models, outputs, validation, help and the style of the loaded results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import (python_errors, recording_feedback, run_then_load, set_settings, virtual_raster_layer,
                      wait_for_tasks, wait_until)

QUESTION = "How big?"


def _task(alg_id, params, feedback=None, project=True):
    from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback,
                           QgsProject)

    alg = QgsApplication.processingRegistry().createAlgorithmById(alg_id)
    context = QgsProcessingContext()
    if project:
        context.setProject(QgsProject.instance())
    feedback = feedback or QgsProcessingFeedback()
    done = []
    task = QgsProcessingAlgRunnerTask(alg, params, context, feedback)  # prepareAlgorithm runs here
    task.executed.connect(lambda ok, res: done.append((ok, res, time.perf_counter())))
    return task, done, feedback, context


def _renders(tmp_path):
    folder = tmp_path / "results" / "renders"
    return sorted(folder.glob("*")) if folder.exists() else []


def _cancelled_while_rendering(alg_id, params):
    """Runs ``alg_id`` in a task and cancels it 0.2 s into its render of a non-file layer:
    (ok, time of the cancel, time the run ended, feedback, Python errors meanwhile)."""
    from qgis.core import QgsApplication

    with python_errors() as errors:
        task, done, fb, _ = _task(alg_id, params, recording_feedback())
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: any("Rendering the non-file layer" in i for i in fb.of("info")), 60, "the render")
        time.sleep(0.2)
        t0 = time.perf_counter()
        fb.cancel()
        wait_until(lambda: done, 60, "the cancelled run")
        wait_for_tasks()
    ok, _res, t1 = done[0]
    return ok, t0, t1, fb, errors


def test_cancel_during_a_render_ends_promptly_and_cleanly(plugin, stub_engine, raster_layer, qgis_processing,
                                                          qgis_new_project, tmp_path):
    set_settings(render_max_px=8192)
    src = raster_layer("src", width=400, height=300)
    virt = virtual_raster_layer(src, "big", size=(8192, 6144))
    ok, t0, t1, fb, errors = _cancelled_while_rendering("geovqa:ask_raster",
                                                        {"INPUT": virt.id(), "QUESTION": QUESTION})
    assert not ok
    assert t1 - t0 < 1.0, f"the run ended {t1 - t0:.2f} s after Cancel"
    assert not stub_engine.requests, "the engine was asked after Cancel"
    assert not errors, errors
    assert not any("Traceback" in e for e in fb.of("error")), fb.of("error")
    assert _renders(tmp_path) == [], "a cancelled render left a file"


def test_a_layer_removed_from_the_project_while_the_algorithm_runs(plugin, stub_engine, raster_layer,
                                                                   qgis_processing, qgis_new_project, tmp_path):
    from qgis.core import QgsApplication, QgsProject

    set_settings(render_max_px=2048)
    src = raster_layer("src")
    virt = virtual_raster_layer(src, "v", size=(2048, 1536))
    with python_errors() as errors:
        task, done, fb, _ = _task("geovqa:ask_raster", {"INPUT": virt.id(), "QUESTION": QUESTION})
        QgsProject.instance().removeMapLayer(virt.id())  # deleted, after prepareAlgorithm
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: done, 60, "the run")
        wait_for_tasks()
    ok, res, _ = done[0]
    assert ok and res["ANSWER"], res
    assert not errors, errors


def test_the_same_algorithm_twice_at_once_each_with_its_own_render(plugin, stub_engine, raster_layer,
                                                                    qgis_processing, qgis_new_project, tmp_path):
    from osgeo import gdal
    from qgis.core import QgsApplication

    set_settings(render_max_px=1024)
    src = raster_layer("src")
    virt = virtual_raster_layer(src, "v", size=(1024, 768))
    aois = ["500000,500320,4999520,5000000 [EPSG:32633]", "500320,500640,4999520,5000000 [EPSG:32633]"]
    runs = [_task("geovqa:ask_raster", {"INPUT": virt.id(), "QUESTION": QUESTION, "AOI": a}) for a in aois]
    with python_errors() as errors:
        for task, *_ in runs:
            QgsApplication.taskManager().addTask(task)
        wait_until(lambda: all(d for _, d, _, _ in runs), 60, "both runs")
        wait_for_tasks()
    assert not errors, errors
    assert all(d[0][0] for _, d, _, _ in runs), [d for _, d, _, _ in runs]
    paths = [r["raster_path"] for r in stub_engine.requests]
    assert len(set(paths)) == 2, paths
    x0 = sorted(gdal.Open(p).GetGeoTransform()[0] for p in paths)
    assert x0 == pytest.approx([500000.0, 500320.0], abs=1.0)


def _model_asking_its_input():
    """A model with a raster parameter IN and a child "ask" (Ask a raster about IN, QUESTION),
    not added to the model yet: (model, ask)."""
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelParameter,
                           QgsProcessingParameterRasterLayer)

    model = QgsProcessingModelAlgorithm("chain", "test")
    model.addModelParameter(QgsProcessingParameterRasterLayer("IN", "in"), QgsProcessingModelParameter("IN"))
    ask = QgsProcessingModelChildAlgorithm("geovqa:ask_raster")
    ask.setChildId("ask")
    ask.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("IN")])
    ask.addParameterSources("QUESTION", [QgsProcessingModelChildParameterSource.fromStaticValue(QUESTION)])
    return model, ask


def test_a_model_chains_the_heatmap_into_another_algorithm(plugin, stub_engine, raster_layer, qgis_processing,
                                                           qgis_new_project, tmp_path):
    import processing
    from qgis.core import (QgsProcessingModelChildAlgorithm, QgsProcessingModelChildParameterSource,
                           QgsProcessingModelOutput)

    layer = raster_layer("a")
    model, ask = _model_asking_its_input()
    model.addChildAlgorithm(ask)
    stats = QgsProcessingModelChildAlgorithm("native:rasterlayerstatistics")
    stats.setChildId("stats")
    stats.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromChildOutput("ask", "HEATMAP")])
    stats.addParameterSources("BAND", [QgsProcessingModelChildParameterSource.fromStaticValue(1)])
    out = QgsProcessingModelOutput("STATS_OUT")
    out.setChildOutputName("OUTPUT_HTML_FILE")
    out.setChildId("stats")
    stats.setModelOutputs({"STATS_OUT": out})
    model.addChildAlgorithm(stats)
    res = processing.run(model, {"IN": layer, "stats:STATS_OUT": str(tmp_path / "stats.html")})
    assert Path(res["stats:STATS_OUT"]).exists(), res
    assert stub_engine.requests


@pytest.mark.parametrize("ext", ["tif", "tiff"])
@pytest.mark.parametrize("vext", ["geojson", "gpkg"])
def test_outputs_to_given_paths(plugin, stub_engine, raster_layer, qgis_processing, qgis_new_project, tmp_path, ext,
                                vext):
    import processing
    from qgis.core import QgsRasterLayer, QgsVectorLayer

    layer = raster_layer("a")
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": QUESTION,
                                               "HEATMAP": str(tmp_path / f"h.{ext}"),
                                               "ANCHORS": str(tmp_path / f"a.{vext}")})
    assert res["HEATMAP"] == str(tmp_path / f"h.{ext}") and QgsRasterLayer(res["HEATMAP"]).isValid()
    assert QgsVectorLayer(res["ANCHORS"]).isValid() and QgsVectorLayer(res["ANCHORS"]).featureCount() == 2


@pytest.mark.parametrize("question", ["", "   ", "\n"])
def test_an_empty_question_is_refused_before_the_run(plugin, raster_layer, stub_engine, qgis_processing, question):
    from qgis.core import QgsApplication, QgsProcessingContext

    layer = raster_layer("a")
    alg = QgsApplication.processingRegistry().createAlgorithmById("geovqa:ask_raster")
    ok, msg = alg.checkParameterValues({"INPUT": layer, "QUESTION": question}, QgsProcessingContext())
    assert not ok, "an empty question passed the check"


@pytest.mark.parametrize("budget", [-1, "abc"])
def test_a_bad_budget_is_refused(plugin, raster_layer, stub_engine, qgis_processing, budget):
    from qgis.core import QgsApplication, QgsProcessingContext

    layer = raster_layer("a")
    alg = QgsApplication.processingRegistry().createAlgorithmById("geovqa:ask_raster")
    ok, msg = alg.checkParameterValues({"INPUT": layer, "QUESTION": QUESTION, "BUDGET": budget},
                                       QgsProcessingContext())
    assert not ok and "budget" in msg.lower(), msg


def test_a_blank_question_is_refused_before_a_layer_is_rendered(plugin, stub_engine, raster_layer, qgis_processing,
                                                                qgis_new_project, tmp_path):
    """A question of blanks passes checkParameterValues (QGIS refuses only ""), so the toolbox
    runs the algorithm: a web/virtual layer is rendered (minutes for a web service) before the
    request is built and refused with "Please type a question."."""
    import processing
    from qgis.core import QgsProcessingException

    set_settings(render_max_px=1024)
    virt = virtual_raster_layer(raster_layer("src"), "v", size=(1024, 768))
    fb = recording_feedback()
    with pytest.raises(QgsProcessingException):
        processing.run("geovqa:ask_raster", {"INPUT": virt, "QUESTION": "   "}, feedback=fb)
    assert not any("Rendering" in i for i in fb.of("info")), fb.of("info")
    assert _renders(tmp_path) == [], _renders(tmp_path)


def _shader_items(layer):
    shader = layer.renderer().shader().rasterShaderFunction()
    return [(round(i.value, 9), i.color.name(0x1), i.label) for i in shader.colorRampItemList()]


@pytest.mark.parametrize("temporary", [True, False])
def test_loaded_results_are_styled_and_stacked_as_the_docks(plugin, stub_engine, raster_layer, qgis_processing,
                                                            qgis_new_project, tmp_path, temporary):
    from geovqa.layers import add_result_layers
    from qgis.core import (QgsProcessing, QgsProcessingOutputLayerDefinition, QgsProject, QgsRasterLayer,
                           QgsVectorLayer)

    layer = raster_layer("a")
    project = QgsProject.instance()
    outs = {}
    for name, path in (("HEATMAP", tmp_path / "z_heat.tif"), ("ANCHORS", tmp_path / "a_anchors.geojson")):
        d = QgsProcessingOutputLayerDefinition(QgsProcessing.TEMPORARY_OUTPUT if temporary else str(path), project)
        outs[name] = d
    before = set(project.mapLayers())
    from qgis.core import QgsApplication

    alg = QgsApplication.processingRegistry().createAlgorithmById("geovqa:ask_raster")
    res, loaded, _errors = run_then_load(alg, dict({"INPUT": layer.id(), "QUESTION": QUESTION}, **outs))
    assert loaded
    new = [project.mapLayer(i) for i in project.mapLayers() if i not in before]
    heat = next(lyr for lyr in new if isinstance(lyr, QgsRasterLayer))
    anch = next(lyr for lyr in new if isinstance(lyr, QgsVectorLayer))
    _, dock_heat, dock_anch = add_result_layers(QUESTION, res["HEATMAP"], res["ANCHORS"], layer)
    assert _shader_items(heat) == _shader_items(dock_heat)
    assert heat.renderer().opacity() == dock_heat.renderer().opacity()
    assert anch.renderer().type() == dock_anch.renderer().type() and anch.labelsEnabled() == dock_anch.labelsEnabled()
    # the dock draws the anchors above the heatmap: drawn under its 78 % opaque cells, they are hidden
    order = [lyr.id() for lyr in project.layerTreeRoot().layerOrder()]
    assert order.index(anch.id()) < order.index(heat.id()), [project.mapLayer(i).name() for i in order]


def test_cancel_while_the_render_is_written_asks_nothing_and_keeps_no_render(plugin, stub_engine, raster_layer,
                                                                             qgis_processing, qgis_new_project,
                                                                             tmp_path):
    """Cancel pressed once the drawing is done, while its GeoTIFF is written (seconds for a large
    render): nothing checks Cancel between the write and the request, so the engine is still
    asked (a real engine starts reading and selecting tokens) and the render stays."""
    from qgis.core import QgsApplication

    set_settings(render_max_px=8192)
    src = raster_layer("src", width=400, height=300)
    virt = virtual_raster_layer(src, "big", size=(8192, 6144))
    fb = recording_feedback()
    with python_errors() as errors:
        task, done, fb, _ = _task("geovqa:ask_raster", {"INPUT": virt.id(), "QUESTION": QUESTION}, fb)
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: _renders(tmp_path), 120, "the render's file")  # GDAL created it: writing
        fb.cancel()
        wait_until(lambda: done, 60, "the cancelled run")
        wait_for_tasks()
    ok, res, _ = done[0]
    assert not errors, errors
    assert not ok
    assert not stub_engine.requests, "the engine was asked after Cancel"
    assert _renders(tmp_path) == [], "a cancelled run kept its render"


def test_a_failed_run_removes_its_render_and_an_answered_one_keeps_it(plugin, stub_engine, raster_layer,
                                                                        qgis_processing, qgis_new_project, tmp_path):
    """The engine refused the question after the virtual layer was rendered: the run failed and its
    render stayed in the results folder, which nothing refers to. A file layer's own file stays."""
    from qgis.core import QgsApplication

    src = raster_layer("src")
    virt = virtual_raster_layer(src, "v")
    stub_engine.fail_with = {"code": "internal", "message": "The engine failed.", "hint": None}
    for layer in (virt, src):
        task, done, fb, _ = _task("geovqa:ask_raster", {"INPUT": layer.id(), "QUESTION": QUESTION},
                                  recording_feedback())
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: done, 60, "the failed run")
        wait_for_tasks()
        assert not done[0][0] and "The engine failed." in " ".join(fb.of("error")), fb.log
    assert len(stub_engine.requests) == 2  # both were asked: the render was made
    assert _renders(tmp_path) == [], "a failed run kept its render"
    assert Path(src.source()).is_file()
    stub_engine.fail_with = None
    task, done, _fb, _ = _task("geovqa:ask_raster", {"INPUT": virt.id(), "QUESTION": QUESTION})
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 60, "the answered run")
    wait_for_tasks()
    assert done[0][0] and len(_renders(tmp_path)) == 1  # what was sent stays with its answer


def test_a_run_cancelled_while_answered_removes_its_render(plugin, stub_engine, raster_layer, qgis_processing,
                                                           qgis_new_project, tmp_path):
    from qgis.core import QgsApplication

    stub_engine.token_delay = 0.2
    virt = virtual_raster_layer(raster_layer("src"), "v")
    task, done, fb, _ = _task("geovqa:ask_raster", {"INPUT": virt.id(), "QUESTION": QUESTION}, recording_feedback())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: "Answering…" in fb.of("text"), 60, "the answer")
    assert len(_renders(tmp_path)) == 1
    fb.cancel()
    wait_until(lambda: done, 60, "the cancelled run")
    wait_for_tasks()
    assert not done[0][0]
    assert _renders(tmp_path) == [], "a cancelled run kept its render"


def test_cancel_during_a_batch_render(plugin, stub_engine, raster_layer, qgis_processing, qgis_new_project, tmp_path):
    set_settings(render_max_px=8192)
    src = raster_layer("src", width=400, height=300)
    virt = [virtual_raster_layer(src, f"big{i}", size=(8192, 6144)) for i in range(2)]
    _ok, t0, t1, fb, errors = _cancelled_while_rendering(
        "geovqa:batch_questions", {"LAYERS": [v.id() for v in virt], "QUESTIONS": "q1\nq2",
                                   "OUTPUT": str(tmp_path / "a.csv")})
    assert not errors, errors
    assert t1 - t0 < 1.0
    assert not stub_engine.requests
    assert not fb.of("error"), fb.log


def test_a_model_with_a_rendered_layer_run_in_the_background(plugin, stub_engine, raster_layer, qgis_processing,
                                                             qgis_new_project, tmp_path):
    from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext,
                           QgsProcessingModelOutput, QgsProject)

    set_settings(render_max_px=1024)
    virt = virtual_raster_layer(raster_layer("src"), "v", size=(1024, 768))
    model, ask = _model_asking_its_input()
    out = QgsProcessingModelOutput("HEAT")
    out.setChildOutputName("HEATMAP")
    out.setChildId("ask")
    ask.setModelOutputs({"HEAT": out})
    model.addChildAlgorithm(ask)
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    fb = recording_feedback()
    done = []
    with python_errors() as errors:
        task = QgsProcessingAlgRunnerTask(model, {"IN": virt.id(), "ask:HEAT": str(tmp_path / "h.tif")}, context, fb)
        task.executed.connect(lambda ok, res: done.append((ok, res)))
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: done, 60, "the model")
        wait_for_tasks()
    assert not errors, errors
    assert done[0][0], fb.log
    assert Path(tmp_path / "h.tif").exists()


@pytest.mark.parametrize("alg_id", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_a_processing_render_holds_no_more_pixels_than_the_engine_reads(alg_id, plugin, stub_engine, raster_layer,
                                                                       qgis_processing, qgis_new_project, tmp_path):
    """Processing rendered a non-file layer at the Render size (here 4096 x 3072 px) though the
    engine's /health says it reads at most 256 x 192 px: as in the dock, the render is made at the
    engine's budget, aspect kept, and the log says why."""
    from osgeo import gdal
    from qgis.core import QgsApplication

    from geovqa.upload import reduced_size

    budget = 256 * 192
    stub_engine.max_read_pixels = budget
    set_settings(render_max_px=4096)
    virt = virtual_raster_layer(raster_layer("src"), size=(4096, 3072))
    params = ({"INPUT": virt.id(), "QUESTION": QUESTION} if alg_id == "geovqa:ask_raster"
              else {"LAYERS": [virt.id()], "QUESTIONS": QUESTION, "OUTPUT": str(tmp_path / "batch.csv")})
    task, done, fb, _ = _task(alg_id, params, recording_feedback())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 60, "the run")
    wait_for_tasks()
    assert done[0][0], fb.log
    ds = gdal.Open(stub_engine.requests[-1]["raster_path"])
    assert (ds.RasterXSize, ds.RasterYSize) == reduced_size((4096, 3072), budget) == (256, 192)
    assert any("256 x 192 px" in i and "max_read_pixels" in i for i in fb.of("info")), fb.of("info")


def test_preparing_a_run_asks_the_engine_nothing_on_the_main_thread(plugin, raster_layer, qgis_processing, tmp_path,
                                                                     monkeypatch):
    """prepareAlgorithm runs on the main thread, and a layer with no usable clone is drawn there:
    capping that render by the engine's read budget asked GET /health there, and a hung engine
    froze QGIS for the short timeout per such layer. Preparing makes no network call."""
    from qgis.core import QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback
    from qgis.core import QgsProject

    from conftest import virtual_raster_layer
    from fault_proxy import FaultProxy
    from geovqa import client as client_mod
    from geovqa.processing import common
    from geovqa.render import PreparedRender

    monkeypatch.setattr(client_mod, "TIMEOUT_S", 2.0)
    monkeypatch.setattr(common, "PreparedRender", lambda *a, **k: PreparedRender(*a, clone=False, **k))
    hole = FaultProxy(mode="blackhole")  # accepts, never answers
    try:
        set_settings(engine_url=hole.url, token="stub-token", send_rasters="path")
        plugin.dock.timer.stop()
        layers = [virtual_raster_layer(raster_layer(f"src{i}"), name=f"virtual{i}") for i in range(2)]
        alg = QgsApplication.processingRegistry().createAlgorithmById("geovqa:batch_questions")
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        params = {"LAYERS": [lyr.id() for lyr in layers], "QUESTIONS": "q1", "OUTPUT": str(tmp_path / "b.csv")}
        t0 = time.monotonic()
        task = QgsProcessingAlgRunnerTask(alg, params, context, QgsProcessingFeedback())  # prepareAlgorithm
        took = time.monotonic() - t0
        del task
        # a GET /health to the silent engine costs the short timeout (2 s) a layer
        assert took < 1.5, f"prepareAlgorithm held the main thread {took:.1f} s"
    finally:
        hole.close()


def test_a_batch_row_cancelled_mid_answer_keeps_its_words_as_the_dialog_does(plugin, stub_engine, raster_layer,
                                                                            qgis_processing, qgis_new_project,
                                                                            tmp_path):
    """Cancel while an answer streams: the batch dialog's row keeps the words that came
    (incomplete_answer); the Processing batch's row dropped them."""
    import csv

    from qgis.core import QgsApplication

    stub_engine.token_delay = 0.2
    src = raster_layer("src")
    out = tmp_path / "answers.csv"
    task, done, fb, _ = _task("geovqa:batch_questions", {"LAYERS": [src.id()], "QUESTIONS": QUESTION,
                                                         "OUTPUT": str(out)}, recording_feedback())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: "Answering…" in fb.of("text"), 60, "the answer")
    time.sleep(0.5)  # a few words
    fb.cancel()
    wait_until(lambda: done, 60, "the cancelled run")
    wait_for_tasks()
    with open(out, encoding="utf-8-sig", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["answer"] == "" and row["incomplete_answer"].startswith("The"), row


def test_a_batch_keeps_only_the_renders_an_answer_came_from(plugin, stub_engine, raster_layer, qgis_processing,
                                                            qgis_new_project, tmp_path):
    """Batch questions over web/virtual layers whose questions all failed kept their renders in
    the results folder, which nothing will look at (Ask a raster removes a failed run's); a
    render an answer came from stays with its row."""
    from qgis.core import QgsApplication

    src = raster_layer("src")
    virt = virtual_raster_layer(src, "v")
    stub_engine.fail_with = {"code": "internal", "message": "The engine failed.", "hint": None}
    params = {"LAYERS": [virt.id()], "QUESTIONS": "q1\nq2", "OUTPUT": str(tmp_path / "a.csv")}
    task, done, fb, _ = _task("geovqa:batch_questions", params, recording_feedback())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 60, "the batch")
    wait_for_tasks()
    assert len(stub_engine.requests) == 2  # both asked: the render was made
    assert _renders(tmp_path) == [], "renders no answer came from were kept"
    stub_engine.fail_with = None
    params["OUTPUT"] = str(tmp_path / "b.csv")
    task, done, fb, _ = _task("geovqa:batch_questions", params, recording_feedback())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 60, "the answered batch")
    wait_for_tasks()
    assert done[0][0] and len(_renders(tmp_path)) == 1  # what was sent stays with its answers


@pytest.mark.parametrize("alg_id", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_cancel_during_the_protocol_check_ends_the_run_at_once_and_asks_nothing(
        plugin, raster_layer, qgis_processing, qgis_new_project, tmp_path, alg_id):
    """Both algorithms ask GET /health once before their first question (the protocol check);
    Cancel did not stop it (only the answer stream was tied to the feedback's Cancel), so against
    an engine slow to answer it the run went on for up to the short timeout (10 s) after Cancel,
    and then sent the question anyway (its stream made after Cancel had been said). Cancel now
    ends the check at once, as the batch dialog's Cancel does, and nothing is asked."""
    from qgis.core import QgsApplication

    from test_hostile_engine import RawEngine

    heads = []

    def silent(head, _conn, closed):  # reads every request, answers none (until closed)
        heads.append(head.split(b"\r\n", 1)[0].decode())
        closed.wait()

    engine = RawEngine(silent)
    try:
        set_settings(engine_url=engine.url, token="tok", send_rasters="path")
        plugin.dock.timer.stop()
        src = raster_layer("src")
        params = ({"INPUT": src.id(), "QUESTION": QUESTION} if alg_id == "geovqa:ask_raster" else
                  {"LAYERS": [src.id()], "QUESTIONS": "q1\nq2", "OUTPUT": str(tmp_path / "a.csv")})
        with python_errors() as errors:
            task, done, fb, _ = _task(alg_id, params, recording_feedback())
            QgsApplication.taskManager().addTask(task)
            wait_until(lambda: any(h.startswith("GET /health") for h in heads), 30, "the protocol check")
            time.sleep(0.3)
            t0 = time.perf_counter()
            fb.cancel()
            wait_until(lambda: done, 30, "the cancelled run")
        took = done[0][2] - t0
        assert not errors, errors[0]
        assert took < 1.5, f"the run went on {took:.1f} s after Cancel"
        assert not any(h.startswith("POST /ask") for h in heads), heads
        if alg_id == "geovqa:batch_questions":
            assert any("Cancelled after 0 answers of 2" in i for i in fb.of("info")), fb.log
        else:
            assert not done[0][0]
    finally:
        engine.close()
        wait_for_tasks()


@pytest.mark.parametrize("alg_id", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_cancel_ends_a_run_whose_engine_trickles_its_answer(plugin, raster_layer, qgis_processing, qgis_new_project,
                                                             tmp_path, alg_id):
    """ask_once tied the feedback's Cancel to the answer stream's abort with a connection made in
    the algorithm's thread, which runs no event loop: the abort was never called, and Cancel was
    only seen at the stream's next event. Against an engine that sent a byte every 0.2 s and never
    an event, the run went on for as long as the engine trickled. It now ends within a second."""
    from qgis.core import QgsApplication

    from test_hostile_engine import RawEngine, trickled_answer

    engine = RawEngine(trickled_answer())
    heads = []
    answer = engine.answer
    engine.answer = lambda head, conn, closed: (heads.append(head.split(b"\r\n", 1)[0].decode()),
                                                answer(head, conn, closed))
    try:
        set_settings(engine_url=engine.url, token="tok", send_rasters="path")
        plugin.dock.timer.stop()
        src = raster_layer("src")
        params = ({"INPUT": src.id(), "QUESTION": QUESTION} if alg_id == "geovqa:ask_raster" else
                  {"LAYERS": [src.id()], "QUESTIONS": "q1\nq2", "OUTPUT": str(tmp_path / "a.csv")})
        with python_errors() as errors:
            task, done, fb, _ = _task(alg_id, params, recording_feedback())
            QgsApplication.taskManager().addTask(task)
            wait_until(lambda: any(h.startswith("POST /ask") for h in heads), 30, "the question")
            time.sleep(0.5)  # the answer trickles
            t0 = time.perf_counter()
            fb.cancel()
            wait_until(lambda: done, 30, "the cancelled run")
        took = done[0][2] - t0
        assert not errors, errors[0]
        assert took < 1.5, f"the run went on {took:.1f} s after Cancel"
        assert sum(h.startswith("POST /ask") for h in heads) == 1, heads
        if alg_id == "geovqa:batch_questions":
            assert any("q1: cancelled before its answer came" in i for i in fb.of("info")), fb.log
        else:
            assert not done[0][0]
    finally:
        engine.close()
        wait_for_tasks()
