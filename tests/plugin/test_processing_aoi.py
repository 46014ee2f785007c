"""The Processing algorithms' area of interest, renders and parameters, as a review found them
through QGIS 3.22's dialogs and qgis_process:

* a raster given by a relative path (``qgis_process run ... INPUT=r.tif`` from its folder) was
  sent to the engine as it was, which refuses relative paths;
* a web (XYZ) layer with no area of interest was rendered over the whole planet, and "Batch
  questions" had no area of interest at all;
* a small non-file raster (a table of a GeoPackage) was rendered scaled up to the render size;
* an area of interest with no area became the whole layer;
* STRATEGY took only numbers (``STRATEGY=pyramid`` was refused);
* both algorithms had no short description;
* under qgis_process the heatmap and anchors outputs are temporary files: nothing said where
  the lasting copies are;
* a web layer that drew nothing (a service that did not answer) was sent as an empty image,
  where the dock says it rendered nothing.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from conftest import (MainThreadStallMeter, qgis_process_with_plugin, set_settings, virtual_raster_layer, wait_until,
                      write_raster)
from test_processing_outputs import _dialog, browser_model  # noqa: F401 - browser_model: the toolbox needs it
from test_xyz_layer import _tiles

# a 200 x 200 m box inside raster_layer()'s 500000..500640 x 4999520..5000000 (EPSG:32633)
AOI = "500100,500300,4999700,4999900 [EPSG:32633]"


def _xyz_layer(tmp_path, name="web tiles"):
    """An XYZ tile layer (local file:// tiles, no network), added to the project: the whole
    Web-Mercator world, as any XYZ layer."""
    from qgis.core import QgsProject, QgsRasterLayer

    _tiles(tmp_path / "tiles")
    url = (tmp_path / "tiles").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=1", name, "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    return layer


def _gpkg_table(raster_layer, tmp_path):
    """The second table of a GeoPackage holding two 64 x 48 px rasters (10 m pixels): a layer
    with pixels of its own that is no file the engine can read, so it is rendered."""
    from osgeo import gdal
    from qgis.core import QgsProject, QgsRasterLayer

    tif = raster_layer("src").source()
    gpkg = str(tmp_path / "multi.gpkg")
    gdal.Translate(gpkg, tif, format="GPKG", creationOptions=["RASTER_TABLE=first"])
    gdal.Translate(gpkg, tif, format="GPKG", creationOptions=["RASTER_TABLE=second", "APPEND_SUBDATASET=YES"])
    layer = QgsRasterLayer(f"GPKG:{gpkg}:second", "second", "gdal")
    assert layer.isValid() and (layer.width(), layer.height()) == (64, 48)
    QgsProject.instance().addMapLayer(layer)
    return layer


def _size(path):
    from osgeo import gdal

    ds = gdal.Open(path)
    return ds.RasterXSize, ds.RasterYSize


def _rows(res):
    with open(res["OUTPUT"], newline="") as fh:
        return list(csv.DictReader(fh))


def _errors_of_a_failed_run(alg_id, parameters, check=True):
    """The errors a failed run reported (processing.run raises only "There were errors executing
    the algorithm." for an error in the run itself). ``check=False``: run without checking the
    parameters first (QgsProcessingAlgorithm.run, as a model's child algorithm or a script may)."""
    import processing
    from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback,
                           QgsProject)

    errors = []

    class Feedback(QgsProcessingFeedback):
        def reportError(self, error, fatalError=False):  # noqa: N802, N803
            errors.append(error)
            super().reportError(error, fatalError)

    if check:
        with pytest.raises(QgsProcessingException) as info:
            processing.run(alg_id, parameters, feedback=Feedback())
        return "\n".join(errors + [str(info.value)])
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    alg = QgsApplication.processingRegistry().createAlgorithmById(alg_id)
    results, ok = alg.run(parameters, context, Feedback())
    assert not ok, results
    return "\n".join(errors)


# --- 1. relative paths ------------------------------------------------------------------------


def test_a_layer_loaded_from_a_relative_path_is_sent_by_its_absolute_path(tmp_path, monkeypatch, qgis_new_project):
    from geovqa.render import layer_file_path
    from qgis.core import QgsRasterLayer

    write_raster(tmp_path / "r.tif")
    monkeypatch.chdir(tmp_path)
    layer = QgsRasterLayer("r.tif", "r", "gdal")
    source, path = layer.source(), layer_file_path(layer)
    del layer  # closed here: GDAL writes its statistics (r.tif.aux.xml) beside a relative path in the current folder
    assert source == "r.tif" and path == str(tmp_path / "r.tif")


def test_qgis_process_from_the_rasters_folder(stub_engine, tmp_path):
    """`qgis_process run ... INPUT=r.tif` from the raster's folder (the engine got 'r.tif'), with
    STRATEGY given by name (it was refused) and by number; the log names the lasting copies of
    the heatmap and anchors (qgis_process deletes its temporary outputs when it ends)."""
    results = tmp_path / "results"
    qp, env = qgis_process_with_plugin(tmp_path, stub_engine, results)
    folder = tmp_path / "data"
    folder.mkdir()
    raster = write_raster(folder / "r.tif")

    def run(*args):
        r = subprocess.run([qp, "run", *args], cwd=folder, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    out = run("geovqa:ask_raster", "--", "INPUT=r.tif", "QUESTION=What is here?", "STRATEGY=pyramid")
    request = stub_engine.requests[-1]
    assert request["raster_path"] == raster and request["strategy"] == "pyramid"
    assert "The area is 64 x 48 pixels" in out
    lasting = [line for line in out.splitlines() if line.startswith("Lasting copies")]
    assert len(lasting) == 1 and str(results) in lasting[0], out
    kept = sorted(results.glob("*_heatmap.tif")) + sorted(results.glob("*_anchors.geojson"))
    assert len(kept) == 2 and all(str(p) in lasting[0] for p in kept), (kept, lasting)

    out = run("geovqa:batch_questions", "--", "LAYERS=r.tif", "QUESTIONS=What is here?", "STRATEGY=3",
              f"OUTPUT={tmp_path / 'answers.csv'}")
    request = stub_engine.requests[-1]
    assert request["raster_path"] == raster and request["strategy"] == "pyramid"
    with open(tmp_path / "answers.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["error"] == "" and row["answer"].startswith("The area is 64 x 48"), row


# --- 2. web layers and the area of interest ---------------------------------------------------


def test_ask_refuses_a_world_wide_web_layer_with_no_area_of_interest(plugin, stub_engine, qgis_processing,
                                                                     qgis_new_project, tmp_path):
    layer = _xyz_layer(tmp_path)
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "What is here?"})
    assert "'web tiles' is a web map service covering the whole world: give an area of interest" in said
    assert stub_engine.requests == []


def test_ask_renders_a_web_layer_over_the_area_of_interest_at_the_render_size(plugin, stub_engine, qgis_processing,
                                                                              qgis_new_project, tmp_path):
    import processing
    from osgeo import gdal

    set_settings(render_max_px=512)
    layer = _xyz_layer(tmp_path)
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "What is here?",
                                               "AOI": "-5000000,5000000,-3000000,4000000 [EPSG:3857]"})
    assert res["ANSWER"]
    request = stub_engine.requests[-1]
    assert request["aoi"] is None
    ds = gdal.Open(request["raster_path"])
    gt = ds.GetGeoTransform()
    assert abs(gt[0] + 5e6) < 1e4 and abs(gt[3] - 4e6) < 1e4
    assert max(ds.RasterXSize, ds.RasterYSize) == 512  # a web layer keeps the render size
    assert ds.GetRasterBand(2).ReadAsArray().max() > 0


