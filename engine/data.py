"""Training data in the LLaVA conversation format (SuperRS-VQA / HighRS-VQA), checked sample by sample.

A data file is either a JSON list or JSON Lines, one record per sample. A file named ``*.jsonl``
is always read as JSON Lines (a line that is a JSON array is a bad record, ``malformed``, with its
index); any other file whose text starts with ``[`` is one JSON list, and a ``*.json`` file that
holds one object is that record (or the list under its ``data``/``samples``/``annotations``)::

    {"id": 0, "image": ["scene.tif"],            # a path, or a list holding exactly one path
     "conversations": [{"from": "human", "value": "<image>\\nHow many ships?"},
                       {"from": "gpt",   "value": "B"}, ...]}

Every record is validated on its own and either becomes a `Sample` or a `BadSample` that carries
the record's index (0-based position in the file), its id and a sentence saying what is wrong:

* ``malformed``      not an object, no/empty ``conversations``, a turn without ``from``/``value``,
                     roles that do not alternate user/assistant (an optional leading ``system``
                     turn is allowed), no assistant turn at the end, several images, text
                     that is not valid Unicode (a lone surrogate, ``"\\ud800"``), a JSON Lines
                     line that is not JSON (nested too deeply, a number too long) or is an array;
* ``no_image_token`` the first user turn lacks ``<image>``, or ``<image>`` appears more than once;
* ``missing_image``  no ``image`` field or the file does not exist;
* ``unreadable_image`` neither GDAL (rasterio) nor Pillow can open it;
* ``too_large``      width x height exceeds ``max_pixels``;
* ``bad_bands``      the record's ``bands`` (or ``--bands``) is not one or three 1-based band
                     numbers, or names a band the image lacks or its alpha band (a mask).

A record may carry ``"bands": [4, 3, 2]``, the bands the model sees as red, green and blue (one
band: grey), as ``ask --bands`` and the plugin choose them; it replaces ``--bands`` for that
record. Keys a record carries beyond these (LLaVA data often has some) are ignored.

With ``on_bad="stop"`` the first bad sample raises `DataError` (its message names the index);
with ``on_bad="skip"`` bad samples are left out of training and all of them are written to a
report file (JSON Lines, one line per skipped sample). Nothing is dropped without a line there.
Training adds three reasons found only while it runs (`engine.finetune_loop`): ``too_long`` (text +
visual tokens exceed ``--max-length``), ``visual_failed`` (the raster read / strategy failed) and
``out_of_memory`` (the sample's visual path, forward or backward pass ran out of memory).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.json_files import json_lines, loads, text_is_encodable

IMAGE_TOKEN = "<image>"
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
SYSTEM_ROLES = {"system"}
BAD_REASONS = ("malformed", "no_image_token", "missing_image", "unreadable_image", "too_large",
               "bad_bands", "too_long", "visual_failed", "out_of_memory")


class DataError(ValueError):
    """The data file cannot be used (unreadable, not JSON) or a bad sample stopped loading."""


@dataclass
class Turn:
    role: str  # 'system' | 'user' | 'assistant'
    text: str


@dataclass
class Sample:
    """One valid training conversation."""

    index: int  # position in the data file
    id: str
    image: Path
    turns: list[Turn]
    image_size: tuple[int, int] = (0, 0)  # (width, height) read from the file header
    system: str | None = None
    bands: list[int] | None = None  # the bands the model sees: the record's, else --bands, else None (default)
    bands_from_record: bool = False  # the record gave its own "bands"

    @property
    def first_question(self) -> str:
        """The first user turn without the `<image>` placeholder."""
        user = next(t for t in self.turns if t.role == "user")
        return strip_image_token(user.text)


@dataclass
class BadSample:
    index: int
    id: str | None
    reason: str  # one of BAD_REASONS
    message: str

    def describe(self) -> str:
        ident = f" (id {self.id})" if self.id is not None else ""
        return f"sample {self.index}{ident}: {self.message}"


@dataclass
class DataReport:
    """What `load_dataset` kept and what it skipped."""

    path: str
    total: int = 0
    kept: int = 0
    bad: list[BadSample] = field(default_factory=list)
    report_path: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.bad:
            out[b.reason] = out.get(b.reason, 0) + 1
        return out

    def summary(self) -> str:
        if not self.bad:
            return f"{self.kept} of {self.total} samples are valid."
        parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(self.counts().items()))
        where = f"; listed in {self.report_path}" if self.report_path else ""
        return f"{self.kept} of {self.total} samples are valid; skipped {len(self.bad)} ({parts}){where}."


def strip_image_token(text: str) -> str:
    """Remove `<image>` and the newline that usually follows it."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def load_records(path: str | Path) -> list[Any]:
    """Read a JSON list or a JSON Lines file. A JSONL line that is not JSON, or that is an
    array, is kept as a marker so that validation reports it with its index instead of losing
    it. A ``.jsonl`` file is read line by line whatever its first line holds: read whole as a
    JSON list because it started with "[", a file whose first line was an array was refused
    whole ("Extra data"), not that one record."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The data file {p} does not exist.")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"The data file {p} cannot be read: {exc}.") from exc
    stripped = text.lstrip()
    json_lines_file = p.suffix.lower() == ".jsonl"
    if stripped.startswith("[") and not json_lines_file:
        try:
            data = json.loads(text)
        except RecursionError:
            raise DataError(f"The data file {p} is nested too deeply to be read as JSON.") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
            raise DataError(f"The data file {p} is not valid JSON: {exc}.") from exc
        return list(data)
    if stripped.startswith("{") and p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # read as JSON Lines below, each line reported
            data = None
        if isinstance(data, dict):
            for key in ("data", "samples", "annotations"):
                if isinstance(data.get(key), list):
                    return list(data[key])
            return [data]
    records: list[Any] = []
    for lineno, line in enumerate(json_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = loads(line)
            records.append(_ArrayLine(lineno) if isinstance(value, list) else value)
        except ValueError as exc:  # not JSON, nested too deeply, an integer of over 4,300 digits
            records.append(_BrokenLine(lineno, str(exc)))
    return records


@dataclass
class _BrokenLine:
    lineno: int
    error: str


@dataclass
class _ArrayLine:
    """A JSON Lines line that holds an array (a list of records, or a record written as one)."""

    lineno: int


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, via rasterio (any GDAL format) then Pillow.
    Raises OSError when neither can open the file."""
    return image_header(path)[:2]


