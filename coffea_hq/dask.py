"""A dask scheduler that runs task graphs on coffea-hq workers.

>>> import dask, coffea_hq
>>> dask.compute(collection, scheduler=coffea_hq.get)  # doctest: +SKIP
>>> with dask.config.set(scheduler=coffea_hq.Scheduler("http://hq:8765")):  # doctest: +SKIP
...     dask.compute(collection)

How a graph runs: the session cuts it into *groups*, linear chains of tasks fused
together (a chain runs on one worker, its intermediate values never leave it). A group
whose inputs are all known is submitted at once, as one task of a coffea-hq job, together
with the other groups that became ready at the same moment. A group none of whose outputs
the caller asked for is submitted with ``keep``: its outputs stay in the queue's store
(under the job, deleted when it ends), the session only learns that it finished, and the
worker running a group that needs them fetches them from the store. Only the groups that
make the computed keys send their outputs to the session. So the values that cross a group
boundary (the inputs of a tree reduction's steps, for instance) travel worker to store to
worker; values inside a chain never leave their worker. The queue's guarantees hold per
group: a group whose worker dies is retried on another one (its inputs are in the store,
not on the worker that made them), a group that raises fails the computation, naming its
key.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from dask._task_spec import DataNode, GraphNode, convert_legacy_graph
from dask.core import flatten, reverse_dict

from . import messages, protocol
from .client import Client, Job, batch_spans, resolve_url
from .errors import JobCancelled, TaskFailed
from .progress import RunProgress, status_text

__all__ = ["Scheduler", "get", "partition"]

Key = Hashable

# Seconds between empty submits while groups wait to be added: the job stays unsealed until
# its last group is, and the server cancels an unsealed job no submit touched for
# hq-server --unsealed-timeout (600 s by default) as abandoned, which partitions that run
# longer than that between two submissions would otherwise trigger.
TOUCH_EVERY = 60.0


@dataclass(frozen=True)
class Group:
    """Tasks run together as one coffea-hq task: ``nodes`` in the order they run, the keys
    they take from other groups (``needs``) and the ones they hand back (``outputs``)."""

    nodes: tuple[GraphNode, ...]
    needs: frozenset[Key]
    outputs: tuple[Key, ...]

    @property
    def key(self) -> Key:
        """The key that names the group: its last task's."""
        return self.nodes[-1].key


def partition(
    graph: Mapping[Key, GraphNode], wanted: Iterable[Key]
) -> tuple[list[Group], dict[Key, Any]]:
    """Cut ``graph`` into groups; also return its data nodes' values (literals the
    session holds anyway: no task needs to run for them).

    Every task that descends from one source task only (one input partition: its read,
    the analysis on it, the partial histograms filled from it) joins that source's
    group, so a partition's arrays never leave the worker that made them. Of the other
    tasks (those that combine several partitions: the steps of tree reductions) a task
    joins the task after it when it is that task's only input and that task is its only
    user (a linear chain); fan-ins stay group boundaries, so the reductions keep their
    parallelism.
    """
    wanted = set(wanted)
    data = {
        key: node.value
        for key, node in graph.items()
        if isinstance(node, DataNode) and not node.dependencies
    }
    deps = {
        key: {d for d in node.dependencies if d not in data}
        for key, node in graph.items()
        if key not in data
    }
    users = reverse_dict(deps)
    parent: dict[Key, Key] = {key: key for key in deps}

    def root(key: Key) -> Key:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    # The one source each task descends from (None: several), in dependency order.
    order = _toposort(list(deps), deps, set(deps))
    source: dict[Key, Key | None] = {}
    for key in order:
        if not deps[key]:
            source[key] = key
            continue
        sources = {source[d] for d in deps[key]}
        source[key] = sources.pop() if len(sources) == 1 else None
        if source[key] is not None:
            parent[root(key)] = root(source[key])
    for key in order:
        after = users.get(key, set())
        if source[key] is not None or key in wanted or len(after) != 1:
            continue
        (user,) = after
        if len(deps[user]) == 1:
            parent[root(key)] = root(user)
    members: dict[Key, list[Key]] = {}
    for key in order:  # each group's members stay in dependency order
        members.setdefault(root(key), []).append(key)
    groups = []
    for keys in members.values():
        inside = set(keys)
        needs = frozenset(d for k in keys for d in graph[k].dependencies if d not in inside)
        outputs = tuple(
            k for k in keys if k in wanted or any(u not in inside for u in users.get(k, ()))
        )
        groups.append(Group(tuple(graph[k] for k in keys), needs, outputs))
    return groups, data


