"""Shipping the user's own code with a coffea processor.

coffea's ``Runner`` pickles the processor by reference, so a worker without the user's
modules (``my_processor.py`` beside a notebook) cannot load it. :func:`ship_code` finds
those modules by reading the pickles (the closure's and the processor's inside it),
registers them with ``cloudpickle.register_pickle_by_value`` and pickles the processor
again, so their code travels with it.

>>> function, registered = ship_code(function, ["my_helpers"], auto=True)
>>> blob = protocol.cloud_dumps(function)    # then unregister ``registered``

Imports no coffea (the closure's processor is plain lz4-compressed cloudpickle).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import io
import os
import pickle
import site
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cloudpickle
import lz4.frame

from . import protocol

__all__ = ["EnvTask", "is_local_module", "referenced_modules", "ship_code", "with_env"]


# ---------------------------------------------------------------------- environment variables


class EnvTask:
    """``function`` run with environment variables ``env`` set in the task's process, and
    put back as they were afterwards: a slot subprocess serves other jobs too."""

    def __init__(self, function: Callable[..., Any], env: dict[str, str]) -> None:
        self.function = function
        self.env = env

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        try:
            return self.function(*args, **kwargs)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def forwarded_env(env: dict[str, str] | Iterable[str]) -> dict[str, str]:
    """``env`` as a dict of variables to set: a dict as given, or names whose values come
    from this process's ``os.environ``. Raises ``ValueError`` naming what is wrong."""
    if isinstance(env, str):
        raise ValueError(f"env= takes a dict or a list of variable names, not the string {env!r}")
    if isinstance(env, dict):
        pairs = dict(env)
    else:
        names = list(env)
        missing = [n for n in names if isinstance(n, str) and n not in os.environ]
        if missing:
            raise ValueError(
                f"env= names variables this session does not have: {', '.join(missing)} "
                "(set them, or pass a dict of values)"
            )
        pairs = {n: os.environ[n] for n in names if isinstance(n, str)}
        if len(pairs) != len(names):
            raise ValueError("env= names must be strings")
    for name, value in pairs.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ValueError(f"env= variable name {name!r} is not a valid name")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"env= value of {name} must be a string, got {value!r:.60}")
    if len(pairs) > protocol.ENV_MAX_VARS:
        raise ValueError(f"env= forwards at most {protocol.ENV_MAX_VARS} variables")
    if sum(len(k) + len(v) for k, v in pairs.items()) > protocol.ENV_MAX_BYTES:
        raise ValueError(f"env= forwards at most {protocol.ENV_MAX_BYTES} bytes of variables")
    return pairs


def with_env(
    function: Callable[..., Any], env: dict[str, str] | Iterable[str]
) -> Callable[..., Any]:
    """``function`` wrapped to run with ``env`` (see :func:`forwarded_env`) set."""
    pairs = forwarded_env(env)
    return EnvTask(function, pairs) if pairs else function


def ship_code(
    function: Callable[..., Any], modules: Sequence[str], auto: bool
) -> tuple[Callable[..., Any], list[str]]:
    """Make ``function`` carry the code of modules the workers may not have.

    Registers ``modules``, and with ``auto`` every local module (one that no installed
    distribution provides) the function or the processor inside it refers to, with
    ``cloudpickle.register_pickle_by_value``, and re-pickles the processor coffea's
    ``Runner`` already pickled by reference. Returns the function and the modules it
    registered, which the caller unregisters once it has pickled the function.
    """
    before = cloudpickle.list_registry_pickle_by_value()
    registered: list[str] = []

    def register(names: Iterable[str]) -> bool:
        new = [n for n in names if n not in before and n not in registered]
        for name in new:
            cloudpickle.register_pickle_by_value(importlib.import_module(name))
            registered.append(name)
        return bool(new)

    register(modules)
    # Always: coffea's Runner pickled the processor with plain cloudpickle, which names
    # by-value code "<dynamic-code>" (remote tracebacks would lose the user's files).
    function = _repickle_processor(function)
    for _ in range(8):  # code shipped by value may refer to more local modules
        if not auto:
            break
        try:
            local = {m for m in referenced_modules(function) if is_local_module(m)}
        except Exception as e:  # scanning is a convenience; the submission says what's wrong
            warnings.warn(
                f"HQExecutor could not look for local modules to ship: {e!r}", stacklevel=3
            )
            break
        if not register(local):
            break
        function = _repickle_processor(function)
    return function, registered


