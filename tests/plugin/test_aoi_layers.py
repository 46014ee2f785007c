"""AOI reprojection into pixel windows / polygons, and heatmap + anchor layer loading."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_gcp_file


class _LocalEngine:
    """The client of an engine on this computer: its result files are copied by their paths."""

    is_local = True


LOCAL_ENGINE = _LocalEngine()


def test_aoi_same_crs_gives_pixel_window(raster_layer):
    from geovqa.aoi import request_aoi
    from qgis.core import QgsGeometry, QgsRectangle

    layer = raster_layer()  # 64 x 48 px, 10 m, origin 500000/5000000, EPSG:32633
    geom = QgsGeometry.fromRect(QgsRectangle(500100, 4999700, 500300, 4999900))
    assert request_aoi(geom, layer.crs(), layer) == {"window": [10, 10, 20, 20]}
    whole = QgsGeometry.fromRect(QgsRectangle(499000, 4990000, 501000, 5001000))
    assert request_aoi(whole, layer.crs(), layer) is None
    assert request_aoi(None, layer.crs(), layer) is None


def test_aoi_in_another_crs_is_reprojected(raster_layer):
    from geovqa.aoi import request_aoi
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProject,
                           QgsRectangle)

    layer = raster_layer()
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    inner = QgsRectangle(500100, 4999700, 500300, 4999900)
    xf = QgsCoordinateTransform(layer.crs(), wgs84, QgsProject.instance())
    geo_rect = xf.transformBoundingBox(inner)
    aoi = request_aoi(QgsGeometry.fromRect(geo_rect), wgs84, layer)
    assert set(aoi) == {"polygon_wkt"}
    poly = QgsGeometry.fromWkt(aoi["polygon_wkt"])
    box = poly.boundingBox()
    # the lat/lon box of the UTM rectangle covers it, within a couple of metres
    assert box.xMinimum() <= inner.xMinimum() + 1 and box.xMaximum() >= inner.xMaximum() - 1
    assert box.yMinimum() <= inner.yMinimum() + 1 and box.yMaximum() >= inner.yMaximum() - 1
    assert box.width() < inner.width() + 20 and box.height() < inner.height() + 20
    assert poly.within(QgsGeometry.fromRect(layer.extent()).buffer(0.001, 2))


def test_aoi_outside_layer_is_a_clear_error(raster_layer):
    from geovqa.aoi import AoiError, request_aoi
    from qgis.core import QgsGeometry, QgsRectangle

    layer = raster_layer()
    with pytest.raises(AoiError, match="does not overlap"):
        request_aoi(QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10)), layer.crs(), layer)


def _write_results(tmp_path, layer):
    from osgeo import gdal
    import numpy as np

    heat = tmp_path / "heat.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(heat), layer.width(), layer.height(), 1, gdal.GDT_Float32)
    e = layer.extent()
    ds.SetGeoTransform((e.xMinimum(), layer.rasterUnitsPerPixelX(), 0, e.yMaximum(), 0, -layer.rasterUnitsPerPixelY()))
    ds.SetProjection(layer.crs().toWkt())
    ds.GetRasterBand(1).SetNoDataValue(-1)
    ds.GetRasterBand(1).WriteArray(np.random.default_rng(0).random((layer.height(), layer.width())).astype("float32"))
    ds = None
    ring = [[e.xMinimum(), e.yMaximum()], [e.xMinimum() + 50, e.yMaximum()], [e.xMinimum() + 50, e.yMaximum() - 50],
            [e.xMinimum(), e.yMaximum() - 50], [e.xMinimum(), e.yMaximum()]]
    anchors = tmp_path / "anchors.geojson"
    anchors.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"rank": 0, "score": 0.9, "role": "anchor", "tile": 0, "n_patches": 9}}]}))
    return heat, anchors


def test_result_layers_are_grouped_styled_and_aligned(raster_layer, tmp_path):
    from geovqa.layers import (HEATMAP_OPACITY, RESULT_LAYER_PROPERTY, add_result_layers, anchors_name, group_name,
                               heatmap_name, is_result_layer)
    from qgis.core import QgsProject, QgsSingleBandPseudoColorRenderer

    layer = raster_layer()
    heat, anchors = _write_results(tmp_path, layer)
    group, hl, al = add_result_layers("Where are the ships?", str(heat), str(anchors), source_layer=layer)
    assert group.name() == group_name("Where are the ships?") and "Where are the ships?" in group.name()
    assert QgsProject.instance().layerTreeRoot().findGroup(group.name()) is group
    # the heatmap says which layer and question it is about
    assert hl.name() == f"heatmap: {layer.name()} — Where are the ships?" == heatmap_name("Where are the ships?", layer)
    # and so do the anchors, named the same way (they were all "anchor tokens")
    assert al.name() == f"anchors: {layer.name()} — Where are the ships?" == anchors_name("Where are the ships?", layer)
    assert [c.layer().name() for c in group.findLayers()] == [al.name(), hl.name()]
    assert hl.customProperty(RESULT_LAYER_PROPERTY) == f"heatmap:{hl.id()}"
    assert al.customProperty(RESULT_LAYER_PROPERTY) == f"anchors:{al.id()}"
    assert is_result_layer(hl) and is_result_layer(al) and not is_result_layer(layer)
    assert hl.crs() == layer.crs() and al.crs() == layer.crs()
    assert hl.extent() == layer.extent()
    assert layer.extent().contains(al.extent())
    assert isinstance(hl.renderer(), QgsSingleBandPseudoColorRenderer)
    assert hl.renderer().opacity() == pytest.approx(HEATMAP_OPACITY)
    assert al.featureCount() == 1


def test_an_anchors_file_with_no_feature_keeps_the_heatmap(raster_layer, tmp_path):
    """Clipping can leave no anchor (all outside the layer): OGR then gives the layer no
    geometry type and no renderer, and styling it raised AttributeError in the dock's slot."""
    from geovqa.clip import clip_anchors
    from geovqa.layers import add_result_layers, heatmap_name

    layer = raster_layer()
    heat, anchors = _write_results(tmp_path, layer)
    clip_anchors(str(anchors), (0.0, 0.0, 10.0, 10.0), str(anchors))  # far from every anchor
    assert json.loads(anchors.read_text())["features"] == []
    group, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert al is None and hl is not None
    assert [c.layer().name() for c in group.findLayers()] == [heatmap_name("Where?", layer)]


def _geollava_like_results(tmp_path, layer, cell=4):
    """A heatmap as the default strategy writes it: one cell per patch, every cell a kept
    cluster's score (the released path keeps a cluster for every patch of a tile with few
    clusters), NaN nodata; and anchors with rank/score/role as the engine writes them."""
    from osgeo import gdal

    w, h = layer.width() // cell, layer.height() // cell
    e = layer.extent()
    px, py = e.width() / w, e.height() / h
    heat = tmp_path / "heat.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(heat), w, h, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((e.xMinimum(), px, 0, e.yMaximum(), 0, -py))
    ds.SetProjection(layer.crs().toWkt())
    band = ds.GetRasterBand(1)
    band.SetNoDataValue(float("nan"))
    scores = np.full((h, w), 0.01, dtype=np.float32)  # most of the image: low-score clusters
    scores[: h // 4, : w // 4] = 0.3  # one high-score cluster
    scores[-2:, -2:] = np.nan  # a pruned corner
    band.WriteArray(scores)
    ds = None
    feats = []
    for rank, (c0, r0, score, role) in enumerate([(0, 0, 0.3, "anchor"), (w // 2, h // 2, 0.01, "kept"),
                                                  (w - 4, h - 4, 0.02, "merged")]):
        x0, y1 = e.xMinimum() + c0 * px, e.yMaximum() - r0 * py
        ring = [[x0, y1], [x0 + 2 * px, y1], [x0 + 2 * px, y1 - 2 * py], [x0, y1 - 2 * py], [x0, y1]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"rank": rank, "score": score, "role": role, "tile": 0, "n_patches": 4}})
    anchors = tmp_path / "anchors.geojson"
    anchors.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return heat, anchors


def _render(layers, extent, crs, size=(256, 192), background="white"):
    """The offscreen map of ``layers`` (first on top): each pixel's (lightness, red, green, blue)."""
    from qgis.core import QgsMapRendererSequentialJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    ms = QgsMapSettings()
    ms.setLayers(layers)
    ms.setDestinationCrs(crs)
    ms.setOutputSize(QSize(*size))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor(background))
    job = QgsMapRendererSequentialJob(ms)
    job.start()
    job.waitForFinished()
    img = job.renderedImage()
    px = [[QColor(img.pixel(x, y)) for x in range(0, img.width(), 2)] for y in range(0, img.height(), 2)]
    return np.array([[(c.lightness(), c.red(), c.green(), c.blue()) for c in row] for row in px], dtype=float)


