"""Batch dialog and Processing algorithms against the protocol stand-in (cancel, errors)."""

from __future__ import annotations

import csv

from conftest import recording_feedback, run_batch_dialog, start_batch, wait_for_tasks, wait_until


def test_batch_dialog_two_layers_csv_and_json(plugin, raster_layer, stub_engine, tmp_path):
    import json

    a, b = raster_layer("a"), raster_layer("b", width=32, height=40)
    dlg, rows = run_batch_dialog(plugin, [a, b], "How big?\n\nWhat bands?\n")
    assert len(rows) == 4 and dlg.table.rowCount() == 4
    assert all(r["error"] is None for r in rows)
    csv_path = dlg.export(str(tmp_path / "answers.csv"))
    with open(csv_path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["layer"], r["question"]) for r in table] == [("a", "How big?"), ("a", "What bands?"),
                                                           ("b", "How big?"), ("b", "What bands?")]
    assert table[2]["answer"] == "The area is 32 x 40 pixels with 3 bands."
    assert json.loads(open(dlg.export(str(tmp_path / "answers.json"))).read())["results"][3]["layer"] == "b"


def test_batch_cancel(plugin, raster_layer, stub_engine):
    stub_engine.token_delay = 0.2
    dlg, done = start_batch(plugin, [raster_layer("a")], "q1\nq2\nq3")
    wait_until(lambda: stub_engine.requests, 10)
    dlg.cancel()
    wait_until(lambda: done, 30, "the cancelled batch")
    assert len(done[0]) < 3
    assert "cancelled" in dlg.message.text()
    wait_for_tasks()