def test_a_virtual_raster_with_no_area_of_interest_is_still_rendered_whole(plugin, raster_layer, stub_engine,
                                                                           qgis_processing, tmp_path):
    import processing
    from osgeo import gdal

    virt = virtual_raster_layer(raster_layer("src"))
    res = processing.run("geovqa:ask_raster", {"INPUT": virt, "QUESTION": "What is here?"})
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."  # its own pixels, not scaled up
    gt = gdal.Open(stub_engine.requests[-1]["raster_path"]).GetGeoTransform()
    assert gt == pytest.approx((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))


class _FakeLayer:
    def __init__(self, provider, extent, crs):
        from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

        self._provider, self._extent, self._crs = provider, QgsRectangle(*extent), QgsCoordinateReferenceSystem(crs)

    def providerType(self):  # noqa: N802
        return self._provider

    def extent(self):
        return self._extent

    def crs(self):
        return self._crs


@pytest.mark.parametrize("provider, extent, crs, world", [
    ("wms", (-20037508.34, -20037508.34, 20037508.34, 20037508.34), "EPSG:3857", True),  # XYZ / WMTS tiles
    ("wms", (-180, -90, 180, 90), "EPSG:4326", True),  # a world-wide WMS
    ("wms", (-170, -60, 160, 80), "EPSG:4326", True),  # most of it
    ("wms", (5, 45, 17, 55), "EPSG:4326", False),  # a WMS of a region
    ("wms", (2500000, 1400000, 6500000, 5500000), "EPSG:3035", False),  # of Europe
    # polar services: their boxes in degrees span every longitude, but only the cap's latitudes
    ("wms", (-1000000, -1000000, 1000000, 1000000), "EPSG:3031", False),  # around the South Pole
    ("wms", (-4194304, -4194304, 4194304, 4194304), "EPSG:3031", False),  # all of Antarctica
    ("wms", (-4194304, -4194304, 4194304, 4194304), "EPSG:3413", False),  # the Arctic
    ("arcgismapserver", (-20037508.34, -20037508.34, 20037508.34, 20037508.34), "EPSG:3857", True),
    ("virtualraster", (-180, -90, 180, 90), "EPSG:4326", False),  # no web service: its own pixels
    ("gdal", (-180, -90, 180, 90), "EPSG:4326", False),
])
def test_which_layers_cover_the_whole_world(provider, extent, crs, world):
    from geovqa.render import covers_the_world

    assert covers_the_world(_FakeLayer(provider, extent, crs)) is world


