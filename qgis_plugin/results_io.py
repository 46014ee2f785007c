"""CSV / JSON export of batch answers (shared by the batch dialog and Processing).

Answers are also written as they arrive, so a cancel or a crash keeps the finished ones: the
batch dialog appends each to a JSON Lines autosave file (:func:`append_json_line`), the
Processing batch writes its CSV row by row (:class:`CsvRows`, same file as :func:`write_csv`).
JSON and JSON Lines are UTF-8 text, non-ASCII characters as they are (not ``\\u00e9`` escapes).
The CSV is UTF-8 with a byte-order mark at its start (``utf-8-sig``): without it, Excel on
Windows reads a CSV in the ANSI code page (cp1252) and garbles every accented question, answer
and layer name; Python's csv (read with ``utf-8-sig``), LibreOffice, GDAL/OGR and QGIS's
delimited-text provider skip the mark. A CSV is only ever written whole from its start, never
appended to, so the mark is never in the middle of a file.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .bands import bands_cell
from .paths import public_source

# "bands": which bands of raster_path the model saw (:func:`bands.bands_cell`: "4,3,2", "1 (grey)",
# "1 (colour table)", "rendered view"; the JSON rows keep the result's "bands" list, "palette" flag
# and the row's "rendered" flag)
# "incomplete_answer": the words of an answer that broke off (the connection dropped, the engine
# failed mid-answer, Cancel stopped it) before it was complete; "answer" is then empty and
# "error" says why ("cancelled" for Cancel)
CSV_COLUMNS = ("index", "layer", "raster_path", "question", "answer", "error", "strategy",
               "visual_kept", "visual_candidates", "total_s", "heatmap_path", "anchors_path", "bands",
               "incomplete_answer")


# the error of a question that Cancel stopped while it was being answered: not answered, but no
# failure either (the batch dialog and Processing count it with the questions not asked)
CANCELLED = "cancelled"


def is_cancelled(row: dict) -> bool:
    """True for a row of a question stopped by Cancel before its answer came."""
    return row.get("answer") is None and row.get("error") == CANCELLED


def is_failure(row: dict) -> bool:
    """True for a row with no answer that was not cancelled: the engine or the layer failed."""
    return row.get("answer") is None and not is_cancelled(row)


def files_note(row: dict) -> str:
    """Why an answered row lacks its heatmap or anchors (its ``error``, "The answer is kept, but
    …"); "" for a row without that note, and for a row with no answer (its error is the failure)."""
    return (row.get("error") or "") if row.get("answer") is not None else ""


def shareable(row: dict) -> dict:
    """``row`` as the files a user shares hold it (CSV, JSON, the autosave): a ``raster_path``
    that is a URL with a login (``/vsicurl/https://user:password@…``) without its password."""
    if isinstance(row, dict) and row.get("raster_path"):
        return {**row, "raster_path": public_source(str(row["raster_path"]))}
    return row


def flat_row(row: dict) -> dict:
    row = shareable(row)
    tokens = row.get("tokens") or {}
    timings = row.get("timings") or {}
    out = {k: row.get(k) for k in CSV_COLUMNS}
    out["visual_kept"] = tokens.get("visual_kept")
    out["visual_candidates"] = tokens.get("visual_candidates")
    out["total_s"] = timings.get("total")
    out["bands"] = bands_cell(row.get("bands"), row.get("palette"), row.get("rendered"))
    return {k: ("" if v is None else v) for k, v in out.items()}


class CsvRows:
    """A CSV of answers written as they come: the byte-order mark and the header at once, then
    each row, flushed, so the file holds every finished row at any time. ``path`` is written
    anew (an existing file is replaced, never appended to). Raises OSError when it cannot be
    written."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        # "w", so the mark utf-8-sig writes first is at the start of the file, and only there
        self._fh = open(path, "w", newline="", encoding="utf-8-sig")
        self._writer = csv.DictWriter(self._fh, fieldnames=list(CSV_COLUMNS))
        self._writer.writeheader()
        self._fh.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow(flat_row(row))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_csv(rows: list, path: str) -> str:
    with CsvRows(path) as out:
        for row in rows:
            out.write(row)
    return str(path)


_LINE_BREAKS = "\u0085\u2028\u2029"  # str.splitlines() ends a line at them; JSON may hold them raw


def append_json_line(path, row: dict) -> None:
    """Append ``row`` to the JSON Lines file ``path`` (one object a line, the fields of the JSON
    export's rows), on the disk before it returns. Raises OSError when it cannot be written."""
    # UTF-8 text; the Unicode line breaks JSON leaves as they are stay escaped, so a reader
    # splitting lines as Python's str.splitlines() does still gets one object a line
    text = json.dumps(shareable(row), default=str, ensure_ascii=False)
    line = "".join(f"\\u{ord(c):04x}" if c in _LINE_BREAKS else c for c in text) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # a lone surrogate (no UTF-8 for it) is written as its JSON escape, \udXXX, still valid JSON
    with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(rows: list, path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"results": [shareable(r) for r in rows]}, indent=2, default=str,
                                     ensure_ascii=False),
                          encoding="utf-8", errors="backslashreplace")
    return str(path)


def new_answers_files(folder, extensions=(".csv",), stem: str = "answers") -> list:
    """Paths for a new set of answer files in ``folder`` (created when missing), one for each of
    ``extensions``, sharing one name: ``<stem>_<date>_<time>.<ext>``, ``_2``, ``_3``… added
    when any of them exists already. Each file is created empty here (exclusively), so no other
    run takes the same name and no file already there is ever overwritten. Raises OSError when
    the folder cannot be written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}"
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}_{n}"
        paths = [folder / f"{name}{ext}" for ext in extensions]
        if any(p.exists() for p in paths):
            continue
        made = []
        try:
            for p in paths:
                with open(p, "x", encoding="utf-8"):
                    made.append(p)
        except OSError as exc:  # taken by another run meanwhile: the next name; else no empty file left
            for p in made:
                p.unlink(missing_ok=True)
            if isinstance(exc, FileExistsError):
                continue
            raise
        return [str(p) for p in paths]
    raise OSError(f"no free file name for the answers in {folder}")