def test_processing_ask_and_batch(plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    import processing
    from qgis.core import QgsRasterLayer

    a, b = raster_layer("a"), raster_layer("b", width=32, height=40)
    res = processing.run("geovqa:ask_raster", {
        "INPUT": a, "QUESTION": "How big?", "AOI": "500100,500300,4999700,4999900 [EPSG:32633]",
        "STRATEGY": 0, "BUDGET": 0, "HEATMAP": str(tmp_path / "h.tif"), "ANCHORS": str(tmp_path / "a.geojson")})
    assert res["ANSWER"] == "The area is 20 x 20 pixels with 3 bands."
    assert stub_engine.requests[-1]["aoi"] == {"window": [10, 10, 20, 20]}
    heat = QgsRasterLayer(res["HEATMAP"], "h")
    assert heat.isValid() and heat.crs() == a.crs() and heat.extent() == a.extent()
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [a, b], "QUESTIONS": "How big?\nWhat bands?", "STRATEGY": 0, "BUDGET": 0,
        "OUTPUT": str(tmp_path / "batch.csv")})
    with open(res["OUTPUT"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and res["ANSWERED"] == 4 and res["ERRORS"] == 0
    assert all(r["answer"] for r in rows)


# the progress text of one answer of the stand-in engine with engine_stages
ENGINE_STAGE_TEXTS = ["Reading the raster …", "Encoding tiles 50 %", "Encoding tiles …",
                      "Choosing tokens …", "Reading the image tokens …", "Answering…",
                      "Writing the result files …"]


def test_the_processing_ask_progress_is_full_only_with_the_answer(
        plugin, raster_layer, stub_engine, qgis_processing):
    """Only the engine's "vision" status events moved the bar: it was at 100 % once the vision
    tower was done and stayed there while the answer was generated (minutes on a real model).
    Each stage now has its share (vision up to 60 %), the generation moves with the answer
    tokens against MAX_NEW_TOKENS, 100 % comes with the result; the text says each stage once."""
    import processing

    stub_engine.engine_stages = True
    fb = recording_feedback()
    res = processing.run("geovqa:ask_raster", {"INPUT": raster_layer("a"), "QUESTION": "How big?",
                                               "MAX_NEW_TOKENS": 20}, feedback=fb)
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."  # 10 tokens of at most 20
    assert fb.of("text") == ENGINE_STAGE_TEXTS  # once each: "Answering…" is not said per token
    progress = fb.of("progress")
    assert progress == sorted(progress) and progress[-1] == 100 and progress.count(100) == 1, progress

    def bar_when(text):  # the bar as the stage named `text` begins
        i = fb.log.index(("text", text))
        return ([v for k, v in fb.log[:i] if k == "progress"] or [0])[-1]

    assert bar_when("Encoding tiles …") <= 60  # the vision tower is done: not 100 %
    # each event moves the bar first, then says its stage: the answer tokens' values lie between
    # the prefill's words and the progress of the "write" status event
    prefill = fb.log.index(("text", "Reading the image tokens …"))
    writing = fb.log.index(("text", ENGINE_STAGE_TEXTS[-1]))
    generating = [v for k, v in fb.log[prefill + 1:writing - 1] if k == "progress"]
    assert len(set(generating)) == 10, generating  # each answer token moves the bar
    assert 65 <= generating[0] and generating[-1] < 90  # 10 of 20 tokens: about half the generation's share
    assert bar_when(ENGINE_STAGE_TEXTS[-1]) < 100


def test_the_processing_log_says_the_queue_only_while_a_job_is_ahead(plugin, raster_layer, stub_engine,
                                                                    qgis_processing):
    """Each answer's log began with "Queued (0 ahead) …", also when nothing was ahead of it; the
    queue is said, in the chat dock's words, only while it holds the question back."""
    import processing

    stub_engine.engine_stages = True
    fb = recording_feedback()
    processing.run("geovqa:ask_raster", {"INPUT": raster_layer("a"), "QUESTION": "How big?"}, feedback=fb)
    assert fb.of("text") == ENGINE_STAGE_TEXTS
    stub_engine.queue_positions = [2, 1, 0]  # two jobs ahead, then one, then it starts
    fb = recording_feedback()
    processing.run("geovqa:ask_raster", {"INPUT": raster_layer("b"), "QUESTION": "How big?"}, feedback=fb)
    assert fb.of("text") == ["Queued (2 ahead) …", "Queued (1 ahead) …"] + ENGINE_STAGE_TEXTS


def test_the_processing_batch_progress_fills_each_answers_share_only_with_its_result(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    """In a batch each answer's share filled up the same way (full once the vision tower was done)."""
    import processing
    from conftest import set_settings

    set_settings(max_new_tokens=20)  # the batch asks with the settings' answer length
    stub_engine.engine_stages = True
    fb = recording_feedback()
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2", "OUTPUT": str(tmp_path / "answers.csv")}, feedback=fb)
    assert res["ANSWERED"] == 2
    progress = fb.of("progress")
    assert progress == sorted(progress) and progress[-1] == 100, progress
    assert fb.of("text") == ENGINE_STAGE_TEXTS * 2  # each answer's stages, once each
    # two answers, 50 % each: the first one's share is full only when it is done
    second = [i for i, e in enumerate(fb.log) if e == ("text", ENGINE_STAGE_TEXTS[0])][1]
    first_answer = [v for k, v in fb.log[:second] if k == "progress"]
    assert first_answer[-1] == 50 and max(first_answer[:-1]) < 50, first_answer
    assert len([v for v in first_answer if 36 <= v < 48.5]) >= 10, first_answer  # its generation, token by token


def test_the_batch_dialogs_progress_fills_each_answers_share_only_with_its_result(
        plugin, raster_layer, stub_engine, tmp_path):
    """The batch dialog's BatchTask: each answer's share was full once the vision tower was done."""
    import time

    from conftest import set_settings

    set_settings(max_new_tokens=20)
    stub_engine.engine_stages = True
    events = stub_engine.events

    def slow_start(req):  # time to connect to the task just started
        time.sleep(0.5)
        yield from events(req)

    stub_engine.events = slow_start
    log = []
    dlg, done = start_batch(plugin, [raster_layer("a")], "q1\nq2")
    dlg.task.progressChanged.connect(lambda p: log.append(("progress", p)))
    dlg.task.row.connect(lambda row: log.append(("row", row["question"])))
    wait_until(lambda: done, 60, "the batch")
    wait_for_tasks()
    progress = [v for k, v in log if k == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100 and dlg.progress.value() == 100, log
    first = [v for k, v in log[:log.index(("row", "q1"))] if k == "progress"]
    # two answers, 50 % each: the first one's share is full only with its result
    assert first[-1] == 50 and max(first[:-1]) < 50, first
    assert len([v for v in first if 36 <= v < 48.5]) >= 10, first  # its generation, token by token


def test_the_processing_ask_progress_bar_follows_the_engine(plugin, raster_layer, stub_engine, qgis_processing):
    """"Ask a raster" showed the engine's progress as text only: the bar stayed still until the
    end. It now follows it as the batch does (tasks.BatchProgress, a batch of one), the upload
    taking the first half when the raster is uploaded."""
    import processing
    from conftest import set_settings
    from qgis.core import QgsProcessingFeedback

    layer = raster_layer("a")
    for mode in ("path", "upload"):
        set_settings(send_rasters=mode)
        feedback, seen = QgsProcessingFeedback(), []
        feedback.progressChanged.connect(seen.append)
        res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?", "MAX_NEW_TOKENS": 20},
                             feedback=feedback)
        assert res["ANSWER"], mode
        assert seen == sorted(seen) and seen[-1] == 100, (mode, seen)
        engine = [p for p in seen if 0 < p < 100]
        if mode == "upload":  # the upload fills the first half, then the engine's stages the second
            assert 50 in seen and engine[-1] > 50, seen
        assert len(set(engine)) >= 10, (mode, seen)  # reading, then the answer tokens


def test_processing_outputs_default_to_temporary_files(plugin, raster_layer, stub_engine, qgis_processing):
    """The documented `qgis_process run geovqa:ask_raster -- INPUT=.. QUESTION=..` failed: the
    heatmap and anchors outputs were mandatory."""
    import processing
    from qgis.core import QgsRasterLayer

    a = raster_layer("a")
    res = processing.run("geovqa:ask_raster", {"INPUT": a, "QUESTION": "How big?"})
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."
    assert QgsRasterLayer(res["HEATMAP"], "h").isValid()
    res = processing.run("geovqa:batch_questions", {"LAYERS": [a], "QUESTIONS": "How big?"})
    with open(res["OUTPUT"], newline="") as fh:
        assert [r["question"] for r in csv.DictReader(fh)] == ["How big?"]


def test_processing_batch_with_an_unwritable_results_folder_keeps_every_row(
        plugin, raster_layer, stub_engine, qgis_processing, tmp_path):
    import processing
    from conftest import set_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))  # cannot be created under a file
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [raster_layer("a")], "QUESTIONS": "How big?\nWhat bands?", "OUTPUT": str(tmp_path / "b.csv")})
    with open(res["OUTPUT"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    # answered, not failed (as the batch dialog counts them): ERRORS counted them in both
    assert len(rows) == 2 and res["ERRORS"] == 0 and res["ANSWERED"] == 2
    assert all("could not be saved" in r["error"] for r in rows)  # the error column says what is missing
    assert [r["answer"] for r in rows] == ["The area is 64 x 48 pixels with 3 bands."] * 2  # the answers are kept
    assert all(r["visual_kept"] == "4" and r["heatmap_path"] == "" for r in rows)


def test_processing_ask_with_an_unwritable_results_folder_keeps_the_answer(
        plugin, raster_layer, stub_engine, qgis_processing, tmp_path):
    import processing
    from conftest import set_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    res = processing.run("geovqa:ask_raster", {"INPUT": raster_layer("a"), "QUESTION": "How big?"})
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."


def test_batch_dialog_with_an_unwritable_results_folder_keeps_the_answers(plugin, raster_layer, stub_engine, tmp_path):
    from conftest import set_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})
    dlg.layers_check.setChecked(True)
    dlg.questions_edit.setPlainText("How big?")
    done = []
    dlg.batch_finished.connect(done.append)
    dlg.run()
    wait_until(lambda: done, 60, "the batch")
    (row,) = done[0]
    assert row["answer"] == "The area is 64 x 48 pixels with 3 bands." and "could not be saved" in row["error"]
    assert dlg.table.item(0, 2).text() == row["answer"]
    from qgis.core import QgsProject
    assert QgsProject.instance().layerTreeRoot().findGroups() == []  # no empty result group
    wait_for_tasks()