def test_the_imagery_stays_readable_under_the_default_heatmap(raster_layer, tmp_path):
    """The default strategy's heatmap has a cell over (nearly) every patch of the raster; at 60 %
    opacity with Magma's near-black low end, the imagery kept 40 % of its contrast and the
    low-score areas (most of the image) turned dark purple: the raster could not be read under
    its heatmap. Low scores are now clear, the highest a warm, mostly opaque colour."""
    from geovqa.layers import add_result_layers
    from qgis.core import QgsRectangle

    layer = raster_layer("scene", width=256, height=192)
    heat, anchors = _geollava_like_results(tmp_path, layer)
    _group, hl, _al = add_result_layers("Where are the boats?", str(heat), str(anchors), source_layer=layer)
    e = layer.extent()
    # the low-score part of the image (away from the high-score corner and the anchors)
    low = QgsRectangle(e.xMinimum() + 0.3 * e.width(), e.yMinimum() + 0.1 * e.height(),
                       e.xMinimum() + 0.9 * e.width(), e.yMinimum() + 0.6 * e.height())
    alone = _render([layer], low, layer.crs())[..., 0]
    under = _render([hl, layer], low, layer.crs())[..., 0]
    kept = under.std() / alone.std()
    assert kept >= 0.9, f"the imagery under the heatmap keeps {kept:.0%} of its contrast"
    # the high-score corner stands out: warm (red over blue), and the imagery still shows through
    top = QgsRectangle(e.xMinimum(), e.yMaximum() - 0.2 * e.height(), e.xMinimum() + 0.2 * e.width(), e.yMaximum())
    alone, under = _render([layer], top, layer.crs()), _render([hl, layer], top, layer.crs())
    assert (under[..., 1] - under[..., 3]).mean() > (alone[..., 1] - alone[..., 3]).mean() + 80
    assert 0.1 < under[..., 0].std() / alone[..., 0].std() < 0.5
    # over a dark background the top cells are readable; low-score and pruned cells are clear
    dark = _render([hl], e, layer.crs(), background="#101018")
    background = 20  # #101018's lightness
    assert dark[:10, :10, 0].mean() > 3 * background
    assert dark[40:60, 40:80, 0].max() == background and dark[-3:, -3:, 0].max() == background
    shader = hl.renderer().shader().rasterShaderFunction()
    alphas = [item.color.alpha() for item in shader.colorRampItemList()]
    assert alphas[0] == 0 and 0.7 * 255 <= alphas[-1] <= 0.8 * 255, alphas


def test_the_heatmap_legend_says_what_its_values_mean(raster_layer, tmp_path):
    """The legend was a Magma ramp from '-0.056081' to '0.131075' (raw scores, 6 digits) under
    'Band 1: token score (geollava) (Gray)': nothing said which end means 'the model relied on
    it', nor that a clear cell is a pruned token."""
    from geovqa.layers import add_result_layers
    from qgis.core import QgsLayerTreeLayer

    layer = raster_layer()
    heat, anchors = _geollava_like_results(tmp_path, layer)
    _group, hl, _al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    nodes = hl.legend().createLayerTreeModelLegendNodes(QgsLayerTreeLayer(hl))
    ramps = [n.settings() for n in nodes if callable(getattr(n, "settings", None))]  # the colour ramp's ends
    assert [(s.maximumLabel(), s.minimumLabel()) for s in ramps] == [
        ("more relied on (high score)", "less relied on (low score)")]
    assert "pruned" in hl.abstract()


def test_a_heatmap_of_equal_scores_does_not_black_out_the_raster(raster_layer, tmp_path):
    """`uniform` and `none` give every kept token the score 1.0: style_heatmap stretched 1.0 .. 2.0,
    so every cell got the ramp's darkest colour (Magma's near-black) at 60 %, and the whole
    raster turned dark: the kept tokens looked like 'nothing here'. They now take one light,
    clear 'kept' colour; pruned cells stay clear."""
    from osgeo import gdal
    from geovqa.layers import add_result_layers
    from qgis.core import QgsLayerTreeLayer
    from qgis.PyQt.QtCore import Qt

    layer = raster_layer("scene", width=128, height=96)
    e = layer.extent()
    heat = tmp_path / "heat.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(heat), 32, 24, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((e.xMinimum(), e.width() / 32, 0, e.yMaximum(), 0, -e.height() / 24))
    ds.SetProjection(layer.crs().toWkt())
    ds.GetRasterBand(1).SetNoDataValue(float("nan"))
    scores = np.ones((24, 32), dtype=np.float32)
    scores[:, 16:] = np.nan  # the right half pruned
    ds.GetRasterBand(1).WriteArray(scores)
    ds = None
    _group, hl, _al = add_result_layers("How many?", str(heat), None, source_layer=layer)
    alone, under = _render([layer], e, layer.crs()), _render([hl, layer], e, layer.crs())
    ratio = under[:, :60, 0].mean() / alone[:, :60, 0].mean()
    assert 1.0 <= ratio <= 1.4, f"the raster under an all-equal heatmap has {ratio:.0%} of its lightness"
    assert under[:, :60, 0].std() / alone[:, :60, 0].std() >= 0.6
    np.testing.assert_array_equal(under[:, 68:], alone[:, 68:])  # pruned: clear
    nodes = hl.legend().createLayerTreeModelLegendNodes(QgsLayerTreeLayer(hl))
    assert "kept token (all scored equally)" in [n.data(Qt.ItemDataRole.DisplayRole) for n in nodes]


def _anchor_labels(layer):
    """Each anchor's label text by its score ('' when unlabelled), as the labelling evaluates it."""
    from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils

    assert layer.labelsEnabled()
    expression = QgsExpression(layer.labeling().settings().fieldName)
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    labels = {}
    for feature in layer.getFeatures():
        context.setFeature(feature)
        labels[feature["score"]] = str(expression.evaluate(context) or "")
    return labels


def _symbols_drawn(layer):
    """The outline width of each anchor's symbol by its score (rule-based: the rule it falls in)."""
    from qgis.core import QgsRenderContext

    context = QgsRenderContext()
    renderer = layer.renderer().clone()
    renderer.startRender(context, layer.fields())
    try:
        return {f["score"]: [s.symbolLayer(0).strokeWidth() for s in renderer.symbolsForFeature(f, context)]
                for f in layer.getFeatures()}
    finally:
        renderer.stopRender(context)


def test_anchors_show_their_rank_by_score(raster_layer, tmp_path):
    """Every anchor was the same cyan outline: no label, no symbol by score, so the analyst could
    not tell the token the model scored highest from the 64th. The top 10 by score are now bold
    and labelled 1, 2, 3... (1: highest), the rest thin and faint."""
    from geovqa.layers import ANCHORS_OTHER_RULE, ANCHORS_TOP_RULE, add_result_layers

    layer = raster_layer("scene", width=256, height=192)
    heat, anchors = _geollava_like_results(tmp_path, layer)
    fc = json.loads(anchors.read_text())
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    fc["features"] = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"rank": i, "score": s, "role": "kept", "tile": 0, "n_patches": 1}}
                      for i, s in enumerate([0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.05, 0.6, 0.4, 0.8, 0.01, 0.02, 0.8])]
    anchors.write_text(json.dumps(fc))
    _group, _hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert al.renderer().type() == "RuleRenderer"
    assert [r.label() for r in al.renderer().rootRule().children()] == [ANCHORS_TOP_RULE, ANCHORS_OTHER_RULE]
    # the rank property is the order of entry into the model: the labels follow the score
    assert _anchor_labels(al) == {0.9: "1", 0.8: "2", 0.7: "3", 0.6: "4", 0.5: "5", 0.4: "6", 0.3: "7",
                                  0.2: "8", 0.1: "9", 0.05: "", 0.02: "", 0.01: ""}
    widths = _symbols_drawn(al)
    assert widths[0.9] == widths[0.1] == [0.7] and widths[0.05] == widths[0.01] == [0.2], widths
    text = al.labeling().settings().format()
    assert text.buffer().enabled() and text.color().lightness() > 200 > text.buffer().color().lightness()


def test_anchors_without_scores_or_with_equal_scores_keep_one_outline(raster_layer, tmp_path):
    """An older engine's anchors without ``score``, and `uniform`'s equal scores: nothing to rank,
    one outline for all (faint when they are many), no labels, no error."""
    from geovqa.layers import add_result_layers

    layer = raster_layer()
    heat, anchors = _geollava_like_results(tmp_path, layer)
    fc = json.loads(anchors.read_text())
    for f in fc["features"]:
        del f["properties"]["score"], f["properties"]["rank"]
    anchors.write_text(json.dumps(fc))
    _group, _hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert al.renderer().type() == "singleSymbol" and not al.labelsEnabled()
    assert al.renderer().symbol().symbolLayer(0).strokeWidth() == 0.4
    fc["features"] = fc["features"] * 8
    for f in fc["features"]:
        f["properties"]["score"] = 1.0
    anchors.write_text(json.dumps(fc))
    _group, _hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert al.renderer().type() == "singleSymbol" and not al.labelsEnabled()
    assert al.renderer().symbol().symbolLayer(0).strokeWidth() == 0.2


def test_one_question_asked_again_gets_groups_and_layers_told_apart(raster_layer, tmp_path):
    """The same question asked again about one layer (another strategy, budget or area, to compare
    what the model kept) gave groups and layers with the very same names."""
    from geovqa.layers import add_result_layers, anchors_name, group_name, heatmap_name

    layer = raster_layer()
    q = "Where are the ships?"
    got = []
    for n in range(3):
        (tmp_path / str(n)).mkdir()
        heat, anchors = _write_results(tmp_path / str(n), layer)
        got.append(add_result_layers(q, str(heat), str(anchors), source_layer=layer))
    assert [(g.name(), h.name(), a.name()) for g, h, a in got] == [
        (group_name(q) + suffix, heatmap_name(q, layer) + suffix, anchors_name(q, layer) + suffix)
        for suffix in ("", " (2)", " (3)")]
    # another question keeps its plain names; a number freed again is taken again
    (tmp_path / "x").mkdir()
    heat, anchors = _write_results(tmp_path / "x", layer)
    g, h, _ = add_result_layers("How many?", str(heat), str(anchors), source_layer=layer)
    assert (g.name(), h.name()) == (group_name("How many?"), heatmap_name("How many?", layer))
    got[1][0].parent().removeChildNode(got[1][0])
    (tmp_path / "y").mkdir()
    heat, anchors = _write_results(tmp_path / "y", layer)
    g, h, _ = add_result_layers(q, str(heat), str(anchors), source_layer=layer)
    assert (g.name(), h.name()) == (group_name(q) + " (2)", heatmap_name(q, layer) + " (2)")