def image_header(path: Path) -> tuple[int, int, int, frozenset]:
    """(width, height, band count, 1-based numbers of its alpha bands) from the file header, via
    rasterio (any GDAL format) then Pillow. Raises OSError when neither can open the file."""
    errors = []
    try:
        import warnings  # noqa: PLC0415

        import rasterio  # noqa: PLC0415 - heavy import, only when data is checked

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plain PNG/JPEG: "not georeferenced" is expected
            with rasterio.open(path) as ds:
                from engine.band_choice import alpha_bands  # noqa: PLC0415

                return int(ds.width), int(ds.height), int(ds.count), frozenset(alpha_bands(ds))
    except Exception as exc:  # noqa: BLE001 - rasterio raises several unrelated types
        errors.append(str(exc))
    try:
        from PIL import Image  # noqa: PLC0415

        Image.MAX_IMAGE_PIXELS = None  # size is judged by our own rule below
        with Image.open(path) as im:
            names = im.getbands()
            return (int(im.width), int(im.height), len(names),
                    frozenset(i for i, name in enumerate(names, 1) if name == "A"))
    except Exception as exc:  # noqa: BLE001
        errors.append(str(exc))
    raise OSError("; ".join(errors))


def _image_field(record: dict) -> tuple[str | None, str, str]:
    """(path as written, bad reason, message); the path is None when the field is unusable."""
    value = record.get("image")
    if value is None:
        return None, "missing_image", "has no 'image' field"
    if isinstance(value, list):
        if len(value) != 1:
            return None, "malformed", f"lists {len(value)} images; exactly one image a sample is supported"
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        return None, "malformed", "has an 'image' field that is not a path"
    return value, "", ""


