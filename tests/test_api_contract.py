"""The HTTP API is a published contract: the OpenAPI document is valid, generated from the
route table the server registers, served, matched by docs/api.md; and a real hq-server,
fuzzed by schemathesis against it (every operation, good and bad input, stateful
chains, binary frames from our own strategy), never answers 5xx, always answers as the
document says, and a job in flight meanwhile still completes exactly once per task.
"""

from __future__ import annotations

import json
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import cloudpickle
import hypothesis
import hypothesis.errors
import jsonschema
import pytest
import schemathesis
from coffea_hq.server import app as server_app
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from openapi_spec_validator import validate as validate_spec

from coffea_hq import Client, openapi, protocol, routes
from coffea_hq import messages as m

from .conftest import Processes
from .test_auth import AuthServer, auth_server  # noqa: F401  (the --auth server fixture)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parent.parent
IDS = st.from_regex(r"\A[A-Za-z0-9_.\-]{1,8}\Z")
LONG_POLL_CAP = 0.2  # fuzzed long polls wait at most this long (the document allows 60 s)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


# ---------------------------------------------------------------------- the document


def test_the_document_is_valid_openapi_and_the_server_serves_it(
    embedded_store: Any, processes: Processes, prefix: str
) -> None:
    server_url, _ = processes.server(embedded_store.url, prefix=prefix)
    doc = openapi.document(auth=False)  # this server runs without --auth
    validate_spec(doc)  # raises with the offending path if the document is not OpenAPI 3.1
    validate_spec(openapi.document(auth=True))
    status, body = get(server_url + protocol.OPENAPI)
    assert status == 200 and json.loads(body) == doc
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == {(r.method, r.path) for r in routes.ROUTES}
    assert len({r.operation for r in routes.ROUTES}) == len(routes.ROUTES)


def test_the_server_refuses_a_route_table_and_handlers_that_disagree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp import web

    handlers = dict(server_app.HANDLERS)
    del handlers["seal_job"]
    handlers["stray"] = server_app.health
    monkeypatch.setattr(server_app, "HANDLERS", handlers)
    with pytest.raises(RuntimeError, match=r"without a handler: \['seal_job'\].*\['stray'\]"):
        server_app.add_routes(web.Application().router)


def test_docs_api_md_lists_exactly_the_route_table() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    table = openapi.route_table_markdown()
    assert table in text, (
        "docs/api.md's route table is not the route table: paste the output of "
        "`python -m coffea_hq.openapi --markdown` between its route-table markers"
    )


# ---------------------------------------------------------------------- binary frames


def frame(header: bytes, parts: list[bytes]) -> bytes:
    return struct.pack("!I", len(header)) + header + b"".join(parts)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """application/x-hq-frames bodies: well-formed frames with plausible and random
    headers, and ones that lie (header lengths, part sizes) or are cut short."""
    n = draw(st.integers(0, 4))
    parts = [draw(st.binary(max_size=64)) for _ in range(n)]
    ids = [draw(IDS) for _ in range(n)]
    item = st.tuples(
        IDS,
        IDS,
        st.integers(-1, 3),
        st.sampled_from(["ok", "error", "crashed", "weird"]),
        st.one_of(
            st.none(),
            st.fixed_dictionaries({"type": st.text(max_size=8), "message": st.text(max_size=8)}),
        ),
    ).map(list)
    header: Any = draw(
        st.one_of(
            st.fixed_dictionaries({"tasks": st.just(ids)}),
            st.fixed_dictionaries({"worker": IDS, "items": st.lists(item, min_size=n, max_size=n)}),
            st.dictionaries(st.text(max_size=6), st.recursive(st.none(), st.lists, max_leaves=4)),
            st.recursive(st.integers() | st.text(max_size=4), st.lists, max_leaves=6),
        )
    )
    lie = draw(
        st.sampled_from(["none", "none", "sizes", "header-length", "truncate", "bytes", "nest"])
    )
    if isinstance(header, dict) and draw(st.integers(0, 3)) != 3:  # mostly with sizes
        header["sizes"] = [len(p) for p in parts]
        if lie == "sizes":  # parts that do not add up to the body
            header["sizes"].append(draw(st.integers(1, 1 << 40)))
    encoded = json.dumps(header).encode()
    body = frame(encoded, parts)
    if lie == "header-length":
        delta = draw(st.integers(-len(encoded), 1 << 20))
        body = struct.pack("!I", max(0, len(encoded) + delta)) + body[4:]
    elif lie == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif lie == "bytes":
        body = draw(st.binary(max_size=32))
    elif lie == "nest":
        body = frame(b"[" * 5000 + b"]" * 5000, [])
    return body