def test_non_square_pixels_are_rendered_at_their_finer_side(raster_layer):
    """Renders have square pixels: 40 m x 10 m pixels are rendered at 10 m (nothing of the finer
    side lost), and so are 10 m x 30 m ones."""
    from geovqa.render import map_settings

    src = raster_layer("src")  # 640 x 480 m
    for size, expected in (((16, 48), (64, 48)), ((64, 16), (64, 48))):
        virt = virtual_raster_layer(src, f"v{size}", size=size)
        out = map_settings(virt, virt.extent(), 2048).outputSize()
        assert (out.width(), out.height()) == expected


def test_batch_asks_every_layer_within_the_area_of_interest(plugin, raster_layer, stub_engine, qgis_processing,
                                                           tmp_path):
    """The AOI applies to every layer as "Ask a raster"'s does: the request's window on a file
    (also cut for an upload), the render's extent on another layer; a layer it does not touch
    gets an error in each of its rows and the others are asked."""
    import processing
    from osgeo import gdal

    a = raster_layer("a")
    far = raster_layer("far", origin=(600000.0, 5000000.0))
    virt = virtual_raster_layer(a, "virt")
    for mode in ("path", "upload"):
        set_settings(send_rasters=mode)
        before = len(stub_engine.requests)
        res = processing.run("geovqa:batch_questions", {
            "LAYERS": [a, far, virt], "QUESTIONS": "How big?\nWhat bands?", "AOI": AOI,
            "OUTPUT": str(tmp_path / f"{mode}.csv")})
        rows = _rows(res)
        assert [(r["layer"], r["question"]) for r in rows] == [
            (n, q) for n in ("a", "far", "virt") for q in ("How big?", "What bands?")]
        assert res["ANSWERED"] == 4 and res["ERRORS"] == 2, rows
        for r in rows:
            if r["layer"] == "far":
                assert r["answer"] == "" and "does not overlap the layer 'far'" in r["error"], r
            else:
                assert r["error"] == "" and r["answer"] == "The area is 20 x 20 pixels with 3 bands.", (mode, r)
        requests = stub_engine.requests[before:]
        assert len(requests) == 4
        if mode == "path":
            assert [q["aoi"] for q in requests[:2]] == [{"window": [10, 10, 20, 20]}] * 2
        gt = gdal.Open(requests[-1]["raster_path"]).GetGeoTransform()
        assert gt == pytest.approx((500100.0, 10.0, 0.0, 4999900.0, 0.0, -10.0))  # virt: rendered over the AOI


def test_batch_gives_a_world_wide_web_layer_with_no_area_of_interest_error_rows(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path):
    import processing

    set_settings(render_max_px=256)
    a = raster_layer("a")
    web = _xyz_layer(tmp_path)
    res = processing.run("geovqa:batch_questions", {"LAYERS": [a, web], "QUESTIONS": "How big?\nWhat bands?",
                                                    "OUTPUT": str(tmp_path / "whole.csv")})
    rows = _rows(res)
    assert res["ANSWERED"] == 2 and res["ERRORS"] == 2, rows
    assert all(r["answer"] for r in rows if r["layer"] == "a")
    assert all("covering the whole world: give an area of interest" in r["error"]
               for r in rows if r["layer"] == "web tiles"), rows
    # with one, it is asked about what the area holds of it
    res = processing.run("geovqa:batch_questions", {"LAYERS": [web], "QUESTIONS": "How big?",
                                                    "AOI": "-5000000,5000000,-3000000,4000000 [EPSG:3857]",
                                                    "OUTPUT": str(tmp_path / "aoi.csv")})
    assert res["ANSWERED"] == 1 and res["ERRORS"] == 0, _rows(res)
    assert _size(stub_engine.requests[-1]["raster_path"]) == (256, 180)


