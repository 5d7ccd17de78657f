"""The OpenAPI 3.1 document of the HTTP API, generated from :data:`coffea_hq.routes.ROUTES`
and the message types of :mod:`coffea_hq.messages` (never written by hand).

``hq-server`` serves it at ``GET /api/v1/openapi.json``; ``python -m coffea_hq.openapi``
prints it.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Final

import msgspec

from . import protocol
from .protocol import (
    BLOB_CONTENT_TYPE,
    EVENTS_CONTENT_TYPE,
    FRAMES_CONTENT_TYPE,
    PRESENCE_CONTENT_TYPE,
    Role,
)
from .routes import (
    PATH_PARAMETERS,
    ROUTES,
    Bytes,
    Frames,
    Json,
    Lines,
    Reply,
    Route,
    Text,
    replies,
)

__all__ = ["document", "FRAMES_DESCRIPTION"]

REF: Final = "#/components/schemas/{name}"

FRAMES_DESCRIPTION: Final = (
    "Binary frames: a u32 big-endian length N, then N bytes of UTF-8 JSON (the header, "
    "an object of the schema named below, always with 'sizes': the byte length of each "
    "part, in order), then the parts back to back. The body ends exactly after the last "
    "part: its length is 4 + N + sum(sizes). See docs/api.md, 'Binary frames'."
)

BEARER: Final = "bearer"

TAGS: Final = [
    {"name": "service", "description": "Health, the queue's state, workers, this document."},
    {"name": "blobs", "description": "Content-addressed pickled functions and reducers."},
    {"name": "jobs", "description": "What a client does: create, submit, seal, read results."},
    {"name": "workers", "description": "What a worker does: lease, complete, release, beat."},
]


def _types() -> list[Any]:
    """Every message type the routes name, once, in table order."""
    seen: dict[Any, None] = {}
    for route in ROUTES:
        for body in [route.body, *(r.body for r in replies(route))]:
            if isinstance(body, Json):
                seen[body.type] = None
            elif isinstance(body, Frames):
                seen[body.header] = None
            elif isinstance(body, Lines) and body.type is not None:
                seen[body.type] = None
    return list(seen)


def _content(body: Json | Frames | Bytes | Lines | Text, schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, Json):
        return {"application/json": {"schema": schema}}
    if isinstance(body, Frames):
        header = schema["$ref"].rsplit("/", 1)[-1]
        binary = {
            "type": "string",
            "format": "binary",
            "description": f"{FRAMES_DESCRIPTION} Header: {header}. Parts: {body.parts}.",
        }
        return {FRAMES_CONTENT_TYPE: {"schema": binary, "x-hq-frame-header": schema}}
    if isinstance(body, Text) and body.media_type == EVENTS_CONTENT_TYPE:
        # A stream's schema describes each of its events (as OpenAPI 3.2 has it).
        field = {"type": "string"}
        event = {
            "type": "object",
            "description": body.what,
            "properties": {
                "data": field,
                "event": field,
                "id": field,
                "retry": {"type": "integer"},
            },
        }
        return {body.media_type: {"schema": event}}
    if isinstance(body, Text):
        return {body.media_type: {"schema": {"type": "string", "description": body.what}}}
    if isinstance(body, Lines):
        text = {"type": "string", "description": f"Newline-delimited JSON: {body.what}."}
        line = {"x-hq-line": schema} if schema else {}
        return {PRESENCE_CONTENT_TYPE: {"schema": text, **line}}
    return {
        BLOB_CONTENT_TYPE: {
            "schema": {"type": "string", "format": "binary", "description": body.what}
        }
    }


def _links(route: Route) -> dict[str, Any]:
    """Every other operation on the same job follows from this one (for stateful testing
    and readers: create -> submit -> seal -> results)."""
    if "job" not in route.path_parameters:
        return {}
    return {
        other.operation: {
            "operationId": other.operation,
            "parameters": {"job": "$request.path.job"},
        }
        for other in ROUTES
        if other is not route and "job" in other.path_parameters
    }


def _operation(route: Route, schema_of: dict[Any, dict[str, Any]], auth: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation,
        "summary": route.summary,
        "tags": [route.tag],
    }
    if auth:
        op["security"] = [] if route.roles is None else [{BEARER: []}]
        if route.roles is not None:
            op["x-hq-roles"] = sorted({*route.roles, Role.ADMIN})
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": msgspec.json.schema(PATH_PARAMETERS[name]),
        }
        for name in route.path_parameters
    ]
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
            "schema": msgspec.json.schema(q.type),
        }
        for q in route.query
    ]
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": _body(route.body, schema_of)}
    responses: dict[str, Any] = {}
    for reply in replies(route, auth):
        responses[str(reply.status)] = _response(route, reply, schema_of)
    op["responses"] = responses
    return op


def _body(
    body: Json | Frames | Bytes | Lines | Text, schema_of: dict[Any, dict[str, Any]]
) -> dict[str, Any]:
    if isinstance(body, Json):
        return _content(body, schema_of[body.type])
    if isinstance(body, Frames):
        return _content(body, schema_of[body.header])
    if isinstance(body, Lines) and body.type is not None:
        return _content(body, schema_of[body.type])
    return _content(body, {})


def _response(route: Route, reply: Reply, schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": reply.description}
    if reply.body is not None and route.method != "HEAD":
        doc["content"] = _body(reply.body, schema_of)
    if 200 <= reply.status < 300 and (links := _links(route)):
        doc["links"] = links
    return doc


def _ecma(node: Any) -> Any:
    """JSON Schema patterns are ECMA-262 regexes, whose ``$`` is Python's ``\\Z``."""
    if isinstance(node, dict):
        return {k: v.replace("\\Z", "$") if k == "pattern" else _ecma(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_ecma(v) for v in node]
    return node


@functools.cache
def _document(auth: bool) -> bytes:
    types = _types()
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schema_of, auth)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "coffea-hq",
            "version": protocol.package_version(),
            "summary": "A pull-based task queue for coffea analyses.",
            "description": (
                "Clients create jobs and read their results; workers lease tasks and report "
                "them. Binary payloads travel as application/x-hq-frames bodies. "
                "docs/api.md has the whole contract in prose."
            ),
        },
        "tags": TAGS,
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": (
                    "An access token made by `coffea-hq token create` (hq-server --auth): "
                    "user tokens create jobs and reach their own jobs only, worker tokens "
                    "lease and report, admin tokens everything. x-hq-roles on each "
                    "operation names the roles it admits."
                ),
            }
        }
    return msgspec.json.encode(_ecma(doc))


