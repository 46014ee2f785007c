"""What the engine tells a client about an uploaded raster names it "the uploaded raster", never
the temporary file it was stored in (engine/uploads.py name_upload, Upload.public): the checks of
the upload itself and the errors of the question read from it. A raster given by path is still
named by its path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from engine.uploads import name_upload

try:
    from tests.engine.rasters import write_gcp_geotiff, write_geotiff
except ImportError:  # rootdir-relative import when tests/ is not a package
    from rasters import write_gcp_geotiff, write_geotiff

RNG = np.random.default_rng(7)
TOKEN = {"Authorization": "Bearer t"}


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory):
    from engine.pipeline import Engine
    from engine.server import Settings, create_app

    state = tmp_path_factory.mktemp("state")
    app = create_app(Engine(tiny_checkpoint, output_dir=state / "out"),
                     Settings(state_dir=state, token="t"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        with TestClient(app) as c:
            c.state_dir = state
            yield c


def _ask(client, raster: Path, **request):
    """(HTTP status, the last event or the error body) of a question about `raster`, uploaded."""
    request = {"question": "What is here?", "max_new_tokens": 2, **request}
    r = client.post("/ask", headers=TOKEN, data={"request": json.dumps(request)},
                    files={"raster": ("layer.tif", raster.read_bytes(), "image/tiff")})
    lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    return r.status_code, (lines[-1] if r.status_code == 200 else r.json()["error"]), r.text


def _rotated(tmp_path):
    """A raster turned by 30 degrees: its bounding box holds points outside it."""
    turned = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    return write_geotiff(tmp_path / "turned.tif", RNG.integers(1, 255, (3, 60, 80), np.uint8),
                         transform=turned)


def _corrupt(tmp_path):
    good = Path(write_geotiff(tmp_path / "good.tif", RNG.integers(1, 255, (3, 60, 80), np.uint8)))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(good.read_bytes()[:200] + b"\0" * 50)
    return bad


def _bent_gcps(tmp_path):
    gcps = [(0, 0, 500000.0, 5000000.0), (80, 0, 500800.0, 5000000.0),
            (0, 60, 500000.0, 4999400.0), (80, 60, 500900.0, 4999300.0)]
    return write_gcp_geotiff(tmp_path / "gcps.tif", RNG.integers(1, 255, (60, 80), np.uint8), gcps)


# a polygon inside the turned raster's bounding box, outside the raster: passes the request
# checks, refused by the read
OUTSIDE = "POLYGON((500005 5000395, 500015 5000395, 500015 5000385, 500005 5000385, 500005 5000395))"

CASES = {
    "all nodata": (lambda d: write_geotiff(d / "nd.tif", np.zeros((3, 60, 80), np.uint8), nodata=0),
                   {}, 200, "no_valid_pixels",
                   "Every pixel of the uploaded raster is nodata (or masked): there is no image"),
    "outside": (_rotated, {"aoi": {"polygon_wkt": OUTSIDE}}, 200, "aoi_outside_raster",
                "The area of interest (polygon, in the raster's CRS) lies wholly outside the "
                "uploaded raster (80 x 60 pixels)."),
    "corrupt": (_corrupt, {}, 422, "raster_unreadable",
                "The uploaded raster looks like a raster but cannot be read: "),
    "needs a warp": (_bent_gcps, {}, 422, "raster_unreadable",
                     "The uploaded raster is georeferenced by ground control points that need a "
                     "warp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_uploads_errors_name_it_and_not_the_engines_temporary_file(client, tmp_path, case):
    """They named '<state dir>/uploads/upload-xxxx/raster.tif': nothing to the client (the QGIS
    plugin uploads a cut of its layer) and the layout of the engine's disk."""
    make, request, status, code, message = CASES[case]
    got_status, error, text = _ask(client, Path(make(tmp_path)), **request)
    assert (got_status, error["type"] if status == 200 else "error") == (status, "error")
    assert error["code"] == code and error["message"].startswith(message), error
    assert str(client.state_dir) not in text and "upload-" not in text and "raster.tif'" not in text
    if case == "needs a warp":
        assert "gdalwarp -r bilinear <raster.tif> warped.tif" in error["message"]


def test_a_raster_given_by_path_is_still_named_by_its_path(client, tmp_path):
    path = write_geotiff(tmp_path / "nd.tif", np.zeros((3, 60, 80), np.uint8), nodata=0)
    r = client.post("/ask", headers=TOKEN, json={"question": "What?", "raster_path": str(path),
                                                 "max_new_tokens": 2})
    last = json.loads(r.text.splitlines()[-1])
    assert last["code"] == "no_valid_pixels" and f"Every pixel of '{path}' is nodata" in last["message"]


def test_name_upload_replaces_the_path_in_every_form():
    p, d = "/srv/state/uploads/upload-ab12/raster.tif", "/srv/state/uploads/upload-ab12"
    assert name_upload(f"'{p}' has no bands. Band 4 does not exist in \"{p}\".", p, d) == (
        "The uploaded raster has no bands. Band 4 does not exist in the uploaded raster.")
    assert name_upload(f"{p} cannot be read: TIFFReadDirectory:{p}: bad", p, d) == (
        "The uploaded raster cannot be read: TIFFReadDirectory:the uploaded raster: bad")
    assert name_upload(f"gdalwarp -rpc '{p}' warped.tif; {d}/raster.tif.ovr", p, d) == (
        "gdalwarp -rpc <raster.tif> warped.tif; the uploaded raster.ovr")
    assert name_upload(f"see {d}/x.aux.xml", p, d) == "see the upload's folder/x.aux.xml"
    assert name_upload(None, p) is None and name_upload("no path here", p) == "no path here"
