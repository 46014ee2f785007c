"""Static Qt6 / QGIS 4 compatibility check of every ``qgis_plugin/**/*.py`` file.

No Qt6 build of QGIS exists in this environment, so the plugin's readiness for QGIS 3.40+ and
4.x (PyQt6) is checked on its source with :mod:`ast`, following the rules of QGIS's own
``scripts/pyqt5_to_pyqt6/pyqt5_to_pyqt6.py`` migration script:

* ``pyqt-import``: PyQt5 / PyQt6 / sip / PySide imported directly instead of through ``qgis.PyQt``.
* ``removed-module``: ``qgis.PyQt.Qt``, QtWebKit, compiled ``resources_rc`` modules.
* ``qt5-only``: classes gone in Qt6 (QRegExp, QDesktopWidget, ``qApp`` ...).
* ``qtgui-moved``: QAction & co. imported from QtWidgets (they live in QtGui under Qt6) outside
  a ``try/except ImportError`` fallback.
* ``exec_``: ``exec_()`` / ``print_()`` calls or definitions.
* ``unscoped-enum``: an enum value read from its owner class instead of its enum type
  (``Qt.AlignLeft`` instead of ``Qt.AlignmentFlag.AlignLeft``). Which attributes are enum
  values, and what their enum type is called, is found by introspecting the PyQt5 / QGIS 3.22
  bindings available here, the same way the QGIS script does (names are resolved through the
  file's own imports, so an attribute of an unknown object is never guessed at).
* ``removed-enum``: enum values Qt6 dropped even in scoped form (``Qt.MouseButton.MidButton`` ...).
* ``qflags``: QFlags classes (``Qt.Alignment``, ``QgsTask.Flags``) that PyQt6 no longer has.
* ``qvariant``: ``QVariant()`` / ``QVariant.Int``-style types (gone in PyQt6; use ``NULL`` / compat).
* ``removed-api``: ``desktop()``, ``setMargin()``, ``fontMetrics().width()``, ``activated[str]``,
  ``localPos()``, 4-argument ``addAction``, the 8-argument ``QDateTime`` constructor.
* ``newer-api`` (the other direction: QGIS 3.22 must keep working): a Qt / QGIS attribute that
  these 3.22 bindings lack (e.g. ``Qgis.LayerFilter``) used outside ``compat.py`` without a guard
  (a ``lambda`` tried by compat's ``_first``, ``try/except AttributeError``, a ``hasattr`` or
  ``Qgis.QGIS_VERSION_INT`` test).

The checker is tested on small code strings (planted violations and legitimate code) as well.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "qgis_plugin"

FORBIDDEN_IMPORT_ROOTS = {"PyQt5", "PyQt6", "sip", "PySide2", "PySide6"}
REMOVED_MODULES = {"qgis.PyQt.Qt", "qgis.PyQt.QtWebKit", "qgis.PyQt.QtWebKitWidgets"}
QT5_ONLY = {
    "QRegExp": "QRegExp is gone in Qt6; use QRegularExpression",
    "QRegExpValidator": "QRegExpValidator is gone in Qt6; use QRegularExpressionValidator",
    "QDesktopWidget": "QDesktopWidget is gone in Qt6; use QScreen (QApplication.screens())",
    "qApp": "qApp is gone in PyQt6; use QApplication.instance()",
    "QTextCodec": "QTextCodec is gone in Qt6; use Python str encode/decode",
    "QGLWidget": "QGLWidget is gone in Qt6; use QOpenGLWidget",
    "QMatrix": "QMatrix is gone in Qt6; use QTransform",
    "QSound": "QSound is gone in Qt6; use QSoundEffect",
}
# Classes that moved from QtWidgets to QtGui in Qt6.
MOVED_TO_QTGUI = {"QAction", "QActionGroup", "QShortcut", "QUndoCommand", "QUndoGroup", "QUndoStack",
                  "QFileSystemModel"}
# Enum values Qt6 removed outright: value name -> (owner class / enum type names, replacement).
REMOVED_ENUM_VALUES = {
    "MidButton": ({"Qt", "MouseButton"}, "Qt.MouseButton.MiddleButton"),
    "TextColorRole": ({"Qt", "ItemDataRole"}, "Qt.ItemDataRole.ForegroundRole"),
    "BackgroundColorRole": ({"Qt", "ItemDataRole"}, "Qt.ItemDataRole.BackgroundRole"),
    "MatchRegExp": ({"Qt", "MatchFlag"}, "Qt.MatchFlag.MatchRegularExpression"),
    "ItemIsTristate": ({"Qt", "ItemFlag"}, "Qt.ItemFlag.ItemIsAutoTristate"),
    "Background": ({"QPalette", "ColorRole"}, "QPalette.ColorRole.Window"),
    "Foreground": ({"QPalette", "ColorRole"}, "QPalette.ColorRole.WindowText"),
    "AdjustToMinimumContentsLength": ({"QComboBox", "SizeAdjustPolicy"},
                                      "QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon"),
    "DirectoryOnly": ({"QFileDialog", "FileMode"}, "QFileDialog.FileMode.Directory"),
}
RENAMED_METHODS = {"exec_": "exec", "print_": "print"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


# -- introspection of the bindings available here (PyQt5 + QGIS 3.22) -----------------------------

def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - missing or broken here: nothing to introspect
        return None


def is_enum_type(obj) -> bool:
    return inspect.isclass(obj) and (issubclass(obj, enum.Enum) or type(obj).__name__ == "enumtype")


def is_enum_value(obj) -> bool:
    return isinstance(obj, enum.Enum) or type(type(obj)).__name__ == "enumtype"


def is_qflags_class(obj) -> bool:
    """PyQt5's QFlags wrappers (``Qt.Alignment``, ``QgsTask.Flags``): sip classes with bit operators."""
    return (inspect.isclass(obj) and type(obj).__name__ == "wrappertype" and not is_enum_type(obj)
            and "__invert__" in vars(obj) and "__int__" in vars(obj))