def _unreachable_xyz_layer(tmp_path, name="gone tiles"):
    """An XYZ layer whose tiles are not there (a service that does not answer): QGIS draws
    nothing and says no error."""
    from qgis.core import QgsProject, QgsRasterLayer

    url = (tmp_path / "no-tiles").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=1", name, "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    return layer


WORLD_PART = "-5000000,5000000,-3000000,4000000 [EPSG:3857]"


def test_ask_refuses_a_web_layer_that_rendered_nothing(plugin, stub_engine, qgis_processing, qgis_new_project,
                                                       tmp_path):
    set_settings(render_max_px=256)
    layer = _unreachable_xyz_layer(tmp_path)
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "What is here?",
                                                         "AOI": WORLD_PART})
    # as the dock says it, not an empty image sent to the model
    assert "The layer 'gone tiles' rendered nothing over this extent (is the service reachable" in said
    assert stub_engine.requests == []


def test_batch_gives_a_web_layer_that_rendered_nothing_error_rows(plugin, raster_layer, stub_engine,
                                                                 qgis_processing, qgis_new_project, tmp_path):
    import processing

    set_settings(render_max_px=256)
    a, gone = raster_layer("a"), _unreachable_xyz_layer(tmp_path)
    res = processing.run("geovqa:batch_questions", {"LAYERS": [gone, a], "QUESTIONS": "How big?",
                                                    "AOI": "500100,500300,4999700,4999900 [EPSG:32633]",
                                                    "OUTPUT": str(tmp_path / "gone.csv")})
    rows = _rows(res)
    assert res["ANSWERED"] == 1 and res["ERRORS"] == 1, rows
    (gone_row,) = [r for r in rows if r["layer"] == "gone tiles"]
    assert "rendered nothing over this extent" in gone_row["error"] and not gone_row["answer"]
    assert [r["raster_path"] for r in stub_engine.requests] == [a.source()]


# --- 3. small non-file rasters are not scaled up ----------------------------------------------


def test_a_small_geopackage_table_is_rendered_at_its_own_pixels(plugin, raster_layer, stub_engine, qgis_processing,
                                                                qgis_new_project, tmp_path):
    import processing
    from geovqa.render import LayerRenderer

    layer = _gpkg_table(raster_layer, tmp_path)
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?"})
    assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."  # was 2048 x 1536
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?", "AOI": AOI})
    assert res["ANSWER"] == "The area is 20 x 20 pixels with 3 bands."
    res = processing.run("geovqa:batch_questions", {"LAYERS": [layer], "QUESTIONS": "How big?",
                                                    "OUTPUT": str(tmp_path / "answers.csv")})
    assert _rows(res)[0]["answer"] == "The area is 64 x 48 pixels with 3 bands."
    # the dock's and the batch dialog's renders (LayerRenderer) alike
    renderer = LayerRenderer(layer, layer.extent(), str(tmp_path / "r.tif"), 2048)
    assert (renderer.settings.outputSize().width(), renderer.settings.outputSize().height()) == (64, 48)


def test_the_dock_renders_a_small_geopackage_table_at_its_own_pixels(plugin, raster_layer, stub_engine,
                                                                     qgis_new_project, tmp_path):
    layer = _gpkg_table(raster_layer, tmp_path)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("How big?")
    wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 60, "the answer")
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert _size(turn["rendered_path"]) == (64, 48)


def test_render_sizes():
    from geovqa.render import output_size
    from qgis.core import QgsRectangle

    ext = QgsRectangle(500000, 4999520, 500640, 5000000)
    assert output_size(ext, 2048).width() == 2048  # no pixels of its own: the render size
    size = output_size(ext, 2048, 10.0)
    assert (size.width(), size.height()) == (64, 48)
    size = output_size(ext, 32, 10.0)  # the render size still caps it
    assert (size.width(), size.height()) == (32, 24)


