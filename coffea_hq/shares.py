"""Leasing hints on the client side: which fair-share group a job is charged to, and the
locality key of each task.

Under ``hq-server --auth`` the server charges a job to its user and ignores what the
client says. In open mode it charges the job to the label the client sends: the
``share=`` argument, else ``$HQ_USER``, else the login name.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re

from . import protocol

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def share_name(name: str | None = None) -> str:
    """The fair-share group for ``name`` (``None``: ``$HQ_USER`` or the login name), with
    characters a group name may not hold replaced by ``_``."""
    if name is None:
        name = os.environ.get("HQ_USER") or ""
        if not name:
            try:
                name = getpass.getuser()
            except (KeyError, OSError):  # no login name (a container's bare uid)
                name = ""
    return _UNSAFE.sub("_", name)[: protocol.ID_MAX_LENGTH]


def locality_key(name: str | None) -> str:
    """A task's locality key on the wire: a short digest of ``name`` (a file's path or
    uuid; the server compares keys, nothing more), '' for None."""
    if not name:
        return ""
    return hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
