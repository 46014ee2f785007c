"""Keep a project's result files with it when it is saved under a new file name.

Answers asked before a project's first save keep their heatmap and anchors files in the QGIS
profile's results folder (there is no project folder yet); after a *Save As* they are in the old
project's ``geovqa_results``. QGIS stores those paths relative to the project file, so a project
moved or shared with its folder lost its result layers. When QGIS gives the project a (new) file
name, before it writes it, :func:`gather_result_files` copies the files of the project's result
layers that lie outside the new results folder into it and points the layers at the copies,
keeping their style. The files of answers whose layers are gone (removed by hand, or an answer
that came after its raster was removed) or were never added, which the dock's saved turns still
refer to, are copied too (``files``), so the saved project refers only to files in its folder.
So are the renders of non-file layers (WMS, XYZ, virtual rasters: :func:`render.render_file`)
the turns were asked about (``renders``), into the new results folder's ``renders``: a project
moved or shared kept answers about an image it no longer had. Each file is copied once, however
many layers and turns refer to it. The originals stay where they were (nothing is removed).

Only where the results folder is the project's own (the options' *Results folder* empty): a
folder the user chose is where they want the results. Only GeoVQA's own files move: those in
the profile's results folder, in a project's ``geovqa_results``, or in Processing's temporary
folder (an output left temporary, gone when QGIS exits), and renders in the temporary folder
they fall back to (:data:`render.TEMP_RENDERS`, when the results folder could not be written);
a heatmap Processing wrote where the user said stays there.

An answer still streaming when the project is saved under a new name (its task was given the
results folder of when it was asked) has its files gathered as its layers are added
(:func:`gather_into_project`), so no later Save leaves them behind.

Whoever gathers, :data:`moved_files` says which files moved, so every record of them (the
dock's turns, the batch dialog's rows and exports) follows the copies.

Main thread only (changes layers).
"""

from __future__ import annotations

import bisect
import itertools
import shutil
import tempfile
from pathlib import Path

from qgis.core import QgsCoordinateReferenceSystem, QgsDataProvider, QgsMapLayerStyle
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .layers import is_result_layer
from .render import RENDERS, TEMP_RENDERS
from .settings import RESULTS_FOLDER, Settings, profile_results_dir


def _file_of(layer) -> tuple:
    """(file path, the rest of the source after it: "|layername=..." of an OGR source)."""
    source = layer.source()
    path, bar, rest = source.partition("|")
    return path, bar + rest


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _ours(path: Path, profile_results: Path, render: bool = False) -> bool:
    """A file GeoVQA put where it is (see the module's docstring), not one the user placed;
    ``render``: a render, also ours in the temporary folder renders fall back to."""
    from qgis.core import QgsProcessingUtils

    return (_inside(path, profile_results) or RESULTS_FOLDER in path.parent.parts
            or _inside(path, Path(QgsProcessingUtils.tempFolder()))
            or (render and _inside(path, Path(tempfile.gettempdir()) / TEMP_RENDERS)))


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>_2<suffix>``... when a different file has that name."""
    dest = folder / name
    stem, suffix = name.split(".", 1) if "." in name else (name, "")
    n = 2
    while dest.exists():
        dest = folder / (f"{stem}_{n}.{suffix}" if suffix else f"{stem}_{n}")
        n += 1
    return dest


def _copy_with_sidecars(src: Path, folder: Path, names_beside: list) -> Path:
    """Copy ``src`` and the files GDAL keeps beside it (``<name>.aux.xml``, ``<name>.ovr``).
    ``names_beside``: the names in ``src``'s folder, sorted (listed once for many files: a folder
    of a thousand answers is not listed again for each)."""
    dest = _free_name(folder, src.name)
    shutil.copy2(src, dest)
    prefix = src.name + "."
    for name in itertools.takewhile(lambda n: n.startswith(prefix),
                                    names_beside[bisect.bisect_left(names_beside, prefix):]):
        side = src.parent / name
        if side.is_file():
            shutil.copy2(side, dest.parent / (dest.name + name[len(src.name):]))
    return dest


def _point_at(layer, source: str) -> None:
    """``layer`` reads ``source`` from now on, with the style and the CRS it had.

    setDataSource gives the layer its new file's CRS again: a CRS the user set on the raster
    (which add_result_layers gave its result layers) fell back to the file's own, and the
    anchors of a raster without CRS (kept without one, as the raster) got QGIS's default for
    an unknown CRS (EPSG:4326), spread over the map. The layer's CRS, valid or not, is kept."""
    style = QgsMapLayerStyle()
    style.readFromLayer(layer)
    crs = QgsCoordinateReferenceSystem(layer.crs())
    layer.setDataSource(source, layer.name(), layer.providerType(), QgsDataProvider.ProviderOptions())
    style.writeToLayer(layer)
    layer.setCrs(crs)