def _render_of_half_nodata(tmp_path):
    """The render GeoVQA sends the engine of a layer half drawn transparent (path, width)."""
    from geovqa.render import render_sync
    from qgis.core import QgsProject, QgsRasterLayer

    path = write_raster(tmp_path / "half.tif", width=448, height=224, nodata_half=True)
    layer = QgsRasterLayer(path, "half", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    path, _visible = render_sync(layer, layer.extent(), str(tmp_path / "render.tif"), 448)
    return path


def test_a_render_masks_what_qgis_drew_transparent(raster_layer, tmp_path):
    """A render (web, virtual, GeoPackage or warped layer) turned what QGIS drew transparent into
    black (RGB 0) but declared no nodata or mask: the engine read it as black image, kept tokens
    there and drew heatmap cells and anchors where the layer shows nothing. Now the render has an
    internal per-dataset mask (inside the TIFF: an upload to a remote engine keeps it, cut or not)."""
    import numpy as np
    from geovqa.upload import needs_translation, translate_to_geotiff
    from osgeo import gdal

    path = _render_of_half_nodata(tmp_path)
    assert not Path(path + ".msk").exists() and not needs_translation(path)
    ds = gdal.Open(path)
    w = ds.RasterXSize
    for b in range(1, 4):
        band = ds.GetRasterBand(b)
        assert band.GetMaskFlags() == gdal.GMF_PER_DATASET, band.GetMaskFlags()
        mask = band.GetMaskBand().ReadAsArray()
        assert mask[:, w // 2 + 2:].max() == 0 and mask[:, : w // 2 - 2].min() == 255
        assert band.ReadAsArray()[:, w // 2 + 2:].max() == 0
    ds = None
    # cut for a remote engine (an area of interest): the mask goes with the cut
    cut = translate_to_geotiff(path, str(tmp_path / "cut.tif"), (w // 2 - 20, 0, 40, 20))
    ds = gdal.Open(cut)
    mask = ds.GetRasterBand(1).GetMaskBand().ReadAsArray()
    ds = None
    assert not Path(cut + ".msk").exists()
    assert np.array_equal(mask[:, :18], np.full((20, 18), 255)) and mask[:, 22:].max() == 0
    # a layer drawn whole: no mask
    from geovqa.render import render_sync

    drawn = raster_layer("drawn")
    whole = render_sync(drawn, drawn.extent(), str(tmp_path / "whole.tif"), 64)[0]
    ds = gdal.Open(whole)
    assert ds.GetRasterBand(1).GetMaskFlags() == gdal.GMF_ALL_VALID


def test_the_engine_keeps_no_token_on_the_transparent_part_of_a_render(tmp_path, qgis_new_project):
    """The real engine (tiny demo model) asked about such a render: no heatmap cell and no anchor
    on the half the layer does not show."""
    import glob
    import json
    import os

    import numpy as np
    from conftest import ENGINE_PY, ENGINE_ROOT, _engine_importable
    from osgeo import gdal, ogr

    ok, why = _engine_importable()
    if not ok:
        pytest.skip(f"the engine cannot be imported: {why}")
    path = _render_of_half_nodata(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, GEOVQA_CONFIG_DIR=str(tmp_path / "config"), OMP_NUM_THREADS="1")
    env.pop("QT_QPA_PLATFORM", None)
    r = subprocess.run([str(ENGINE_PY), "-m", "engine", "ask", path, "Where are ships?", "--output-dir", str(out),
                        "--json"], cwd=ENGINE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = gdal.Open(glob.glob(str(out / "*_heatmap.tif"))[0])
    gt, heat = ds.GetGeoTransform(), ds.GetRasterBand(1).ReadAsArray()
    mid = 500000 + 448 * 10 / 2
    xs = gt[0] + (np.arange(heat.shape[1]) + 0.5) * gt[1]
    assert int(np.sum(~np.isnan(heat[:, xs > mid]))) == 0
    assert int(np.sum(~np.isnan(heat[:, xs < mid]))) > 0
    feats = json.loads(Path(glob.glob(str(out / "*_anchors.geojson"))[0]).read_text())["features"]
    right = ogr.CreateGeometryFromWkt(f"POLYGON(({mid} 4990000,{mid + 5000} 4990000,{mid + 5000} 5000000,"
                                      f"{mid} 5000000,{mid} 4990000))")
    assert sum(ogr.CreateGeometryFromJson(json.dumps(f["geometry"])).Intersection(right).GetArea()
               for f in feats) == 0


# --- 4. an area of interest with no area ------------------------------------------------------


@pytest.mark.parametrize("aoi", ["500100,500100,4999700,4999900 [EPSG:32633]",
                                 "500100,500300,4999800,4999800 [EPSG:32633]"])
def test_an_area_of_interest_with_no_area_is_refused(plugin, raster_layer, stub_engine, qgis_processing, tmp_path,
                                                    aoi):
    import processing

    a = raster_layer("a")
    for alg, parameters in (("geovqa:ask_raster", {"INPUT": a, "QUESTION": "How big?", "AOI": aoi}),
                            ("geovqa:batch_questions", {"LAYERS": [a], "QUESTIONS": "How big?", "AOI": aoi,
                                                        "OUTPUT": str(tmp_path / "answers.csv")})):
        for check in (True, False):  # refused before the run (dialog, processing.run), and by the run itself
            said = _errors_of_a_failed_run(alg, parameters, check)
            assert "The area of interest" in said and "has no area: its width or height is 0" in said, (alg, said)
    assert stub_engine.requests == []
    for empty in (None, ""):  # an empty parameter is still the whole layer
        res = processing.run("geovqa:ask_raster", {"INPUT": a, "QUESTION": "How big?", "AOI": empty})
        assert res["ANSWER"] == "The area is 64 x 48 pixels with 3 bands."
        assert stub_engine.requests[-1]["aoi"] is None


def test_a_question_longer_than_the_engine_takes_is_refused_before_the_run(plugin, raster_layer, stub_engine,
                                                                          qgis_processing, tmp_path):
    from geovqa.engine_protocol import MAX_QUESTION_CHARS
    from processing.tools import dataobjects
    from qgis.core import QgsApplication

    a = raster_layer("a")
    long_question = "x" * (MAX_QUESTION_CHARS + 1)
    for alg, parameters, expected in (
            ("geovqa:ask_raster", {"INPUT": a, "QUESTION": long_question}, "The question has"),
            ("geovqa:batch_questions", {"LAYERS": [a], "QUESTIONS": f"How big?\n{long_question}",
                                        "OUTPUT": str(tmp_path / "answers.csv")}, "Question 2 has")):
        # what the toolbox dialog checks before it runs anything
        ok, message = QgsApplication.processingRegistry().createAlgorithmById(alg).checkParameterValues(
            parameters, dataobjects.createContext())
        assert not ok and f"{expected} {MAX_QUESTION_CHARS + 1} characters" in message, (alg, message)
        for check in (True, False):  # refused before the run (dialog, processing.run), and by the run itself
            said = _errors_of_a_failed_run(alg, parameters, check)
            assert f"{expected} {MAX_QUESTION_CHARS + 1} characters" in said, (alg, said)
            assert f"at most {MAX_QUESTION_CHARS}" in said, (alg, said)
    assert stub_engine.requests == []  # not even the batch's first question
    assert not (tmp_path / "answers.csv").exists()


def test_a_batch_question_too_long_after_blank_lines_is_named_by_its_line(plugin, raster_layer, stub_engine,
                                                                          qgis_processing, tmp_path):
    """The QUESTIONS text skips blank lines: "Question 2" of the batch is on its fourth line."""
    from geovqa.engine_protocol import MAX_QUESTION_CHARS
    from processing.tools import dataobjects
    from qgis.core import QgsApplication

    parameters = {"LAYERS": [raster_layer("a")], "QUESTIONS": f"How big?\n\n  \n{'x' * (MAX_QUESTION_CHARS + 1)}",
                  "OUTPUT": str(tmp_path / "answers.csv")}
    named = f"Question 2 (line 4) has {MAX_QUESTION_CHARS + 1} characters"
    ok, message = QgsApplication.processingRegistry().createAlgorithmById(
        "geovqa:batch_questions").checkParameterValues(parameters, dataobjects.createContext())
    assert not ok and named in message, message
    for check in (True, False):
        said = _errors_of_a_failed_run("geovqa:batch_questions", parameters, check)
        assert named in said, said
    assert stub_engine.requests == []


def test_an_area_of_interest_across_the_antimeridian_reaches_the_pixels_it_covers(plugin, stub_engine,
                                                                                 qgis_processing, tmp_path):
    """A raster in degrees from lon 179.5 to 180.5 and an extent in the Pacific-centred EPSG:3832
    over lon 179.7..180.1: its reprojection into degrees was torn at the antimeridian and a
    GeometryCollection over lon 179.5..179.7 was sent; it is the window of columns 20..60."""
    import processing
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsPointXY, QgsProject,
                           QgsRasterLayer)
    from test_aoi_layers import _geotiff_with_transform

    path = _geotiff_with_transform(tmp_path / "fiji.tif", (179.5, 0.01, 0.0, -16.0, 0.0, -0.01), width=100,
                                   height=100, epsg=4326)
    layer = QgsRasterLayer(path, "fiji", "gdal")
    QgsProject.instance().addMapLayer(layer)
    xf = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"), QgsCoordinateReferenceSystem("EPSG:3832"),
                                QgsProject.instance())
    sw, ne = xf.transform(QgsPointXY(179.7, -16.7)), xf.transform(QgsPointXY(180.1, -16.3))
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?",
                                               "AOI": f"{sw.x()},{ne.x()},{sw.y()},{ne.y()} [EPSG:3832]"})
    assert res["ANSWER"] == "The area is 40 x 40 pixels with 3 bands."
    assert stub_engine.requests[-1]["aoi"] == {"window": [20, 30, 40, 40]}


def test_an_area_of_interest_smaller_than_one_pixel_is_refused(plugin, raster_layer, stub_engine, qgis_processing):
    a = raster_layer("a")  # 10 m pixels from 500000/5000000: centres at ...5 m
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": a, "QUESTION": "How big?",
                                                         "AOI": "500100,500100.5,4999900,4999900.5 [EPSG:32633]"})
    assert "smaller than one pixel of the layer 'a'" in said, said
    assert stub_engine.requests == []


