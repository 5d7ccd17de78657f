"""A local conda channel and a pixi.lock for it, built by the tests (conda channels are
unreachable from the test machines).

The channel holds hand-made packages: ``python`` (this platform; its ``bin/python`` is the
host interpreter made into a venv-style prefix by a ``pyvenv.cfg``, so it sees the prefix's
site-packages and none of the worker's), ``cloudpickle`` (noarch: python, built from the
cloudpickle this test run imports) and ``hqmarker`` (noarch: python, ``VALUE = 42``: a package
the worker's own venv does not have). The channel is indexed with py-rattler and the lock
file written by py-rattler (pixi.lock v6), so both are what pixi itself would read.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle

PLATFORM_TEMPLATE = """\
[workspace]
name = "hq-test"
channels = ["{channel}"]
platforms = ["{platform}"]

[dependencies]
python = "*"
cloudpickle = "*"
hqmarker = "*"
"""


@dataclass
class LocalChannel:
    """A built channel: its directory, its ``file://`` URL and the packages in it."""

    root: Path
    url: str
    platform: str
    packages: dict[str, Path] = field(default_factory=dict)  # name -> archive

    def manifest(self) -> bytes:
        """A pixi.toml naming this channel and the three packages."""
        return PLATFORM_TEMPLATE.format(channel=self.url, platform=self.platform).encode()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _tar_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = int(time.time())
    tar.addfile(info)


