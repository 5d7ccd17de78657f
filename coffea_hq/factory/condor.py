"""``coffea-hq condor``: keep between --min and --max hq-worker jobs in an HTCondor pool.

Each cycle the factory reads the queue's work (``GET /api/v1/queue``: queued + running
tasks) and which workers hold tasks (``GET /api/v1/workers``), lists its own worker jobs
in the schedd (those carrying ``CoffeaHQFactory == "<name>"``), asks
:func:`coffea_hq.factory.policy.decide` what to do, and submits or removes jobs through
the ``htcondor`` Python bindings (imported only when a pool is used, so ``--dry-run``
and everything else work where they are not installed).

Removing a running worker never kills its tasks: the submit description asks for a
graceful removal (``want_graceful_removal``) with SIGTERM (``kill_sig``,
``remove_kill_sig``), which hq-worker treats as *drain*, and gives it
``job_max_vacate_time`` seconds (the successor of the deprecated ``kill_sig_timeout``;
an execute node's ``MachineMaxVacateTime`` may cap it) before HTCondor kills it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from coffea_hq import protocol
from coffea_hq.tls import client_context
from coffea_hq.transport import resolve_token

from .policy import BatchState, Bounds, Cooldown, Decision, WorkerJob, decide, wanted

log = logging.getLogger("coffea_hq.factory")

FACTORY_ATTR = "CoffeaHQFactory"
WORKER_PREFIX = "condor-"
# HTCondor JobStatus codes (the bindings' JobStatus enum has the same values).
_CONDOR_STATES = {
    1: BatchState.IDLE,
    2: BatchState.RUNNING,
    5: BatchState.HELD,
    6: BatchState.RUNNING,
    7: BatchState.RUNNING,
}
# 3 (Removed: a removed worker still draining) and 4 (Completed) are not counted: they
# are on their way out of the queue.


class FactoryError(Exception):
    """A factory problem with a sentence that says what to do."""


def import_htcondor() -> ModuleType:
    """The HTCondor bindings: ``htcondor2`` (HTCondor 24+) or the older ``htcondor``."""
    for name in ("htcondor2", "htcondor"):
        try:
            return __import__(name)
        except ImportError:
            continue
    raise FactoryError(
        "the HTCondor Python bindings are not installed: `pip install htcondor` (the version "
        "matching your pool), or use --dry-run to see what the factory would do"
    )


# ---------------------------------------------------------------------- submit description


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker job is: the resources it asks for and the hq-worker it runs."""

    url: str
    slots: int = 1
    cpus: int | None = None  # default: one per slot
    memory: str = "2GB"
    disk: str = "4GB"
    requirements: str | None = None
    worker_command: str = "hq-worker"
    drain_grace: int = 600  # seconds from SIGTERM to kill (job_max_vacate_time)
    factory: str = "coffea-hq"
    log_dir: str = "coffea-hq-condor"
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # Where the worker builds per-task environments: None is hq-worker's default, the
    # job's own scratch ($_CONDOR_SCRATCH_DIR); a node-local shared directory lets the
    # worker jobs of one node build each environment once.
    env_cache: str | None = None
    env_cache_size: str | None = None


def submit_description(spec: WorkerSpec) -> dict[str, str]:
    """The HTCondor submit description of one worker job, as ordered key/value pairs."""
    drain_timeout = max(1, spec.drain_grace - 30)
    arguments = [
        spec.url,
        "--slots",
        str(spec.slots),
        "--name",
        f"{WORKER_PREFIX}$(ClusterId).$(ProcId)",
        "--drain-timeout",
        str(drain_timeout),
    ]
    if spec.env_cache:
        arguments += ["--env-cache", spec.env_cache]
    if spec.env_cache_size:
        arguments += ["--env-cache-size", spec.env_cache_size]
    desc = {
        "universe": "vanilla",
        "executable": spec.worker_command,
        # The worker comes from the execute node's environment (a shared venv, CVMFS,
        # a container image), not from the submit host.
        "transfer_executable": "false",
        "arguments": _condor_arguments(arguments),
        "request_cpus": str(spec.cpus or spec.slots),
        "request_memory": spec.memory,
        "request_disk": spec.disk,
        # condor_rm sends SIGTERM and waits: hq-worker drains (finishes running tasks,
        # hands back the rest) instead of dying mid-task.
        "kill_sig": "SIGTERM",
        "remove_kill_sig": "SIGTERM",
        "want_graceful_removal": "true",
        "job_max_vacate_time": str(spec.drain_grace),
        "output": f"{spec.log_dir}/worker-$(ClusterId).$(ProcId).out",
        "error": f"{spec.log_dir}/worker-$(ClusterId).$(ProcId).err",
        "log": f"{spec.log_dir}/factory.log",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT_OR_EVICT",
        # Job attributes (MY.X is the modern spelling of +X): how the factory finds its jobs.
        f"MY.{FACTORY_ATTR}": _classad_string(spec.factory),
        "MY.CoffeaHQServer": _classad_string(spec.url),
    }
    if spec.requirements:
        desc["requirements"] = spec.requirements
    for key, value in spec.extra:
        desc[key] = value
    return desc