def test_result_layers_are_drawn_above_their_raster_with_a_custom_layer_order(raster_layer, tmp_path):
    """The Layer Order panel's 'Control rendering order' on: QGIS put the new result layers at the
    bottom of the custom order, under the opaque raster they are about, which hid them."""
    from geovqa.layers import add_result_layers
    from qgis.core import QgsProject

    below, layer, above = raster_layer("below"), raster_layer("scene"), raster_layer("above")
    root = QgsProject.instance().layerTreeRoot()
    root.setHasCustomLayerOrder(True)
    root.setCustomLayerOrder([above, layer, below])  # first: drawn on top
    heat, anchors = _write_results(tmp_path, layer)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert [lyr.id() for lyr in root.layerOrder()] == [above.id(), al.id(), hl.id(), layer.id(), below.id()]
    # the raster not in the custom order (or not known): on top
    (tmp_path / "b").mkdir()
    heat, anchors = _write_results(tmp_path / "b", layer)
    root.setCustomLayerOrder([below])
    _, hl2, al2 = add_result_layers("Where?", str(heat), str(anchors))
    assert [lyr.id() for lyr in root.customLayerOrder()][:2] == [al2.id(), hl2.id()]
    assert root.layerOrder()[0].id() == al2.id()


def test_result_layers_follow_a_crs_the_user_set_on_the_layer(raster_layer, tmp_path):
    """A file tagged with a wrong CRS, corrected in QGIS: the heatmap kept the file's tag and
    landed hundreds of kilometres from the image and its anchors."""
    from geovqa.layers import add_result_layers
    from qgis.core import QgsCoordinateReferenceSystem

    layer = raster_layer()
    heat, anchors = _write_results(tmp_path, layer)  # written with the file's own CRS
    corrected = QgsCoordinateReferenceSystem("EPSG:32634")
    assert layer.crs() != corrected
    layer.setCrs(corrected)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert hl.crs() == corrected and al.crs() == corrected


@pytest.mark.parametrize("georeferenced", [False, True])
def test_the_anchors_of_a_raster_without_crs_lie_over_it(tmp_path, qgis_new_project, georeferenced):
    """The anchors layer kept OGR's EPSG:4326 (a GeoJSON without "crs" member) while the raster
    and the heatmap had no CRS: with the project in EPSG:32633 they spread over the whole map."""
    from conftest import extent_on_map, write_raster
    from geovqa.layers import add_result_layers
    from osgeo import gdal
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer

    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    QgsProject.instance().setCrs(utm)
    path = write_raster(tmp_path / "no_crs.tif", 200, 150, georeferenced=False)
    if georeferenced:  # placed by a geotransform, but with no CRS
        ds = gdal.Open(path, gdal.GA_Update)
        ds.SetGeoTransform((1000.0, 10.0, 0.0, 2000.0, 0.0, -10.0))
        ds = None
    layer = QgsRasterLayer(path, "no crs", "gdal")
    assert layer.isValid() and not layer.crs().isValid()
    QgsProject.instance().addMapLayer(layer)
    heat, anchors = _write_results(tmp_path, layer)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer, crs_wkt="")
    assert not al.crs().isValid() and not hl.crs().isValid()
    on_map = extent_on_map(layer, utm)
    assert on_map.contains(extent_on_map(al, utm)), extent_on_map(al, utm).toString()
    assert on_map.contains(extent_on_map(hl, utm))


def test_gathering_result_files_on_save_as_keeps_the_layers_crs(raster_layer, tmp_path, qgis_new_project):
    """Save / Save As copies the result files into <project>/geovqa_results and points the
    layers at the copies: the layers took their file's CRS again, so a CRS the user set on the
    raster (which the results follow) fell back to the file's, and the anchors of a raster
    without CRS became EPSG:4326, spread over the map."""
    from conftest import extent_on_map, write_raster
    from geovqa.layers import add_result_layers
    from geovqa.project_results import gather_result_files
    from osgeo import gdal
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer

    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    project = QgsProject.instance()
    project.setCrs(utm)
    # a CRS the user set on the raster
    corrected = QgsCoordinateReferenceSystem("EPSG:32634")
    layer = raster_layer()
    (tmp_path / "old" / "geovqa_results").mkdir(parents=True)
    heat, anchors = _write_results(tmp_path / "old" / "geovqa_results", layer)  # with the file's CRS
    layer.setCrs(corrected)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    # a raster without CRS, placed by a geotransform
    path = write_raster(tmp_path / "no_crs.tif", 200, 150, georeferenced=False)
    ds = gdal.Open(path, gdal.GA_Update)
    ds.SetGeoTransform((1000.0, 10.0, 0.0, 2000.0, 0.0, -10.0))
    ds = None
    plain = QgsRasterLayer(path, "no crs", "gdal")
    assert plain.isValid() and not plain.crs().isValid()
    project.addMapLayer(plain)
    (tmp_path / "old2" / "geovqa_results").mkdir(parents=True)
    heat2, anchors2 = _write_results(tmp_path / "old2" / "geovqa_results", plain)
    _, hl2, al2 = add_result_layers("Where?", str(heat2), str(anchors2), source_layer=plain, crs_wkt="")

    new = tmp_path / "new" / "geovqa_results"
    moved, problems = gather_result_files(project, new)
    assert len(moved) == 4 and not problems
    for lyr in (hl, al, hl2, al2):
        assert lyr.isValid() and lyr.source().startswith(str(new)), lyr.source()
    assert (hl.crs(), al.crs()) == (corrected, corrected), (hl.crs().authid(), al.crs().authid())
    assert not hl2.crs().isValid() and not al2.crs().isValid(), (hl2.crs().authid(), al2.crs().authid())
    on_map = extent_on_map(plain, utm)
    assert on_map.contains(extent_on_map(al2, utm)), extent_on_map(al2, utm).toString()
    assert on_map.contains(extent_on_map(hl2, utm))


def test_results_folder_next_to_project(tmp_path, qgis_new_project):
    from geovqa.settings import RESULTS_FOLDER, Settings
    from qgis.core import QgsProject

    s = Settings()
    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "proj" / "map.qgz"))
    assert s.results_dir(project) == tmp_path / "proj" / RESULTS_FOLDER
    s.output_dir = str(tmp_path / "mine")
    assert s.results_dir(project) == tmp_path / "mine"
    project.setFileName("")
    s.output_dir = ""
    # unsaved project: a folder inside the QGIS profile, not a temp dir
    from qgis.core import QgsApplication

    profile = Path(QgsApplication.qgisSettingsDirPath()).resolve()
    assert s.results_dir(project).resolve().is_relative_to(profile)
    assert s.results_dir(project).resolve() != Path(tempfile.gettempdir()).resolve()


# --- AOIs the map can produce that used to go wrong -------------------------------------------


def _geotiff_with_transform(path, gt, width=100, height=80, epsg=32633):
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte)
    ds.SetGeoTransform(gt)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetProjection(srs.ExportToWkt())
    ds = None
    return str(path)


@pytest.mark.parametrize("gt", [
    (500000.0, 10.0, 0.0, 4999200.0, 0.0, 10.0),  # south-up
    (500000.0, 9.4, 3.4, 5000000.0, 3.4, -9.4),  # rotated 20 degrees
])
def test_a_rectangle_on_a_rotated_or_south_up_raster_is_sent_as_a_polygon(tmp_path, qgis_new_project, gt):
    """QGIS shows these through a warped north-up view; a window cut from that view's grid
    landed on the wrong file pixels (mirrored rows on a south-up file)."""
    from geovqa.aoi import file_grid_is_layer_grid, request_aoi
    from qgis.core import QgsGeometry, QgsPointXY, QgsRasterLayer

    layer = QgsRasterLayer(_geotiff_with_transform(tmp_path / "odd.tif", gt), "odd", "gdal")
    assert layer.isValid() and not file_grid_is_layer_grid(layer)

    def to_map(col, row):
        return QgsPointXY(gt[0] + col * gt[1] + row * gt[2], gt[3] + col * gt[4] + row * gt[5])

    # the map box around file pixels cols 10..30, rows 10..30
    corners = [to_map(c, r) for c, r in ((10, 10), (30, 10), (30, 30), (10, 30))]
    box = QgsGeometry.fromMultiPointXY(corners).boundingBox()
    aoi = request_aoi(QgsGeometry.fromRect(box), layer.crs(), layer)
    assert set(aoi) == {"polygon_wkt"}
    sent = QgsGeometry.fromWkt(aoi["polygon_wkt"])
    for corner in corners:
        assert sent.buffer(1e-6, 2).contains(QgsGeometry.fromPointXY(corner))


def test_a_rectangle_on_a_raster_placed_by_gcps_is_sent_as_a_polygon(tmp_path, qgis_new_project):
    """QGIS shows a file placed by GCPs through a warped VRT of another size (200 x 100 px became
    158 x 158): a window cut from that grid landed on the wrong file pixels. The engine fits the
    GCPs, so a polygon in the layer's CRS is what reaches the right pixels."""
    from geovqa.aoi import file_grid_is_layer_grid, request_aoi
    from qgis.core import QgsGeometry, QgsRasterLayer, QgsRectangle

    # columns run south, rows run east (a transposed grid), 5 m x 10 m pixels
    path = write_gcp_file(tmp_path / "gcps.tif", 200, 100, [(500000 + 10 * row, 5000000 - 5 * col, col, row)
                                                            for col, row in ((0, 0), (200, 0), (0, 100), (200, 100))])

    layer = QgsRasterLayer(path, "gcps", "gdal")
    assert layer.isValid() and layer.crs().authid() == "EPSG:32633"
    assert not file_grid_is_layer_grid(layer)
    box = QgsRectangle(500100, 4999600, 500300, 4999800)
    aoi = request_aoi(QgsGeometry.fromRect(box), layer.crs(), layer)
    assert set(aoi) == {"polygon_wkt"}
    assert QgsGeometry.fromWkt(aoi["polygon_wkt"]).boundingBox() == box


