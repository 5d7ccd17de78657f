"""Per-task software environments and data files, as the analysis names them.

>>> env = Environment.pixi("pixi.toml")                 # pixi.lock beside it
>>> env = Environment.pip(["coffea==2025.3.0", "correctionlib"])
>>> env = Environment.interpreter("/cvmfs/sft.cern.ch/lcg/views/LCG_106/x86_64-el9/bin/python")
>>> run = processor.Runner(executor=HQExecutor(url, environment=env, files=["corrections.json"]))

Each environment is a content-addressed spec (:class:`coffea_hq.messages.EnvironmentSpec`):
the sha256 of its canonical JSON names it, so workers build each one once and reuse it for
every job that names the same spec. Files travel as blobs too and appear under their
basename in the task's working directory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import msgspec

from . import protocol
from .messages import BoundFunction, EnvironmentSpec, ShippedFile

__all__ = ["Environment", "session_versions"]


@dataclass(frozen=True)
class Environment:
    """A software environment the tasks of a job run in, instead of the worker's own.

    Build one with :meth:`pixi`, :meth:`pixi_pack`, :meth:`pip` or :meth:`interpreter`.
    ``strict=True`` fails the tasks when the environment's python, cloudpickle, coffea,
    awkward, uproot or numpy version differs from this session's (default: a warning).
    The environment must provide ``cloudpickle`` (the task runner unpickles with it) and
    whatever the analysis imports; the worker adds nothing of its own.
    """

    spec: EnvironmentSpec
    strict: bool = False
    archive: bytes | None = field(default=None, repr=False)  # a pixi-pack tar's bytes

    @property
    def spec_bytes(self) -> bytes:
        """The canonical bytes of the spec (its blob)."""
        return msgspec.json.encode(self.spec)

    @property
    def sha(self) -> str:
        """The environment's content address: the sha256 of :attr:`spec_bytes`."""
        return protocol.blob_name(self.spec_bytes)

    @property
    def label(self) -> str:
        """How errors and logs name it: its name and the head of its hash."""
        return f"{self.spec.name or self.spec.kind} ({self.sha[:12]})"

    # ------------------------------------------------------------------ constructors

    @classmethod
    def pixi(
        cls, manifest: str | os.PathLike[str], environment: str = "default", strict: bool = False
    ) -> Environment:
        """A pixi environment: the manifest (``pixi.toml`` or ``pyproject.toml``) and the
        ``pixi.lock`` beside it, which the workers install exactly (``pixi install
        --frozen`` or py-rattler). ``environment`` names one of the manifest's."""
        path = Path(manifest)
        lock = path.with_name("pixi.lock")
        text = _read_text(path, "pixi manifest")
        if not lock.is_file():
            raise FileNotFoundError(
                f"Environment.pixi: no pixi.lock beside {path} (run `pixi lock` or "
                "`pixi install` there first: workers install exactly the locked packages)"
            )
        spec = EnvironmentSpec(
            kind="pixi",
            name=f"{path.parent.name or path.name}#{environment}",
            manifest=text,
            lock=_read_text(lock, "pixi lock file"),
            environment=environment,
        )
        return cls(spec, strict)

    @classmethod
    def pixi_pack(cls, archive: str | os.PathLike[str], strict: bool = False) -> Environment:
        """A pixi-pack archive (``environment.tar``), shipped as a blob and unpacked once
        per worker node."""
        path = Path(archive)
        if not path.is_file():
            raise FileNotFoundError(f"Environment.pixi_pack: no file {path}")
        data = path.read_bytes()
        spec = EnvironmentSpec(kind="pixi-pack", name=path.name, archive=protocol.blob_name(data))
        return cls(spec, strict, data)

    @classmethod
    def pip(
        cls,
        requirements: str | os.PathLike[str] | Sequence[str],
        *,
        find_links: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
        index: bool = True,
        python: str = "",
        strict: bool = False,
    ) -> Environment:
        """A virtual environment the workers make with uv: ``requirements`` is a list of
        requirement strings (``"coffea==2025.3.0"``), a requirements.txt file (hashes,
        ``--hash=sha256:...``, are enforced where given), or a ``uv.lock`` (exported here
        with ``uv export --frozen``, hashes included: uv must be installed in this
        session, ``coffea-hq[envs]``). ``find_links`` are wheel
        directories on the workers, ``index=False`` installs from those only (offline
        facilities; the worker's $HQ_PIP_FIND_LINKS and $HQ_PIP_NO_INDEX do the same for
        every environment). ``python`` asks uv for that interpreter version (default:
        the worker's own Python)."""
        if isinstance(requirements, (str, os.PathLike)):
            path = Path(requirements)
            if path.name == "uv.lock":
                text = _export_uv_lock(path)
            else:
                text = _read_text(path, "requirements file")
            # One requirement per logical line: pip-compile and uv export continue a
            # requirement's --hash options on the next lines with a backslash.
            lines = text.replace("\\\n", " ").splitlines()
            name = f"{path.parent.name}/{path.name}" if path.name == "uv.lock" else path.name
        else:
            lines = list(requirements)
            if not all(isinstance(r, str) for r in lines):
                raise TypeError("Environment.pip: requirements must be strings")
            name = f"pip[{len(lines)}]"
        lines = [
            line.strip() for line in lines if line.strip() and not line.strip().startswith("#")
        ]
        if not lines:
            raise ValueError("Environment.pip: no requirements given")
        links = [find_links] if isinstance(find_links, (str, os.PathLike)) else list(find_links)
        spec = EnvironmentSpec(
            kind="pip",
            name=name,
            requirements=lines,
            find_links=[os.fspath(p) for p in links],
            index=index,
            python=python,
        )
        return cls(spec, strict)

    @classmethod
    def interpreter(cls, path: str | os.PathLike[str], strict: bool = False) -> Environment:
        """An interpreter that exists on every worker (a CVMFS view, a facility's
        conda environment): used as it is, nothing installed."""
        text = os.fspath(path)
        if not os.path.isabs(text):
            raise ValueError(f"Environment.interpreter: {text!r} must be an absolute path")
        spec = EnvironmentSpec(kind="interpreter", name=os.path.basename(text), path=text)
        return cls(spec, strict)


