"""The chat's conversations and result layers across a project's life, as a state machine
(hypothesis): layers added (files, or virtual rasters the plugin renders), renamed and removed,
questions answered by the stand-in engine (some while the project is saved or a layer removed
mid-answer), conversations cleared, result layers removed by hand, the project saved, saved
again, saved under another name (another folder, a folder below, an earlier project's folder;
.qgs or .qgz), closed and read back.

After every step: the dock holds exactly the conversations the steps left (a project read
back holds what was saved in it, cleared ones do not come back), the project entry says the
same, answers about removed layers are under the removed layers' item, every answer's files
exist, result layers open existing files and every answer's files are inside the project's
results folder once the project is saved, when that folder is the project's own (also the files
of answers whose result layers were removed, or that got none, and the render an answer about a
virtual raster was about, in its renders/), the layer list offers no result layer, and nothing
raised in a slot or warned.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from conftest import set_settings, virtual_raster_layer, wait_for_tasks, wait_until, write_raster

SIZES = ((64, 48), (40, 40), (32, 56))  # the stand-in's answer says the raster's size


def _state(turn) -> str:
    """What became of a turn: "ok" (answered), "interrupted" (saved mid-answer), or its error."""
    if turn.get("error"):
        return "error: " + turn["error"]
    if turn.get("interrupted"):
        return "interrupted"
    return "ok" if turn.get("done") else "streaming"


def _summary(conversations) -> dict:
    """{layer id: [(question, answer, state)]} of the conversations that hold turns."""
    return {lid: [(t["question"], t["answer"], _state(t)) for t in turns] for lid, turns in conversations.items()
            if turns}


def _file(layer) -> Path:
    return Path(layer.source().split("|")[0]).resolve()


def project_life(plugin, stub_engine, base: Path):
    """The state machine class, bound to the plugin's dock and the stand-in engine."""
    from geovqa import history
    from geovqa.dock import REMOVED_LAYERS_ITEM
    from geovqa.layers import is_result_layer
    from geovqa.settings import RESULTS_FOLDER
    from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer

    project = QgsProject.instance()
    dock = plugin.dock
    bar = plugin.iface.messageBar()

    def result_layers():
        return sorted((lyr for lyr in project.mapLayers().values() if is_result_layer(lyr, project)),
                      key=lambda lyr: lyr.id())

    class ProjectLife(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            project.clear()
            bar.clear_messages()
            self.dir = Path(tempfile.mkdtemp(dir=base))
            self.n = 0
            self.model = {}  # layer id -> [(question, answer, state)]
            self.names = {}  # layer id -> name, of the layers in the project
            self.path = None  # the project's file
            self.saved = {}  # project file -> (model, names) as saved there
            self.own = True  # the results folder is the project's own
            self.errors, self.logs = [], []
            self._hook = sys.excepthook
            sys.excepthook = lambda *exc: self.errors.append("".join(traceback.format_exception(*exc)))
            QgsApplication.messageLog().messageReceived.connect(self._logged)

        def _logged(self, text, tag, _level):
            if tag in ("Python error", "GeoVQA"):
                self.logs.append(text)

        def teardown(self):
            sys.excepthook = self._hook
            QgsApplication.messageLog().messageReceived.disconnect(self._logged)
            stub_engine.token_delay = 0.0
            project.clear()
            shutil.rmtree(self.dir, ignore_errors=True)

        def fresh(self, prefix: str) -> str:
            self.n += 1
            return f"{prefix}{self.n}"

        def layer_ids(self):
            return sorted(self.names)

        @initialize(own=st.booleans())
        def start(self, own):
            self.own = own
            set_settings(output_dir="" if own else str(self.dir / "chosen"))
            self.add_layer(SIZES[0])
            self.add_layer(SIZES[1])
            self.add_layer(SIZES[2], virtual=True)

        # -- steps ----------------------------------------------------------------------------
        @rule(size=st.sampled_from(SIZES), virtual=st.booleans())
        def add_layer(self, size, virtual=False):
            """A raster file, or a virtual raster over one (no file: the dock renders it)."""
            name = self.fresh("L")
            layer = QgsRasterLayer(write_raster(self.dir / f"{name}.tif", width=size[0], height=size[1]), name, "gdal")
            if virtual:
                layer = virtual_raster_layer(layer, name)  # added; its source file stays out
            else:
                project.addMapLayer(layer)
            self.names[layer.id()] = name

        def _ask(self, lid):
            layer = project.mapLayer(lid)
            dock.set_layer(layer)
            question = self.fresh("question ") + "?"
            dock.ask(question)
            turn = dock.current_turn
            assert turn is not None and turn["question"] == question, dock.progress_label.text()
            self.model.setdefault(lid, []).append((question, None, "streaming"))
            return turn, f"The area is {layer.width()} x {layer.height()} pixels with 3 bands."

        def _answered(self, lid, turn, answer):
            wait_until(lambda: turn.get("done"), 30, "the answer")
            wait_for_tasks()
            assert (turn["answer"], _state(turn)) == (answer, "ok"), turn
            self.model[lid][-1] = (turn["question"], answer, "ok")

        @precondition(lambda self: self.names)
        @rule(data=st.data())
        def ask(self, data):
            lid = data.draw(st.sampled_from(self.layer_ids()))
            self._answered(lid, *self._ask(lid))

        @precondition(lambda self: self.names)
        @rule(data=st.data(), meanwhile=st.sampled_from(["save", "save_as", "remove_layer"]))
        def ask_and_meanwhile(self, data, meanwhile):
            """A step while the answer streams: its files go with a project saved meanwhile, and
            its turn is saved interrupted; it lands under the removed layers' item."""
            lid = data.draw(st.sampled_from(self.layer_ids()))
            stub_engine.token_delay = 0.03
            turn, answer = self._ask(lid)
            wait_until(lambda: turn["answer"], 10, "the first words")
            if meanwhile == "remove_layer":
                self._remove(lid)
            else:
                so_far = turn["answer"]
                self.save() if meanwhile == "save" else self.save_as("new", "qgs")
                self.saved[self.path][0][lid][-1] = (turn["question"], so_far, "interrupted")
            self._answered(lid, turn, answer)
            stub_engine.token_delay = 0.0

        @precondition(lambda self: self.names)
        @rule(data=st.data())
        def clear_conversation(self, data):
            lid = data.draw(st.sampled_from(self.layer_ids()))
            dock.set_layer(project.mapLayer(lid))
            dock.clear_conversation()
            self.model[lid] = []

        @precondition(lambda self: any(turns for lid, turns in self.model.items() if lid not in self.names))
        @rule()
        def clear_removed_layers_answers(self):
            dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
            assert dock.showing_removed_layers()
            dock.clear_conversation()
            self.model = {lid: turns for lid, turns in self.model.items() if lid in self.names}

        @precondition(lambda self: self.names)
        @rule(data=st.data())
        def remove_layer(self, data):
            self._remove(data.draw(st.sampled_from(self.layer_ids())))

        def _remove(self, lid):
            project.removeMapLayer(lid)
            del self.names[lid]

        @precondition(lambda self: self.names)
        @rule(data=st.data())
        def rename_layer(self, data):
            lid = data.draw(st.sampled_from(self.layer_ids()))
            self.names[lid] = self.fresh("renamed ")
            project.mapLayer(lid).setName(self.names[lid])

        @precondition(lambda self: result_layers())
        @rule(data=st.data())
        def remove_result_layer(self, data):
            project.removeMapLayer(data.draw(st.sampled_from([lyr.id() for lyr in result_layers()])))

        def _written(self):
            assert project.write()
            assert not project.isDirty() or dock.is_asking()
            self.saved[self.path] = ({lid: list(turns) for lid, turns in self.model.items() if turns},
                                     dict(self.names))

        @rule()
        def save(self):
            if self.path is None:
                self.save_as("new", "qgs")  # QGIS asks for a name
            else:
                self._written()

        @rule(where=st.sampled_from(["new", "below", "earlier"]), ext=st.sampled_from(["qgs", "qgz"]))
        def save_as(self, where, ext):
            folder = self.dir / self.fresh("project")
            if where == "below" and self.path:
                folder = Path(self.path).parent / self.fresh("below")
            elif where == "earlier" and self.saved:
                folder = Path(min(self.saved)).parent
            folder.mkdir(exist_ok=True)
            self.path = str(folder / f"{self.fresh('p')}.{ext}")
            project.setFileName(self.path)  # File > Save As: a name, then write()
            self._written()

        @rule()
        def new_project(self):
            project.clear()
            self.model, self.names, self.path = {}, {}, None

        @precondition(lambda self: self.saved)
        @rule(data=st.data(), new_first=st.booleans())
        def read_back(self, data, new_first):
            path = data.draw(st.sampled_from(sorted(self.saved)))
            if new_first:
                project.clear()
            assert project.read(path)
            wait_for_tasks()
            assert not project.isDirty()
            model, names = self.saved[path]
            self.model, self.names, self.path = {lid: list(t) for lid, t in model.items()}, dict(names), path
            assert {lid: project.mapLayer(lid) and project.mapLayer(lid).name() for lid in names} == names

        # -- what always holds ----------------------------------------------------------------
        @invariant()
        def the_conversations_are_those_the_steps_left(self):
            got = {lid: [(q, None if s == "streaming" else a, s) for q, a, s in turns]
                   for lid, turns in _summary(dock.conversations).items()}
            assert got == {lid: turns for lid, turns in self.model.items() if turns}
            if not dock.is_asking():  # what a save writes (tokens streaming are written at the save)
                text, found = project.readEntry(history.SCOPE, history.KEY, "")
                stored = history.loads(text, project.readPath)[0] if found else {}
                assert _summary(stored) == _summary(dock.conversations)

        @invariant()
        def answers_about_removed_layers_are_under_their_item(self):
            removed = sorted(lid for lid, turns in self.model.items() if turns and lid not in self.names)
            assert list(dock.layer_combo.additionalItems()) == ([REMOVED_LAYERS_ITEM] if removed else [])
            assert sorted({t["layer_id"] for t in dock.removed_layer_turns()}) == removed

        @invariant()
        def result_files_exist_and_stay_with_the_project(self):
            folder = (Path(project.homePath()) / RESULTS_FOLDER).resolve() if self.own and project.fileName() else None
            for lyr in result_layers():
                assert lyr.isValid() and _file(lyr).is_file(), lyr.source()
                assert folder is None or _file(lyr).parent == folder, (lyr.source(), folder)
            for turn in (t for turns in dock.conversations.values() for t in turns if _state(t) == "ok"):
                for key, layer_key in (("local_heatmap_path", "heatmap_layer_id"),
                                       ("local_anchors_path", "anchors_layer_id")):
                    path = Path(turn["result"][key])
                    assert path.is_file(), (key, path)
                    assert folder is None or path.resolve().parent == folder, (key, path, folder)
                    layer = project.mapLayer(turn.get(layer_key) or "")
                    assert layer is None or path.resolve() == _file(layer), (path, layer.source())
            for turn in (t for turns in dock.conversations.values() for t in turns
                         if t.get("rendered_path") and _state(t) != "streaming"):
                render = Path(turn["rendered_path"])
                assert render.is_file() and turn["request"]["raster_path"] == str(render), turn
                assert folder is None or render.resolve().parent == folder / "renders", (render, folder)

        @invariant()
        def the_layer_list_offers_no_result_layer(self):
            combo = dock.layer_combo
            offered = [combo.layer(i) for i in range(combo.count()) if combo.layer(i) is not None]
            assert not [lyr.name() for lyr in offered if is_result_layer(lyr, project)]

        @invariant()
        def nothing_raised_or_warned(self):
            assert self.errors == [] and self.logs == [], (self.errors, self.logs)
            said = bar.get_messages(Qgis.MessageLevel.Warning) + bar.get_messages(Qgis.MessageLevel.Critical)
            assert [m for m in said if "was removed before GeoVQA answered" not in m] == []

    return ProjectLife


def test_conversations_and_result_layers_across_the_project_life(plugin, stub_engine, qgis_new_project, tmp_path):
    from geovqa.settings import profile_results_dir

    profile = profile_results_dir()
    before = set(profile.rglob("*")) if profile.exists() else set()  # renders/ too
    try:
        run_state_machine_as_test(
            project_life(plugin, stub_engine, tmp_path),
            # no shrinking: with QGIS it takes minutes; the failing steps are printed as they ran
            settings=settings(max_examples=30, stateful_step_count=20, deadline=None, derandomize=True,
                              database=None, phases=(Phase.explicit, Phase.generate),
                              suppress_health_check=list(HealthCheck)))
    finally:  # answers asked before a first save keep their files in the (test) profile
        for path in (set(profile.rglob("*")) if profile.exists() else set()) - before:
            if path.is_file():
                path.unlink()