def test_a_north_up_file_keeps_its_pixel_window(raster_layer):
    from geovqa.aoi import file_grid_is_layer_grid

    assert file_grid_is_layer_grid(raster_layer())


@pytest.mark.parametrize("crs, rect", [
    ("EPSG:3857", (-1e7, 0, 1e7, 1e7)),
    ("EPSG:3857", (-2e7, -1.2e7, 2e7, 1.2e7)),
    ("EPSG:4326", (-180, -90, 180, 90)),
    ("EPSG:4326", (-315, -90, 315, 90)),  # QGIS widens a world view past the date line
    ("EPSG:4326", (-100, 0, 100, 80)),
])
def test_a_continent_or_world_view_over_a_small_layer_is_the_whole_layer(raster_layer, crs, rect):
    """Reprojected whole into UTM, such a view became an invalid polygon: 'does not overlap'."""
    from geovqa.aoi import request_aoi
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

    layer = raster_layer()  # UTM 33N, near 15 E 45 N
    view = QgsGeometry.fromRect(QgsRectangle(*rect))
    assert request_aoi(view, QgsCoordinateReferenceSystem(crs), layer) is None


# --- a raster in degrees across the antimeridian, on a Pacific-centred map ----------------------


def _rect_in(crs_code, lon0, lat0, lon1, lat1):
    """A rectangle drawn on a map in ``crs_code`` whose corners are the given lon/lat, and that CRS."""
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsPointXY,
                           QgsProject, QgsRectangle)

    crs = QgsCoordinateReferenceSystem(crs_code)
    xf = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"), crs, QgsProject.instance())
    return QgsGeometry.fromRect(QgsRectangle(xf.transform(QgsPointXY(lon0, lat0)),
                                             xf.transform(QgsPointXY(lon1, lat1)))), crs


def _window_read(aoi, path):
    """The source pixel window the engine reads for ``aoi`` (engine/raster.py: a window as it is;
    a polygon's bounding box through the inverse geotransform, floor/ceil, clipped)."""
    from osgeo import gdal
    from qgis.core import QgsGeometry

    if aoi is None or "window" in aoi:
        return aoi and aoi["window"]
    ds = gdal.Open(path)
    inv = gdal.InvGeoTransform(ds.GetGeoTransform())
    box = QgsGeometry.fromWkt(aoi["polygon_wkt"]).boundingBox()
    corners = [(x, y) for x in (box.xMinimum(), box.xMaximum()) for y in (box.yMinimum(), box.yMaximum())]
    cols = [inv[0] + inv[1] * x + inv[2] * y for x, y in corners]
    rows = [inv[3] + inv[4] * x + inv[5] * y for x, y in corners]
    c0, r0 = max(0, math.floor(min(cols))), max(0, math.floor(min(rows)))
    c1, r1 = min(ds.RasterXSize, math.ceil(max(cols))), min(ds.RasterYSize, math.ceil(max(rows)))
    return [c0, r0, c1 - c0, r1 - r0]