class _MovedFiles(QObject):
    """``moved`` ({old path: new path}) is emitted after a gathering copied result files."""

    moved = pyqtSignal(object)


moved_files = _MovedFiles()


def gather_result_files(project, folder, files=(), renders=()) -> tuple:
    """Copy the files of ``project``'s result layers, and the result files ``files`` (paths that
    GeoVQA's records refer to, with or without a layer), that lie outside ``folder`` into it and
    point the layers at the copies; the renders ``renders`` (of non-file layers, that records
    refer to) lying outside it go into its ``renders`` folder. Returns ``({old path: new path},
    [problems])``: a file that no longer exists is left as it is (its layer was already missing
    it); one that could not be copied is said in ``problems`` and its layer keeps the old file.
    Only GeoVQA's own files are copied (:func:`_ours`), each once."""
    folder = Path(folder)
    profile_results = profile_results_dir()
    moved, problems = {}, []
    copies = {}  # resolved source -> its copy (or None: not to copy), each file looked at once
    listed = {}  # folder -> the names in it, listed once (sidecars of many files in one folder)

    def copy(path: str, render: bool = False):
        """The copy of ``path`` in ``folder`` (a render: in its ``renders``; made now or before),
        or None when it stays."""
        if path in moved:
            return moved[path]
        src = Path(path)
        key = src.resolve()
        if key not in copies:
            copies[key] = None
            if src.is_file() and not _inside(src, folder) and _ours(src, profile_results, render):
                into = folder / RENDERS if render else folder
                try:
                    into.mkdir(parents=True, exist_ok=True)
                    if src.parent not in listed:
                        listed[src.parent] = sorted(p.name for p in src.parent.iterdir())
                    copies[key] = str(_copy_with_sidecars(src, into, listed[src.parent]))
                except OSError as exc:
                    problems.append(f"{src}: {exc.strerror or exc}")
        if copies[key] is not None:  # under each spelling its records may have
            moved[path] = moved[str(src)] = copies[key]
        return copies[key]

    for layer in project.mapLayers().values():
        if not is_result_layer(layer, project):
            continue
        path, rest = _file_of(layer)
        new = copy(path) if path else None
        if new is not None:
            _point_at(layer, new + rest)
    for path in files:
        if isinstance(path, str) and path:
            copy(path)
    for path in renders:
        if isinstance(path, str) and path:
            copy(path, render=True)
    if moved:
        moved_files.moved.emit(dict(moved))
    return moved, problems


def gather_into_project(project, paths=None, files=(), renders=()):
    """Gather the project's result files (its result layers', ``files`` and ``renders``, as
    :func:`gather_result_files`) into its own results folder, when it has one (a file name, and
    no results folder set in the options); with ``paths`` (an answer's files) only when one of
    them lies outside that folder. Returns ``(folder, moved, problems)`` as
    :func:`gather_result_files`, or None when there was nothing to do."""
    settings = Settings.load()
    if not project.fileName() or settings.output_dir.strip():
        return None  # a results folder the user chose is where they want the results
    folder = settings.results_dir(project)
    if paths is not None and all(_inside(Path(p), folder) for p in paths if p):
        return None
    moved, problems = gather_result_files(project, folder, files, renders)
    return folder, moved, problems


def moved_path(path, moved: dict):
    """``path`` as it is after a gathering that ``moved`` files ({old: new})."""
    return moved.get(path, path) if isinstance(path, str) else path