def render_submit(desc: dict[str, str], count: int | None = None) -> str:
    """The submit description as a condor_submit file (what ``str(htcondor.Submit)`` prints)."""
    lines = [f"{key} = {value}" for key, value in desc.items()]
    lines.append(f"queue {count}" if count else "queue")
    return "\n".join(lines) + "\n"


def _classad_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _condor_arguments(args: Sequence[str]) -> str:
    """HTCondor's new argument syntax: the whole list in double quotes, each argument
    single-quoted when it holds spaces or quotes."""
    out = []
    for arg in args:
        if not arg or any(c in arg for c in " \t'\""):
            arg = "'" + arg.replace("'", "''").replace('"', '""') + "'"
        out.append(arg)
    return '"' + " ".join(out) + '"'


def parse_submit_keys(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise FactoryError(
                f'--submit-key takes KEY=VALUE (e.g. +ProjectName="cms" or '
                f"accounting_group=group_cms), got {pair!r}"
            )
        out.append((key, value))
    return tuple(out)


# ---------------------------------------------------------------------- the queue server


def read_queue(url: str, timeout: float = 10.0) -> dict[str, int]:
    """``GET /api/v1/queue``: {"queued", "running", "work", "workers"}."""
    return _get_json(url + protocol.QUEUE, timeout)


def busy_workers(url: str, timeout: float = 10.0) -> dict[str, bool]:
    """Which of our condor workers hold tasks, keyed by condor job id ("123.0")."""
    try:
        workers = _get_json(url + protocol.WORKERS, timeout)
    except FactoryError as e:
        log.warning("cannot read the workers (%s); treating every running worker as busy", e)
        return {}
    out = {}
    for name, info in workers.items():
        if not name.startswith(WORKER_PREFIX) or not isinstance(info, dict):
            continue
        stats = info.get("stats") or {}
        out[name[len(WORKER_PREFIX) :]] = bool(stats.get("held", 1))
    return out


def _get_json(url: str, timeout: float) -> Any:
    # The queue and workers routes need an admin token on a server with --auth: the
    # factory's own ($HQ_TOKEN or $HQ_TOKEN_FILE; its worker jobs do not inherit it).
    token = resolve_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # An https:// server is verified as clients verify it (system CAs plus $HQ_TLS_CA).
    context = client_context() if url.startswith("https://") else None
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise FactoryError(f"{url} answered {e.code} {e.reason}") from e
    except (OSError, ValueError) as e:
        raise FactoryError(f"cannot read {url}: {e}") from e


# ---------------------------------------------------------------------- the batch system


class Pool(Protocol):
    """What the factory needs from a batch system."""

    def jobs(self) -> list[WorkerJob]: ...
    def submit(self, desc: dict[str, str], count: int) -> list[str]: ...
    def remove(self, ids: Sequence[str], reason: str) -> None: ...


class CondorPool:
    """The local (or a named) schedd, through the htcondor bindings."""

    def __init__(self, factory: str, schedd_name: str | None = None) -> None:
        self.htcondor = import_htcondor()
        self.factory = factory
        if schedd_name:
            collector = self.htcondor.Collector()
            ad = collector.locate(self.htcondor.DaemonTypes.Schedd, schedd_name)
            self.schedd = self.htcondor.Schedd(ad)
        else:
            self.schedd = self.htcondor.Schedd()

    def jobs(self) -> list[WorkerJob]:
        ads = self.schedd.query(
            constraint=f"{FACTORY_ATTR} == {_classad_string(self.factory)}",
            projection=["ClusterId", "ProcId", "JobStatus"],
        )
        out = []
        for ad in sorted(ads, key=lambda a: (int(a["ClusterId"]), int(a["ProcId"]))):
            state = _CONDOR_STATES.get(int(ad["JobStatus"]))
            if state is not None:
                out.append(WorkerJob(f"{ad['ClusterId']}.{ad['ProcId']}", state))
        return out

    def submit(self, desc: dict[str, str], count: int) -> list[str]:
        result = self.schedd.submit(self.htcondor.Submit(desc), count=count)
        cluster = result.cluster()
        return [f"{cluster}.{i}" for i in range(count)]

    def remove(self, ids: Sequence[str], reason: str) -> None:
        self.schedd.act(self.htcondor.JobAction.Remove, list(ids), reason=reason)


class DryRunPool:
    """Acts on nothing. Remembers the jobs it would have submitted (as idle jobs), so
    that later cycles of a dry run show removals as well as submissions."""

    def __init__(self) -> None:
        self._clusters = 0
        self._jobs: dict[str, WorkerJob] = {}

    def jobs(self) -> list[WorkerJob]:
        return list(self._jobs.values())

    def submit(self, desc: dict[str, str], count: int) -> list[str]:
        self._clusters += 1
        ids = [f"dry{self._clusters}.{i}" for i in range(count)]
        self._jobs.update((i, WorkerJob(i, BatchState.IDLE)) for i in ids)
        return ids

    def remove(self, ids: Sequence[str], reason: str) -> None:
        for i in ids:
            self._jobs.pop(i, None)


# ---------------------------------------------------------------------- the loop


@dataclass
class Factory:
    """One factory: a server to read, a pool to act on, bounds, a worker spec."""

    url: str
    spec: WorkerSpec
    bounds: Bounds
    pool: Pool
    cooldown: Cooldown
    dry_run: bool = False
    out: Callable[[str], None] = print

    def cycle(self, now: float | None = None) -> Decision:
        """Read the queue and the pool, decide, act; returns the decision."""
        queue = read_queue(self.url)
        jobs = self.pool.jobs()
        if any(j.state is BatchState.RUNNING for j in jobs):
            busy = busy_workers(self.url)
            jobs = [WorkerJob(j.id, j.state, busy.get(j.id)) for j in jobs]
        now = time.monotonic() if now is None else now
        target = wanted(queue["work"], self.bounds)
        allowed = self.cooldown.allows_scale_down(target, len(jobs), now)
        decision = decide(queue["work"], jobs, self.bounds, scale_down=allowed)
        self.apply(decision, queue)
        return decision

    def apply(self, decision: Decision, queue: dict[str, int]) -> None:
        would = "would " if self.dry_run else ""
        self.out(
            f"[{time.strftime('%H:%M:%S')}] queued={queue['queued']} "
            f"running={queue['running']} target={decision.target}: {decision.reason}"
        )
        if decision.submit:
            ids = self.pool.submit(submit_description(self.spec), decision.submit)
            self.out(f"{would}submit {decision.submit} worker job(s): {' '.join(ids)}")
        if decision.remove:
            self.pool.remove(decision.remove, f"coffea-hq factory: {decision.reason}")
            self.out(f"{would}remove {' '.join(decision.remove)} (running workers drain first)")

    def run(self, interval: float, once: bool = False) -> None:
        while True:
            try:
                self.cycle()
            except FactoryError as e:
                if once:
                    raise
                self.out(f"cycle skipped: {e}")
            if once:
                return
            time.sleep(interval)


# ---------------------------------------------------------------------- command line


def add_condor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``condor`` subcommand to ``coffea-hq``'s subparsers."""
    p = subparsers.add_parser(
        "condor",
        help="keep between --min and --max hq-worker jobs in an HTCondor pool",
        description="A worker factory for HTCondor: submits hq-worker jobs when the queue "
        "has work and removes them (they drain, never dying mid-task) when it empties.",
    )
    add_condor_arguments(p)
    p.set_defaults(func=run_condor)
    return p


def add_condor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "url",
        nargs="?",
        default=os.environ.get(protocol.ENV_URL),
        help=f"server URL as the workers reach it (default: ${protocol.ENV_URL})",
    )
    p.add_argument("--min", type=int, default=0, help="fewest worker jobs (default: %(default)s)")
    p.add_argument("--max", type=int, default=10, help="most worker jobs (default: %(default)s)")
    p.add_argument(
        "--slots", type=int, default=1, help="tasks each worker runs at once (default: %(default)s)"
    )
    p.add_argument(
        "--interval",
        type=float,
        default=30.0,
        help="seconds between two cycles (default: %(default)s)",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=120.0,
        help="seconds the work must stay low before jobs are removed (default: %(default)s)",
    )
    p.add_argument("--cpus", type=int, default=None, help="request_cpus (default: --slots)")
    p.add_argument("--memory", default="2GB", help="request_memory (default: %(default)s)")
    p.add_argument("--disk", default="4GB", help="request_disk (default: %(default)s)")
    p.add_argument(
        "--env-cache",
        default=None,
        metavar="DIR",
        help="hq-worker --env-cache: where workers build per-task environments (default: "
        "each job's scratch directory; a node-local shared directory builds once per node; "
        "count the environments in --disk otherwise)",
    )
    p.add_argument(
        "--env-cache-size",
        default=None,
        metavar="BYTES",
        help="hq-worker --env-cache-size: evict least recently used environments beyond it",
    )
    p.add_argument("--requirements", default=None, help="a ClassAd requirements expression")
    p.add_argument(
        "--submit-key",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='an extra submit description line, e.g. +ProjectName="cms" '
        "(repeatable; overrides the factory's own keys)",
    )
    p.add_argument(
        "--worker-command",
        default=None,
        help="hq-worker's path on the execute nodes (default: the one beside this coffea-hq)",
    )
    p.add_argument(
        "--drain-grace",
        type=int,
        default=600,
        help="seconds a removed worker may drain before HTCondor kills it "
        "(job_max_vacate_time; default: %(default)s)",
    )
    p.add_argument(
        "--name",
        default="coffea-hq",
        help="factory name, stored in each job as CoffeaHQFactory (default: %(default)s)",
    )
    p.add_argument("--schedd", default=None, help="schedd name (default: the local one)")
    p.add_argument(
        "--log-dir",
        default="coffea-hq-condor",
        help="where the workers' stdout, stderr and the job log go (default: %(default)s)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the submit description and what would be submitted or "
        "removed, and why; touch no pool",
    )
    p.add_argument("--once", action="store_true", help="run one cycle and exit")


