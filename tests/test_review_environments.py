"""Adversarial review of shipped files: a file name in a job's bound function that is not
a plain basename (hand-made, not from ``files=``) is refused when decoded."""

from __future__ import annotations

import msgspec
import pytest

from coffea_hq import messages, protocol

BLOB = protocol.blob_name(b"x")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../etc", "", "a\x00b"])
def test_a_shipped_file_name_that_is_not_a_basename_is_refused(name: str) -> None:
    doc = msgspec.json.encode({"function": BLOB, "files": [[name, BLOB]]})
    with pytest.raises(msgspec.ValidationError, match="files"):
        msgspec.json.decode(doc, type=messages.BoundFunction)


@pytest.mark.parametrize("name", ["a.root", "..hidden", ".env", "x..y"])
def test_plain_names_with_dots_are_kept(name: str) -> None:
    doc = msgspec.json.encode({"function": BLOB, "files": [[name, BLOB]]})
    assert msgspec.json.decode(doc, type=messages.BoundFunction).files[0].name == name