schemathesis.openapi.media_type(protocol.FRAMES_CONTENT_TYPE, frames())


@st.composite
def presence_lines(draw: st.DrawFn) -> bytes:
    """application/x-ndjson presence bodies: a hello (well-formed or not), keep-alive empty
    lines, goodbyes of this or another session, and junk; the stream ends with the body."""
    hello = st.fixed_dictionaries(
        {"worker": IDS, "session": IDS}, optional={"bye": st.booleans()}
    ).map(lambda d: json.dumps(d).encode())
    junk = st.one_of(
        st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"")),
        st.just(b"[" * 5000),
        st.dictionaries(st.text(max_size=6), st.integers()).map(lambda d: json.dumps(d).encode()),
    )
    lines = draw(st.lists(st.one_of(hello, junk, st.just(b"")), min_size=1, max_size=5))
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))


schemathesis.openapi.media_type(protocol.PRESENCE_CONTENT_TYPE, presence_lines())


# ---------------------------------------------------------------------- fuzzing


FUZZ_JOBS = ("fz0", "fz1", "fz2")  # valid job ids are steered to these, so they meet state
FUZZ_BLOB = b"not a function: tasks of fuzzed jobs fail on the worker"
# Jobs the fuzzer must not touch: the job in flight whose exact completion the test checks.
# (The stateful phase follows GET JOBS's job ids into DELETE and cancel.)
WITNESS_JOBS: set[str] = set()


def _steer(case: schemathesis.Case) -> None:
    """Fuzzed long polls would wait up to a minute each: keep valid waits valid, but short.
    Valid job ids and blob names rarely name anything: point most at a few that exist."""
    body: Any = case.body
    for holder in (case.query, body):
        if isinstance(holder, dict):
            wait = holder.get("wait")
            number = isinstance(wait, int | float) and not isinstance(wait, bool)
            if number and LONG_POLL_CAP < float(wait) <= protocol.LONG_POLL_MAX:  # type: ignore[arg-type]
                holder["wait"] = LONG_POLL_CAP
    count = case.query.get("count") if isinstance(case.query, dict) else None
    if isinstance(count, int) and not isinstance(count, bool) and 1 < count <= protocol.EVENTS_MAX:
        case.query["count"] = 1  # (one event at once, not a stream of minutes)
    job = (case.path_parameters or {}).get("job")
    if isinstance(job, str) and protocol.valid_id(job) and (len(job) % 4 or job in WITNESS_JOBS):
        # (DELETE gets jobs of its own, or it would leave the later operations none.)
        pool = ("fzd",) if case.method == "DELETE" else FUZZ_JOBS
        case.path_parameters["job"] = pool[len(job) % len(pool)]
    function = body.get("function") if isinstance(body, dict) else None
    if isinstance(function, str) and protocol.valid_blob_name(function):
        body["function"] = protocol.blob_name(FUZZ_BLOB)


FRAME_REPLIES_CHECKED: Tally[str] = Tally()


