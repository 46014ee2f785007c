"""Result layers: the kept-token heatmap and the anchor tokens, grouped per question.

Each is marked with the custom property RESULT_LAYER_PROPERTY; the chat dock leaves them out
of its layer list.

Main thread only (creates layers and touches the layer tree). Files are expected to be already
saved in the results folder (see :func:`tasks.keep_result_files`), so the project can find them
again after a restart.
"""

from __future__ import annotations

import math

from qgis.core import (
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsCoordinateReferenceSystem,
    QgsFillSymbol,
    QgsPalLayerSettings,
    QgsProject,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRuleBasedRenderer,
    QgsSingleBandPseudoColorRenderer,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor, QFont

from .compat import RAMP_DISCRETE, RAMP_INTERPOLATED, STATS_MIN_MAX

HEATMAP_PREFIX = "heatmap"  # each heatmap is named "heatmap: <layer> — <question>" (heatmap_name)
LEGACY_HEATMAP_NAME = "kept-token heatmap"  # what every heatmap was called before: projects saved then
ANCHORS_PREFIX = "anchors"  # each anchors layer: "anchors: <layer> — <question>" (anchors_name)
# custom layer property marking GeoVQA's own result layers (saved with the project): the chat dock
# does not offer them as layers to ask about
RESULT_LAYER_PROPERTY = "geovqa/result_layer"
MAX_HEATMAP_QUESTION_CHARS = 40
HEATMAP_OPACITY = 1.0  # the layer's; the colours carry their own alpha (HEATMAP_STOPS)
GROUP_PREFIX = "GeoVQA: "
MAX_GROUP_CHARS = 80


class ResultLayerError(RuntimeError):
    """A result file could not be loaded as a layer."""


def group_name(question: str) -> str:
    q = " ".join(question.split())
    if len(q) > MAX_GROUP_CHARS:
        q = q[: MAX_GROUP_CHARS - 1] + "…"
    return GROUP_PREFIX + q


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def result_layer_name(prefix: str, question: str, source_layer=None) -> str:
    """"<prefix>: <layer> — <question, shortened>": a result layer's raster and question, so the
    results of several questions can be told apart in the layer tree and layer lists.
    ``source_layer``: the raster asked about (a layer, or its name), if known."""
    if source_layer is not None and not isinstance(source_layer, str):
        source_layer = source_layer.name()
    about = f": {source_layer}" if source_layer else ""
    return f"{prefix}{about} — {_short(question, MAX_HEATMAP_QUESTION_CHARS)}"


def heatmap_name(question: str, source_layer=None) -> str:
    """The heatmap layer's name (:func:`result_layer_name`)."""
    return result_layer_name(HEATMAP_PREFIX, question, source_layer)


def anchors_name(question: str, source_layer=None) -> str:
    """The anchors layer's name, as the heatmap's (:func:`result_layer_name`)."""
    return result_layer_name(ANCHORS_PREFIX, question, source_layer)


def mark_result_layer(layer, kind: str) -> None:
    """Mark `layer` as GeoVQA's `kind` ('heatmap' or 'anchors') result layer. The mark names the
    layer's own id: QGIS copies custom properties with a layer's style (Copy/Paste Style, .qml),
    and a mark pasted onto the user's own raster names another id, so it does not count."""
    layer.setCustomProperty(RESULT_LAYER_PROPERTY, f"{kind}:{layer.id()}")


def is_result_layer(layer, project: QgsProject | None = None) -> bool:
    """True for a heatmap or anchors layer GeoVQA added (marked by :func:`mark_result_layer`; a
    heatmap of a project saved before the mark: its old name, inside a GeoVQA result group)."""
    if layer is None:
        return False
    mark = layer.customProperty(RESULT_LAYER_PROPERTY)
    if mark:
        return str(mark).endswith(f":{layer.id()}")
    if layer.name() != LEGACY_HEATMAP_NAME:
        return False
    node = (project or QgsProject.instance()).layerTreeRoot().findLayer(layer.id())
    parent = node.parent() if node is not None else None
    return parent is not None and bool(parent.customProperty("geovqa/question"))


# The heatmap's colours: transparent at and below the median score, then warmer and more opaque
# up to the highest score, so the imagery stays readable under the (nearly) full cover the
# default strategy gives and the cells the model relied on most stand out. (quantile of the
# kept cells' scores, (r, g, b, alpha)); the lowest score is always fully transparent.
HEATMAP_STOPS = (
    (0.0, (255, 235, 140, 0)),
    (0.5, (255, 225, 110, 0)),
    (0.8, (255, 190, 60, 60)),
    (0.95, (253, 130, 40, 130)),
    (1.0, (235, 60, 20, 200)),  # about 78 % opaque
)
# every kept token has the same score (strategies `uniform`, `none`): one light, clear colour
HEATMAP_KEPT_COLOR = (255, 215, 90, 75)
HEATMAP_MORE_LABEL = "more relied on (high score)"
HEATMAP_LESS_LABEL = "less relied on (low score)"
HEATMAP_KEPT_LABEL = "kept token (all scored equally)"
HEATMAP_ABSTRACT = ("Token scores of the answer: warm, opaque cells are the tokens the model relied on most; "
                    "clear cells are pruned tokens or nodata.")


def _score_at(provider, quantile: float, lo: float, hi: float) -> float:
    """The kept cells' score at `quantile` (from the band's histogram), `lo`/`hi` at the ends."""
    if quantile <= 0.0:
        return lo
    if quantile >= 1.0:
        return hi
    try:
        value = float(provider.cumulativeCut(1, quantile, 1.0)[0])
    except Exception:  # noqa: BLE001 - a provider without a histogram: spread evenly
        value = float("nan")
    if not lo <= value <= hi:
        value = lo + quantile * (hi - lo)
    return value


def style_heatmap(layer: QgsRasterLayer) -> None:
    """Pseudocolor on band 1 whose alpha rises with the score (:data:`HEATMAP_STOPS`): low
    scores clear, the highest warm and about 78 % opaque; pruned tokens are nodata, so they stay
    clear. All scores equal: one light semi-transparent "kept" colour. The legend says which end
    the model relied on (not raw numbers only)."""
    provider = layer.dataProvider()
    stats = provider.bandStatistics(1, STATS_MIN_MAX)
    lo, hi = float(stats.minimumValue), float(stats.maximumValue)
    if not math.isfinite(lo):
        lo = 0.0
    shader_fn = QgsColorRampShader(lo, hi if hi > lo else lo)
    if math.isfinite(hi) and hi > lo:
        shader_fn.setColorRampType(RAMP_INTERPOLATED)
        items, tolerance = [], (hi - lo) * 1e-6
        for quantile, rgba in HEATMAP_STOPS:
            value = _score_at(provider, quantile, lo, hi)
            if items and value <= items[-1].value + tolerance:
                if quantile < 1.0:
                    continue  # a stop on a score already coloured: the lower one keeps it
                items.pop()  # the top score: its colour wins
            items.append(QgsColorRampShader.ColorRampItem(value, QColor(*rgba), f"{value:.3g}"))
        items[0].label = f"{lo:.3g} ({HEATMAP_LESS_LABEL})"
        items[-1].label = f"{hi:.3g} ({HEATMAP_MORE_LABEL})"
        shader_fn.setColorRampItemList(items)
        settings = getattr(shader_fn, "legendSettings", None)  # QGIS 3.18+
        if settings is not None:
            legend = QgsColorRampLegendNodeSettings(settings())
            legend.setUseContinuousLegend(True)
            legend.setMaximumLabel(HEATMAP_MORE_LABEL)
            legend.setMinimumLabel(HEATMAP_LESS_LABEL)
            shader_fn.setLegendSettings(legend)
    else:  # one score for every kept token: nothing to rank, each kept cell one clear colour
        hi = lo
        shader_fn.setColorRampType(RAMP_DISCRETE)
        top = lo + max(abs(lo), 1.0) * 1e-3  # discrete: values up to it take the colour
        shader_fn.setColorRampItemList([
            QgsColorRampShader.ColorRampItem(top, QColor(*HEATMAP_KEPT_COLOR), HEATMAP_KEPT_LABEL)])
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(provider, 1, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    layer.setRenderer(renderer)
    layer.renderer().setOpacity(HEATMAP_OPACITY)
    if not layer.abstract():
        layer.setAbstract(HEATMAP_ABSTRACT)
    layer.triggerRepaint()


def has_no_features(layer: QgsVectorLayer) -> bool:
    """True for an anchors file with no feature (no anchor was kept, or clipping to the layer
    left none): OGR then knows no geometry type, so the layer has no renderer to style."""
    return layer.featureCount() == 0 or layer.renderer() is None


TOP_ANCHORS = 10  # anchors drawn bold and labelled (by score; the rest thin and faint)
ANCHOR_TOP_COLOR = "0,229,255"
ANCHORS_TOP_RULE = f"top {TOP_ANCHORS} by score (label 1: highest)"
ANCHORS_OTHER_RULE = "other kept tokens"


def _anchor_scores(layer: QgsVectorLayer) -> list[float]:
    """The anchors' finite scores, highest first ([] without a ``score`` property: older engine)."""
    if layer.fields().indexOf("score") < 0:
        return []
    scores = []
    for feature in layer.getFeatures():
        try:
            value = float(feature["score"])
        except (TypeError, ValueError):  # NULL
            continue
        if math.isfinite(value):
            scores.append(value)
    return sorted(scores, reverse=True)


def _between(a: float, b: float) -> str:
    """An expression literal for a threshold between scores a > b (no float equality needed)."""
    return repr((a + b) / 2.0)


def style_anchors(layer: QgsVectorLayer) -> None:
    """The anchors by score: the :data:`TOP_ANCHORS` highest-scored footprints bold and labelled
    1, 2, 3... (1: highest score; equal scores, equal numbers), the others thin and faint. The
    ``rank`` property is the order tokens enter the model, not importance, so it is not used.
    Without scores (older engine) or all scores equal: one outline for all."""
    scores = _anchor_scores(layer)
    distinct = sorted(set(scores), reverse=True)
    faint = {"color": "0,0,0,0", "outline_color": "0,180,255,130", "outline_width": "0.2"}
    if len(distinct) < 2:
        props = faint if scores and len(scores) > TOP_ANCHORS else {
            "color": "0,200,255,40", "outline_color": "0,160,255,255", "outline_width": "0.4"}
        layer.setRenderer(QgsSingleSymbolRenderer(QgsFillSymbol.createSimple(props)))
        layer.setLabelsEnabled(False)
        layer.triggerRepaint()
        return
    cut = scores[min(TOP_ANCHORS, len(scores)) - 1]  # the 10th highest score (ties: all drawn bold)
    top = [v for v in distinct if v >= cut]  # the scores labelled 1, 2, 3...: the bold ones only
    lower = [v for v in distinct if v < cut]
    top_filter = f'"score" > {_between(cut, lower[0])}' if lower else '"score" IS NOT NULL'
    root = QgsRuleBasedRenderer.Rule(None)
    bold = QgsFillSymbol.createSimple({"color": ANCHOR_TOP_COLOR + ",45", "outline_color": ANCHOR_TOP_COLOR + ",255",
                                       "outline_width": "0.7"})
    root.appendChild(QgsRuleBasedRenderer.Rule(bold, 0, 0, top_filter, ANCHORS_TOP_RULE))
    other_filter = f'NOT ({top_filter}) OR "score" IS NULL'  # not ELSE: each rule says what it draws
    root.appendChild(QgsRuleBasedRenderer.Rule(QgsFillSymbol.createSimple(faint), 0, 0, other_filter,
                                               ANCHORS_OTHER_RULE))
    layer.setRenderer(QgsRuleBasedRenderer(root))
    cases = [f"WHEN \"score\" > {_between(a, b)} THEN '{i}'" for i, (a, b) in enumerate(zip(top, top[1:]), 1)]
    last = f'"score" > {_between(top[-1], lower[0])}' if lower else '"score" IS NOT NULL'
    cases.append(f"WHEN {last} THEN '{len(top)}'")
    label = QgsPalLayerSettings()
    label.fieldName = "CASE " + " ".join(cases) + " END"
    label.isExpression = True
    text = QgsTextFormat()
    font = QFont()
    font.setBold(True)
    text.setFont(font)
    text.setSize(9)
    text.setColor(QColor("white"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor(0, 40, 60))
    text.setBuffer(buffer)
    label.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(label))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def _crs(crs_wkt: str | None, source_layer) -> QgsCoordinateReferenceSystem | None:
    """The CRS of the result layers: the source layer's (also when the user overrode the file's
    own), else the result's ``crs_wkt``; an invalid (empty) CRS when the source raster has none;
    None when nothing is known of it (no source layer, no WKT)."""
    if source_layer is not None and source_layer.crs().isValid():
        return source_layer.crs()
    if crs_wkt:
        crs = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
        if crs.isValid():
            return crs
    return QgsCoordinateReferenceSystem() if source_layer is not None or crs_wkt is not None else None


def crs_from_wkt(crs_wkt: str) -> QgsCoordinateReferenceSystem:
    """The CRS of ``crs_wkt``; an invalid (empty) one for "" (a raster without CRS)."""
    return QgsCoordinateReferenceSystem.fromWkt(crs_wkt) if crs_wkt else QgsCoordinateReferenceSystem()


def set_result_crs(layer, crs: QgsCoordinateReferenceSystem | None) -> None:
    """Give a result layer the CRS of its raster (:func:`_crs`), also an empty one: a raster with
    no CRS gets results with none, so they lie over it. (OGR reads a GeoJSON without a ``crs``
    member, as the engine writes the anchors of such a raster, as EPSG:4326: on a map in a
    projected CRS those anchors spread over the whole map.) ``crs`` None: left as loaded."""
    if crs is not None:
        layer.setCrs(crs)


def add_result_layers(question: str, heatmap_path: str | None, anchors_path: str | None,
                      source_layer=None, crs_wkt: str | None = None, project: QgsProject | None = None):
    """Add a group named after the question holding the heatmap and anchors layers.

    The group goes right above the source layer's position at the top of the tree; when a group
    of its name is there already (the question asked again), the group and its layers get a
    running number, " (2)", " (3)"... (:func:`_running_number`). Layers get
    the source raster's CRS, or none when it has none (:func:`set_result_crs`).
    Returns ``(group, heatmap_layer | None, anchors_layer | None)``.
    """
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    number = _running_number(root, group_name(question))
    crs = _crs(crs_wkt, source_layer)
    heat = anchors = None
    if heatmap_path:
        heat = QgsRasterLayer(str(heatmap_path), heatmap_name(question, source_layer) + number, "gdal")
        if not heat.isValid():
            raise ResultLayerError(f"The heatmap {heatmap_path} could not be opened as a raster.")
        set_result_crs(heat, crs)  # the source layer's CRS, also when the user overrode the file's own
        style_heatmap(heat)
    if anchors_path:
        anchors = QgsVectorLayer(str(anchors_path), anchors_name(question, source_layer) + number, "ogr")
        if not anchors.isValid():
            raise ResultLayerError(f"The anchors {anchors_path} could not be opened as a vector layer.")
        if has_no_features(anchors):
            anchors = None  # nothing to show; the heatmap still is
        else:
            set_result_crs(anchors, crs)  # also none: OGR would read a GeoJSON without CRS as EPSG:4326
            style_anchors(anchors)
    group = root.insertGroup(0, group_name(question) + number)
    for lyr in (anchors, heat):
        if lyr is not None:
            mark_result_layer(lyr, "heatmap" if lyr is heat else "anchors")
            project.addMapLayer(lyr, False)
            group.addLayer(lyr)
    _above_source_in_custom_order(root, [lyr for lyr in (anchors, heat) if lyr is not None], source_layer)
    if source_layer is not None:
        group.setCustomProperty("geovqa/source_layer", source_layer.id())
    group.setCustomProperty("geovqa/question", question)
    return group, heat, anchors


def _running_number(root, name: str) -> str:
    """"" when no group in the layer tree is called ``name``, else " (2)", " (3)"...: the first
    free one, so that the groups and layers of one question asked again (another strategy,
    budget or area) can be told apart. Nothing looks result layers up by name (ids are kept)."""
    names = {group.name() for group in root.findGroups(True)}
    if name not in names:
        return ""
    n = 2
    while f"{name} ({n})" in names:
        n += 1
    return f" ({n})"


def _above_source_in_custom_order(root, layers: list, source_layer) -> None:
    """With the Layer Order panel's *Control rendering order* on, QGIS puts new layers at the
    bottom of the custom order, under their (opaque) raster, which hid them: ``layers`` (first:
    drawn on top) go right above ``source_layer`` there, or at the top when it is not in it."""
    if not layers or not root.hasCustomLayerOrder():
        return
    ids = {lyr.id() for lyr in layers}
    order = [lyr for lyr in root.customLayerOrder() if lyr is not None and lyr.id() not in ids]
    at = 0
    if source_layer is not None and not isinstance(source_layer, str):
        at = next((i for i, lyr in enumerate(order) if lyr.id() == source_layer.id()), 0)
    root.setCustomLayerOrder(order[:at] + list(layers) + order[at:])
