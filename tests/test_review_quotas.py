"""Review: the blob quota counts what the user holds now. A blob that expired (its
BLOB_TTL passed; fast-forwarded here with PEXPIRE) no longer counts, and uploading a blob
the user holds already adds nothing (a retried PUT whose first reply was lost)."""

from __future__ import annotations

import time

from coffea_hq import protocol

from .test_quotas import Limited, http, limited  # noqa: F401 (the module's fixture)


def test_an_expired_blob_no_longer_counts_against_the_quota(limited: Limited) -> None:  # noqa: F811
    token = limited.user()
    big = b"e" * 2500
    url = limited.url + protocol.BLOB.format(sha=protocol.blob_name(big))
    assert http("PUT", url, big, token, protocol.BLOB_CONTENT_TYPE)[0] == 201
    limited.redis.pexpire(limited.keys.blob(protocol.blob_name(big)), 1)  # its TTL ran out
    time.sleep(0.05)
    assert not limited.redis.exists(limited.keys.blob(protocol.blob_name(big)))
    more = b"n" * 1000
    more_url = limited.url + protocol.BLOB.format(sha=protocol.blob_name(more))
    status, _, reply = http("PUT", more_url, more, token, protocol.BLOB_CONTENT_TYPE)
    assert status == 201, reply


def test_putting_a_blob_the_user_holds_again_adds_nothing(limited: Limited) -> None:  # noqa: F811
    token = limited.user()
    big = b"r" * 2500
    url = limited.url + protocol.BLOB.format(sha=protocol.blob_name(big))
    assert http("PUT", url, big, token, protocol.BLOB_CONTENT_TYPE)[0] == 201
    status, _, reply = http("PUT", url, big, token, protocol.BLOB_CONTENT_TYPE)
    assert status == 201, reply