def validate_record(
    record: Any,
    index: int,
    *,
    image_root: str | Path | None = None,
    data_dir: str | Path = ".",
    max_pixels: int | None = None,
    bands: Sequence[int] | None = None,
) -> Sample | BadSample:
    """Check one record; return a `Sample` or a `BadSample` naming what is wrong. `bands` (the
    --bands of the run) applies where the record has no "bands" of its own."""
    if isinstance(record, _BrokenLine):
        return BadSample(index, None, "malformed", f"line {record.lineno} is not valid JSON ({record.error})")
    if isinstance(record, _ArrayLine):
        return BadSample(index, None, "malformed", f"line {record.lineno} is a JSON array, not a JSON object: each "
                         "line of a JSON Lines file is one record (a file that is one list of records is a .json file)")
    if not isinstance(record, dict):
        return BadSample(index, None, "malformed", f"is a {type(record).__name__}, not a JSON object")
    rid = record.get("id")
    # (an id with a lone surrogate, "\\ud800" in the file, is shown escaped: no report or
    # message could be written with it)
    sid = None if rid is None else str(rid).encode("utf-8", "backslashreplace").decode("utf-8")

    def bad(reason: str, msg: str) -> BadSample:
        return BadSample(index, sid, reason, msg)

    if not text_is_encodable(record):  # the tokenizer, the report and the console cannot take it
        return bad("malformed", "has text that is not valid Unicode (a lone UTF-16 surrogate "
                   "such as \\ud800); fix the text")

    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return bad("malformed", "has no 'conversations' list (or it is empty)")
    turns: list[Turn] = []
    system = None
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or not isinstance(t.get("from"), str):
            return bad("malformed", f"turn {k} needs string fields 'from' and 'value'")
        role_raw = t["from"].strip().lower()
        if role_raw in USER_ROLES:
            role = "user"
        elif role_raw in ASSISTANT_ROLES:
            role = "assistant"
        elif role_raw in SYSTEM_ROLES and k == 0:
            system = t["value"]
            continue
        else:
            return bad("malformed", f"turn {k} has an unknown role {t['from']!r} (use human/gpt)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            return bad("malformed", f"turn {k} is from {role} but a {expected} turn was expected "
                       "(turns must alternate, starting with the user)")
        if role == "assistant" and not t["value"].strip():
            return bad("malformed", f"turn {k} is an empty answer")
        turns.append(Turn(role, t["value"]))
    if not turns or turns[-1].role != "assistant":
        return bad("malformed", "does not end with an assistant (gpt) answer")
    n_tokens = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if IMAGE_TOKEN not in turns[0].text:
        return bad("no_image_token", f"the first user turn has no {IMAGE_TOKEN} placeholder")
    if n_tokens != 1:
        return bad("no_image_token", f"{IMAGE_TOKEN} appears {n_tokens} times; exactly once is required")

    own_bands = record.get("bands")
    if own_bands is not None:
        problem = bands_problem(own_bands)
        if problem:
            return bad("bad_bands", f"has a 'bands' field that {problem}")
    rel, reason, msg = _image_field(record)
    if rel is None:
        return bad(reason, msg)
    # relative paths: against --image-root first, then the data file's folder
    if Path(rel).is_absolute():
        candidates = [Path(rel)]
    else:
        candidates = ([Path(image_root) / rel] if image_root else []) + [Path(data_dir) / rel]
    path = next((c for c in candidates if _is_file(c)), None)
    if path is None:
        return bad("missing_image", "image not found: " + " or ".join(str(c) for c in candidates))
    try:
        w, h, count, alpha = image_header(path)
    except OSError as exc:
        return bad("unreadable_image", f"image {path} cannot be read ({exc})")
    if max_pixels is not None and w * h > max_pixels:
        return bad("too_large", f"image {path} has {w} x {h} = {w * h:,} pixels, more than "
                   f"--max-pixels {max_pixels:,}")
    chosen = list(own_bands) if own_bands is not None else (list(bands) if bands else None)
    missing = [b for b in chosen or () if b > count]
    if missing:
        source = "its 'bands'" if own_bands is not None else "--bands"
        return bad("bad_bands", f"image {path} has {count} band(s); {source} names band(s) {missing}")
    from engine.band_choice import alpha_choice_problem  # noqa: PLC0415 - numpy, rasterio: only when data is checked

    problem = alpha_choice_problem(chosen or (), alpha)
    if problem:
        source = "its 'bands'" if own_bands is not None else "--bands"
        return bad("bad_bands", f"image {path}, {source}: {problem}")
    return Sample(index=index, id=sid if sid is not None else str(index), image=path, turns=turns,
                  image_size=(w, h), system=system, bands=chosen, bands_from_record=own_bands is not None)