def _toposort(keys: list[Key], deps: Mapping[Key, set[Key]], inside: set[Key]) -> list[Key]:
    done: set[Key] = set()
    order: list[Key] = []
    for start in keys:
        stack = [start]
        while stack:  # depth first, without recursion (chains can be long)
            key = stack[-1]
            if key in done:
                stack.pop()
                continue
            todo = [d for d in deps[key] if d in inside and d not in done]
            if todo:
                stack.extend(todo)
            else:
                done.add(key)
                order.append(key)
                stack.pop()
    return order


class GroupCall:
    """One group's work item: which group of the job's blob, and its inputs' values."""

    __slots__ = ("index", "key", "inputs")

    def __init__(self, index: int, key: Key, inputs: dict[Key, Any]) -> None:
        self.index = index
        self.key = key
        self.inputs = inputs

    def __repr__(self) -> str:  # what a TaskFailed shows as the work item
        return f"dask task {self.key!r}"

    def __getstate__(self) -> tuple[int, Key, dict[Key, Any]]:
        return self.index, self.key, self.inputs

    def __setstate__(self, state: tuple[int, Key, dict[Key, Any]]) -> None:
        self.index, self.key, self.inputs = state


class RunGroups:
    """The function of one compute's job (uploaded once, as its blob): runs a group.

    A group that takes kept outputs of other groups is called, by the worker, with its
    own payload (the pickled ``(GroupCall,)``) and those groups' results, as bytes (see
    ``coffea_hq.protocol.with_kept_inputs``)."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = list(groups)

    def __call__(
        self, call: GroupCall | bytes, kept: Mapping[str, bytes] | None = None
    ) -> dict[Key, Any]:
        if isinstance(call, bytes):
            (call,) = protocol.loads(call)
        assert isinstance(call, GroupCall)
        cache = dict(call.inputs)
        for data in (kept or {}).values():
            cache.update(protocol.loads(data))
        group = self.groups[call.index]
        for node in group.nodes:
            try:
                cache[node.key] = node(cache)
            except Exception as e:
                e.add_note(f"in dask task {node.key!r}")
                raise
        return {key: cache[key] for key in group.outputs}


_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def _client(url: str | None) -> Client:
    """One client per server for the process (``get`` has no object to keep it in)."""
    url = resolve_url(url)
    with _clients_lock:
        client = _clients.get(url)
        if client is None or client._closed:
            client = _clients[url] = Client(url)
        return client


class Scheduler:
    """A dask scheduler on the coffea-hq server at ``url`` (default ``$HQ_URL``).

    Use it as ``dask.compute(..., scheduler=Scheduler(url))`` or
    ``dask.config.set(scheduler=Scheduler(url))``. ``max_attempts`` bounds the retries of a
    group whose worker dies or hangs; ``progress`` shows a bar of the groups run;
    ``client`` reuses an existing :class:`~coffea_hq.Client` instead. ``keep=False``
    sends every group's outputs through the session instead of keeping those only other
    groups take in the server's store (for comparison; uses the session's memory and
    network).

    dask's ``num_workers`` and ``pool`` options are ignored: the workers are those
    attached to the server. Graph optimisation (``optimize_graph``, ``optimization.*``
    settings) happens in ``dask.compute`` before the scheduler is called, so it applies.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        max_attempts: int = protocol.DEFAULT_MAX_ATTEMPTS,
        progress: bool = False,
        label: str = "dask",
        keep: bool = True,
    ) -> None:
        self.url = url
        self._client = client
        self.max_attempts = max_attempts
        self.progress = progress
        self.label = label
        self.keep = keep
        # Of the last compute: the graph's tasks, the groups they were cut into (one
        # coffea-hq task each), how many of those kept their outputs in the store, how
        # many submissions added them, the bytes the session sent (payloads) and received
        # (results), and its wall time.
        self.stats: dict[str, float] = {}

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = _client(self.url)
        return self._client

    def __repr__(self) -> str:
        return f"Scheduler({self.url or os.environ.get(protocol.ENV_URL)!r})"

    def __call__(self, dsk: Mapping[Key, Any], keys: Any, **kwargs: Any) -> Any:
        """The dask ``get`` protocol: compute ``keys`` (a key or nested lists of keys)."""
        graph = convert_legacy_graph(dict(dsk))
        wanted = set(flatten(keys)) if isinstance(keys, list) else {keys}
        missing = [k for k in wanted if k not in graph]
        if missing:
            raise KeyError(f"keys not in the graph: {missing[:5]!r}")
        started = time.perf_counter()
        values = _Run(self, graph, wanted).run()
        self.stats["wall"] = time.perf_counter() - started
        return _nested(keys, values)


