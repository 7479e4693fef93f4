"""The on-disk cache of traced activation profiles: one JSON file of polynomials (``trace.polys``) per key.

A key hashes the HF config (depth included), dtype, attention, kernel target and library versions
(``trace.tracer``); an entry holds the layout of the kinds of layer (``trace.kinds``). The files live in the
user's cache directory, never in the working tree: ``$ZEROEST_CACHE_DIR``, else
``$XDG_CACHE_HOME/zeroest/profiles`` (an absolute path, as the XDG spec asks), else
``~/.cache/zeroest/profiles``. A file that cannot be read or does not hold a traced entry is ignored with one
warning, and traced again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from zeroest.estimator.trace.polys import profile_from_polys

log = logging.getLogger(__name__)

CACHE_VERSION = 6
"""Bumped whenever what a trace records changes, so that old files are not read (5: a layer checkpointed at
``__call__`` keeps its input as its own; 6: the key holds the depth, the entry the layout of the kinds of layer,
``trace.kinds``)."""


def cache_dir() -> Path:
    """``$ZEROEST_CACHE_DIR``, else ``$XDG_CACHE_HOME/zeroest/profiles``, else ``~/.cache/zeroest/profiles``.

    A relative ``$XDG_CACHE_HOME`` is ignored (the XDG base directory spec calls it invalid): it would put the
    cache under whatever directory the command runs in, such as a checkout.
    """
    if os.environ.get("ZEROEST_CACHE_DIR"):
        return Path(os.environ["ZEROEST_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "zeroest" / "profiles"


def cache_key(payload: dict) -> str:
    """A stable hash of a JSON-able dict (sorted keys), used as the file name."""
    text = json.dumps({"version": CACHE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load(key: str) -> dict | None:
    """The cached entry for ``key``; None when there is none, or (with one warning) when the file is corrupt.

    A file is corrupt when it cannot be read, is not JSON, or does not evaluate to a profile; a file of another
    ``CACHE_VERSION`` is stale and skipped quietly. Either way the caller traces again and overwrites it.
    """
    path = cache_dir() / f"{key}.json"
    try:
        data = read_versioned(path, CACHE_VERSION)
        if data is None:
            return None
        entry = decode(data)
        profile_from_polys(entry, 1, 1)  # the layout and every region, snapshot and peak is there and numeric
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        log.warning(f"ignoring the corrupt activation profile cache file {path} ({type(err).__name__}: {err}); "
                    "tracing again")
        return None
    return entry


def store(key: str, entry: dict) -> None:
    """Write ``entry`` for ``key`` atomically; a cache that cannot be written is logged and skipped."""
    write_atomically(cache_dir() / f"{key}.json", {"version": CACHE_VERSION, **encode(entry)}, "activation profile")


def read_versioned(path: Path, version: int) -> dict | None:
    """The JSON object a cache file holds, if it is of ``version``: None when there is no file, or when it is of
    another version (stale, skipped quietly). OSError or ValueError (not JSON, not an object) for a corrupt file,
    which the caller warns of."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    if data.get("version") != version:
        log.debug(f"skipping {path}: cache version {data.get('version')!r}, not {version}")
        return None
    return data


def write_atomically(path: Path, data: dict, what: str) -> None:
    """``data`` as JSON at ``path``, through a temporary file renamed over it (readers never see half a file); a
    directory that cannot be written is logged, naming the ``what`` cache, and skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as err:
        log.warning(f"could not write the {what} cache in {path.parent}: {err}")


def encode(entry: object) -> object:
    """Polynomials (dicts keyed by (i, j)) to JSON objects keyed ``"i,j"``, recursively."""
    if isinstance(entry, dict):
        if entry and all(isinstance(k, tuple) for k in entry):
            return {"__poly__": {f"{i},{j}": c for (i, j), c in entry.items()}}
        return {k: encode(v) for k, v in entry.items()}
    if isinstance(entry, list):
        return [encode(v) for v in entry]
    return entry


def decode(entry: object) -> object:
    """Inverse of ``encode``."""
    if isinstance(entry, dict):
        if "__poly__" in entry:
            return {tuple(int(x) for x in k.split(",")): c for k, c in entry["__poly__"].items()}
        return {k: decode(v) for k, v in entry.items()}
    if isinstance(entry, list):
        return [decode(v) for v in entry]
    return entry