def test_an_unwritable_results_folder_keeps_the_answers_about_rendered_layers(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_iface, tmp_path):
    """A virtual (or web) layer's render went to the results folder too: its rows failed with
    "Could not write the rendered raster" (batch dialog) or "Could not render" (Processing),
    with no answer, where a file layer was answered."""
    import processing
    from conftest import set_settings, virtual_raster_layer

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    src = raster_layer("src")
    virt = virtual_raster_layer(src)
    canvas = qgis_iface.mapCanvas()  # the batch dialog renders what the map shows of it
    canvas.setDestinationCrs(src.crs())
    canvas.setExtent(src.extent())
    answer = "The area is 64 x 48 pixels with 3 bands."
    res = processing.run("geovqa:ask_raster", {"INPUT": virt, "QUESTION": "How big?"})
    assert res["ANSWER"] == answer
    res = processing.run("geovqa:batch_questions", {"LAYERS": [virt], "QUESTIONS": "How big?",
                                                    "OUTPUT": str(tmp_path / "b.csv")})
    with open(res["OUTPUT"], newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["answer"] == answer and "could not be saved" in row["error"], row
    _dlg, (row,) = run_batch_dialog(plugin, [virt], "How big?")
    assert row["answer"] == answer and "could not be saved" in row["error"], row
    assert not any(r["raster_path"].startswith(str(blocker)) for r in stub_engine.requests)
    wait_for_tasks()


def _unreferenced_layer(tmp_path, name):
    from conftest import write_raster
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(write_raster(tmp_path / f"{name}.tif", 400, 300, georeferenced=False), name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_batch_and_processing_place_the_results_of_a_raster_with_no_georeferencing(
        plugin, stub_engine, tmp_path, qgis_new_project, qgis_processing):
    """Its result files are in source pixels, rows down; QGIS shows the raster at y = -row. The
    heatmap and anchors landed above the layer (and the heatmap failed to be cropped)."""
    import processing
    from geovqa.layers import anchors_name, heatmap_name
    from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer

    layer = _unreferenced_layer(tmp_path, "plain")
    ext = layer.extent().buffered(1e-6)
    top_left = QgsRectangle(0, -150, 200, 0).buffered(1e-6)

    res = processing.run("geovqa:ask_raster", {
        "INPUT": layer, "QUESTION": "How big?", "AOI": "0,200,-150,0", "HEATMAP": str(tmp_path / "h.tif"),
        "ANCHORS": str(tmp_path / "a.geojson")})
    assert stub_engine.requests[-1]["aoi"] == {"window": [0, 0, 200, 150]}
    assert ext.contains(QgsRasterLayer(res["HEATMAP"], "h").extent())
    anchors = QgsVectorLayer(res["ANCHORS"], "a", "ogr")
    assert anchors.featureCount() == 2 and top_left.contains(anchors.extent())

    res = processing.run("geovqa:batch_questions", {"LAYERS": [layer], "QUESTIONS": "How big?"})
    with open(res["OUTPUT"], newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["error"] == ""
    assert ext.contains(QgsRasterLayer(row["heatmap_path"], "h").extent())
    assert ext.contains(QgsVectorLayer(row["anchors_path"], "a", "ogr").extent())

    dlg = plugin.open_batch()
    dlg.layers_check.setChecked(True)
    _, rows = run_batch_dialog(plugin, [layer], "How big?", dlg=dlg)
    assert rows[0]["error"] is None
    added = {lyr.name(): lyr for lyr in QgsProject.instance().mapLayers().values() if lyr is not layer}
    assert added[heatmap_name("How big?", layer)].extent() == layer.extent()
    anchors = added[anchors_name("How big?", layer)]
    assert anchors.featureCount() == 2 and ext.contains(anchors.extent())
    assert anchors.extent().yMaximum() == 0  # the anchor at the top-left corner (row 0) is at the top


def test_cancel_while_rendering_then_run_again_gives_one_batch(plugin, raster_layer, stub_engine, qgis_iface):
    """A render of the cancelled run used to go on into the new run: duplicate rows, two BatchTasks."""
    import time

    from qgis.core import QgsApplication

    from conftest import batch_of_two_rendered_layers

    dlg, _, _, finished = batch_of_two_rendered_layers(plugin, raster_layer, qgis_iface)
    dlg.run()
    dlg.cancel()  # while v1 is being rendered
    assert finished == [[]] and "cancelled" in dlg.message.text()
    dlg.run()  # and again at once
    wait_until(lambda: len(finished) == 2, 60, "the second run")
    wait_for_tasks()
    for _ in range(10):  # anything late of the first run would arrive now
        QgsApplication.processEvents()
        time.sleep(0.05)
    assert len(finished) == 2 and [r["layer"] for r in finished[1]] == ["v1", "v2"]
    assert [r["layer"] for r in dlg.rows] == ["v1", "v2"] and dlg.table.rowCount() == 2
    assert len(stub_engine.requests) == 2 and all(r["error"] is None for r in dlg.rows)


def test_the_batch_dialog_lets_go_of_its_renders(plugin, raster_layer, stub_engine, qgis_iface):
    """Each rendered layer of a batch left its LayerRenderer (map job image + RGBA copy: 2 x 12.6 MB
    for these 2048 x 1536 renders, 2 x 256 MB for 8192 px ones) alive as a child of the dialog,
    run after run, until QGIS closed; a cancelled run's renders too."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    from conftest import batch_of_two_rendered_layers, python_errors
    from geovqa.render import LayerRenderer

    dlg, _, _, finished = batch_of_two_rendered_layers(plugin, raster_layer, qgis_iface)
    with python_errors() as errors:
        for run in (1, 2):
            dlg.run()
            wait_until(lambda: len(finished) == run, 60, "the batch")
            wait_for_tasks()
            assert [r["error"] for r in finished[-1]] == [None, None], finished[-1]
        dlg.run()
        dlg.cancel()  # while v1 is being rendered
        wait_until(lambda: not dlg.findChildren(LayerRenderer) or all(r.released for r in dlg.findChildren(LayerRenderer)),
                   60, "the cancelled render to stop")
        wait_for_tasks()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        assert dlg.findChildren(LayerRenderer) == [] and dlg._renderers == []
    assert errors == []


def test_run_never_orphans_a_running_batch(plugin, raster_layer, stub_engine):
    stub_engine.token_delay = 0.1
    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})
    dlg.questions_edit.setPlainText("q1\nq2")
    dlg.run()
    task = dlg.task
    wait_until(lambda: stub_engine.requests, 10)
    dlg.run()  # a script calling run() again: the running batch is not replaced
    assert dlg.task is task and "still running" in dlg.message.text()
    dlg.cancel()
    wait_for_tasks()


def test_processing_result_layers_loaded_into_the_project_are_marked(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, qgis_new_project):
    """"Ask a raster" run with its outputs to be loaded into the project: the heatmap and anchors
    QGIS loads are GeoVQA's result layers (marked, named as the dock names them), so the dock
    does not offer the heatmap as a raster to ask about. (The toolbox dialog itself:
    test_processing_outputs.)"""
    import processing
    from geovqa.layers import RESULT_LAYER_PROPERTY, anchors_name, heatmap_name
    from qgis.core import QgsProcessing, QgsProcessingOutputLayerDefinition, QgsProject, QgsRasterLayer

    layer = raster_layer("a")
    project = QgsProject.instance()
    dock = plugin.dock
    # what the toolbox's dialog sends for an output whose "Open output file…" box is ticked; the
    # results are then loaded as the toolbox loads them (handleAlgorithmResults). A plain path is
    # loaded too: runAndLoadResults gives every layer output the project (HEATMAP and ANCHORS
    # were file outputs, which it left alone)
    res = processing.runAndLoadResults("geovqa:ask_raster", {
        "INPUT": layer, "QUESTION": "How big?",
        "HEATMAP": QgsProcessingOutputLayerDefinition(QgsProcessing.TEMPORARY_OUTPUT, project),
        "ANCHORS": str(tmp_path / "a.geojson")})
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."
    (heat,) = [lyr for lyr in project.mapLayers().values() if isinstance(lyr, QgsRasterLayer) and lyr is not layer]
    (anchors,) = [lyr for lyr in project.mapLayers().values() if lyr not in (layer, heat)]
    assert heat.source() == res["HEATMAP"] and anchors.source() == res["ANCHORS"] == str(tmp_path / "a.geojson")
    assert heat.customProperty(RESULT_LAYER_PROPERTY) == f"heatmap:{heat.id()}" and heat.name() == heatmap_name("How big?", layer)
    assert anchors.customProperty(RESULT_LAYER_PROPERTY) == f"anchors:{anchors.id()}"
    assert anchors.name() == anchors_name("How big?", layer)
    # marked after Processing added it: the dock's list leaves it out all the same
    listed = [dock.layer_combo.layer(i) for i in range(dock.layer_combo.count())]
    assert layer in listed and heat not in listed

    # the layer QGIS loads from a file is named and gets the post-processor that marks it
    heat_path = str(tmp_path / "h.tif")
    from geovqa.processing.common import load_result_layer
    from qgis.core import QgsProcessingContext, QgsProcessingUtils

    context = QgsProcessingContext()
    context.setProject(project)
    context.addLayerToLoadOnCompletion(heat_path, QgsProcessingContext.LayerDetails(
        "Kept-token heatmap", project, "HEATMAP", QgsProcessingUtils.LayerHint.Raster))
    load_result_layer(context, heat_path, "heatmap", "heatmap: a — q")
    details = context.layerToLoadOnCompletionDetails(heat_path)
    assert details.name == "heatmap: a — q" and details.postProcessor() is not None
    # a file QGIS does not load (no project asked for): nothing is loaded
    load_result_layer(context, str(tmp_path / "none.tif"), "heatmap", "n")
    assert not context.willLoadLayerOnCompletion(str(tmp_path / "none.tif"))
    wait_for_tasks()


def test_a_processing_question_cancelled_mid_answer_is_no_error(plugin, raster_layer, stub_engine, tmp_path,
                                                                qgis_processing):
    """The question streaming when the run was cancelled was reported as an error ("a / q2:
    Cancelled.") and counted in ERRORS, as the batch dialog counted it as failed."""
    import processing

    feedback = recording_feedback()
    events = stub_engine.events

    def cancelling(req):  # the run is cancelled once the second answer streams
        for ev in events(req):
            yield ev
            if ev["type"] == "token" and len(stub_engine.requests) == 2:
                feedback.cancel()
                stub_engine.token_delay = 0.2

    stub_engine.events = cancelling
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2\nq3", "OUTPUT": str(tmp_path / "b.csv")}, feedback=feedback)
    with open(res["OUTPUT"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["question"], bool(r["answer"]), r["error"]) for r in rows] == [("q1", True, ""), ("q2", False, "cancelled")]
    assert res["ANSWERED"] == 1 and res["ERRORS"] == 0
    assert feedback.of("error") == []
    assert any(line.startswith("Cancelled after 1 answer of 3") for line in feedback.of("info"))