def default_worker_command() -> str:
    beside = Path(sys.executable).with_name("hq-worker")
    if beside.exists():
        return str(beside)
    return shutil.which("hq-worker") or "hq-worker"


def spec_from_args(args: argparse.Namespace) -> WorkerSpec:
    if not args.url:
        raise FactoryError(
            f"give the server URL or set {protocol.ENV_URL}, e.g. "
            "http://hq.example.org:8786 (as the execute nodes reach it)"
        )
    if not args.url.startswith(("http://", "https://")):
        raise FactoryError(f"server URL must start with http:// or https://, got {args.url!r}")
    if args.interval <= 0 or args.cooldown < 0 or args.drain_grace < 1:
        raise FactoryError("--interval and --drain-grace must be positive, --cooldown at least 0")
    if args.cpus is not None and args.cpus < 1:
        raise FactoryError(f"--cpus must be at least 1, got {args.cpus}")
    if not protocol.valid_id(args.name):
        raise FactoryError("--name may hold only letters, digits, '-', '_' and '.'")
    return WorkerSpec(
        url=args.url.rstrip("/"),
        slots=args.slots,
        cpus=args.cpus,
        memory=args.memory,
        disk=args.disk,
        requirements=args.requirements,
        worker_command=args.worker_command or default_worker_command(),
        drain_grace=args.drain_grace,
        factory=args.name,
        log_dir=args.log_dir,
        extra=parse_submit_keys(args.submit_key),
        env_cache=args.env_cache,
        env_cache_size=args.env_cache_size,
    )


def run_condor(args: argparse.Namespace) -> int:
    """Run the factory from parsed arguments; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coffea-hq condor %(message)s")
    try:
        bounds = Bounds(args.min, args.max, args.slots)
        spec = spec_from_args(args)
    except (ValueError, FactoryError) as e:
        print(f"coffea-hq condor: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# submit description of one worker job (dry run: nothing is submitted)")
        print(render_submit(submit_description(spec)))
    try:
        pool: Pool = DryRunPool() if args.dry_run else CondorPool(spec.factory, args.schedd)
        if not args.dry_run:
            Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
        factory = Factory(
            spec.url, spec, bounds, pool, Cooldown(args.cooldown), dry_run=args.dry_run
        )
        factory.run(args.interval, once=args.once)
    except FactoryError as e:
        print(f"coffea-hq condor: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``coffea-hq condor`` on its own (``python -m coffea_hq.factory.condor``)."""
    p = argparse.ArgumentParser(
        prog="coffea-hq condor", description="A coffea-hq worker factory for HTCondor."
    )
    add_condor_arguments(p)
    return run_condor(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