# --- 5. the strategy by name ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_the_strategy_is_given_by_name_or_by_its_number(plugin, raster_layer, stub_engine, qgis_processing, tmp_path,
                                                       alg):
    import processing
    from geovqa.settings import STRATEGIES, STRATEGY_CHOICES
    from qgis.core import QgsApplication, QgsProcessingException

    param = QgsApplication.processingRegistry().algorithmById(alg).parameterDefinition("STRATEGY")
    assert param.usesStaticStrings() and param.options() == list(STRATEGY_CHOICES) and param.defaultValue() == "geollava"
    # "Engine's default" (engine) is appended last: the numbers stored before keep their meaning
    assert param.options() == list(STRATEGIES) + ["engine"]
    a = raster_layer("a")
    base = ({"INPUT": a, "QUESTION": "How big?"} if alg == "geovqa:ask_raster"
            else {"LAYERS": [a], "QUESTIONS": "How big?", "OUTPUT": str(tmp_path / "answers.csv")})
    assert STRATEGIES.index("pyramid") == 3
    for value, sent in (("pyramid", "pyramid"), (3, "pyramid"), ("3", "pyramid"), ("budget", "budget"),
                        (0, "geollava"), (None, "geollava"), ("engine", None), (8, None), ("8", None)):
        processing.run(alg, dict(base, STRATEGY=value))
        assert stub_engine.requests[-1]["strategy"] == sent, value
    for bad in ("quadtree", 99, "99"):
        with pytest.raises(QgsProcessingException):
            processing.run(alg, dict(base, STRATEGY=bad))