def _nested(keys: Any, values: Mapping[Key, Any]) -> Any:
    if isinstance(keys, list):
        return [_nested(k, values) for k in keys]
    return values[keys]


class _Run:
    """One computation, as one coffea-hq job: the graph's groups are its function (uploaded
    once, so each worker slot loads it once); a group's task is added to the open job as
    soon as its inputs are known; the job is sealed when the last group is added."""

    def __init__(self, scheduler: Scheduler, graph: Mapping[Key, GraphNode], wanted: set[Key]):
        self.scheduler = scheduler
        self.client = scheduler.client
        self.wanted = wanted
        self.groups, self.values = partition(graph, wanted)
        owner = {key: i for i, g in enumerate(self.groups) for key in g.outputs}
        self.owner = owner
        # A group whose outputs only other groups take keeps them in the store.
        self.kept = [
            scheduler.keep and not any(k in wanted for k in g.outputs) for g in self.groups
        ]
        self.waiting: list[int] = [0] * len(self.groups)  # producer groups not yet done
        self.users: dict[int, list[int]] = {}
        # How many groups still need each value: freed from the session once none does.
        self.refs: dict[Key, int] = {}
        for i, group in enumerate(self.groups):
            producers = {owner[k] for k in group.needs if k in owner}
            self.waiting[i] = len(producers)
            for p in producers:
                self.users.setdefault(p, []).append(i)
            for k in group.needs:
                self.refs[k] = self.refs.get(k, 0) + 1
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.submitted = 0
        # The job's work items, filled in as groups are submitted (the Job reads them
        # to describe a failure).
        self.items: list[tuple[Any, ...]] = [()] * len(self.groups)
        self.job = _GraphJob(self.client, uuid.uuid4().hex[:20], self.items)
        scheduler.stats = {
            "groups": len(self.groups),
            "tasks": len(graph),
            "kept": sum(self.kept),
            "submissions": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
        }

    def run(self) -> dict[Key, Any]:
        if not self.groups:
            return {k: self.values[k] for k in self.wanted}
        ready = [i for i, n in enumerate(self.waiting) if n == 0]
        done = 0
        job = self.job
        progress = RunProgress(disable=not self.scheduler.progress)
        # The job's results are streamed by one thread (a Job is read by one thread only),
        # handed to this one, which submits what they make ready.
        reader = threading.Thread(target=self._stream, name="coffea-hq-dask", daemon=True)
        try:
            self.client.run(self._create())
            self._add(ready)
            reader.start()
            with progress:
                bar = progress.add_task("dask graph", total=len(self.groups), unit="groups")
                while done < len(self.groups):
                    try:
                        event = self.events.get(timeout=TOUCH_EVERY)
                    except queue.Empty:
                        if self.submitted < len(self.groups):
                            self.client.run(self._touch())
                        continue
                    ready = []
                    while True:
                        done += self._handle(event, ready)
                        try:
                            event = self.events.get_nowait()
                        except queue.Empty:
                            break
                    if ready:
                        self._add(ready)
                    progress.status = status_text(retried=job.requeued, crashed=job.crashed)
                    progress.update(bar, completed=done, refresh=True)
            reader.join()
            self.scheduler.stats["bytes_received"] = job.received_bytes
        except BaseException:
            if not job._finished:
                with contextlib.suppress(Exception):
                    job.cancel(budget=5)
                    self.client.run(self.client.api.delete_job(job.id))
            raise
        return {k: self.values[k] for k in self.wanted}

    async def _create(self) -> None:
        blob = protocol.compress(protocol.cloud_dumps(RunGroups(self.groups)), self.client.codec)
        sha = await self.client.api.upload(blob)
        spec = messages.CreateJob(
            function=sha, max_attempts=self.scheduler.max_attempts, label=self.scheduler.label
        )
        await self.client.api.create_job(self.job.id, spec)

    def _add(self, ready: list[int]) -> None:
        """Add the ready groups' tasks to the job (named by group index); seal it after the
        last."""
        payloads = []
        for i in ready:
            group = self.groups[i]
            stored = sorted(
                {self.owner[k] for k in group.needs if k in self.owner and self.kept[self.owner[k]]}
            )
            inside = {k for p in stored for k in self.groups[p].outputs}
            call = GroupCall(
                i, group.key, {k: self.values[k] for k in group.needs if k not in inside}
            )
            self.items[i] = (call,)
            payload = protocol.dumps((call,), self.client.codec)
            if stored:  # the worker fetches these groups' outputs from the store
                refs = messages.KeptInputs(
                    tasks=[str(p) for p in stored],
                    labels=[f"dask key {self.groups[p].key!r}" for p in stored],
                )
                payload = protocol.kept_inputs_payload(msgspec.json.encode(refs), payload)
            payloads.append(payload)
            for k in group.needs:  # the session holds a value only while a group needs it
                if k in inside:
                    continue
                self.refs[k] -= 1
                if self.refs[k] == 0 and k not in self.wanted:
                    del self.values[k]
        self.submitted += len(ready)
        keep = [str(i) for i in ready if self.kept[i]]
        self.client.run(self._submit([str(i) for i in ready], payloads, keep))
        self.scheduler.stats["submissions"] += 1
        self.scheduler.stats["bytes_sent"] += sum(len(p) for p in payloads)

    async def _submit(self, names: list[str], payloads: list[bytes], keep: list[str]) -> None:
        api = self.client.api
        budget = await self.client._max_request_size() // 4
        kept = set(keep)
        for a, b in batch_spans([len(p) for p in payloads], 4096, budget):
            header = messages.SubmitTasks(
                tasks=names[a:b], keep=[n for n in names[a:b] if n in kept]
            )
            await api.submit_tasks(self.job.id, header, payloads[a:b])
        if self.submitted == len(self.groups):
            await api.seal(self.job.id, messages.Seal(total=len(self.groups)))

    async def _touch(self) -> None:
        """An empty submit: the server sees the session is still there (see TOUCH_EVERY)."""
        await self.client.api.submit_tasks(self.job.id, messages.SubmitTasks(tasks=[]), [])

    def _stream(self) -> None:
        try:
            for index, outputs in self.job.as_completed(keep=False):
                self.events.put(("done", index, outputs))
        except BaseException as e:  # handed to the scheduling thread, which raises it
            self.events.put(("error", e))

    def _handle(self, event: tuple[Any, ...], ready: list[int]) -> int:
        if event[0] == "error":
            raise _dask_error(self.job, event[1])
        _, index, outputs = event
        if outputs is not None:  # (None: a kept group's, in the store)
            self.values.update(outputs)
        for user in self.users.get(index, ()):
            self.waiting[user] -= 1
            if self.waiting[user] == 0:
                ready.append(user)
        return 1


class _GraphJob(Job):
    """A compute's job, counting the result bytes the session receives."""

    received_bytes = 0

    def _take(
        self, task: str, outcome: str, part: memoryview, error: dict[str, Any], keep: bool
    ) -> tuple[int, Any] | None:
        self.received_bytes += len(part)
        return super()._take(task, outcome, part, error, keep)


def _dask_error(job: Job, error: BaseException) -> BaseException:
    """The exception to raise for a failed group: the remote one's type, the key named."""
    if isinstance(error, TaskFailed) and error.index >= 0:
        call = job.items[error.index][0]
        error.add_note(f"dask key {call.key!r} failed on coffea-hq (job {job.id})")
    elif isinstance(error, JobCancelled):
        error.add_note("a dask graph's job was cancelled")
    return error


_default: Scheduler | None = None


def get(dsk: Mapping[Key, Any], keys: Any, **kwargs: Any) -> Any:
    """Compute a dask graph on the coffea-hq server at ``$HQ_URL``: pass it as
    ``dask.compute(..., scheduler=coffea_hq.get)``. See :class:`Scheduler`."""
    global _default
    if _default is None:
        _default = Scheduler()
    return _default(dsk, keys, **kwargs)