def _degrees_layer(tmp_path, lon0, name="pacific"):
    """100 x 100 px of 0.01 degree (EPSG:4326) from ``lon0`` east, lat -16..-17, in the project."""
    from qgis.core import QgsProject, QgsRasterLayer

    path = _geotiff_with_transform(tmp_path / f"{name}.tif", (lon0, 0.01, 0.0, -16.0, 0.0, -0.01),
                                   width=100, height=100, epsg=4326)
    layer = QgsRasterLayer(path, name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer, path


@pytest.mark.parametrize("lon0, rect, window", [
    (179.5, (179.7, -16.7, 180.1, -16.3), [20, 30, 40, 40]),  # across the antimeridian
    (179.5, (180.2, -16.7, 180.4, -16.3), [70, 30, 20, 40]),  # all of it past 180
    (179.5, (179.6, -16.7, 179.8, -16.3), [10, 30, 20, 40]),  # all of it before 180
    (179.0, (179.2, -16.7, 179.6, -16.3), [20, 30, 40, 40]),  # a raster that stops at 180
    (179.0, (179.8, -16.7, 180.3, -16.3), [80, 30, 20, 40]),  # ... a rectangle past its edge
    (-120.0, (-119.8, -16.7, -119.4, -16.3), [20, 30, 40, 40]),  # the western hemisphere
])
def test_a_rectangle_on_a_pacific_map_reaches_the_pixels_drawn_on(tmp_path, qgis_new_project, lon0, rect, window):
    """A raster in degrees spanning the antimeridian (lon 179.5..180.5, as Pacific data often
    is) on a Pacific-centred map (EPSG:3832, where it is one piece): a rectangle over lon
    179.7..180.1 came back from its reprojection into degrees with the longitudes past 180
    wrapped to -180..., so what was sent was a GeometryCollection over lon 179.5..179.7, outside
    the rectangle. Longitudes now follow the layer's extent (-179.9 is 180.1)."""
    from geovqa.aoi import request_aoi

    layer, path = _degrees_layer(tmp_path, lon0)
    geom, crs = _rect_in("EPSG:3832", *rect)
    aoi = request_aoi(geom, crs, layer)
    assert aoi is not None and "GeometryCollection" not in aoi.get("polygon_wkt", "")
    assert _window_read(aoi, path) == window


@pytest.mark.parametrize("lon0", [179.5, 179.0, -120.5])
def test_a_pacific_map_view_around_a_raster_in_degrees_is_the_whole_layer(tmp_path, qgis_new_project, lon0):
    """The map extent around all of the antimeridian raster (lon 179..181, the dock's *Current
    map extent*) was refused with 'does not overlap the layer'; it is the whole layer."""
    from geovqa.aoi import request_aoi

    layer, _ = _degrees_layer(tmp_path, lon0)
    geom, crs = _rect_in("EPSG:3832", lon0 - 0.5, -17.5, lon0 + 1.5, -15.5)
    assert request_aoi(geom, crs, layer) is None


def _pacific_mercator_layer(tmp_path, lon0, lon1, name="pdc"):
    """100 x 100 px in EPSG:3832 (PDC Mercator, centred on 150 E) over lon ``lon0``..``lon1``
    (past 180 allowed), lat -16..-17, in the project: (layer, path)."""
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsPointXY, QgsProject,
                           QgsRasterLayer)

    xf = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"), QgsCoordinateReferenceSystem("EPSG:3832"),
                                QgsProject.instance())
    nw, se = xf.transform(QgsPointXY(lon0, -16.0)), xf.transform(QgsPointXY(lon1, -17.0))
    gt = (nw.x(), (se.x() - nw.x()) / 100, 0.0, nw.y(), 0.0, (se.y() - nw.y()) / 100)
    path = _geotiff_with_transform(tmp_path / f"{name}.tif", gt, width=100, height=100, epsg=3832)
    layer = QgsRasterLayer(path, name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer, path


def _antimeridian_layer(tmp_path, kind, lon0):
    """A raster over lon ``lon0``..``lon0 + 1`` (across 180 when lon0 > 179), lat -16..-17, not in
    EPSG:4326: in PDC Mercator, or in degrees of another datum (NAD83, EPSG:4269)."""
    from qgis.core import QgsProject, QgsRasterLayer

    if kind == "mercator":
        return _pacific_mercator_layer(tmp_path, lon0, lon0 + 1)
    path = _geotiff_with_transform(tmp_path / "nad83.tif", (lon0, 0.01, 0.0, -16.0, 0.0, -0.01),
                                   width=100, height=100, epsg=4269)
    layer = QgsRasterLayer(path, "nad83", "gdal")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4269"
    QgsProject.instance().addMapLayer(layer)
    return layer, path


@pytest.mark.parametrize("kind", ["mercator", "degrees"])
@pytest.mark.parametrize("lon0", [179.6, 179.4])  # the centre just past 180 (PROJ: -179.9), or just before it
@pytest.mark.parametrize("near, west", [(180.0, 179.0), (-180.0, -181.0), (None, None)])
def test_a_layer_extent_across_the_antimeridian_in_degrees_is_one_piece_where_the_area_is(
        tmp_path, qgis_new_project, kind, lon0, near, west):
    """_extent_in on a map in EPSG:4326: the extent of a raster across 180 degrees comes back in one
    piece 1 degree wide (PROJ answers -180..180: unshifted it spanned the whole world), at the copy
    nearest the area's centre ``near`` (west end ``west`` + the layer's offset past 179)."""
    from geovqa.aoi import _extent_in
    from qgis.core import QgsCoordinateReferenceSystem

    layer, _ = _antimeridian_layer(tmp_path, kind, lon0)
    box = _extent_in(layer, QgsCoordinateReferenceSystem("EPSG:4326"), None, near=near).boundingBox()
    assert box.width() == pytest.approx(1.0, abs=1e-6) and box.yMinimum() == pytest.approx(-17.0, abs=1e-6)
    if west is not None:
        assert box.xMinimum() == pytest.approx(west + lon0 - 179.0, abs=1e-6)
    else:  # the layer's own longitudes (degrees), or within 180 degrees of its centre's
        assert abs(box.center().x() - (lon0 + 0.5)) < 1e-6 or abs(box.center().x() - (lon0 + 0.5 - 360)) < 1e-6


@pytest.mark.parametrize("kind", ["mercator", "degrees"])
@pytest.mark.parametrize("lon0", [179.6, 179.4])
@pytest.mark.parametrize("r0, r1", [
    (179.7, 179.95),  # on the layer's east piece, as a map in degrees shows it at -180..180
    (179.7, 180.1),  # across 180, on a map panned past it
    (-180.3, -179.9),  # the same place, west of -180
])
def test_a_rectangle_on_a_map_in_degrees_reaches_an_antimeridian_layer(tmp_path, qgis_new_project, kind, lon0,
                                                                       r0, r1):
    """A rectangle on a map in EPSG:4326 over a raster across 180 degrees (in PDC Mercator, or in
    NAD83 degrees): the layer's extent in map degrees was placed by where PROJ put its centre
    (179.9 or -179.9), so a rectangle drawn at the other copy, e.g. on the east piece of a layer
    whose centre lies just past 180, did "not overlap the layer"."""
    from geovqa.aoi import request_aoi
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

    layer, path = _antimeridian_layer(tmp_path, kind, lon0)
    rect = QgsGeometry.fromRect(QgsRectangle(r0, -16.7, r1, -16.3))
    aoi = request_aoi(rect, QgsCoordinateReferenceSystem("EPSG:4326"), layer)
    col0, _, cols, _ = _window_read(aoi, path)
    start = (r0 + 360 if r0 < -180 else r0) - lon0
    assert (col0, cols) == (round(100 * start), round(100 * (r1 - r0))), aoi


def test_a_layer_extent_away_from_the_antimeridian_is_not_shifted(tmp_path, qgis_new_project, raster_layer):
    """Not across 180 degrees: the extent in map degrees is where the map shows the layer (the
    area's centre nearby shifts nothing), and a rectangle on it reaches its pixels."""
    from conftest import extent_on_map
    from geovqa.aoi import _extent_in, request_aoi
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

    degrees = QgsCoordinateReferenceSystem("EPSG:4326")
    west, _ = _pacific_mercator_layer(tmp_path, -175.0, -174.0, "west")
    for layer in (west, raster_layer()):  # the western hemisphere; UTM 33N near 15 E 45 N
        on_map = extent_on_map(layer, degrees)
        for near in (None, on_map.center().x(), on_map.xMinimum() - 20):
            box = _extent_in(layer, degrees, None, near=near).boundingBox()
            assert box.xMinimum() == pytest.approx(on_map.xMinimum(), abs=1e-6), (layer.name(), near)
            assert box.xMaximum() == pytest.approx(on_map.xMaximum(), abs=1e-6), (layer.name(), near)
    aoi = request_aoi(QgsGeometry.fromRect(QgsRectangle(-174.8, -16.7, -174.4, -16.3)), degrees, west)
    assert aoi["window"][0] == 20 and aoi["window"][2] == 40, aoi


def test_a_rectangle_beside_an_antimeridian_raster_does_not_overlap_it(tmp_path, qgis_new_project):
    from geovqa.aoi import AoiError, request_aoi

    layer, _ = _degrees_layer(tmp_path, 179.5)
    geom, crs = _rect_in("EPSG:3832", 180.7, -16.7, 181.0, -16.3)
    with pytest.raises(AoiError, match="does not overlap"):
        request_aoi(geom, crs, layer)


def test_an_area_touching_the_layer_beside_its_overlap_sends_only_the_overlap(raster_layer):
    """A U-shaped polygon with one arm over the layer and the other only touching its east edge
    was cut to a GeometryCollection (the arm's part, and a line along the edge), sent as such."""
    from geovqa.aoi import request_aoi
    from qgis.core import QgsGeometry

    layer = raster_layer()  # 64 x 48 px, 10 m, x 500000..500640, y 4999520..5000000
    u_shape = QgsGeometry.fromWkt("POLYGON((500100 4999700, 500200 4999700, 500200 4999400, 500640 4999400, "
                                  "500640 4999900, 500700 4999900, 500700 4999300, 500100 4999300, "
                                  "500100 4999700))")
    assert request_aoi(u_shape, layer.crs(), layer) == {"window": [10, 30, 10, 18]}


def test_a_world_view_in_degrees_covers_a_web_mercator_layer_whole(qgis_new_project, tmp_path):
    """An XYZ-like layer (the whole world in EPSG:3857) under a map showing the world in degrees:
    only about +-45 degrees of longitude used to be rendered."""
    from geovqa.aoi import clip_to_layer
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRasterLayer, QgsRectangle

    half = 20037508.342789244
    path = _geotiff_with_transform(tmp_path / "world.tif", (-half, 2 * half / 100, 0.0, half, 0.0, -2 * half / 100),
                                   width=100, height=100)
    from osgeo import gdal, osr

    ds = gdal.Open(path, gdal.GA_Update)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(3857)
    ds.SetProjection(srs.ExportToWkt())
    ds = None
    layer = QgsRasterLayer(path, "world", "gdal")
    assert layer.isValid() and layer.crs().authid() == "EPSG:3857"
    view = QgsGeometry.fromRect(QgsRectangle(-315, -90, 315, 90))
    box = clip_to_layer(view, QgsCoordinateReferenceSystem("EPSG:4326"), layer).boundingBox()
    assert box.xMinimum() <= -0.99 * half and box.xMaximum() >= 0.99 * half
    assert box.height() > 1.5 * half


def test_a_polygon_that_crosses_itself_is_repaired_not_refused(raster_layer):
    from geovqa.aoi import request_aoi
    from qgis.core import QgsGeometry, QgsPointXY

    layer = raster_layer()  # 500000..500640 x 4999520..5000000
    bowtie = QgsGeometry.fromPolygonXY([[QgsPointXY(500100, 4999900), QgsPointXY(500300, 4999700),
                                         QgsPointXY(500300, 4999900), QgsPointXY(500100, 4999700)]])
    assert not bowtie.isGeosValid()
    aoi = request_aoi(bowtie, layer.crs(), layer)
    sent = QgsGeometry.fromWkt(aoi["polygon_wkt"])
    assert sent.isGeosValid() and sent.area() == pytest.approx(200 * 200 / 2, rel=1e-6)


def test_a_table_of_a_geopackage_with_several_rasters_is_not_its_container_file(raster_layer, tmp_path):
    """The container's path made the engine read another table (or 'no raster bands')."""
    from geovqa.render import layer_file_path
    from osgeo import gdal
    from qgis.core import QgsRasterLayer

    tif = raster_layer().source()
    gpkg = str(tmp_path / "multi.gpkg")
    gdal.Translate(gpkg, tif, format="GPKG", creationOptions=["RASTER_TABLE=first"])
    gdal.Translate(gpkg, tif, format="GPKG", creationOptions=["RASTER_TABLE=second", "APPEND_SUBDATASET=YES"])
    second = QgsRasterLayer(f"GPKG:{gpkg}:second", "second", "gdal")
    assert second.isValid()
    assert layer_file_path(second) is None  # rendered like a web layer
    single = str(tmp_path / "single.gpkg")
    gdal.Translate(single, tif, format="GPKG")
    assert layer_file_path(QgsRasterLayer(single, "single", "gdal")) == single


# --- rasters with no georeferencing at all ----------------------------------------------------
# The protocol's coordinates for them are source pixels (col, row), rows running down; QGIS shows
# them at x = col, y = -row. Polygon AOIs and result files used to land mirrored.


def _unreferenced_layer(tmp_path, width=400, height=300):
    from conftest import write_raster
    from qgis.core import QgsProject, QgsRasterLayer

    path = write_raster(tmp_path / "plain.tif", width, height, georeferenced=False)
    layer = QgsRasterLayer(path, "plain", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_a_file_with_no_georeferencing_is_told_apart(raster_layer, tmp_path):
    from geovqa.aoi import file_grid_is_layer_grid, is_unreferenced_file
    from qgis.core import QgsRasterLayer, QgsRectangle

    plain = _unreferenced_layer(tmp_path)
    assert plain.extent() == QgsRectangle(0, -300, 400, 0)  # how QGIS shows it: row r at y = -r
    assert is_unreferenced_file(plain) and file_grid_is_layer_grid(plain)
    assert not is_unreferenced_file(raster_layer())
    path = _three_gcp_file(tmp_path / "gcps.tif")  # placed by GCPs: georeferenced, though with no geotransform
    assert not is_unreferenced_file(QgsRasterLayer(path, "gcps", "gdal"))


def test_a_polygon_on_an_unreferenced_raster_is_sent_in_source_pixels(tmp_path):
    from geovqa.aoi import request_aoi
    from qgis.core import QgsGeometry, QgsRectangle

    layer = _unreferenced_layer(tmp_path)
    crs = layer.crs()
    # a triangle in the top-left corner, drawn where QGIS shows it (y up)
    aoi = request_aoi(QgsGeometry.fromWkt("POLYGON((0 0, 200 0, 0 -150, 0 0))"), crs, layer)
    assert QgsGeometry.fromWkt(aoi["polygon_wkt"]).isGeosEqual(QgsGeometry.fromWkt("POLYGON((0 0, 200 0, 0 150, 0 0))"))
    # one reaching past the layer is cut to it first, then sent in pixels
    aoi = request_aoi(QgsGeometry.fromWkt("POLYGON((300 50, 500 -250, 300 -400, 300 50))"), crs, layer)
    sent = QgsGeometry.fromWkt(aoi["polygon_wkt"]).boundingBox()
    assert (sent.xMinimum(), sent.xMaximum()) == (300, 400) and 0 <= sent.yMinimum() < sent.yMaximum() <= 300
    # rectangles stay pixel windows; all of it is the whole layer
    assert request_aoi(QgsGeometry.fromRect(QgsRectangle(200, -300, 400, -150)), crs, layer) == {
        "window": [200, 150, 200, 150]}
    assert request_aoi(QgsGeometry.fromRect(QgsRectangle(-50, -350, 450, 50)), crs, layer) is None


def _engine_results_in_pixels(folder):
    """What the engine writes for the window 0,0,200,150 of a 400 x 300 raster with no
    georeferencing (as a real run did): a 24 x 48 grid of 8.33 px cells from row -125 down (the
    model's padded canvas around the window), tokens only over rows 0..150; anchors in (col, row)."""
    import numpy as np
    from osgeo import gdal

    folder.mkdir(parents=True, exist_ok=True)
    heat = folder / "q_heatmap.tif"
    cell = 200 / 24
    ds = gdal.GetDriverByName("GTiff").Create(str(heat), 24, 48, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((0.0, cell, 0.0, -125.0, 0.0, cell))
    band = ds.GetRasterBand(1)
    band.SetNoDataValue(float("nan"))
    scores = np.full((48, 24), np.nan, dtype="float32")
    scores[15:33] = 0.5
    band.WriteArray(scores)
    ds = None
    ring = [[0.0, 66.7], [200.0, 66.7], [200.0, 0.0], [0.0, 0.0], [0.0, 66.7]]
    anchors = folder / "q_anchors.geojson"
    anchors.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"rank": 0, "score": 0.9, "role": "anchor", "tile": 0, "n_patches": 551}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 75], [8.3, 75], [8.3, 150],
                                                                              [0, 150], [0, 75]]]},
         "properties": {"rank": 1, "score": 0.1, "role": "anchor", "tile": 0, "n_patches": 1}}]}))
    return heat, anchors