class _InProcessLoader(pickle.Unpickler):
    """Loads a cloudpickle made in this process without changing the classes inside it.

    cloudpickle hands a class pickled by value back as the very class it was pickled from
    (found by its tracker id), then sets its attributes again from the pickle: methods
    rebuilt with code named "<dynamic-code>" and a copy of their globals. That class is
    already what the pickle describes, and it is the user's: leave it as it is.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        tracked = getattr(cloudpickle.cloudpickle, "_DYNAMIC_CLASS_TRACKER_BY_ID", {})
        self._existing = {id(c) for c in list(tracked.values())}

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module == "cloudpickle.cloudpickle" and name == "_class_setstate":
            existing = self._existing

            def class_setstate(obj: Any, state: Any) -> Any:
                return obj if id(obj) in existing else found(obj, state)

            return class_setstate
        return found


class _ModuleRecorder(_InProcessLoader):
    """Loads a pickle and notes the top-level name of every module it refers to."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.modules: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.modules.add(module.partition(".")[0])
        found = super().find_class(module, name)
        if module.startswith("cloudpickle") and name == "subimport":
            # cloudpickle sends modules used by by-value code as subimport("name")
            def subimport(modname: str) -> Any:
                self.modules.add(modname.partition(".")[0])
                return found(modname)

            return subimport
        return found


def referenced_modules(function: Callable[..., Any]) -> set[str]:
    """Top-level modules that the pickled function and any processor inside refer to."""
    recorder = _ModuleRecorder(protocol.cloud_dumps(function))
    recorder.load()
    found = recorder.modules
    for data in _processor_blobs(function):
        recorder = _ModuleRecorder(lz4.frame.decompress(data))
        recorder.load()
        found |= recorder.modules
    return found


def _processor_blobs(function: Any) -> list[bytes]:
    """The pickled processors coffea's Runner put in the closure (``processor_instance``)."""
    if not isinstance(function, functools.partial):
        return []
    found = [function.keywords.get("processor_instance")]
    blobs = [b for b in found if isinstance(b, bytes)]
    for arg in function.args:
        blobs += _processor_blobs(arg)
    return blobs


def _repickle_processor(function: Any) -> Any:
    """The closure with its pickled processor pickled again, under the current registry and
    keeping the file names of by-value code (coffea's work function takes lz4 bytes)."""
    if not isinstance(function, functools.partial):
        return function
    keywords = dict(function.keywords)
    blob = keywords.get("processor_instance")
    if isinstance(blob, bytes):
        processor = _InProcessLoader(lz4.frame.decompress(blob)).load()
        keywords["processor_instance"] = lz4.frame.compress(
            protocol.cloud_dumps(processor), compression_level=1
        )
    args = [_repickle_processor(arg) for arg in function.args]
    return functools.partial(function.func, *args, **keywords)


@functools.cache
def _installed_names() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


@functools.cache
def _install_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    dirs += site.getsitepackages() + [site.getusersitepackages(), sys.prefix, sys.base_prefix]
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


def is_local_module(name: str) -> bool:
    """A module of the user's own (beside the notebook, on a PYTHONPATH), not installed."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return False
    if name == "__main__" or name in _installed_names():
        return False  # __main__ is shipped by value by cloudpickle already
    module = sys.modules.get(name)
    if module is None:
        return False
    files = [getattr(module, "__file__", None), *getattr(module, "__path__", [])]
    files = [os.path.realpath(f) for f in files if f]
    return bool(files) and not any(f.startswith(_install_dirs()) for f in files)