def document(auth: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a fresh JSON object: of a server with ``--auth`` (bearer
    tokens, 401/403 answers) or without (open mode: no security)."""
    return json.loads(_document(auth))


def encoded(auth: bool = True) -> bytes:
    """The document as JSON bytes (what a server serves; computed once per mode)."""
    return _document(auth)


def _body_name(body: Json | Frames | Bytes | Lines | Text | None) -> str:
    if body is None:
        return "-"
    if isinstance(body, Json):
        name = getattr(body.type, "__name__", "object")
        return f"`{name}`" if name != "dict" else "JSON object"
    if isinstance(body, Frames):
        return f"frames: `{body.header.__name__}` + parts"
    if isinstance(body, Lines):
        return f"lines: `{body.type.__name__}`" if body.type is not None else "lines"
    if isinstance(body, Text):
        return "text"
    return "bytes"


def route_table_markdown() -> str:
    """The route table as the markdown table docs/api.md carries (a test keeps them equal)."""
    lines = [
        "| Method | Path | Operation | Request body | Replies |",
        "|---|---|---|---|---|",
    ]
    for route in ROUTES:
        answers = ", ".join(
            f"{r.status} {_body_name(r.body) if r.body is not None else '(empty)'}"
            for r in replies(route)
        )
        query = "?" + "&".join(f"{q.name}=" for q in route.query) if route.query else ""
        lines.append(
            f"| {route.method} | `{route.path}{query}` | `{route.operation}` | "
            f"{_body_name(route.body)} | {answers} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(route_table_markdown())
    else:
        sys.stdout.write(json.dumps(document(), indent=2) + "\n")