def test_results_of_an_unreferenced_raster_land_on_it(tmp_path):
    """The engine's heatmap (rows down from -125) showed at y -125..275 beside a layer at
    -300..0, and the anchors of the top-left quarter at y 0..150, above the layer."""
    from conftest import valid_cells_extent
    from geovqa.layers import add_result_layers
    from geovqa.tasks import keep_result_files, rect_bounds
    from osgeo import gdal
    from qgis.core import QgsRectangle

    layer = _unreferenced_layer(tmp_path)
    heat, anchors = _engine_results_in_pixels(tmp_path / "engine")
    originals = (gdal.Open(str(heat)).GetGeoTransform(), anchors.read_text())
    kept = keep_result_files({"heatmap_path": str(heat), "anchors_path": str(anchors)}, LOCAL_ENGINE, tmp_path / "results",
                             "q", rect_bounds(layer.extent()), unreferenced=True)
    assert (gdal.Open(str(heat)).GetGeoTransform(), anchors.read_text()) == originals  # the engine's are kept
    _, hl, al = add_result_layers("Where?", kept["heatmap"], kept["anchors"], source_layer=layer)
    near = 1e-6
    assert layer.extent().buffered(near).contains(hl.extent())
    assert layer.extent().buffered(near).contains(al.extent())
    top_left = QgsRectangle(0, -150, 200, 0)
    assert top_left.buffered(near).contains(valid_cells_extent(kept["heatmap"]))
    assert valid_cells_extent(kept["heatmap"]).width() == pytest.approx(200)
    assert valid_cells_extent(kept["heatmap"]).height() == pytest.approx(150)
    assert al.featureCount() == 2 and top_left.buffered(near).contains(al.extent())
    assert al.extent().yMinimum() == pytest.approx(-150)


def test_geojson_geometries_are_mirrored_whole():
    from geovqa.unreferenced import flip_geometry, flipped_geotransform

    assert flipped_geotransform((0, 2, 0, -10, 0, 2)) == (0, 2, 0, 10, 0, -2)
    assert flip_geometry({"type": "Point", "coordinates": [1, 2]}) == {"type": "Point", "coordinates": [1, -2]}
    square = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]  # clockwise
    flipped = flip_geometry({"type": "MultiPolygon", "coordinates": [[square]]})["coordinates"][0][0]
    assert flipped == [[0, 0], [1, 0], [1, -1], [0, -1], [0, 0]]  # mirrored, winding kept
    coll = flip_geometry({"type": "GeometryCollection", "geometries": [
        {"type": "LineString", "coordinates": [[0, 1], [2, 3]]}]})
    assert coll["geometries"][0]["coordinates"] == [[0, -1], [2, -3]]


def test_the_bounding_boxes_of_mirrored_anchors_stay_min_then_max(tmp_path):
    """A GeoJSON bbox is [xmin, ymin, xmax, ymax]: mirrored, the row span [1, 3] becomes the y
    span [-3, -1], for the collection and for each feature."""
    from geovqa.unreferenced import flip_anchors

    path = tmp_path / "anchors.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "bbox": [0, 1, 2, 3], "features": [
        {"type": "Feature", "bbox": [0, 1, 2, 3], "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 1], [0, 3], [2, 3], [2, 1], [0, 1]]]}}]}))
    data = json.loads(Path(flip_anchors(str(path))).read_text())
    assert data["bbox"] == data["features"][0]["bbox"] == [0, -3, 2, -1]


# --- files the engine refuses ("warp it first") but QGIS shows warped --------------------------


def test_a_file_the_engine_refuses_to_read_unwarped_is_rendered(tmp_path):
    """GCPs no affine transform fits, or RPCs alone: the engine answers 'warp it first'
    (raster_unreadable), while QGIS shows the layer warped. Sending the file failed every question."""
    from conftest import write_gcp_raster
    from geovqa.render import layer_file_path
    from osgeo import gdal
    from qgis.core import QgsRasterLayer

    def path_of(path):
        layer = QgsRasterLayer(path, "l", "gdal")
        assert layer.isValid()
        return layer_file_path(layer)

    fits = write_gcp_raster(tmp_path / "fits.tif", displaced_px=0.2)  # the engine fits these GCPs
    assert path_of(fits) == fits
    assert path_of(write_gcp_raster(tmp_path / "warp.tif", displaced_px=20)) is None
    rpc = str(tmp_path / "rpc.tif")
    ds = gdal.GetDriverByName("GTiff").Create(rpc, 50, 50, 1, gdal.GDT_Byte)
    ds.SetMetadata({"LINE_OFF": "25", "SAMP_OFF": "25", "LAT_OFF": "45", "LONG_OFF": "15", "HEIGHT_OFF": "0",
                    "LINE_SCALE": "25", "SAMP_SCALE": "25", "LAT_SCALE": "0.01", "LONG_SCALE": "0.01",
                    "HEIGHT_SCALE": "1", "LINE_NUM_COEFF": " ".join(["0", "0", "-1"] + ["0"] * 17),
                    "LINE_DEN_COEFF": " ".join(["1"] + ["0"] * 19),
                    "SAMP_NUM_COEFF": " ".join(["0", "1"] + ["0"] * 18),
                    "SAMP_DEN_COEFF": " ".join(["1"] + ["0"] * 19)}, "RPC")
    ds = None
    assert path_of(rpc) is None


def _three_gcp_file(path):
    """A 40 x 30 px one-band file placed by three GCPs on a 10 m grid (EPSG:32633)."""
    return write_gcp_file(path, 40, 30, [(500000 + 10 * c, 5000000 - 10 * r, c, r)
                                         for c, r in ((0, 0), (40, 0), (0, 30))], bands=1)


def _clustered_gcp_scan(path, count):
    """A 1000 x 800 px scan (10 m pixels, EPSG:32633) placed by the first ``count`` of 12 GCPs
    clustered in its centre third (all in one town), each up to 0.45 px off the affine grid."""
    rng = np.random.default_rng(3)
    points = []
    for _ in range(12):
        col, row = rng.uniform(350, 650), rng.uniform(300, 500)
        dc, dr = rng.uniform(-0.45, 0.45, 2)
        points.append((500000 + 10 * (col + dc), 5000000 - 10 * (row + dr), col, row))
    return write_gcp_file(path, 1000, 800, points[:count])


def test_a_file_whose_gcps_bend_it_is_rendered_as_qgis_shows_it(tmp_path, qgis_new_project):
    """12 GCPs clustered in the centre, each within 0.46 px of one affine transform: the file was
    sent as it is and the engine placed it by that affine fit, while QGIS shows a file with 6 or
    more GCPs through GDAL's 2nd-order polynomial warp, 8-9 px away at the corners: heatmap and
    anchors landed off what the user sees. Now the plugin sends a render of the layer. With 5
    GCPs (GDAL's warp is then the affine fit) the file is sent, and QGIS shows it where the
    engine places it."""
    from geovqa.render import layer_file_path
    from osgeo import gdal
    from qgis.core import QgsProject, QgsRasterLayer

    bent = _clustered_gcp_scan(tmp_path / "bent.tif", 12)
    layer = QgsRasterLayer(bent, "bent", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    assert layer_file_path(layer) is None

    flat = _clustered_gcp_scan(tmp_path / "flat.tif", 5)
    layer = QgsRasterLayer(flat, "flat", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    assert layer_file_path(layer) == flat
    gt = gdal.GCPsToGeoTransform(gdal.Open(flat).GetGCPs())  # the engine's fit (rasterio from_gcps)
    xs = [gt[0] + gt[1] * c + gt[2] * r for c in (0, 1000) for r in (0, 800)]
    ys = [gt[3] + gt[4] * c + gt[5] * r for c in (0, 1000) for r in (0, 800)]
    ext = layer.extent()
    off = max(abs(ext.xMinimum() - min(xs)), abs(ext.xMaximum() - max(xs)),
              abs(ext.yMinimum() - min(ys)), abs(ext.yMaximum() - max(ys)))
    assert off <= 10.0, f"QGIS shows the raster {off / 10:.1f} px from where its results land"


def test_the_heatmap_of_a_south_up_raster_is_kept_uncropped(tmp_path):
    """The engine's heatmap follows its raster's grid; cropping a south-up one raised in
    gdal.Translate (negative source window) and the answer failed with 'Could not save the
    result files'."""
    from geovqa.tasks import keep_result_files
    from osgeo import gdal

    heat = _geotiff_with_transform(tmp_path / "heat.tif", (500000.0, 80.0, 0.0, 4997250.0, 0.0, 80.0), 25, 50)
    kept = keep_result_files({"heatmap_path": heat}, LOCAL_ENGINE, tmp_path / "results", "q",
                             (500000.0, 4998500.0, 502000.0, 5000000.0))
    assert gdal.Open(kept["heatmap"]).GetGeoTransform() == (500000.0, 80.0, 0.0, 4997250.0, 0.0, 80.0)


# --- the heatmap clipped to the raster keeps every cell over it, on every side -------------------


def _heatmap_grid(path, gt, width, height, epsg=32633):
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 1, gdal.GDT_Float32)
    ds.SetGeoTransform(gt)
    if epsg:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        ds.SetProjection(srs.ExportToWkt())
    ds.GetRasterBand(1).WriteArray(np.arange(width * height, dtype=np.float32).reshape(height, width))
    ds = None
    return str(path)


# the real tiny engine's heatmaps of 300 x 200 px rasters (24 x 48 cells over the padded canvas)
# and those rasters' bounds, as the review found them
ENGINE_GRIDS = {
    "utm": ((500000.0, 124.99999999999997, 0.0, 5001982.222222222, 0.0, -124.44444444444446),
            (500000.0, 4998000.0, 503000.0, 5000000.0), 17),
    "4326": ((10.0, 0.012499999999999999, 0.0, 50.099111111111114, 0.0, -0.006222222222222222),
             (10.0, 49.9, 10.3, 50.0), 17),
    # no georeferencing: the engine's grid in pixels (rows down), mirrored by the plugin first
    "unreferenced": ((0.0, 12.5, 0.0, 198.2222222222222, 0.0, -12.444444444444443),
                     (0.0, -200.0, 300.0, 0.0), 17),
    "edges on cells": ((100.0, 10.0, 0.0, 500.0, 0.0, -10.0), (120.0, 300.0, 200.0, 450.0), 15),
    "inside": ((100.0, 10.0, 0.0, 500.0, 0.0, -10.0), (90.0, 100.0, 400.0, 600.0), 40),
}


@pytest.mark.parametrize("name", list(ENGINE_GRIDS))
def test_the_clipped_heatmap_covers_the_raster_on_every_side(tmp_path, name):
    """gdal.Translate(projWin=...) rounded the window's corners to the nearest cell: the last
    row of cells over the raster (its bottom 6 %) was dropped while a row mostly outside it was
    kept at the top."""
    from geovqa.clip import clip_heatmap
    from osgeo import gdal

    from conftest import cell_coverage_problems

    gt, bounds, rows = ENGINE_GRIDS[name]
    src = _heatmap_grid(tmp_path / "engine.tif", gt, 24 if name != "inside" else 30, 48 if name != "inside" else 40)
    assert cell_coverage_problems(src, bounds) or name == "inside"  # the engine's grid is larger
    out = clip_heatmap(src, bounds, str(tmp_path / "clipped.tif"))
    assert cell_coverage_problems(out, bounds) == [] or name == "inside"
    ds = gdal.Open(out)
    assert ds.RasterYSize == rows
    if name == "inside":  # the grid lies inside the bounds: nothing to cut
        assert out == src
        return
    # the cells are the engine's, not resampled
    g = ds.GetGeoTransform()
    col, row = round((g[0] - gt[0]) / gt[1]), round((g[3] - gt[3]) / gt[5])
    engine_ds = gdal.Open(src)  # kept: a band outliving its dataset crashes GDAL's Python
    engine = engine_ds.GetRasterBand(1).ReadAsArray()
    assert ds.GetRasterBand(1).ReadAsArray().tolist() == \
        engine[row:row + ds.RasterYSize, col:col + ds.RasterXSize].tolist()


def test_anchors_outside_the_bold_top_are_not_labelled_when_top_scores_tie(raster_layer, tmp_path):
    """With ties among the highest scores, the labels ran on over the next distinct scores:
    anchors drawn thin and faint (outside the bold top 10) got labels 5..9."""
    from geovqa.layers import add_result_layers

    layer = raster_layer("scene", width=256, height=192)
    heat, anchors = _geollava_like_results(tmp_path, layer)
    fc = json.loads(anchors.read_text())
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    scores = [0.9] * 3 + [0.8] * 3 + [0.7] * 3 + [0.6] * 3 + [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]
    fc["features"] = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"rank": i, "score": s, "role": "kept", "tile": 0, "n_patches": 1}}
                      for i, s in enumerate(scores)]
    anchors.write_text(json.dumps(fc))
    _group, _hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    widths = _symbols_drawn(al)
    labels = _anchor_labels(al)
    faint_but_labelled = {s: labels[s] for s, w in widths.items() if w == [0.2] and labels[s]}
    assert faint_but_labelled == {}, faint_but_labelled