def frame_headers_conform(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """schemathesis sees frames as opaque bytes: check that the body is well-formed frames
    and that its header is what the document's x-hq-frame-header names."""
    if response.headers.get("content-type", [""])[0] != protocol.FRAMES_CONTENT_TYPE:
        return
    doc = openapi.document()
    path = doc["paths"][case.operation.path][case.method.lower()]
    media = path["responses"][str(response.status_code)]["content"][protocol.FRAMES_CONTENT_TYPE]
    header, parts = protocol.unpack(response.content)  # raises FrameError if malformed
    assert header["sizes"] == [len(p) for p in parts]
    schema = {**media["x-hq-frame-header"], "components": doc["components"]}
    jsonschema.validate(header, schema, cls=jsonschema.Draft202012Validator)
    FRAME_REPLIES_CHECKED[case.operation.label] += 1


def fuzz(url: str, examples: int, seed: int) -> Tally[str]:
    """Every operation with good and bad input, then stateful chains; raises on any
    failed check (a 5xx, an undocumented status, a body not as documented, bad input
    taken). Returns the number of requests sent, by status class."""
    schema = schemathesis.openapi.from_dict(openapi.document(auth=False))  # an open server
    with urllib.request.urlopen(
        urllib.request.Request(
            url + protocol.BLOB.format(sha=protocol.blob_name(FUZZ_BLOB)),
            data=FUZZ_BLOB,
            method="PUT",
        ),
        timeout=10,
    ) as r:
        assert r.status == 201
    sent: Tally[str] = Tally()
    excluded = [
        # Good input may still be refused for the state it meets (no such job, blob).
        schemathesis.checks.positive_data_acceptance,
    ]

    def call(case: schemathesis.Case) -> Any:
        _steer(case)
        response = case.call_and_validate(
            base_url=url, excluded_checks=excluded, additional_checks=[frame_headers_conform]
        )
        sent[f"{response.status_code // 100}xx"] += 1
        return response

    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # (the document is valid)
        began = time.monotonic()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if protocol.FRAMES_CONTENT_TYPE not in str(operation.definition.raw.get("requestBody")):
            # Bad frames come from frames(), which makes them faster than negative mode.
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings
            @hypothesis.seed(seed)
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case: schemathesis.Case) -> None:
                call(case)

            try:
                one()
            except hypothesis.errors.Unsatisfiable:
                # Nothing of an operation without parameters or body can be made invalid.
                if mode is schemathesis.GenerationMode.POSITIVE:
                    raise
        print(f"{operation.label}: {time.monotonic() - began:.2f} s, {sum(sent.values())}")

    machine = schema.as_state_machine()

    class Stateful(machine):  # type: ignore[misc, valid-type]
        def before_call(self, case: schemathesis.Case) -> None:
            _steer(case)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": url}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            sent[f"{response.status_code // 100}xx"] += 1

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(
                response, excluded_checks=excluded, additional_checks=[frame_headers_conform]
            )

    Stateful.run(
        settings=hypothesis.settings(
            max_examples=max(2, examples // 2),
            stateful_step_count=6,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
    )
    return sent


def slow_square(x: int) -> int:
    time.sleep(0.1)  # 40 of them on one slot outlast the default fuzz run
    return x * x


def wait_finished(job: Any, timeout: float) -> dict[str, Any]:
    """The job's summary once it has finished (read before result(), which deletes it)."""
    deadline = time.monotonic() + timeout
    while (summary := job.status())["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    return summary


def _counters(client: Client) -> dict[str, int]:
    return client.queue()["counters"]


def _fuzz_a_server_with_a_job_in_flight(
    processes: Processes, redis_url: str, prefix: str, examples: int, tasks: int
) -> Tally[str]:
    url, server = processes.server(redis_url, "--lease-timeout", "3", prefix=prefix)
    processes.worker(url, "--slots", "1")
    with Client(url) as client:
        before = _counters(client)
        job = client.map(slow_square, range(tasks))
        WITNESS_JOBS.add(job.id)
        started = time.monotonic()
        sent = fuzz(url, examples, seed=18)
        took = time.monotonic() - started
        summary = wait_finished(job, 60)
        assert job.result(timeout=60) == [x * x for x in range(tasks)]
        after = _counters(client)
        assert server.poll() is None, "the server died under fuzzing"
        assert client.health()["store"] == "ok"
    # The server's own accounting: every task of the job accepted exactly once.
    assert summary["state"] == "done" and summary["done"] == tasks and summary["failed"] == 0
    assert after["tasks_ok"] - before["tasks_ok"] == tasks
    total = sum(sent.values())
    print(f"fuzzed {total} requests in {took:.1f} s: {dict(sent)}")
    assert sent["5xx"] == 0 and total >= examples
    assert len(FRAME_REPLIES_CHECKED) == 2, FRAME_REPLIES_CHECKED  # results and lease replies
    return sent


def test_fuzzing_the_api_finds_no_5xx_and_a_job_in_flight_completes_exactly(
    embedded_store: Any, processes: Processes, prefix: str
) -> None:
    # (One store by default; the slow run below covers both.)
    _fuzz_a_server_with_a_job_in_flight(processes, embedded_store.url, prefix, examples=6, tasks=40)


@pytest.mark.slow
def test_fuzzing_the_api_at_length(store: Any, processes: Processes, prefix: str) -> None:
    _fuzz_a_server_with_a_job_in_flight(processes, store.url, prefix, examples=60, tasks=200)


def test_frames_strategy_makes_both_good_and_lying_bodies() -> None:
    """The custom strategy reaches well-formed frames and each kind of malformed one."""
    kinds: Tally[str] = Tally()

    @hypothesis.settings(max_examples=150, database=None, deadline=None, derandomize=True)
    @given(frames())
    def sample(body: bytes) -> None:
        try:
            header, _ = protocol.unpack(body)
            kinds["tasks" if "tasks" in header else "items" if "items" in header else "other"] += 1
        except protocol.FrameError as e:
            kinds[str(e).split(":")[0]] += 1

    sample()
    assert kinds["tasks"] and kinds["items"] and kinds["frame header length exceeds the body"]
    assert kinds["part sizes do not add up to the body length"]


# ---------------------------------------------------------------------- the lease chain


def call(method: str, url: str, body: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
    """One raw request; the status and body whatever the status."""
    headers = {"Content-Type": ctype} if ctype else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class LeaseChain(RuleBasedStateMachine):
    """create -> submit -> seal -> lease -> complete/release by one worker, through the
    raw API, with right and wrong attempts and resent reports: every status the server
    answers is the one its accounting says it must, and the job's counts follow."""

    url = ""
    SENT: Tally[str] = Tally()  # requests by route and status, over all examples
    TASKS = [f"t{i}" for i in range(8)]
    WORKER = "chain-worker"

    def __init__(self) -> None:
        super().__init__()
        self.job = "chain" + uuid.uuid4().hex[:8]
        self.submitted: set[str] = set()
        self.sealed = False
        self.held: dict[str, int] = {}  # task -> attempt leased to WORKER
        self.reported: dict[str, int] = {}  # task -> attempt whose report was accepted
        sha = protocol.blob_name(FUZZ_BLOB)
        assert call("PUT", self.url + protocol.BLOB.format(sha=sha), FUZZ_BLOB)[0] == 201
        spec = m.CreateJob(function=sha, fail_fast=False, max_attempts=5)
        status, _ = call("PUT", self.url + protocol.JOB.format(job=self.job), m.encode(spec))
        assert status == 200

    def _post(self, path: str, body: bytes, frames: bool = False) -> tuple[int, bytes]:
        ctype = protocol.FRAMES_CONTENT_TYPE if frames else "application/json"
        status, reply = call("POST", self.url + path.format(job=self.job), body, ctype)
        assert status < 500, reply
        self.SENT[f"{path.rsplit('/', 1)[-1]} {status}"] += 1
        return status, reply

    @rule(tasks=st.lists(st.sampled_from(TASKS), unique=True, max_size=4))
    def submit(self, tasks: list[str]) -> None:
        header = m.SubmitTasks(tasks=tasks)
        status, reply = self._post(
            protocol.JOB_TASKS, protocol.pack(header, [b"p"] * len(tasks)), True
        )
        new = set(tasks) - self.submitted
        finished = self.sealed and len(self.reported) == len(self.submitted)
        if finished or (self.sealed and new):  # a sealed job takes only a resent batch
            assert status == 409, reply
            return
        assert status == 200 and m.decode(reply, m.Submitted).added == len(new)
        self.submitted |= new

    @precondition(lambda self: len(self.submitted) >= 2)  # else most jobs end at once
    @rule()
    def seal(self) -> None:
        status, reply = self._post(protocol.JOB_SEAL, m.encode(m.Seal(len(self.submitted))))
        if status == 200:
            self.sealed = True
            assert m.decode(reply, m.JobSummary).total == len(self.submitted)
        else:
            assert status == 409 and self.sealed  # sealing again with the same total is fine

    @rule(n=st.integers(1, 4))
    def lease(self, n: int) -> None:
        status, reply = self._post(protocol.LEASE, m.encode(m.LeaseRequest(self.WORKER, n)))
        assert status == 200
        header, parts = protocol.unpack(reply, m.LeaseReply)
        assert len(parts) == len(header.tasks) <= n
        for t in header.tasks:
            assert t.job == self.job and t.task in self.submitted and t.task not in self.held
            self.held[t.task] = t.attempt

    @precondition(lambda self: self.held)
    @rule(data=st.data(), wrong=st.booleans(), outcome=st.sampled_from(["ok", "error"]))
    def complete(self, data: st.DataObject, wrong: bool, outcome: str) -> None:
        task = data.draw(st.sampled_from(sorted(self.held)))
        attempt = self.held[task] + (1 if wrong else 0)
        error = None if outcome == "ok" else {"type": "E", "message": "m"}
        item = [self.job, task, attempt, outcome, error]
        report = m.Complete(worker=self.WORKER, items=[item])
        status, reply = self._post(protocol.COMPLETE, protocol.pack(report, [b"r"]), True)
        verdict = m.decode(reply, m.CompleteReply).items
        if wrong:
            assert (status, verdict) == (409, ["not_leased"])
        else:
            assert (status, verdict) == (200, ["accepted"])
            self.reported[task] = attempt
            del self.held[task]

    @precondition(lambda self: self.reported)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(sorted(self.reported)))
        item = [self.job, task, self.reported[task], "ok", None]
        report = m.Complete(worker=self.WORKER, items=[item])
        status, reply = self._post(protocol.COMPLETE, protocol.pack(report, [b"r"]), True)
        assert (status, m.decode(reply, m.CompleteReply).items) == (200, ["duplicate"])
        self.SENT["duplicate"] += 1

    @precondition(lambda self: self.held)
    @rule()
    def release(self) -> None:
        refs = [m.LeaseRef(self.job, t, a) for t, a in self.held.items()]
        status, reply = self._post(protocol.RELEASE, m.encode(m.Release(self.WORKER, refs)))
        assert status == 200 and m.decode(reply, m.Released).released == len(refs)
        self.held.clear()

    @invariant()
    def counts_follow(self) -> None:
        status, reply = call("GET", self.url + protocol.JOB.format(job=self.job))
        assert status == 200
        summary = m.decode(reply, m.JobSummary)
        assert summary.submitted == len(self.submitted)
        assert summary.done + summary.failed == len(self.reported)
        finished = self.sealed and len(self.reported) == len(self.submitted)
        assert finished == (summary.state != "running")

    def teardown(self) -> None:
        # The next example's leases must meet its own job's tasks only.
        call("DELETE", self.url + protocol.JOB.format(job=self.job))


def test_the_lease_chain_answers_what_the_accounting_says(
    embedded_store: Any, processes: Processes, prefix: str
) -> None:
    # (One store by default; the slow run covers both.) A long lease timeout: no lease may
    # expire between the steps of a slow machine.
    LeaseChain.url, _ = processes.server(
        embedded_store.url, "--lease-timeout", "120", prefix=prefix
    )
    chain(examples=12)


@pytest.mark.slow
def test_the_lease_chain_at_length(store: Any, processes: Processes, prefix: str) -> None:
    LeaseChain.url, _ = processes.server(store.url, "--lease-timeout", "120", prefix=prefix)
    chain(examples=200, derandomize=False)


def chain(examples: int, derandomize: bool = True) -> None:
    LeaseChain.SENT.clear()
    run_state_machine_as_test(
        LeaseChain,
        settings=hypothesis.settings(
            max_examples=examples,
            stateful_step_count=15,
            deadline=None,
            database=None,
            derandomize=derandomize,  # the default run: the same steps every time
        ),
    )
    sent = LeaseChain.SENT
    print(f"lease chain: {sum(sent.values())} requests: {dict(sent)}")
    # Every kind of step was reached: accepted, refused and resent reports, releases.
    for seen in ("complete 200", "complete 409", "duplicate", "release 200", "seal 200"):
        assert sent[seen], (seen, sent)


# ---------------------------------------------------------------------- fuzzing with tokens


AUTH_EXAMPLES = 3  # per operation, caller and mode: about 300 requests in all


def _refused_as(
    url: str, headers: dict[str, str], status: int, who: str | None, sent: Tally[int]
) -> Any:
    def one(case: schemathesis.Case) -> None:
        if isinstance(case.query, dict) and "wait" in case.query:
            case.query["wait"] = 0  # (refused before it could wait, but bound it)
        # (Replacing whatever Authorization schemathesis made up for the bearer scheme.)
        case.headers = {
            k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
        }
        case.headers.update(headers)
        response = case.call(base_url=url)
        assert response.status_code == status, (
            f"{case.method} {case.formatted_path} as {who}: "
            f"{response.status_code} {response.text[:200]}"
        )
        sent[status] += 1

    return one


def test_fuzzed_calls_without_a_token_or_with_a_wrong_role_are_refused_and_change_nothing(
    auth_server: AuthServer,  # noqa: F811  (the fixture imported above)
) -> None:
    """hq-server --auth: every protected operation, with good and bad input, from no token,
    a revoked one and (where the route does not admit it) the wrong role, answers 401/403
    before anything else looks at the request, and the store is unchanged afterwards."""
    schema = schemathesis.openapi.from_dict(openapi.document())
    by_operation = {route.operation: route for route in routes.ROUTES}
    settings = hypothesis.settings(
        max_examples=AUTH_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    before = auth_server.snapshot()
    sent: Tally[int] = Tally()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        route = by_operation[operation.definition.raw["operationId"]]
        if route.roles is None:
            continue
        callers: list[tuple[str | None, int]] = [(None, 401), ("revoked", 401)]
        if protocol.Role.USER not in route.roles:
            callers.append(("alice", 403))
        if protocol.Role.WORKER not in route.roles:
            callers.append(("worker", 403))
        for who, status in callers:
            token = auth_server.secret[who] if who else None
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):
                one = settings(
                    hypothesis.seed(7)(
                        given(case=operation.as_strategy(generation_mode=mode))(
                            _refused_as(auth_server.url, headers, status, who, sent)
                        )
                    )
                )
                try:
                    one()
                except hypothesis.errors.Unsatisfiable:
                    if mode is schemathesis.GenerationMode.POSITIVE:
                        raise
    print(f"auth fuzz: {dict(sent)}")
    assert sent[401] > 0 and sent[403] > 0
    assert auth_server.snapshot() == before