def test_a_model_saved_with_the_strategys_number_runs_as_saved(plugin, raster_layer, stub_engine, qgis_processing,
                                                              qgis_new_project):
    """Models saved before the strategy took names store its number (3: pyramid)."""
    from qgis.core import (QgsProcessingContext, QgsProcessingFeedback, QgsProcessingModelAlgorithm,
                           QgsProcessingModelChildAlgorithm, QgsProcessingModelChildParameterSource,
                           QgsProcessingModelParameter, QgsProcessingParameterRasterLayer, QgsProject)

    model = QgsProcessingModelAlgorithm("old model", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("RASTER", "Raster"),
                            QgsProcessingModelParameter("RASTER"))
    child = QgsProcessingModelChildAlgorithm("geovqa:ask_raster")
    child.setChildId("ask")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("RASTER")])
    child.addParameterSources("QUESTION", [QgsProcessingModelChildParameterSource.fromStaticValue("How big?")])
    child.addParameterSources("STRATEGY", [QgsProcessingModelChildParameterSource.fromStaticValue(3)])
    model.addChildAlgorithm(child)
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    results, ok = model.run({"RASTER": raster_layer("a").id()}, context, QgsProcessingFeedback())
    assert ok, results
    assert results["CHILD_RESULTS"]["ask"]["ANSWER"] and stub_engine.requests[-1]["strategy"] == "pyramid"