_MISSING = object()


def _getattr(obj, name):
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001 - unknown in these bindings: nothing to judge
        return _MISSING


def _attr_of_module(module, name):
    value = _getattr(module, name)
    if value is _MISSING and inspect.ismodule(module):
        value = _module(f"{module.__name__}.{name}") or _MISSING
    return value


# -- the checker -------------------------------------------------------------------------------------

class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, tree: ast.AST):
        self.path = path
        self.is_compat = Path(path).name == "compat.py"
        self.found: list[Violation] = []
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.bindings = self._bindings(tree)

    def add(self, node, rule, message):
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), rule, message))

    # names bound by the file's imports (any scope) to Qt / QGIS objects
    @staticmethod
    def _bindings(tree) -> dict:
        out: dict = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] not in ("qgis", "PyQt5"):
                    continue
                mod = _module(node.module)
                if mod is None:
                    continue
                for alias in node.names:
                    value = _attr_of_module(mod, alias.name)
                    if value is not _MISSING:
                        out.setdefault(alias.asname or alias.name, value)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in ("qgis", "PyQt5"):
                        continue
                    if alias.asname:
                        mod = _module(alias.name)
                        if mod is not None:
                            out.setdefault(alias.asname, mod)
                    else:
                        top = alias.name.split(".")[0]
                        if _module(alias.name) is not None:
                            out.setdefault(top, _module(top))
        return out

    def resolve(self, node):
        """The object an expression stands for in these bindings, or _MISSING."""
        if isinstance(node, ast.Name):
            return self.bindings.get(node.id, _MISSING)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            return _MISSING if owner is _MISSING else _getattr(owner, node.attr)
        literal = _getattr_literal(node)
        if literal is not None:
            owner = self.resolve(literal[0])
            return _MISSING if owner is _MISSING else _getattr(owner, literal[1])
        return _MISSING

    def _in_import_fallback(self, node) -> bool:
        """True inside ``except ImportError`` (the Qt5 branch of a QtGui-first import)."""
        parent = self.parents.get(node)
        while parent is not None:
            if isinstance(parent, ast.ExceptHandler):
                names = []
                if isinstance(parent.type, ast.Name):
                    names = [parent.type.id]
                elif isinstance(parent.type, ast.Tuple):
                    names = [e.id for e in parent.type.elts if isinstance(e, ast.Name)]
                if {"ImportError", "ModuleNotFoundError"} & set(names):
                    return True
            parent = self.parents.get(parent)
        return False

    # -- imports ------------------------------------------------------------------------------------
    def visit_Import(self, node):
        for alias in node.names:
            self._check_module(node, alias.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        module = node.module or ""
        if node.level == 0:
            self._check_module(node, module)
        for alias in node.names:
            full = f"{module}.{alias.name}"
            if alias.name == "resources_rc":
                self._check_module(node, "resources_rc")
            elif full in REMOVED_MODULES:
                self._check_module(node, full)
            if alias.name in QT5_ONLY:
                self.add(node, "qt5-only", QT5_ONLY[alias.name])
            if (alias.name in MOVED_TO_QTGUI and module.endswith("QtWidgets")
                    and not self._in_import_fallback(node)):
                self.add(node, "qtgui-moved",
                         f"{alias.name} is in QtGui under Qt6: import it from qgis.PyQt.QtGui first and fall back "
                         "to QtWidgets in 'except ImportError' (see compat.qaction_class)")
        self.generic_visit(node)

    def _check_module(self, node, module: str):
        root = module.split(".")[0]
        if root in FORBIDDEN_IMPORT_ROOTS:
            self.add(node, "pyqt-import", f"'{module}' imported directly; import Qt through qgis.PyQt "
                                          "(qgis.PyQt.QtCore, ..., qgis.PyQt.sip)")
        elif module in REMOVED_MODULES:
            self.add(node, "removed-module", f"'{module}' does not exist with Qt6")
        elif module.split(".")[-1] == "resources_rc":
            self.add(node, "removed-module", "compiled Qt resources are not supported with Qt6; "
                                             "load icons by file path")

    # -- attributes: enums, moved classes, renamed methods --------------------------------------------
    def visit_Attribute(self, node):
        if node.attr in RENAMED_METHODS:
            self.add(node, "exec_", f"{node.attr}() is gone in PyQt6; use {RENAMED_METHODS[node.attr]}()")
        if node.attr == "localPos" and isinstance(self.parents.get(node), ast.Call):
            self.add(node, "removed-api", "localPos() is gone in PyQt6; use position()")
        owner = self.resolve(node.value)
        if owner is not _MISSING:
            self._check_member(node, owner, ast.unparse(node.value), node.attr)
            if (_getattr(owner, node.attr) is _MISSING and isinstance(node.ctx, ast.Load)
                    and not self.is_compat and not self._guarded(node)):
                self.add(node, "newer-api", f"{ast.unparse(node)}: {node.attr} does not exist in QGIS "
                                            f"{_qgis_version()}; put the version-dependent spelling in compat.py")
        self.generic_visit(node)

    def _guarded(self, node) -> bool:
        """Inside a lambda, a try that catches AttributeError, or an if/ternary testing hasattr() or
        Qgis.QGIS_VERSION_INT."""
        child, parent = node, self.parents.get(node)
        while parent is not None:
            if isinstance(parent, ast.Lambda):
                return True
            if isinstance(parent, ast.Try) and child in parent.body:
                for handler in parent.handlers:
                    caught = handler.type
                    names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
                    if caught is None or any(isinstance(n, ast.Name) and n.id in ("AttributeError", "Exception")
                                             for n in names):
                        return True
            if isinstance(parent, (ast.If, ast.IfExp)) and child is not parent.test and any(
                    (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr")
                    or (isinstance(n, ast.Attribute) and n.attr == "QGIS_VERSION_INT")
                    for n in ast.walk(parent.test)):
                return True
            child, parent = parent, self.parents.get(parent)
        return False

    def visit_Call(self, node):
        literal = _getattr_literal(node)
        if literal is not None:
            owner = self.resolve(literal[0])
            if owner is not _MISSING:
                self._check_member(node, owner, ast.unparse(literal[0]), literal[1])
        func = node.func
        if isinstance(func, ast.Attribute):
            if func.attr == "desktop" and not node.args and not node.keywords:
                self.add(node, "removed-api", "QApplication.desktop() (QDesktopWidget) is gone in Qt6; use QScreen")
            elif func.attr == "setMargin":
                self.add(node, "removed-api", "QLayout.setMargin() is gone in Qt6; use setContentsMargins()")
            elif func.attr == "addAction" and len(node.args) >= 4:
                self.add(node, "removed-api", "addAction() with 4+ arguments is fragile under Qt6; create the "
                                              "QAction first and add it")
            elif func.attr == "width" and _is_font_metrics(func.value):
                self.add(node, "removed-api", "QFontMetrics.width() is gone in Qt6; use horizontalAdvance()")
        elif isinstance(func, ast.Name):
            if func.id == "QVariant" and (not node.args or _is_qvariant_attr(node.args[0])) and len(node.args) <= 1:
                self.add(node, "qvariant", "a null QVariant() does not work the same in PyQt6; use qgis.core.NULL")
            elif func.id == "QDateTime" and (len(node.args) == 8 or (
                    len(node.args) == 1 and isinstance(node.args[0], ast.Call)
                    and isinstance(node.args[0].func, ast.Name) and node.args[0].func.id == "QDate")):
                self.add(node, "removed-api", "this QDateTime constructor is gone in Qt6; use "
                                              "QDateTime(QDate(...), QTime(...))")
        self.generic_visit(node)

    def visit_Subscript(self, node):
        overloaded = ("activated", "currentIndexChanged", "highlighted")
        if (isinstance(node.value, ast.Attribute) and node.value.attr in overloaded
                and isinstance(node.slice, ast.Name) and node.slice.id == "str"):
            self.add(node, "removed-api", f"the {node.value.attr}[str] overload is gone in Qt6; use "
                                          "textActivated / currentTextChanged / the int signal")
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        if node.name in RENAMED_METHODS:
            self.add(node, "exec_", f"define {RENAMED_METHODS[node.name]}(), not {node.name}()")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _check_member(self, node, owner, owner_src: str, name: str):
        value = _getattr(owner, name)
        owner_name = getattr(owner, "__name__", "")
        if inspect.ismodule(owner):
            short = owner_name.split(".")[-1]
            if name in QT5_ONLY:
                self.add(node, "qt5-only", QT5_ONLY[name])
            elif short == "QtWidgets" and name in MOVED_TO_QTGUI:
                self.add(node, "qtgui-moved", f"{name} is in QtGui under Qt6")
            elif is_qflags_class(value):
                self.add(node, "qflags", f"{owner_src}.{name} is a QFlags class PyQt6 does not have; use the enum type")
            return
        if not inspect.isclass(owner) or value is _MISSING:
            return
        if name in REMOVED_ENUM_VALUES and owner_name in REMOVED_ENUM_VALUES[name][0] and is_enum_value(value):
            self.add(node, "removed-enum", f"{owner_src}.{name} is gone in Qt6; use {REMOVED_ENUM_VALUES[name][1]}")
            return
        if owner_name == "QVariant" and (is_enum_type(value) or is_enum_value(value)):
            self.add(node, "qvariant", f"{owner_src}.{name}: QVariant.Type is gone in PyQt6 (QMetaType.Type); "
                                       "route field types through compat.py")
            return
        if is_qflags_class(value):
            self.add(node, "qflags", f"{owner_src}.{name} is a QFlags class PyQt6 does not have; use the enum "
                                     "type (values combine with |)")
            return
        if not is_enum_value(value):
            return
        enum_type = type(value)
        if owner is enum_type:
            return  # scoped: Owner.Enum.Value
        if _getattr(enum_type, name) is _MISSING:
            return  # a constant of enum type (e.g. QgsRasterLayer.SINGLE_BAND_ENHANCEMENT_ALGORITHM), not a value name
        scoped = _getattr(owner, enum_type.__name__)
        if scoped is enum_type or (is_enum_type(scoped) and _getattr(scoped, name) == value):
            self.add(node, "unscoped-enum", f"{owner_src}.{name} is an unscoped enum value; write "
                                            f"{owner_src}.{enum_type.__name__}.{name}")
        else:
            self.add(node, "unscoped-enum", f"{owner_src}.{name} is the enum value {enum_type.__qualname__}.{name} "
                                            f"read through another class (no scoped spelling on {owner_src} in "
                                            f"QGIS {_qgis_version()}); use its own enum, through a helper in "
                                            "qgis_plugin/compat.py where the enum moved between QGIS versions")


def _getattr_literal(node):
    """``getattr(X, "name"[, default])`` -> (X node, "name"), else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) in (2, 3) and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def _is_font_metrics(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return ((isinstance(func, ast.Attribute) and func.attr == "fontMetrics")
            or (isinstance(func, ast.Name) and func.id in ("QFontMetrics", "QFontMetricsF")))


def _is_qvariant_attr(node) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "QVariant"


def _qgis_version() -> str:
    from qgis.core import Qgis

    return Qgis.QGIS_VERSION.split("-")[0]


def check_source(source: str, path: str = "<string>") -> list[Violation]:
    tree = ast.parse(source, filename=path)
    checker = _Checker(path, tree)
    checker.visit(tree)
    return sorted(set(checker.found), key=lambda v: (v.line, v.rule, v.message))


def plugin_files() -> list[Path]:
    return sorted(p for p in PLUGIN_DIR.rglob("*.py") if "__pycache__" not in p.parts)


# -- the plugin itself ------------------------------------------------------------------------------

def test_plugin_sources_are_qt6_ready():
    files = plugin_files()
    assert len(files) >= 15 and PLUGIN_DIR / "processing" / "provider.py" in files
    found = []
    for path in files:
        found += check_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "Qt6 / QGIS 4 incompatibilities:\n" + "\n".join(map(str, found))


# -- the checker on planted violations ----------------------------------------------------------------

QT = "from qgis.PyQt.QtCore import Qt, QEvent, QVariant, QDateTime, QDate\n"
QW = ("from qgis.PyQt.QtWidgets import (QAbstractItemView, QApplication, QDialogButtonBox, QHeaderView,"
      " QMessageBox, QSizePolicy)\n")
QC = ("from qgis.core import Qgis, QgsProcessing, QgsProcessingParameterNumber, QgsRasterLayer, QgsTask, "
      "QgsRasterBandStats\n")
QG = "from qgis.gui import QgsDockWidget\n"
HEAD = QT + QW + QC + QG

PLANTED = [
    ("from PyQt5.QtCore import Qt", "pyqt-import"),
    ("from PyQt6 import QtWidgets", "pyqt-import"),
    ("import PyQt5.QtGui", "pyqt-import"),
    ("import sip", "pyqt-import"),
    ("from PyQt5 import sip", "pyqt-import"),
    ("from qgis.PyQt.Qt import QColor", "removed-module"),
    ("from . import resources_rc", "removed-module"),
    ("from qgis.PyQt.QtCore import QRegExp", "qt5-only"),
    ("from qgis.PyQt.QtWidgets import QDesktopWidget", "qt5-only"),
    ("from qgis.PyQt.QtWidgets import qApp", "qt5-only"),
    ("from qgis.PyQt import QtCore\nrx = QtCore.QRegExp('a')", "qt5-only"),
    ("from qgis.PyQt.QtWidgets import QAction", "qtgui-moved"),
    ("from qgis.PyQt import QtWidgets\na = QtWidgets.QAction('x')", "qtgui-moved"),
    ("dialog.exec_()", "exec_"),
    ("result = QMessageBox(None).exec_()", "exec_"),
    ("class D:\n    def exec_(self):\n        pass", "exec_"),
    ("x = Qt.AlignLeft", "unscoped-enum"),
    ("x = Qt.AlignLeft | Qt.AlignmentFlag.AlignTop", "unscoped-enum"),
    ("x = Qt.UserRole", "unscoped-enum"),
    ("x = Qt.RightDockWidgetArea", "unscoped-enum"),
    ("x = QEvent.Close", "unscoped-enum"),
    ("x = QDialogButtonBox.Ok | QDialogButtonBox.StandardButton.Cancel", "unscoped-enum"),
    ("x = QMessageBox.Yes", "unscoped-enum"),
    ("x = QSizePolicy.Expanding", "unscoped-enum"),
    ("x = QAbstractItemView.SelectRows", "unscoped-enum"),
    ("x = QHeaderView.Stretch", "unscoped-enum"),
    ("x = QgsTask.CanCancel", "unscoped-enum"),
    ("x = getattr(QgsTask, 'CanCancel')", "unscoped-enum"),
    ("x = Qgis.Warning", "unscoped-enum"),
    ("x = Qgis.Byte", "unscoped-enum"),  # one of QGIS 3.22's Python-enum (monkey-patched) values
    ("x = QgsProcessing.TypeRaster", "unscoped-enum"),
    ("x = QgsProcessingParameterNumber.Integer", "unscoped-enum"),
    ("x = QgsRasterBandStats.Min", "unscoped-enum"),
    ("x = QgsDockWidget.AllDockWidgetFeatures", "unscoped-enum"),  # inherited from QDockWidget
    ("x = QgsRasterLayer.RasterLayer", "unscoped-enum"),  # QgsMapLayerType value, no QgsRasterLayer.<Enum> form
    ("from qgis.PyQt import QtCore\nx = QtCore.Qt.AlignLeft", "unscoped-enum"),
    ("import qgis.PyQt.QtCore as QtCore\nx = QtCore.Qt.AlignRight", "unscoped-enum"),
    ("from qgis.PyQt.QtCore import Qt as QtNs\nx = QtNs.AlignLeft", "unscoped-enum"),
    ("x = Qt.MidButton", "removed-enum"),
    ("x = Qt.MouseButton.MidButton", "removed-enum"),
    ("x = Qt.ItemDataRole.BackgroundColorRole", "removed-enum"),
    ("x = Qt.Alignment()", "qflags"),
    ("x = QgsTask.Flags()", "qflags"),
    ("x = QVariant()", "qvariant"),
    ("x = QVariant(QVariant.Int)", "qvariant"),
    ("x = QVariant.String", "qvariant"),
    ("QApplication.desktop()", "removed-api"),
    ("layout.setMargin(0)", "removed-api"),
    ("w = self.fontMetrics().width('text')", "removed-api"),
    ("combo.activated[str].connect(print)", "removed-api"),
    ("p = event.localPos()", "removed-api"),
    ("menu.addAction(icon, 'x', receiver, slot)", "removed-api"),
    ("d = QDateTime(2020, 1, 2, 3, 4, 5, 6, 7)", "removed-api"),
    ("d = QDateTime(QDate(2020, 1, 2))", "removed-api"),
    ("x = Qgis.LayerFilter.RasterLayer", "newer-api"),
    ("try:\n    x = Qgis.LayerFilter.RasterLayer\nexcept ImportError:\n    x = None", "newer-api"),
    ("x = QgsTask.Flag.Hidden", "newer-api"),
]


@pytest.mark.parametrize("code,rule", PLANTED, ids=[c.replace("\n", " | ")[:60] for c, _ in PLANTED])
def test_checker_catches_planted_violation(code, rule):
    source = HEAD + textwrap.dedent(code) + "\n"
    found = check_source(source)
    first_line = HEAD.count("\n") + 1
    assert all(v.line >= first_line for v in found), f"false positive in the clean header: {found}"
    assert found and {v.rule for v in found} == {rule}, found


def test_checker_reports_every_violation_with_its_line():
    source = HEAD + "a = Qt.AlignLeft\nb = 1\nc = QgsTask.CanCancel\ndlg.exec_()\n"
    n = HEAD.count("\n")
    found = check_source(source, "x.py")
    assert [(v.line - n, v.rule) for v in found] == [(1, "unscoped-enum"), (3, "unscoped-enum"), (4, "exec_")]
    assert "Qt.AlignmentFlag.AlignLeft" in found[0].message and "QgsTask.Flag.CanCancel" in found[1].message
    assert str(found[0]).startswith(f"x.py:{n + 1}: [unscoped-enum]")


# -- the checker on legitimate code (no false positives) ----------------------------------------------

LEGIT = """
    from qgis.core import Qgis, QgsProcessing, QgsProcessingParameterNumber, QgsRasterLayer, QgsTask, NULL
    from qgis.PyQt.QtCore import QEvent, Qt, QVariant, pyqtSignal
    from qgis.PyQt.QtWidgets import (QAbstractItemView, QDialogButtonBox, QHeaderView, QMessageBox,
                                     QSizePolicy, QVBoxLayout)
    from qgis.PyQt.QtGui import QImage
    from qgis.PyQt import sip

    try:
        from qgis.PyQt.QtGui import QAction
    except ImportError:
        from qgis.PyQt.QtWidgets import QAction

    a = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop
    b = QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
    c = QgsTask.Flag.CanCancel
    d = Qgis.MessageLevel.Warning
    e = QMessageBox.StandardButton.Yes
    f = QSizePolicy.Policy.Expanding
    g = QAbstractItemView.SelectionBehavior.SelectRows
    h = QHeaderView.ResizeMode.Stretch
    i = QEvent.Type.Close
    j = Qt.ItemDataRole.UserRole
    k = Qt.DockWidgetArea.RightDockWidgetArea
    m = QgsProcessing.SourceType.TypeRaster
    n = QgsProcessingParameterNumber.Type.Integer
    o = Qt.MouseButton.MiddleButton
    p = QImage.Format.Format_RGBA8888
    q = Qgis.DataType.Byte
    r = QgsProcessing.TEMPORARY_OUTPUT
    s = QgsRasterLayer.SINGLE_BAND_ENHANCEMENT_ALGORITHM
    t = getattr(QgsTask.Flag, "Hidden", None)
    u = getattr(getattr(QgsTask, "Flag", None), "CanCancel", None)
    v = Qgis.LayerFilter.RasterLayer if hasattr(Qgis, "LayerFilter") else None
    w = lambda: Qgis.ProcessingSourceType.Raster
    try:
        aa = Qgis.GeometryType.Polygon
    except AttributeError:
        aa = None
    if hasattr(Qgis, "RasterBandStatistic"):
        bb = Qgis.RasterBandStatistic.Min
    cc = Qgis.ProcessingSourceType.Raster if Qgis.QGIS_VERSION_INT >= 33600 else QgsProcessing.SourceType.TypeRaster
    x = Qt.AlignmentFlag.AlignLeft.value if hasattr(Qt.AlignmentFlag.AlignLeft, "value") else 1
    y = NULL
    sig = pyqtSignal(object)
    layout = QVBoxLayout()
    layout.setContentsMargins(0, 0, 0, 0)
    dialog.exec()
    menu.addAction(QAction("x"))
    text = widget.fontMetrics().horizontalAdvance("x")
    combo.textActivated.connect(print)
    event.position()
    class Local:
        AlignLeft = 1
    z = Local.AlignLeft
    Unknown.AlignLeft
"""


def test_checker_accepts_scoped_and_portable_code():
    assert check_source(textwrap.dedent(LEGIT)) == []


def test_newer_spellings_are_allowed_in_compat_only():
    code = "from qgis.core import Qgis\nLAYERS = Qgis.LayerFilter.RasterLayer\n"
    assert check_source(code, "qgis_plugin/compat.py") == []
    assert [v.rule for v in check_source(code, "qgis_plugin/dock.py")] == ["newer-api"]


def test_scoped_forms_suggested_by_the_checker_exist_here():
    """Every unscoped value the checker can flag on the planted cases has a working scoped spelling."""
    from qgis.core import QgsTask
    from qgis.PyQt.QtCore import Qt

    assert Qt.AlignmentFlag.AlignLeft == Qt.AlignLeft
    assert QgsTask.Flag.CanCancel == QgsTask.CanCancel
    assert type(Qt.AlignLeft).__name__ == "AlignmentFlag"
