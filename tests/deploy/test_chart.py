"""The Helm chart: rendered with default and non-default values by tools/helm-render,
every manifest checked against the Kubernetes schemas (kubernetes-validate, strict) and
the ScaledObject against KEDA's documented fields; values checked against
values.schema.json, bad ones refused with a message that names the value."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, KUBE_VERSION, Manifest, Rendered, container, env_of, render_raw

HERE = Path(__file__).parent
KEDA_SCHEMAS = {
    kind: json.loads((HERE / f"keda_{kind.lower()}.schema.json").read_text())
    for kind in ("ScaledObject", "TriggerAuthentication")
}
VALUES_SCHEMA = json.loads((CHART / "values.schema.json").read_text())

Render = Callable[..., Rendered]


def validate_manifest(doc: Manifest) -> None:
    """Kubernetes' own schema for built-in kinds (strict: unknown fields fail), KEDA's
    documented fields for the ScaledObject."""
    if doc["apiVersion"] == "keda.sh/v1alpha1":
        jsonschema.Draft7Validator(KEDA_SCHEMAS[doc["kind"]]).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# Non-default values that together touch every template branch.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda-scale-to-zero": {
        "autoscaling": {
            "enabled": True,
            "minReplicaCount": 0,
            "maxReplicaCount": 40,
            "cooldownPeriod": 600,
            "pollingInterval": 10,
        },
        "worker": {"slots": 4, "resources": {"requests": {"cpu": "4", "memory": "8Gi"}}},
    },
    "external-redis": {
        "valkey": {"enabled": False},
        "externalRedis": {
            "host": "redis.example.org",
            "port": 6380,
            "database": 2,
            "tls": True,
            "username": "hq",
            "password": "s3cret-pass",
        },
    },
    "external-redis-existing-secret": {
        "valkey": {"enabled": False},
        "externalRedis": {
            "host": "dragonfly.db.svc",
            "existingSecret": "dragonfly-auth",
            "existingSecretPasswordKey": "pw",
        },
    },
    "valkey-auth-no-persistence": {
        "valkey": {
            "auth": {"enabled": True, "password": "v4lkey"},
            "maxmemory": "3gb",
            "persistence": {"enabled": False},
            "networkPolicy": {"enabled": False},
        },
    },
    "tls-keda": {
        "tls": {"enabled": True, "secretName": "hq-tls"},
        "autoscaling": {"enabled": True},
    },
    "tls-public-ca": {
        "tls": {"enabled": True, "secretName": "hq-tls", "caKey": ""},
        "autoscaling": {"enabled": True},
    },
    "security-and-placement": {
        "fullnameOverride": "cms-hq",
        "tls": {"enabled": True, "secretName": "hq-tls"},
        "auth": {"enabled": True, "secretName": "hq-tokens"},
        "image": {"repository": "registry.example.org/coffea-hq", "tag": "0.1.0"},
        "server": {
            "replicas": 3,
            "image": {"tag": "0.1.0-debug", "pullPolicy": "Always"},
            "nodeSelector": {"node-role": "services"},
            "extraEnv": [{"name": "HQ_LOG", "value": "debug"}],
            "extraArgs": ["--log-level", "DEBUG"],
        },
        "worker": {
            "replicas": 5,
            "terminationGracePeriodSeconds": 3600,
            "drainTimeout": 3000,
            "image": {"repository": "registry.example.org/analysis", "tag": "2026.1"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "analysis",
                    "effect": "NoSchedule",
                }
            ],
            "extraEnv": [{"name": "X509_USER_PROXY", "value": "/etc/grid/proxy"}],
            "extraVolumes": [{"name": "proxy", "secret": {"secretName": "grid-proxy"}}],
            "extraVolumeMounts": [{"name": "proxy", "mountPath": "/etc/grid", "readOnly": True}],
        },
        "autoscaling": {
            "enabled": True,
            "minReplicaCount": 2,
            "maxReplicaCount": 10,
            "authenticationRef": "hq-keda-token",
        },
        "imagePullSecrets": [{"name": "regcred"}],
    },
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_manifest_is_valid(render: Render, case: str) -> None:
    rendered = render(CASES[case])
    assert rendered.docs, "nothing rendered"
    for doc in rendered.docs:
        validate_manifest(doc)
    assert {"Deployment", "Service"} <= set(rendered.kinds())


@pytest.mark.timeout(30)
def test_validators_reject_broken_manifests(render: Render) -> None:
    """The two validators above have teeth: a misspelt field and a number where KEDA
    wants a string both fail."""
    rendered = render(CASES["keda-scale-to-zero"])
    server = rendered.one("Deployment", "-server")
    container(server)["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        validate_manifest(server)
    scaled = rendered.one("ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["targetValue"] = 4
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        validate_manifest(scaled)


@pytest.mark.timeout(30)
def test_defaults_bundle_a_durable_valkey_that_never_evicts(render: Render) -> None:
    rendered = render()
    assert rendered.kinds() == sorted(
        [
            "Deployment",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "Service",
            "StatefulSet",
        ]
    )
    valkey = rendered.one("StatefulSet", "-valkey")
    args = container(valkey)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" not in args
    claim = valkey["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert container(valkey)["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    server = rendered.one("Deployment", "-server")
    assert (
        env_of(server)["HQ_REDIS_URL"]
        == "redis://hq-coffea-hq-valkey.analysis.svc.cluster.local:6379/0"
    )
    # Only the servers may reach the store.
    policy = rendered.one("NetworkPolicy")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed["app.kubernetes.io/component"] == "server"
    assert server["spec"]["template"]["metadata"]["labels"].items() >= allowed.items()


@pytest.mark.timeout(30)
def test_server_probes_health_and_workers_get_a_drain_grace(render: Render) -> None:
    rendered = render()
    server = rendered.one("Deployment", "-server")
    c = container(server)
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    assert c["ports"] == [{"name": "http", "containerPort": 8786, "protocol": "TCP"}]
    assert c["args"][:3] == ["server", "--port", "8786"]
    # No tokens by default: the server must be told it runs open on a non-loopback address.
    assert "--insecure" in c["args"] and "--auth" not in c["args"]
    assert server["spec"]["replicas"] == 2
    assert server["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = rendered.one("Service", "-server")
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]
    worker = rendered.one("Deployment", "-worker")
    spec = worker["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 600
    args = container(worker)["args"]
    assert args[0] == "worker"
    # The worker gives up waiting before Kubernetes kills it, so it hands back cleanly.
    assert int(args[args.index("--drain-timeout") + 1]) == 570
    assert env_of(worker)["HQ_URL"] == "http://hq-coffea-hq-server.analysis.svc.cluster.local:8786"
    assert container(worker)["image"] == "coffea-hq:0.1.0-coffea"
    assert c["image"] == "coffea-hq:0.1.0"


@pytest.mark.timeout(30)
def test_keda_scales_workers_on_the_servers_work_count(render: Render) -> None:
    rendered = render(CASES["keda-scale-to-zero"])
    scaled = rendered.one("ScaledObject")
    worker = rendered.one("Deployment", "-worker")
    server_service = rendered.one("Service", "-server")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 40)
    assert (spec["cooldownPeriod"], spec["pollingInterval"]) == (600, 10)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    name = server_service["metadata"]["name"]
    assert meta["url"] == f"http://{name}.analysis.svc.cluster.local:8786/api/v1/queue"
    assert meta["valueLocation"] == "work"
    assert meta["targetValue"] == "4"  # one task per slot, 4 slots per worker
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert "authenticationRef" not in trigger


@pytest.mark.timeout(30)
def test_external_redis_password_goes_through_a_secret(render: Render) -> None:
    rendered = render(CASES["external-redis"])
    assert not rendered.all("StatefulSet")
    assert not [s for s in rendered.all("Service") if "valkey" in s["metadata"]["name"]]
    secret = rendered.one("Secret", "-redis")
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret-pass"
    server = rendered.one("Deployment", "-server")
    env = container(server)["env"]
    names = [e["name"] for e in env]
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert names.index("HQ_REDIS_PASSWORD") < names.index("HQ_REDIS_URL")
    assert env_of(server)["HQ_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "password"}
    }
    assert (
        env_of(server)["HQ_REDIS_URL"]
        == "rediss://hq:$(HQ_REDIS_PASSWORD)@redis.example.org:6380/2"
    )
    assert "s3cret" not in yaml.safe_dump(server)

    existing = render(CASES["external-redis-existing-secret"])
    assert not existing.all("Secret")
    server = existing.one("Deployment", "-server")
    assert env_of(server)["HQ_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "dragonfly-auth", "key": "pw"}
    }
    assert env_of(server)["HQ_REDIS_URL"] == "redis://:$(HQ_REDIS_PASSWORD)@dragonfly.db.svc:6379/0"


@pytest.mark.timeout(30)
def test_valkey_auth_and_ephemeral_storage(render: Render) -> None:
    rendered = render(CASES["valkey-auth-no-persistence"])
    valkey = rendered.one("StatefulSet", "-valkey")
    c = container(valkey)
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(VALKEY_PASSWORD)"
    assert c["args"][c["args"].index("--maxmemory") + 1] == "3gb"
    assert "volumeClaimTemplates" not in valkey["spec"]
    assert valkey["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert not rendered.all("NetworkPolicy")
    secret = rendered.one("Secret", "-redis")
    assert base64.b64decode(secret["data"]["password"]).decode() == "v4lkey"
    assert env_of(rendered.one("Deployment", "-server"))["HQ_REDIS_URL"].startswith(
        "redis://:$(HQ_REDIS_PASSWORD)@hq-coffea-hq-valkey."
    )


@pytest.mark.timeout(30)
def test_overrides_reach_the_pods_and_security_mounts_are_wired(render: Render) -> None:
    rendered = render(CASES["security-and-placement"])
    server = rendered.one("Deployment", "cms-hq-server")
    worker = rendered.one("Deployment", "cms-hq-worker")
    sc, wc = container(server), container(worker)
    assert sc["image"] == "registry.example.org/coffea-hq:0.1.0-debug"
    assert sc["imagePullPolicy"] == "Always"
    assert wc["image"] == "registry.example.org/analysis:2026.1"
    assert server["spec"]["replicas"] == 3
    assert server["spec"]["template"]["spec"]["nodeSelector"] == {"node-role": "services"}
    assert worker["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3600
    assert wc["args"][wc["args"].index("--drain-timeout") + 1] == "3000"
    assert sc["args"][-2:] == ["--log-level", "DEBUG"]
    assert env_of(server)["HQ_LOG"] == "debug"
    assert env_of(worker)["X509_USER_PROXY"] == "/etc/grid/proxy"
    pod = worker["spec"]["template"]["spec"]
    assert {"name": "proxy", "secret": {"secretName": "grid-proxy"}} in pod["volumes"]
    assert {"name": "proxy", "mountPath": "/etc/grid", "readOnly": True} in wc["volumeMounts"]
    for deployment in (server, worker):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "hq-tls"
        assert volumes["auth"]["secret"]["secretName"] == "hq-tokens"
        mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/coffea-hq/tls", "readOnly": True}
        assert env_of(deployment)["HQ_AUTH_DIR"] == "/etc/coffea-hq/auth"
    # Tokens on: the server requires them and knows the workers' one; workers read it.
    assert "--auth" in sc["args"] and "--insecure" not in sc["args"]
    token_file = "/etc/coffea-hq/auth/worker-token"
    assert sc["args"][sc["args"].index("--worker-token-file") + 1] == token_file
    assert env_of(worker)["HQ_TOKEN_FILE"] == token_file
    assert sc["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert env_of(worker)["HQ_URL"].startswith("https://cms-hq-server.analysis.svc.")
    # The operator's own TriggerAuthentication stands: the chart adds none.
    assert not rendered.all("TriggerAuthentication")
    trigger = rendered.one("ScaledObject")["spec"]["triggers"][0]
    assert trigger["authenticationRef"] == {"name": "hq-keda-token"}
    assert trigger["metadata"]["authMode"] == "bearer"
    assert trigger["metadata"]["url"].startswith("https://")


@pytest.mark.timeout(30)
def test_notes_print_the_hq_url(helm_render: Path, tmp_path: Path, render: Render) -> None:
    done = render_raw(helm_render, tmp_path, CASES["keda-scale-to-zero"], notes=True)
    assert done.returncode == 0, done.stderr
    url = env_of(render(CASES["keda-scale-to-zero"]).one("Deployment", "-worker"))["HQ_URL"]
    assert f"export HQ_URL={url}\n" in done.stdout
    assert "scaled by KEDA between 0 and 40" in done.stdout
    done = render_raw(helm_render, tmp_path, CASES["valkey-auth-no-persistence"], notes=True)
    assert "WARNING: valkey.persistence.enabled is false" in done.stdout
    assert "HQ_TLS_CA" not in done.stdout
    done = render_raw(helm_render, tmp_path, CASES["tls-keda"], notes=True)
    assert done.returncode == 0, done.stderr
    assert "export HQ_URL=https://" in done.stdout
    assert "get secret hq-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d" in done.stdout
    assert "export HQ_TLS_CA=" in done.stdout


# ----------------------------------------------------------------------------- values


@pytest.mark.timeout(10)
def test_default_values_match_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(VALUES_SCHEMA)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(VALUES_SCHEMA).validate(values)
    for case, overrides in CASES.items():
        merged = merge(values, overrides)
        errors = list(jsonschema.Draft7Validator(VALUES_SCHEMA).iter_errors(merged))
        assert not errors, f"{case}: {[e.message for e in errors]}"


# (values, the path of the offending value, what the message says)
BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    (
        {"server": {"replicas": "3"}},
        "server.replicas",
        "Invalid type. Expected: integer, given: string",
    ),
    ({"server": {"replicas": 0}}, "server.replicas", "Must be greater than or equal to 1"),
    ({"worker": {"slot": 2}}, "worker", "Additional property slot is not allowed"),
    ({"worker": {"slots": 0}}, "worker.slots", "Must be greater than or equal to 1"),
    ({"image": {"tag": 1.5}}, "image.tag", "Invalid type. Expected: string, given: number"),
    (
        {"image": {"pullPolicy": "Sometimes"}},
        "image.pullPolicy",
        'image.pullPolicy must be one of the following: "Always", "IfNotPresent", "Never"',
    ),
    (
        {"autoscaling": {"maxReplicaCount": 0}},
        "autoscaling.maxReplicaCount",
        "Must be greater than or equal to 1",
    ),
    (
        {"valkey": {"enabled": False}},
        "externalRedis.host",
        "String length must be greater than or equal to 1",
    ),
    (
        {"valkey": {"appendfsync": "no"}},
        "valkey.appendfsync",
        'valkey.appendfsync must be one of the following: "always", "everysec"',
    ),
    ({"valkey": {"maxmemory": "lots"}}, "valkey.maxmemory", "Does not match pattern"),
    (
        {"tls": {"enabled": True}},
        "tls.secretName",
        "String length must be greater than or equal to 1",
    ),
    (
        {"worker": {"resources": {"requests": {"cpu": "two"}}}},
        "worker.resources.requests.cpu",
        "Must validate one and only one schema",
    ),
    ({"worker": {"extraEnv": [{"value": "x"}]}}, "worker.extraEnv.0", "name is required"),
    ({"server": {"port": 70000}}, "server.port", "Must be less than or equal to 65535"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("values", "path", "message"),
    BAD_VALUES,
    ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD_VALUES)],
)
def test_bad_values_fail_with_a_clear_message(
    helm_render: Path, tmp_path: Path, values: dict[str, Any], path: str, message: str
) -> None:
    # As Helm reports it at install (same validator library, same wording) ...
    done = render_raw(helm_render, tmp_path, values)
    assert done.returncode != 0, f"{values} rendered:\n{done.stdout[:500]}"
    assert "values don't meet the specifications of the schema(s)" in done.stderr
    assert f"- {path}: {message}" in done.stderr, done.stderr
    # ... and as any draft-7 validator sees it, naming the value's place.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = list(jsonschema.Draft7Validator(VALUES_SCHEMA).iter_errors(merge(defaults, values)))
    assert errors
    places = {".".join(str(p) for p in e.absolute_path) for e in errors}
    places |= {".".join(str(p) for p in c.absolute_path) for e in errors for c in e.context}
    assert any(path == p or path.startswith(p + ".") or p.startswith(path) for p in places), places


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"autoscaling": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}},
            "autoscaling.minReplicaCount (5) must not exceed autoscaling.maxReplicaCount (2)",
        ),
        (
            {"valkey": {"auth": {"enabled": True}}},
            "valkey.auth.enabled needs valkey.auth.password or valkey.auth.existingSecret",
        ),
    ],
)
def test_values_the_schema_cannot_express_fail_in_the_templates(
    helm_render: Path, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    done = render_raw(helm_render, tmp_path, values)
    assert done.returncode != 0
    assert "execution error at (coffea-hq/templates/" in done.stderr
    assert message in done.stderr, done.stderr


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.timeout(30)
def test_tls_serves_the_secret_and_workers_and_keda_get_only_its_ca(render: Render) -> None:
    rendered = render(CASES["tls-keda"])
    server = rendered.one("Deployment", "-server")
    worker = rendered.one("Deployment", "-worker")
    sc, wc = container(server), container(worker)
    # The server serves the Secret's certificate and key ...
    assert sc["args"][sc["args"].index("--tls-cert") + 1] == "/etc/coffea-hq/tls/tls.crt"
    assert sc["args"][sc["args"].index("--tls-key") + 1] == "/etc/coffea-hq/tls/tls.key"
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "hq-tls", "defaultMode": 0o440}
    for probe in ("readinessProbe", "livenessProbe"):
        assert sc[probe]["httpGet"]["scheme"] == "HTTPS"
    # ... workers get only the CA, never the server's key, and an https URL.
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert env_of(worker)["HQ_TLS_CA"] == "/etc/coffea-hq/tls/ca.crt"
    assert env_of(worker)["HQ_URL"].startswith("https://")
    assert "--tls-cert" not in wc["args"]
    # KEDA reads the queue over https, verifying with the same CA.
    auth = rendered.one("TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "ca", "name": "hq-tls", "key": "ca.crt"}
    ]
    trigger = rendered.one("ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["url"].startswith("https://")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}


@pytest.mark.timeout(30)
def test_tls_with_a_public_ca_mounts_nothing_in_workers(render: Render) -> None:
    rendered = render(CASES["tls-public-ca"])
    worker = rendered.one("Deployment", "-worker")
    volumes = {v["name"] for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert "tls" not in volumes and "HQ_TLS_CA" not in env_of(worker)
    assert env_of(worker)["HQ_URL"].startswith("https://")
    assert not rendered.all("TriggerAuthentication")
    assert "authenticationRef" not in rendered.one("ScaledObject")["spec"]["triggers"][0]