@pytest.mark.parametrize("alg", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_the_toolbox_dialog_sends_the_strategys_name(plugin, raster_layer, stub_engine, qgis_processing,
                                                     qgis_new_project, tmp_path, alg):
    import processing
    from processing.tools import dataobjects

    a = raster_layer("a")
    base = ({"INPUT": a.id(), "QUESTION": "How big?"} if alg == "geovqa:ask_raster"
            else {"LAYERS": [a.id()], "QUESTIONS": "How big?", "OUTPUT": str(tmp_path / "answers.csv")})
    dlg = _dialog(alg)
    panel = dlg.mainWidget()
    panel.setParameters(base)
    combo = panel.wrappers["STRATEGY"].wrappedWidget()
    assert combo.currentText() == "geollava"
    combo.setCurrentIndex(combo.findText("pyramid"))
    parameters = panel.createProcessingParameters()
    assert parameters["STRATEGY"] == "pyramid"
    ok, message = dlg.algorithm().checkParameterValues(parameters, dataobjects.createContext())
    assert ok, message
    processing.run(alg, parameters)
    assert stub_engine.requests[-1]["strategy"] == "pyramid"
    if alg == "geovqa:batch_questions":  # its new area of interest is in the dialog, empty
        assert "AOI" in panel.wrappers and panel.createProcessingParameters().get("AOI") is None


# --- 6. short descriptions --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["geovqa:ask_raster", "geovqa:batch_questions"])
def test_both_algorithms_have_a_short_description(plugin, qgis_processing, alg):
    from qgis.core import QgsApplication

    algorithm = QgsApplication.processingRegistry().algorithmById(alg)
    text = algorithm.shortDescription()
    assert text.strip() and "\n" not in text and text != algorithm.displayName()


# --- 7. the lasting copies of the heatmap and anchors -----------------------------------------


def test_ask_says_where_the_lasting_copies_of_the_heatmap_and_anchors_are(plugin, raster_layer, stub_engine,
                                                                          qgis_processing):
    import processing
    from geovqa.settings import Settings
    from qgis.core import QgsProcessingFeedback

    infos = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802
            infos.append(info)
            super().pushInfo(info)

    res = processing.run("geovqa:ask_raster", {"INPUT": raster_layer("a"), "QUESTION": "How big?"},
                         feedback=Feedback())
    results = Settings.load().results_dir()
    lines = [i for i in infos if i.startswith("Lasting copies")]
    assert len(lines) == 1 and str(results) in lines[0], infos
    heat = next(results.glob("*_heatmap.tif"))
    anchors = next(results.glob("*_anchors.geojson"))
    assert f"heatmap {heat}" in lines[0] and f"anchors {anchors}" in lines[0]
    assert res["HEATMAP"] != str(heat)  # the output is another file (a temporary one here)


# --- 4. renders run in the algorithm's task, not on the main thread -----------------------------


def test_the_batch_renders_its_layers_off_the_main_thread(plugin, stub_engine, raster_layer, qgis_processing,
                                                          qgis_new_project, tmp_path):
    """Run as the toolbox runs it (a QgsProcessingAlgRunnerTask in the background), the batch
    rendered every non-file layer in prepareAlgorithm, which QGIS calls on the main thread (in
    the task's constructor): the user interface froze for all the renders (a web service's
    downloads too) and Cancel could not stop them. Now the renders run in processAlgorithm, in
    the task's thread: the main thread's longest stall stays well below the run's time, which
    is mostly the three 4096 x 3072 px renders (measured on the same run: robust on a loaded
    machine, where both grow)."""
    import time

    from osgeo import gdal
    from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback,
                           QgsProject)

    set_settings(render_max_px=4096)
    src = raster_layer("src", width=400, height=300)
    layers = [virtual_raster_layer(src, f"v{i}", size=(4096, 3072)) for i in range(3)]
    alg = QgsApplication.processingRegistry().createAlgorithmById("geovqa:batch_questions")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = QgsProcessingFeedback()
    params = {"LAYERS": [lyr.id() for lyr in layers], "QUESTIONS": "What is here?",
              "OUTPUT": str(tmp_path / "answers.csv")}
    done = []
    QgsApplication.processEvents()
    meter = MainThreadStallMeter()
    t0 = time.perf_counter()
    task = QgsProcessingAlgRunnerTask(alg, params, context, feedback)  # prepareAlgorithm runs here
    prepare = time.perf_counter() - t0
    task.executed.connect(lambda ok, res: done.append((ok, res)))
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 180, "the algorithm")
    run = time.perf_counter() - t0
    stall = meter.stop()
    ok, res = done[0]
    assert ok and res["ANSWERED"] == 3 and res["ERRORS"] == 0, res
    sent = [r["raster_path"] for r in stub_engine.requests]
    assert len(sent) == 3 and all(gdal.Open(p).RasterXSize == 4096 for p in sent), sent
    assert stall < run / 3, (f"the main thread stalled for {stall:.2f} s of the run's {run:.2f} s (the task's "
                             f"constructor, where prepareAlgorithm runs, took {prepare:.2f} s)")