def test_a_file_placed_by_three_gcps_is_sent_as_it_is(tmp_path):
    """Three GCPs are the fewest an affine transform is fitted to, and they fit it exactly (GDAL's
    warp of them is that affine transform too): the engine reads the file as QGIS shows it, so
    the file itself is sent, not a render."""
    from geovqa.render import layer_file_path
    from qgis.core import QgsRasterLayer

    path = _three_gcp_file(tmp_path / "three.tif")
    layer = QgsRasterLayer(path, "three", "gdal")
    assert layer.isValid()
    assert layer_file_path(layer) == path


def _bent_gcp_scan(path, cols, bend):
    """A 1000 x 800 px scan (10 m pixels, EPSG:32633) placed by 9 GCPs in the columns ``cols``
    (rows 100, 400, 700) of a map that bends east by ``bend`` x col² pixels: GDAL's 2nd-order
    warp of them follows the bend, which no affine transform does away from the GCPs, while the
    affine fit misses no GCP by more than a few hundredths of a pixel."""
    return write_gcp_file(path, 1000, 800, [(500000 + 10 * (c + bend * c * c), 5000000 - 10 * r, c, r)
                                            for c in cols for r in (100, 400, 700)], bands=1)


def test_a_gcp_warp_that_strays_far_from_its_gcps_is_rendered_wherever_it_strays(tmp_path):
    """GCPs in the east of a scan: GDAL's warp strays 1.4 px from the engine's affine fit at the
    west edge, and only there (at the east edge it is within a few hundredths); GCPs in the
    west, bent less: it strays 0.57 px at the east edge, under 0.5 px anywhere short of it.
    Both are shown by QGIS off where the engine would place them, so both are rendered."""
    from geovqa.render import layer_file_path
    from qgis.core import QgsRasterLayer

    for name, cols, bend in (("east", (700, 850, 1000), 2e-6), ("west", (0, 150, 300), 0.8e-6)):
        path = _bent_gcp_scan(tmp_path / f"{name}.tif", cols, bend)
        layer = QgsRasterLayer(path, name, "gdal")
        assert layer.isValid()
        assert layer_file_path(layer) is None, name


def test_long_questions_are_shortened_to_their_limit_in_group_and_layer_names():
    """A group's question is cut to MAX_GROUP_CHARS characters, a result layer's to
    MAX_HEATMAP_QUESTION_CHARS, the last of them an ellipsis; a question of exactly the limit is
    kept whole."""
    from geovqa.layers import GROUP_PREFIX, MAX_GROUP_CHARS, MAX_HEATMAP_QUESTION_CHARS, group_name, heatmap_name

    long_q = "where  are\tthe " + "boats " * 40
    words = " ".join(long_q.split())
    assert group_name(long_q) == GROUP_PREFIX + words[: MAX_GROUP_CHARS - 1] + "…"
    assert len(group_name(long_q)) == len(GROUP_PREFIX) + MAX_GROUP_CHARS
    exact = "q" * MAX_GROUP_CHARS
    assert group_name(exact) == GROUP_PREFIX + exact
    assert heatmap_name(long_q, "scene") == f"heatmap: scene — {words[: MAX_HEATMAP_QUESTION_CHARS - 1]}…"
    exact = "h" * MAX_HEATMAP_QUESTION_CHARS
    assert heatmap_name(exact, "scene") == f"heatmap: scene — {exact}"