def _export_uv_lock(lock: Path) -> str:
    """The pinned, hashed requirements of a uv project's lock (``uv export --frozen``)."""
    import shutil
    import subprocess

    try:
        from uv import find_uv_bin

        uv: str | None = str(find_uv_bin())
    except ImportError:
        uv = shutil.which("uv")
    if uv is None:
        raise ValueError(
            "Environment.pip: a uv.lock is exported with uv, which this session lacks "
            "(pip install coffea-hq[envs]); or pass `uv export --frozen > requirements.txt`"
        )
    if not lock.is_file():
        raise FileNotFoundError(f"Environment.pip: no file {lock}")
    argv = [uv, "export", "--frozen", "--no-emit-project", "--format", "requirements-txt"]
    done = subprocess.run(
        [*argv, "--quiet", "--project", str(lock.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise ValueError(f"Environment.pip: `uv export` of {lock} failed: {done.stderr.strip()}")
    return done.stdout


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the {what} {path}: {e.strerror or e}") from e


def session_versions() -> dict[str, str]:
    """The versions of :data:`coffea_hq.protocol.VERSION_CHECKED` in this session (those
    installed), compared on the workers with the environment's."""
    found = {"python": "{}.{}".format(*sys.version_info[:2])}
    for name in protocol.VERSION_CHECKED[1:]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


@dataclass
class Binding:
    """What a job with an environment or files uploads: the blobs it depends on (spec,
    archive, files) and, per function blob, the bound-function blob the job names."""

    blobs: list[bytes]
    bound: BoundFunction

    def bind(self, function_blob: bytes) -> bytes:
        """The bound-function blob for ``function_blob`` (uploaded with :attr:`blobs`)."""
        bound = msgspec.structs.replace(self.bound, function=protocol.blob_name(function_blob))
        return protocol.BOUND_FUNCTION_MAGIC + msgspec.json.encode(bound)


def binding(environment: Environment | None, files: Iterable[str | os.PathLike[str]]) -> Binding:
    """The :class:`Binding` of a job's ``environment=`` and ``files=`` (either may be
    empty). Raises ``ValueError``/``FileNotFoundError`` naming what is wrong."""
    if environment is not None and not isinstance(environment, Environment):
        raise TypeError(
            "environment= takes a coffea_hq.Environment (Environment.pixi, .pixi_pack, .pip "
            f"or .interpreter), not {type(environment).__name__}"
        )
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    blobs: list[bytes] = []
    shipped: list[ShippedFile] = []
    seen: dict[str, Path] = {}
    for entry in files:
        path = Path(entry)
        if not path.is_file():
            raise FileNotFoundError(f"files=: no file {path}")
        if path.name in seen:
            raise ValueError(
                f"files=: {seen[path.name]} and {path} have the same name, {path.name!r}: "
                "files appear under their basename in the task's working directory"
            )
        seen[path.name] = path
        data = path.read_bytes()
        blobs.append(data)
        shipped.append(ShippedFile(path.name, protocol.blob_name(data)))
    if len(shipped) > protocol.FILES_MAX:
        raise ValueError(f"files=: at most {protocol.FILES_MAX} files")
    bound = BoundFunction(function="0" * 64, files=shipped, versions=session_versions())
    if environment is not None:
        blobs.append(environment.spec_bytes)
        if environment.archive is not None:
            blobs.append(environment.archive)
        bound = msgspec.structs.replace(
            bound, environment=environment.sha, label=environment.label, strict=environment.strict
        )
    return Binding(blobs, bound)


@contextlib.contextmanager
def coffea_hq_by_value(on: bool) -> Iterator[None]:
    """With ``on``: pickle what refers to coffea_hq (the merge function, ``env=``'s
    wrapper) by value, since a task's environment need not have coffea_hq installed."""
    package = sys.modules[__package__ or "coffea_hq"]
    registered = on and package.__name__ not in cloudpickle.list_registry_pickle_by_value()
    if registered:
        cloudpickle.register_pickle_by_value(package)
    try:
        yield
    finally:
        if registered:
            cloudpickle.unregister_pickle_by_value(package)
