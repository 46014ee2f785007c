"""Caches that make a second question on the same raster cheap.

* `FeatureCache`: vision features of a raster read, keyed by (path, size, mtime, ctime and inode
  of every file behind it: a VRT's sources, overviews, masks, the archive of a /vsizip/ source;
  area of interest, bands; a read with a source that cannot be stat-ed is not cached), kept on the CPU and
  bounded in bytes (least recently used goes first). A hit skips reading tiles and the whole
  vision tower. Its cap (`feature_cache_cap`: `serve --feature-cache-bytes`, else
  GEOVQA_FEATURE_CACHE_BYTES, else 4 GiB; 0 turns it off) is RAM on top of the model's, whatever
  the device: the memory check counts it when the model loads on the CPU.
* `PrefixStore`: the language model's KV cache of the image prefix (system prompt + visual tokens)
  for question-independent strategies, keyed by the feature key plus the strategy and its
  parameters. A hit skips the prefill of every visual token. Holds few entries: KV caches are big.

Both are thread-safe; the server runs one GPU job at a time, but health checks read the sizes.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any, Hashable

FEATURE_CACHE_ENV = "GEOVQA_FEATURE_CACHE_BYTES"
DEFAULT_FEATURE_CACHE_BYTES = 4 * 2**30


def feature_cache_cap(given: int | None = None) -> int:
    """The feature cache's cap in bytes: `given` (``serve --feature-cache-bytes``) when not None,
    else GEOVQA_FEATURE_CACHE_BYTES, else DEFAULT_FEATURE_CACHE_BYTES (4 GiB); 0 turns the cache off.

    Read when an engine starts (not at import), so a bad value stops it before the model loads,
    with a message that names the variable."""
    if given is not None:
        if given < 0:
            raise ValueError(f"the feature cache size must be 0 or more bytes, not {given}.")
        return int(given)
    from engine.env_settings import env_number, whole_number

    return env_number(FEATURE_CACHE_ENV, DEFAULT_FEATURE_CACHE_BYTES, whole_number,
                      "a whole number of bytes (for example 1073741824 for 1 GiB, or 0 to turn "
                      "the feature cache off)")


def raster_key(path: str, aoi, bands) -> tuple | None:
    """Identity of a raster read: every file behind it (see `raster_files`; the key changes when
    any of them is written or replaced), the area of interest (window / polygon, as canonical
    JSON) and the bands. None when a file behind it cannot be stat-ed (a VRT source on a web
    server, /vsicurl/): nothing tells when it changes, so such a read is not cached."""
    stamps = tuple(_file_stamp(f) for f in raster_files(path))
    if any(stamp is None for stamp in stamps):
        return None
    return (os.path.realpath(path), stamps, json.dumps(aoi, sort_keys=True, default=str),
            tuple(bands or ()))


def content_key(identity: str, aoi, bands) -> tuple:
    """Identity of a read of an uploaded raster: its content hash instead of its (temporary) path,
    plus the area of interest and bands as in `raster_key`."""
    return ("content", identity, json.dumps(aoi, sort_keys=True, default=str), tuple(bands or ()))


def raster_files(path: str) -> list[str]:
    """`path` and every file GDAL reads with it: a VRT's sources (those of a VRT inside it too)
    and sidecars such as .ovr overviews, .msk masks and .aux.xml metadata.

    A VRT is only XML naming other files: keyed on itself alone, the cache served the features
    of the old pixels after a source file was replaced. Opening the dataset to ask GDAL is cheap
    next to the read a cache hit saves; it reads no pixels.
    """
    found = [path]
    seen = {os.path.realpath(path)}
    pending = [path]
    while pending:
        for name in _gdal_file_list(pending.pop()):
            real = os.path.realpath(name)
            if real in seen:
                continue
            seen.add(real)
            found.append(name)
            if name.lower().endswith(".vrt"):  # GDAL lists a nested VRT, not its sources
                pending.append(name)
    return found


def _gdal_file_list(path: str) -> list[str]:
    """The files GDAL reports for the dataset at `path`; none when it cannot be opened (the read
    that follows says why)."""
    import warnings

    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning and the like
            with rasterio.open(path) as src:
                return list(src.files)
    except Exception:  # noqa: BLE001 - any failure here only means "no more files known"
        return []


# GDAL's archive file systems: the file to stamp is the archive on the disk
ARCHIVE_PREFIXES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")


def _file_stamp(name: str) -> tuple | None:
    """(real path, size, mtime and ctime in ns, inode) of a file, or of the archive on the disk
    holding a GDAL /vsizip/ (/vsitar/, …) member; None when there is no such file to stat (a
    /vsicurl/ source).

    The ctime and the inode change when a file is written or replaced, also by a copy that keeps
    the old mtime (`cp -p`, `rsync -t`, an unpacked archive) and the same size."""
    target = _archive_file(name) if name.startswith(ARCHIVE_PREFIXES) else name
    if target is None:
        return None
    try:
        st = os.stat(target)
    except OSError:
        return None
    return (os.path.realpath(target), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _archive_file(name: str) -> str | None:
    """The archive file on the disk of a /vsizip/-style name (the longest leading part of what
    follows the prefix that is a file), None when there is none (an archive on a web server)."""
    rest = name[name.index("/", 1) + 1:]  # after "/vsizip/"
    if rest.startswith("/vsi"):  # an archive inside another virtual file system (/vsicurl/...)
        return None
    parts = rest.split("/")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end])
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _nbytes(value: Any) -> int:
    """Bytes held by tensors/arrays inside `value` (dataclass, tuple, dict or tensor)."""
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "layers") and isinstance(getattr(value, "layers"), list):  # transformers Cache
        return sum(_nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
                   for layer in value.layers)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


class _LRU:
    def __init__(self, max_bytes: int, max_items: int) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes or self.max_bytes <= 0 or self.max_items <= 0:
                return  # too big to keep (never evict everything for one entry), or caching is off
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._items) > self.max_items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


FEATURE_CACHE_ITEMS = 16  # rasters whose features the engine keeps at most


def feature_entry_ceiling(hidden_size: int, tile_px: int, patch_px: int, max_canvas_px: int,
                          value_bytes: int = 4) -> int:
    """The most bytes one FeatureCache entry can take: the vision tower's hidden states (CLS and
    patches) of the overview tile and of the largest canvas's tiles (`max_canvas_px` pixels), in
    float32 (the CPU's dtype; bfloat16 halves it)."""
    tiles = 1 + int(max_canvas_px) // (int(tile_px) ** 2)
    tokens = 1 + (int(tile_px) // int(patch_px)) ** 2
    return tiles * tokens * int(hidden_size) * int(value_bytes)


class FeatureCache(_LRU):
    """Vision features per raster read (CPU tensors); a `max_bytes` of 0 keeps nothing."""

    def __init__(self, max_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
                 max_items: int = FEATURE_CACHE_ITEMS) -> None:
        super().__init__(max_bytes, max_items)


class PrefixStore(_LRU):
    """(selection, generate.PrefixCache) per raster + strategy. Generation crops a prefix cache
    back to its length after each answer, so one entry serves every later question."""

    def __init__(self, max_bytes: int = 2 * 2**30, max_items: int = 2) -> None:
        super().__init__(max_bytes, max_items)
