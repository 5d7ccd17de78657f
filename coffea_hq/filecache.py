"""ROOT files kept open across the chunks a slot subprocess runs.

coffea's work function opens each chunk's file with ``uproot.open`` and closes it when
the chunk is done, so every chunk pays again for the file's header, directory,
streamers and the ``TTree`` metadata (uproot keeps those in the open file's object
cache). A slot subprocess runs many chunks of one job, mostly of the same few files:
:class:`KeepFilesOpen`, the wrapper ``HQExecutor`` puts around coffea's work function,
routes those opens through a small per-process :class:`FileCache` instead. The chunk
still reads exactly its own entry range, so the outputs are the same.

Files on a local or mounted file system (a plain path) are opened with uproot's plain
file source, reading in the calling thread, unless the analysis chose a ``handler``:
uproot's default for them goes through fsspec and a background thread for every basket
request, which cost the AGC analysis 15% of its CPU time per chunk. The bytes read are the
same. Remote files (``root://``, ``https://``) keep uproot's own choice.

uproot keeps the baskets it read in each open file's array cache (up to 100 MB, freed
when coffea closes the file after the chunk). Only the file the current chunk reads keeps
them, so its next chunk gets the basket two chunks share without reading it again; coffea's
``bytesread`` counts what each chunk really read, less than when every chunk reopens.

The cache lives only in the slot subprocess (the analysis session's own ``uproot`` is
never touched): it is keyed by the file name(s) and every open option, holds at most
:data:`FILES_KEPT` files (the least recently used one is closed first), and its files
are closed when the subprocess ends, which it does before it serves another job.
"""

from __future__ import annotations

import atexit
import contextlib
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["FILES_KEPT", "FileCache", "KeepFilesOpen"]

FILES_KEPT = 8  # open files per slot subprocess: each holds a descriptor and some metadata


class _Kept:
    """What the cached ``uproot.open`` returns: ``with`` gives the open directory and
    leaves it open for the next chunk, unless the chunk failed."""

    __slots__ = ("directory", "cache", "key")

    def __init__(self, directory: Any, cache: FileCache, key: str) -> None:
        self.directory = directory
        self.cache = cache
        self.key = key

    def __enter__(self) -> Any:
        return self.directory

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            # The file may be what failed (a lost connection, a bad read): coffea's retry
            # of this chunk, and the next chunk, open it afresh, as coffea itself would.
            self.cache.drop(self.key)
        return None


class FileCache:
    """Open uproot directories by (files, options), at most ``size`` of them."""

    def __init__(self, open_function: Callable[..., Any], size: int = FILES_KEPT) -> None:
        self._open_function = open_function
        self.size = size
        self._open: OrderedDict[str, Any] = OrderedDict()
        self.opened = 0  # files really opened (misses), for tests and profiles
        self.reused = 0
        self._own_arrays: set[str] = set()  # files whose array cache uproot made for them
        self._last: str | None = None

    def _forget_arrays_but(self, key: str) -> None:
        """Empty the array caches of the kept files other than ``key``'s. uproot keeps up
        to 100 MB of baskets per open file, which coffea frees with the file after each
        chunk; a slot holding :data:`FILES_KEPT` files must not hold that for each of them
        (a chunk's memory limit counts it). The current file's baskets stay: the next
        chunk of the same file reads the basket it shares with this one from there."""
        if key == self._last:
            return
        self._last = key
        for other in self._own_arrays:
            if other != key and other in self._open:
                _clear_arrays(self._open[other])

    def open(self, files: Any, **options: Any) -> Any:
        key = _key(files, options)
        if key is None:  # a file object or something else without a stable name
            return self._open_function(files, **options)
        self._forget_arrays_but(key)
        directory = self._open.get(key)
        if directory is not None and not _closed(directory):
            self._open.move_to_end(key)
            self.reused += 1
            # coffea reports a chunk's bytesread from the source's counter: count from
            # here (a file opened for this chunk counts its opening too, as in coffea).
            source = getattr(getattr(directory, "file", None), "source", None)
            if source is not None and hasattr(source, "_num_requested_bytes"):
                source._num_requested_bytes = 0
            return _Kept(directory, self, key)
        directory = self._open_function(files, **_local_source(files, options))
        self.opened += 1
        self._open[key] = directory
        if "array_cache" not in options:  # the analysis's own cache is left as it is
            self._own_arrays.add(key)
        while len(self._open) > self.size:
            self.drop(next(iter(self._open)))  # the least recently used
        return _Kept(directory, self, key)

    def drop(self, key: str) -> None:
        """Close the file held under ``key``, if any: the next open of it opens it again."""
        directory = self._open.pop(key, None)
        self._own_arrays.discard(key)
        if directory is not None:
            _close(directory)

    def close(self) -> None:
        """Close every file held."""
        while self._open:
            _close(self._open.popitem()[1])
        self._own_arrays.clear()
        self._last = None

    def __len__(self) -> int:
        return len(self._open)


def _key(files: Any, options: dict[str, Any]) -> str | None:
    if isinstance(files, dict):
        if not all(isinstance(f, str) for f in files):
            return None
        names = repr(sorted((f, repr(t)) for f, t in files.items()))
    elif isinstance(files, str):
        names = files
    else:
        return None
    return names + "\0" + repr(sorted(options.items()))


def _local_source(files: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options``, with uproot's plain file source for plain paths if none was chosen."""
    if "handler" in options:
        return options
    names = list(files) if isinstance(files, dict) else [files]
    if not names or any("://" in name for name in names):
        return options
    import uproot.source.file

    return {
        "use_threads": False,  # a slot runs one chunk at a time: no thread to hand reads to
        **options,  # unless the analysis asked for threads
        "handler": uproot.source.file.MultithreadedFileSource,
    }


def _closed(directory: Any) -> bool:
    file = getattr(directory, "file", None)
    return bool(getattr(file, "closed", False))


def _clear_arrays(directory: Any) -> None:
    arrays = getattr(getattr(directory, "file", None), "array_cache", None)
    if arrays is not None:
        arrays.clear()


def _close(directory: Any) -> None:
    with contextlib.suppress(Exception):  # a file already gone: nothing left to free
        directory.close()


class _UprootWithCache(types.ModuleType):
    """Stands for ``uproot`` inside coffea's executor module: ``open`` goes through the
    cache, every other name is uproot's own."""

    def __init__(self, uproot: types.ModuleType, cache: FileCache) -> None:
        super().__init__(uproot.__name__)
        self._uproot = uproot
        self.open = cache.open

    def __getattr__(self, name: str) -> Any:
        return getattr(self._uproot, name)


_CACHE: FileCache | None = None


def install(size: int = FILES_KEPT) -> FileCache:
    """Route coffea's per-chunk ``uproot.open`` through this process's cache (once)."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    import uproot
    from coffea.processor import executor as coffea_executor

    from . import formcache

    cache = FileCache(uproot.open, size)
    coffea_executor.uproot = _UprootWithCache(uproot, cache)
    formcache.install()  # a file's NanoEvents form, built once here too
    atexit.register(cache.close)
    _CACHE = cache
    return cache


def cache() -> FileCache | None:
    """This process's cache, if :func:`install` ran here."""
    return _CACHE


class KeepFilesOpen:
    """``function`` (coffea's work function), run with the file cache installed in the
    process that calls it. Picklable: it travels to the workers as the job's function."""

    def __init__(self, function: Callable[..., Any], size: int = FILES_KEPT) -> None:
        self.function = function
        self.size = size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        install(self.size)
        return self.function(*args, **kwargs)