def _is_file(path: Path) -> bool:
    """Path.is_file, False where the name itself cannot be looked up (longer than the file
    system takes: OSError ENAMETOOLONG) instead of an exception ending the whole check."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def bands_problem(value: Any) -> str | None:
    """What is wrong with a band choice (as `ask --bands` and the protocol's `bands` take it:
    one band, shown as grey, or three, red, green and blue, 1-based), or None."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in value)):
        return "is not a list of band numbers (1-based), e.g. [4, 3, 2]"
    if len(value) not in (1, 3):
        return f"names {len(value)} bands; give one (shown as grey) or three (red, green, blue)"
    if any(b < 1 for b in value):
        return f"names band(s) {[b for b in value if b < 1]}; bands are numbered from 1"
    return None


def load_dataset(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    max_pixels: int | None = None,
    on_bad: str = "skip",
    report_path: str | Path | None = None,
    progress: Any = None,
    bands: Sequence[int] | None = None,
) -> tuple[list[Sample], DataReport]:
    """Load and validate every record. `on_bad` is 'skip' or 'stop'. With 'skip' every bad
    sample goes to `report_path` (JSON Lines; written even when empty so its absence never
    hides anything)."""
    if on_bad not in ("skip", "stop"):
        raise DataError(f"on_bad must be 'skip' or 'stop', not {on_bad!r}")
    p = Path(path)
    records = load_records(p)
    report = DataReport(path=str(p), total=len(records))
    samples: list[Sample] = []
    for i, rec in enumerate(records):
        res = validate_record(rec, i, image_root=image_root, data_dir=p.parent, max_pixels=max_pixels,
                              bands=bands)
        if isinstance(res, BadSample):
            if on_bad == "stop":
                raise DataError(f"Bad training data in {p}, {res.describe()}. "
                                "Fix it, or pass --on-bad-sample skip to leave such samples out.")
            report.bad.append(res)
        else:
            samples.append(res)
        if progress is not None:
            progress(i + 1, len(records))
    report.kept = len(samples)
    if report_path is not None:
        write_bad_report(report.bad, report_path)
        report.report_path = str(report_path)
    return samples, report


def write_bad_report(bad: Iterable[BadSample], path: str | Path) -> None:
    """One JSON line a skipped sample: index, id, reason, message."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8", errors="backslashreplace") as f:  # never lose a line
        for b in bad:
            f.write(json.dumps(asdict(b), ensure_ascii=False) + "\n")


def split_train_val(samples: Sequence[Sample], fraction: float, seed: int = 0, *,
                    by: str = "raster") -> tuple[list[Sample], list[Sample]]:
    """Seeded random split; the training part keeps file order.

    ``by="raster"`` (default) holds out whole rasters: every question about a held-out image is
    in validation, none in training, so the validation loss tells how the adapter does on scenes
    it has not seen (VQA data asks several questions about each scene). `fraction` is then the
    share of distinct images held out: at least one when fraction > 0, never all. With fewer than
    two distinct images (or ``by="record"``) records are split instead, at least one validation
    record when fraction > 0 and there are two or more records; `split_is_by_raster` says which
    happened."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"the validation fraction must be in [0, 1), not {fraction}")
    if by not in ("raster", "record"):
        raise DataError(f"by must be 'raster' or 'record', not {by!r}")
    if by == "raster" and split_is_by_raster(samples, fraction):
        rasters = sorted({_raster_key(s) for s in samples})
        held = set(_held_out(rasters, fraction, seed))
        train = [s for s in samples if _raster_key(s) not in held]
        val = [s for s in samples if _raster_key(s) in held]
        return train, val
    val_idx = set(_held_out(list(range(len(samples))), fraction, seed))
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def split_is_by_raster(samples: Sequence[Sample], fraction: float) -> bool:
    """Whether `split_train_val(..., by="raster")` holds out whole rasters (two or more distinct
    images and a fraction above 0) rather than records."""
    return fraction > 0 and len({_raster_key(s) for s in samples}) >= 2


def _raster_key(sample: Sample) -> str:
    return str(Path(sample.image).resolve()) if sample.image is not None else ""


def _held_out(items: list, fraction: float, seed: int) -> list:
    """The seeded `fraction` of `items` to hold out: at least one and never all when fraction > 0
    and there are two or more, none otherwise."""
    n = len(items)
    n_val = int(round(n * fraction))
    n_val = max(1, min(n_val, n - 1)) if fraction > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n_val]]