def build_package(
    directory: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    *,
    subdir: str = "noarch",
    noarch: str | None = "python",
    depends: list[str] | None = None,
    symlinks: dict[str, str] | None = None,
    executable: frozenset[str] = frozenset(),
) -> Path:
    """Write ``<directory>/<subdir>/<name>-<version>-0.tar.bz2``: a conda package with
    info/index.json, info/paths.json and ``files`` (paths relative to the prefix)."""
    index: dict[str, object] = {
        "name": name,
        "version": version,
        "build": "0",
        "build_number": 0,
        "depends": depends or [],
        "license": "BSD-3-Clause",
        "subdir": subdir,
        "timestamp": int(time.time() * 1000),
    }
    if noarch is not None:
        index["noarch"] = noarch
    else:
        arch = subdir.split("-", 1)
        index["platform"], index["arch"] = arch[0], {"64": "x86_64"}.get(arch[1], arch[1])
    paths: list[dict[str, object]] = [
        {
            "_path": path,
            "path_type": "hardlink",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_in_bytes": len(data),
        }
        for path, data in files.items()
    ]
    paths += [{"_path": path, "path_type": "softlink"} for path in symlinks or {}]
    out = directory / subdir / f"{name}-{version}-0.tar.bz2"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:bz2") as tar:
        _tar_add(tar, "info/index.json", json.dumps(index).encode())
        _tar_add(tar, "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
        for path, data in files.items():
            _tar_add(tar, path, data, 0o755 if path in executable else 0o644)
        for path, target in (symlinks or {}).items():
            _tar_symlink(tar, path, target)
    return out


def _python_package(directory: Path, platform: str) -> Path:
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    version = ".".join(map(str, sys.version_info[:3]))
    pyver = sysconfig.get_python_version()
    # A venv-style prefix: the host interpreter finds pyvenv.cfg beside bin/ and takes the
    # prefix's lib/pythonX.Y/site-packages as its only site directory.
    cfg = (
        f"home = {os.path.dirname(base)}\n"
        f"include-system-site-packages = false\nversion = {version}\n"
    )
    return build_package(
        directory,
        "python",
        version,
        {
            "pyvenv.cfg": cfg.encode(),
            f"lib/python{pyver}/site-packages/README.hq-test": b"site-packages of the test env\n",
        },
        subdir=platform,
        noarch=None,
        symlinks={"bin/python": base, "bin/python3": "python"},
    )


def _cloudpickle_package(directory: Path) -> Path:
    source = Path(cloudpickle.__file__).parent
    files = {
        f"site-packages/cloudpickle/{p.name}": p.read_bytes() for p in sorted(source.glob("*.py"))
    }
    return build_package(
        directory, "cloudpickle", cloudpickle.__version__, files, depends=["python"]
    )


def _marker_package(directory: Path) -> Path:
    files = {"site-packages/hqmarker/__init__.py": b'"""coffea-hq test marker."""\nVALUE = 42\n'}
    return build_package(directory, "hqmarker", "1.0", files, depends=["python"])


def build_channel(root: Path) -> LocalChannel:
    """Build and index the test channel in ``root`` (made if missing)."""
    from rattler.index import index_fs
    from rattler.platform import Subdir

    platform = str(Subdir.current())
    root.mkdir(parents=True, exist_ok=True)
    channel = LocalChannel(root=root, url=root.resolve().as_uri(), platform=platform)
    channel.packages["python"] = _python_package(root, platform)
    channel.packages["cloudpickle"] = _cloudpickle_package(root)
    channel.packages["hqmarker"] = _marker_package(root)
    asyncio.run(index_fs(root, write_zst=False, write_shards=False))
    return channel


def records(channel: LocalChannel, names: list[str] | None = None) -> list[object]:
    """The channel's RepoDataRecords (with their ``file://`` URLs), optionally only ``names``."""
    from rattler import Channel, RepoData

    found: list[object] = []
    for subdir in ("noarch", channel.platform):
        repodata = RepoData.from_path(channel.root / subdir / "repodata.json")
        found += repodata.into_repo_data(Channel(channel.url))
    return [r for r in found if names is None or r.name.normalized in names]  # type: ignore[attr-defined]


def write_lock(
    channel: LocalChannel,
    path: Path,
    *,
    environment: str = "default",
    names: list[str] | None = None,
    platform_name: str | None = None,
) -> Path:
    """Write a pixi.lock at ``path`` locking ``names`` (all three by default) from the channel
    for ``environment`` on this platform (or ``platform_name``), as py-rattler writes it (the
    newest lock format it knows)."""
    from rattler import LockChannel, LockFile, LockPlatform

    platform = LockPlatform(platform_name or channel.platform)
    lock = LockFile([platform])
    lock.set_channels(environment, [LockChannel(channel.url)])
    for record in records(channel, names):
        lock.add_conda_package(environment, platform, record)  # type: ignore[arg-type]
    lock.to_path(path)
    return path


def write_lock_v6(
    channel: LocalChannel,
    path: Path,
    *,
    environment: str = "default",
    names: list[str] | None = None,
) -> Path:
    """Write a pixi.lock in format version 6 (what pixi 0.40 and later write): the record's
    name, version and build are read from its URL, the rest listed beside it."""
    import yaml

    urls: list[str] = []
    packages: list[dict[str, object]] = []
    for record in records(channel, names):
        url = str(record.url)  # type: ignore[attr-defined]
        urls.append(url)
        entry: dict[str, object] = {
            "conda": url,
            "sha256": record.sha256.hex(),  # type: ignore[attr-defined]
            "md5": record.md5.hex(),  # type: ignore[attr-defined]
            "subdir": record.subdir,  # type: ignore[attr-defined]
        }
        if record.noarch.python:  # type: ignore[attr-defined]
            entry["noarch"] = "python"
        depends = list(record.depends)  # type: ignore[attr-defined]
        if depends:
            entry["depends"] = depends
        entry["license"] = record.license  # type: ignore[attr-defined]
        entry["size"] = record.size  # type: ignore[attr-defined]
        packages.append(entry)
    document = {
        "version": 6,
        "environments": {
            environment: {
                "channels": [{"url": channel.url + "/"}],
                "packages": {channel.platform: [{"conda": url} for url in urls]},
            }
        },
        "packages": packages,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def build_pixi_pack(channel: LocalChannel, out: Path, *, platform_name: str | None = None) -> Path:
    """A pixi-pack archive (format version 1) of the whole channel: ``pixi-pack.json``,
    ``environment.yml`` and ``channel/<subdir>/`` with the packages and their repodata.json."""
    import yaml

    platform = platform_name or channel.platform
    specs = [
        f"{r.name.normalized}={r.version}={r.build}"  # type: ignore[attr-defined]
        for r in records(channel)
    ]
    environment = {"channels": ["./channel"], "dependencies": specs}
    with tarfile.open(out, "w") as tar:
        _tar_add(tar, "pixi-pack.json", json.dumps({"version": "1", "platform": platform}).encode())
        _tar_add(tar, "environment.yml", yaml.safe_dump(environment).encode())
        for subdir in ("noarch", channel.platform):
            for item in sorted((channel.root / subdir).iterdir()):
                if item.name.endswith((".tar.bz2", ".conda")) or item.name == "repodata.json":
                    tar.add(item, f"channel/{subdir}/{item.name}")
    return out