def test_the_heatmaps_clear_half_ends_at_the_median_score_not_half_the_range(tmp_path):
    """The colour stops are quantiles of the kept cells' scores: with most scores low (a cubic
    spread from 0 to 1, median 0.125), the cells up to the median stay clear and those above it
    are coloured, where stops spread evenly over 0..1 would leave three quarters of the cells
    clear."""
    from osgeo import gdal
    from geovqa.layers import style_heatmap
    from qgis.core import QgsRasterLayer

    path = str(tmp_path / "heat.tif")
    scores = (np.arange(2000).reshape(40, 50) ** 3 / 1999.0 ** 3).astype(np.float32)
    ds = gdal.GetDriverByName("GTiff").Create(path, 50, 40, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((500000, 10, 0, 5000000, 0, -10))
    ds.GetRasterBand(1).SetNoDataValue(float("nan"))
    ds.GetRasterBand(1).WriteArray(scores)
    ds = None
    layer = QgsRasterLayer(path, "heat", "gdal")
    style_heatmap(layer)
    items = layer.renderer().shader().rasterShaderFunction().colorRampItemList()
    clear_up_to = max(item.value for item in items if item.color.alpha() == 0)
    assert abs(clear_up_to - float(np.median(scores))) < 0.03, [(i.value, i.color.alpha()) for i in items]
    coloured_from = min(item.value for item in items if item.color.alpha() > 0)
    assert coloured_from < 0.6  # the 0.8 quantile (0.51), not 0.8 of the range


def test_a_rectangle_past_the_layers_edge_is_clipped_to_its_pixels(raster_layer):
    """The pixel window of a rectangle reaching past the layer's right and bottom edges ends at
    the raster's last column and row; one that only touches the layer's edge has no pixel of it."""
    from geovqa.aoi import AoiError, pixel_window
    from qgis.core import QgsRectangle

    layer = raster_layer()  # 64 x 48 px, 10 m, origin 500000/5000000
    assert pixel_window(QgsRectangle(500500, 4999400, 500800, 4999900), layer) == [50, 10, 14, 38]
    with pytest.raises(AoiError):
        pixel_window(QgsRectangle(500640, 4999600, 500700, 4999800), layer)  # touches the east edge
    with pytest.raises(AoiError):
        pixel_window(QgsRectangle(500100, 4999400, 500300, 4999520), layer)  # touches the south edge


def test_a_rectangle_on_a_raster_with_oblong_pixels_reaches_its_rows(tmp_path, qgis_new_project):
    """Pixels 10 m wide and 20 m high: the rows of the window are counted in 20 m steps."""
    from conftest import write_raster
    from geovqa.aoi import pixel_window
    from qgis.core import QgsRasterLayer, QgsRectangle

    path = write_raster(tmp_path / "oblong.tif", pixel=(10.0, 20.0), bands=1)
    layer = QgsRasterLayer(path, "oblong", "gdal")
    assert layer.isValid()
    assert pixel_window(QgsRectangle(500100, 4999600, 500300, 4999800), layer) == [10, 10, 20, 10]


def test_gathering_result_files_moves_only_geovqas_own_and_overwrites_nothing(raster_layer, tmp_path,
                                                                              qgis_new_project):
    """Save As copies the files of result layers in an old project's geovqa_results (with the
    files GDAL keeps beside them), under a free name when the new folder holds other files of
    that name (heat.tif, heat_2.tif: heat_3.tif);
    a result file the user placed in a folder of their own (Processing's output path) stays
    where it is and its layer keeps reading it."""
    from geovqa.layers import add_result_layers
    from geovqa.project_results import gather_result_files
    from qgis.core import QgsProject

    layer = raster_layer()
    (tmp_path / "old" / "geovqa_results").mkdir(parents=True)
    heat, anchors = _write_results(tmp_path / "old" / "geovqa_results", layer)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    (tmp_path / "mine").mkdir()
    own_heat, own_anchors = _write_results(tmp_path / "mine", layer)
    _, own_hl, own_al = add_result_layers("What?", str(own_heat), str(own_anchors), source_layer=layer)
    new = tmp_path / "new" / "geovqa_results"
    new.mkdir(parents=True)
    for name in (heat.name, heat.stem + "_2" + heat.suffix):
        (new / name).write_bytes(b"another file")
    aux = '<PAMDataset><Metadata><MDI key="STATISTICS_MAXIMUM">1</MDI></Metadata></PAMDataset>'
    Path(str(heat) + ".aux.xml").write_text(aux)  # what GDAL keeps beside the file (statistics)

    moved, problems = gather_result_files(QgsProject.instance(), new)
    assert not problems
    assert set(moved) == {str(heat), str(anchors)}
    assert moved[str(heat)] == str(new / (heat.stem + "_3" + heat.suffix))
    for name in (heat.name, heat.stem + "_2" + heat.suffix):
        assert (new / name).read_bytes() == b"another file", name
    assert hl.isValid() and hl.source() == moved[str(heat)]
    assert Path(moved[str(heat)] + ".aux.xml").read_text() == aux
    assert own_hl.source() == str(own_heat) and own_al.source().split("|")[0] == str(own_anchors)


def test_gathering_copies_the_files_records_refer_to_without_layers_each_once(raster_layer, tmp_path,
                                                                             qgis_new_project):
    """Save As copies the result files GeoVQA's records (the dock's turns) refer to although their
    layers are gone, each once however many layers and records refer to it (by any spelling of
    its path); a file the user placed, one already in the new folder and one no longer there
    stay as they are."""
    from geovqa.layers import add_result_layers
    from geovqa.project_results import gather_result_files, moved_files
    from qgis.core import QgsProject

    layer = raster_layer()
    old = tmp_path / "old" / "geovqa_results"
    (old / "a").mkdir(parents=True)
    (old / "b").mkdir()
    heat, anchors = _write_results(old / "a", layer)  # an answer whose layers were removed
    kept_heat, kept_anchors = _write_results(old / "b", layer)  # one whose layers are there
    _, kl, _ = add_result_layers("Where?", str(kept_heat), str(kept_anchors), source_layer=layer)
    (tmp_path / "mine").mkdir()
    mine, _ = _write_results(tmp_path / "mine", layer)
    new = tmp_path / "new" / "geovqa_results"
    new.mkdir(parents=True)
    already = new / "already.tif"
    already.write_bytes(b"in the new folder")
    emitted = []
    moved_files.moved.connect(emitted.append)
    try:
        moved, problems = gather_result_files(
            QgsProject.instance(), new,
            [str(heat), str(anchors), str(kept_heat), str(old / "a" / ".." / "a" / "heat.tif"), str(mine),
             str(already), str(old / "gone.tif"), "", None])
    finally:
        moved_files.moved.disconnect(emitted.append)
    assert not problems
    assert set(moved) == {str(heat), str(anchors), str(kept_heat), str(kept_anchors),
                          str(old / "a" / ".." / "a" / "heat.tif")}
    assert moved[str(old / "a" / ".." / "a" / "heat.tif")] == moved[str(heat)]  # one copy
    assert kl.source() == moved[str(kept_heat)]
    assert sorted(p.name for p in new.iterdir()) == ["already.tif", "anchors.geojson", "anchors_2.geojson",
                                                     "heat.tif", "heat_2.tif"]
    assert all(Path(p).is_file() for p in (heat, anchors, kept_heat, kept_anchors))  # nothing removed
    assert emitted == [moved]


def test_gathering_copies_the_renders_records_refer_to_into_the_renders_folder_each_once(raster_layer, tmp_path,
                                                                                     qgis_new_project):
    """Save As left the renders of non-file layers (WMS, XYZ, virtual rasters) the turns were
    asked about in the old results folder's renders/ (or the profile's): the project moved or
    shared lost the image its answers were about. They are copied into the new results folder's
    renders/, each once; one in the temporary folder renders fall back to is GeoVQA's too; a
    file the user placed, one already in the new folder and one no longer there stay."""
    import tempfile

    from geovqa.project_results import gather_result_files, moved_files
    from geovqa.render import RENDERS, TEMP_RENDERS
    from qgis.core import QgsProject

    layer = raster_layer()
    old = tmp_path / "old" / "geovqa_results" / RENDERS
    old.mkdir(parents=True)
    render, _ = _write_results(old, layer)
    temp = Path(tempfile.gettempdir()) / TEMP_RENDERS
    temp.mkdir(exist_ok=True)
    fallback = temp / f"{tmp_path.name}_render.tif"
    fallback.write_bytes(b"a render written when the results folder could not be")
    (tmp_path / "mine").mkdir()
    mine, _ = _write_results(tmp_path / "mine", layer)
    new = tmp_path / "new" / "geovqa_results"
    (new / RENDERS).mkdir(parents=True)
    already = new / RENDERS / "already_render.tif"
    already.write_bytes(b"in the new folder")
    emitted = []
    moved_files.moved.connect(emitted.append)
    try:
        moved, problems = gather_result_files(
            QgsProject.instance(), new, renders=[str(render), str(old / ".." / RENDERS / render.name), str(fallback),
                                                 str(mine), str(already), str(old / "gone.tif"), "", None])
    finally:
        moved_files.moved.disconnect(emitted.append)
        fallback.unlink()
    assert not problems
    assert set(moved) == {str(render), str(old / ".." / RENDERS / render.name), str(fallback)}
    assert moved[str(render)] == moved[str(old / ".." / RENDERS / render.name)] == str(new / RENDERS / render.name)
    assert moved[str(fallback)] == str(new / RENDERS / fallback.name)
    assert sorted(p.name for p in new.iterdir()) == [RENDERS]
    assert sorted(p.name for p in (new / RENDERS).iterdir()) == sorted(["already_render.tif", render.name,
                                                                        fallback.name])
    assert render.is_file() and mine.is_file()  # nothing removed
    assert emitted == [moved]


def test_an_answer_with_one_file_outside_the_projects_results_folder_is_gathered(raster_layer, tmp_path,
                                                                                 qgis_new_project):
    """gather_into_project for an answer's files: nothing to do when all of them lie in the saved
    project's own results folder; when one of them does not (its anchors still in an old project's
    folder), the project's result files are gathered."""
    from conftest import set_settings
    from geovqa.layers import add_result_layers
    from geovqa.project_results import gather_into_project
    from qgis.core import QgsProject

    set_settings(output_dir="")  # the project's own results folder
    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "proj" / "p.qgz"))
    results = tmp_path / "proj" / "geovqa_results"
    results.mkdir(parents=True)
    layer = raster_layer()
    heat, _ = _write_results(results, layer)
    (tmp_path / "old" / "geovqa_results").mkdir(parents=True)
    _, anchors = _write_results(tmp_path / "old" / "geovqa_results", layer)
    _, hl, al = add_result_layers("Where?", str(heat), str(anchors), source_layer=layer)
    assert gather_into_project(project, [str(heat)]) is None
    folder, moved, problems = gather_into_project(project, [str(heat), str(anchors)])
    assert (folder, problems) == (results, [])
    assert set(moved) == {str(anchors)} and al.source().startswith(str(results))
