"""The Helm chart helm/outbox-relay: lint, render, validate offline, policy checks, schema."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import outbox_relay

from .conftest import HelmTemplate
from .helpers import CHART, CI_VALUES, FIXTURES, KUBERNETES_VERSIONS, run

CI_FILES = ["default-values.yaml", "sidecar-values.yaml", "production-values.yaml"]
CRDS_WITHOUT_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor")}
RELAY_CONTAINERS = {"outbox-relay", "migrate"}


# ------------------------------------------------------------------ helpers
def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod_spec(doc)["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {doc['kind']}/{doc['metadata']['name']}")


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def relay_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deps = [d for d in by_kind(docs, "Deployment") if "annotations" not in d["metadata"]]
    assert len(deps) == 1
    return deps[0]


def migration_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Job")


def values_of(ci_file: str, yaml_mod: Any) -> dict[str, Any]:
    merged = yaml_mod.safe_load((CHART / "values.yaml").read_text())
    overrides = yaml_mod.safe_load((CI_VALUES / ci_file).read_text()) or {}

    def deep(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        for k, v in b.items():
            a[k] = (
                deep(a.get(k) or {}, v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            )
        return a

    return deep(merged, overrides)


def ci(name: str) -> Path:
    return CI_VALUES / name


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"relay.batchSize": 500}`` -> ``{"relay": {"batchSize": 500}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def values_file(directory: Path, name: str, values: dict[str, Any], yaml_mod: Any) -> Path:
    path = directory / name
    path.write_text(yaml_mod.safe_dump(values))
    return path


# ------------------------------------------------------------- lint, render
def test_ci_values_files_exist() -> None:
    for name in CI_FILES:
        assert ci(name).is_file(), name


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_helm_lint(helm: str, ci_file: str) -> None:
    proc = run([helm, "lint", "--strict", str(CHART), "-f", str(ci(ci_file))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_rendered_manifests_validate(
    helm_template: HelmTemplate, kubernetes_validate: Any, ci_file: str, k8s_version: str
) -> None:
    docs = helm_template(ci(ci_file))
    assert docs, "nothing rendered"
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CRDS_WITHOUT_SCHEMA, (
                f"no schema for {name} ({doc['apiVersion']}) in Kubernetes {k8s_version}"
            )
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{ci_file}: {name} invalid for Kubernetes {k8s_version}: {path}: {exc.message}"
            )


def test_expected_resources(helm_template: HelmTemplate) -> None:
    kinds = sorted(d["kind"] for d in helm_template(ci("default-values.yaml")))
    assert kinds == sorted(
        [
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "Secret",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
    )
    prod = sorted(d["kind"] for d in helm_template(ci("production-values.yaml")))
    assert prod == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


def test_standard_labels(helm_template: HelmTemplate) -> None:
    for doc in helm_template(ci("default-values.yaml")):
        labels = doc["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ):
            assert key in labels, f"{doc['kind']} lacks label {key}"
        assert labels["app.kubernetes.io/name"] == "outbox-relay"
        assert labels["app.kubernetes.io/instance"] == "rel"


# ------------------------------------------------------- security / policy
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_restricted_security_context(helm_template: HelmTemplate, ci_file: str) -> None:
    docs = helm_template(ci(ci_file))
    assert workloads(docs)
    for doc in workloads(docs):
        spec = pod_spec(doc)
        where = f"{ci_file}: {doc['kind']}/{doc['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] == 10001, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), where
        for vol in spec.get("volumes", []):
            assert set(vol) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            cwhere = f"{where} container {c['name']}"
            assert sc["runAsNonRoot"] is True, cwhere
            assert sc["runAsUser"] == 10001, cwhere
            assert sc["readOnlyRootFilesystem"] is True, cwhere
            assert sc["allowPrivilegeEscalation"] is False, cwhere
            assert sc.get("privileged", False) is False, cwhere
            assert sc["capabilities"]["drop"] == ["ALL"], cwhere
            assert not sc["capabilities"].get("add"), cwhere
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", cwhere
            if c["name"] in RELAY_CONTAINERS:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts, f"{cwhere}: no writable /tmp"
                vol = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
                assert "emptyDir" in vol, cwhere


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_resources_set(helm_template: HelmTemplate, ci_file: str) -> None:
    for doc in workloads(helm_template(ci(ci_file))):
        for c in pod_spec(doc)["containers"]:
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"], c["name"]
            assert res["limits"]["memory"], c["name"]


def test_production_resources_are_higher(helm_template: HelmTemplate) -> None:
    prod = container(relay_deployment(helm_template(ci("production-values.yaml"))), "outbox-relay")
    assert prod["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    }


# ------------------------------------------------------------- deployment
def test_default_deployment(helm_template: HelmTemplate) -> None:
    dep = relay_deployment(helm_template(ci("default-values.yaml")))
    assert dep["spec"]["replicas"] == 2
    spec = pod_spec(dep)
    c = container(dep, "outbox-relay")
    assert c["image"] == "outbox-relay:0.1.0"  # chart appVersion
    assert c["args"] == ["outbox-relay", "run"]
    assert "command" not in c, "must keep the image's tini ENTRYPOINT"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    # pods roll when the chart-managed config changes
    assert len(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]) == 64
    assert spec["serviceAccountName"] == "rel-outbox-relay"
    assert dep["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("ci_file", ["default-values.yaml", "production-values.yaml"])
def test_probes(helm_template: HelmTemplate, ci_file: str) -> None:
    c = container(relay_deployment(helm_template(ci(ci_file))), "outbox-relay")
    port_names = {p["name"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names, probe
    assert env_of(c)["OUTBOX_HTTP_PORT"]["value"] == str(c["ports"][0]["containerPort"])


def test_custom_http_port(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"), sets=["http.port=9100"])
    c = container(relay_deployment(docs), "outbox-relay")
    assert c["ports"][0]["containerPort"] == 9100
    assert env_of(c)["OUTBOX_HTTP_PORT"]["value"] == "9100"
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize(
    ("ci_file", "sets", "expected"),
    [
        ("default-values.yaml", [], 45),
        ("production-values.yaml", [], 75),
        ("sidecar-values.yaml", [], 35),
        ("default-values.yaml", ["shutdownTimeout=100"], 115),
    ],
)
def test_termination_grace_exceeds_shutdown_timeout(
    helm_template: HelmTemplate, yaml_mod: Any, ci_file: str, sets: list[str], expected: int
) -> None:
    docs = helm_template(ci(ci_file), sets=sets)
    dep = by_kind(docs, "Deployment")[0]
    grace = pod_spec(dep)["terminationGracePeriodSeconds"]
    relay = container(dep, "outbox-relay")
    timeout = float(env_of(relay)["OUTBOX_SHUTDOWN_TIMEOUT"]["value"])
    assert grace == expected
    assert grace > timeout
    assert grace == timeout + 15


def test_env_kafka_default(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"))
    env = env_of(container(relay_deployment(docs), "outbox-relay"))
    assert env["OUTBOX_SINK"]["value"] == "kafka"
    assert env["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]["value"] == "kafka:9092"
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-outbox-relay",
        "key": "database-url",
    }
    assert env["OUTBOX_KAFKA_PROPERTIES"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["OUTBOX_SHUTDOWN_TIMEOUT"]["value"] == "30"
    assert env["OUTBOX_LOG_LEVEL"]["value"] == "INFO"
    assert "OUTBOX_WEBHOOK_URL" not in env
    assert "OUTBOX_ROUTES_FILE" not in env
    # secrets never appear as plain values
    for e in env.values():
        assert "postgresql" not in str(e.get("value", ""))


def test_env_webhook_production(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("production-values.yaml"))
    dep = relay_deployment(docs)
    c = container(dep, "outbox-relay")
    env = env_of(c)
    assert env["OUTBOX_SINK"]["value"] == "webhook"
    assert env["OUTBOX_WEBHOOK_URL"]["value"] == "https://events.example.com/hooks/outbox"
    assert env["OUTBOX_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == (
        "outbox-relay-credentials"
    )
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "outbox-relay-credentials",
        "key": "database-url",
    }
    assert env["OUTBOX_SCHEMA"]["value"] == "outbox"
    assert env["OUTBOX_TABLE"]["value"] == "events"
    assert "OUTBOX_KAFKA_BOOTSTRAP_SERVERS" not in env
    assert c["image"] == "registry.example.com/platform/outbox-relay:0.1.0"
    # routes file: the env var points at the mounted ConfigMap key
    cm = one(docs, "ConfigMap")
    assert "[routes.order]" in cm["data"]["routes.toml"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/outbox-relay")
    assert mount["readOnly"] is True
    vol = next(v for v in pod_spec(dep)["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert env["OUTBOX_ROUTES_FILE"]["value"] == "/etc/outbox-relay/routes.toml"
    # existingSecret: the chart creates no Secret at all
    assert by_kind(docs, "Secret") == []


def test_secret_contents(helm_template: HelmTemplate) -> None:
    docs = helm_template(
        ci("default-values.yaml"),
        sets=[
            "secret.kafkaProperties.sasl\\.username=relay",
            "secret.kafkaProperties.sasl\\.password=pw",
        ],
    )
    main = next(s for s in by_kind(docs, "Secret") if "annotations" not in s["metadata"])
    data = {k: base64.b64decode(v).decode() for k, v in main["data"].items()}
    assert data["database-url"] == "postgresql+psycopg://relay:change-me@postgres:5432/app"
    assert json.loads(data["kafka-properties"]) == {"sasl.username": "relay", "sasl.password": "pw"}
    assert "webhook-secret" not in data
    assert "webhook-headers" not in data


def test_webhook_headers_go_through_the_secret(helm_template: HelmTemplate) -> None:
    docs = helm_template(
        ci("default-values.yaml"),
        sets=[
            "sink=webhook",
            "webhook.url=https://hooks.example.com/outbox",
            "secret.webhookHeaders.Authorization=Bearer t0ken",
            "secret.webhookHeaders.X-Tenant=acme",
        ],
    )
    headers = {"Authorization": "Bearer t0ken", "X-Tenant": "acme"}
    for secret in by_kind(docs, "Secret"):  # the chart's Secret and the migration hook's copy
        assert json.loads(base64.b64decode(secret["data"]["webhook-headers"])) == headers
    for doc, name in ((relay_deployment(docs), "outbox-relay"), (migration_job(docs), "migrate")):
        env = env_of(container(doc, name))
        ref = env["OUTBOX_WEBHOOK_HEADERS"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "webhook-headers" and ref["optional"] is True
        assert ref["name"] == env["OUTBOX_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
        assert "Bearer" not in json.dumps(env)


def test_image_digest_and_tag(helm_template: HelmTemplate) -> None:
    digest = "sha256:" + "a" * 64
    docs = helm_template(ci("default-values.yaml"), sets=[f"image.digest={digest}"])
    assert container(relay_deployment(docs), "outbox-relay")["image"] == f"outbox-relay@{digest}"
    docs = helm_template(ci("default-values.yaml"), sets=["image.tag=1.2.3"])
    assert container(relay_deployment(docs), "outbox-relay")["image"] == "outbox-relay:1.2.3"


# ------------------------------------------------------------ migration hook
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_migration_job_is_a_hook(helm_template: HelmTemplate, ci_file: str) -> None:
    docs = helm_template(ci(ci_file))
    job = migration_job(docs)
    ann = job["metadata"]["annotations"]
    assert set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    c = container(job, "migrate")
    assert c["args"] == ["outbox-relay", "migrate"]
    assert "livenessProbe" not in c and "ports" not in c
    assert env_of(c)["OUTBOX_HTTP_PORT"]["value"] == "0"
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_migration_hook_uses_only_resources_that_exist_before_install(
    helm_template: HelmTemplate, yaml_mod: Any, ci_file: str
) -> None:
    """A pre-install hook runs before the release's ordinary resources exist."""
    docs = helm_template(ci(ci_file))
    job = migration_job(docs)
    job_weight = int(job["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
    values = values_of(ci_file, yaml_mod)
    earlier_hooks = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if "helm.sh/hook" in d["metadata"].get("annotations", {})
        and "pre-install" in d["metadata"]["annotations"]["helm.sh/hook"]
        and int(d["metadata"]["annotations"].get("helm.sh/hook-weight", "0")) < job_weight
    }
    external = {("Secret", values["existingSecret"])} if values["existingSecret"] else set()
    spec = pod_spec(job)
    refs = set()
    for c in spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                refs.add(("Secret", ref["name"]))
            elif ref:
                # optional refs must not point at a non-hook Secret of this release either
                chart_secrets = {
                    ("Secret", d["metadata"]["name"])
                    for d in by_kind(docs, "Secret")
                    if "annotations" not in d["metadata"]
                }
                assert ("Secret", ref["name"]) not in chart_secrets, e["name"]
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            refs.add(("ConfigMap", vol["configMap"]["name"]))
        if "secret" in vol:
            refs.add(("Secret", vol["secret"]["secretName"]))
    assert "serviceAccountName" not in spec or not values["serviceAccount"]["create"]
    assert refs <= earlier_hooks | external, f"hook Job needs {refs - earlier_hooks - external}"


def test_migration_hook_secret(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"))
    hook = next(s for s in by_kind(docs, "Secret") if "annotations" in s["metadata"])
    ann = hook["metadata"]["annotations"]
    assert int(ann["helm.sh/hook-weight"]) < int(
        migration_job(docs)["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert "hook-succeeded" in ann["helm.sh/hook-delete-policy"]


def test_migration_can_be_disabled(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"), sets=["migration.enabled=false"])
    assert by_kind(docs, "Job") == []
    assert len(by_kind(docs, "Secret")) == 1


# ---------------------------------------------------- PDB, Service, monitor
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_pdb(helm_template: HelmTemplate, ci_file: str) -> None:
    docs = helm_template(ci(ci_file))
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] >= 1
    dep = by_kind(docs, "Deployment")[0]
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # the selector must not match the migration Job's pods
    job_labels = migration_job(docs)["spec"]["template"]["metadata"]["labels"]
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= job_labels.items(), job_labels


def test_default_pdb_min_available_1(helm_template: HelmTemplate) -> None:
    pdb = one(helm_template(ci("default-values.yaml")), "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "outbox-relay",
                "app.kubernetes.io/instance": "rel",
                "app.kubernetes.io/component": "relay",
            }
        },
    }


def test_no_pdb_for_single_replica(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"), sets=["replicaCount=1"])
    assert by_kind(docs, "PodDisruptionBudget") == []
    assert relay_deployment(docs)["spec"]["replicas"] == 1


def test_service_and_service_monitor(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("production-values.yaml"))
    svc = one(docs, "Service")
    dep = relay_deployment(docs)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    port = svc["spec"]["ports"][0]
    assert port["targetPort"] in {p["name"] for p in container(dep, "outbox-relay")["ports"]}
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["outbox"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {
        "port": port["name"],
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "5s",
    }
    assert by_kind(helm_template(ci("default-values.yaml")), "ServiceMonitor") == []


def test_topology_spread_is_templated(helm_template: HelmTemplate) -> None:
    spec = pod_spec(relay_deployment(helm_template(ci("production-values.yaml"))))
    (tsc,) = spec["topologySpreadConstraints"]
    assert tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "rel"


# ----------------------------------------------------------------- sidecar
def test_sidecar_example(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("sidecar-values.yaml"))
    (dep,) = by_kind(docs, "Deployment")
    assert dep["metadata"]["name"] == "rel-outbox-relay-producer-example"
    assert dep["spec"]["replicas"] == 3
    spec = pod_spec(dep)
    assert [c["name"] for c in spec["containers"]] == ["app", "outbox-relay"]
    relay = container(dep, "outbox-relay")
    env = env_of(relay)
    # shares the producer's database Secret
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "producer-app-db",
        "key": "DATABASE_URL",
    }
    assert [p["name"] for p in relay["ports"]] == ["outbox-http"]
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "outbox-http"}
    assert "readinessProbe" not in relay, "sidecar readiness must not gate the producer pod"
    vols = {v["name"] for v in spec["volumes"]}
    assert vols == {"outbox-relay-tmp", "outbox-relay-routes"}
    assert {m["name"] for m in relay["volumeMounts"]} == vols
    assert env["OUTBOX_ROUTES_FILE"]["value"] == "/etc/outbox-relay/routes.toml"
    svc = one(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "outbox-http"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def _producer_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "producer-app"
    shutil.copytree(FIXTURES / "producer-app", chart)
    shutil.copytree(CHART, chart / "charts" / "outbox-relay", ignore=shutil.ignore_patterns("ci"))
    return chart


def test_producer_chart_with_sidecar(
    helm_template: HelmTemplate, kubernetes_validate: Any, tmp_path: Path
) -> None:
    """The documented sidecar form, from a producer chart that depends on this chart."""
    docs = helm_template(chart=_producer_chart(tmp_path), release="shop")
    kinds = sorted(d["kind"] for d in docs)
    # library mode: the subchart renders no Deployment/Service/PDB of its own
    assert kinds == ["ConfigMap", "Deployment", "Job"], kinds
    (dep,) = by_kind(docs, "Deployment")
    assert dep["metadata"]["name"] == "shop-producer-app"
    spec = pod_spec(dep)
    assert [c["name"] for c in spec["containers"]] == ["app", "outbox-relay"]
    relay = container(dep, "outbox-relay")
    assert relay["image"] == "registry.example.com/platform/outbox-relay:0.1.0"
    env = env_of(relay)
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "producer-app-db",
        "key": "DATABASE_URL",
    }
    assert env["OUTBOX_KAFKA_PROPERTIES"]["valueFrom"]["secretKeyRef"] == {
        "name": "producer-app-db",
        "key": "KAFKA_PROPERTIES",
        "optional": True,
    }
    assert spec["terminationGracePeriodSeconds"] == 60  # shutdownTimeout 45 + 15
    cm = one(docs, "ConfigMap")
    routes = next(v for v in spec["volumes"] if v["name"] == "outbox-relay-routes")
    assert routes["configMap"]["name"] == cm["metadata"]["name"] == "shop-outbox-relay-routes"
    job = migration_job(docs)
    assert (
        env_of(container(job, "migrate"))["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"][
            "name"
        ]
        == "producer-app-db"
    )
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_producer_chart_lints(helm: str, tmp_path: Path) -> None:
    proc = run([helm, "lint", "--strict", str(_producer_chart(tmp_path))])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ NOTES
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_notes_render(helm_template: HelmTemplate, tmp_path: Path, ci_file: str) -> None:
    """`helm template` skips NOTES.txt: render it through a probe template in a copy."""
    chart = tmp_path / "outbox-relay"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_probe.tpl").write_text(
        '{{- define "notes-probe" -}}\n' + notes + "\n{{- end }}\n"
    )
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\ndata:\n"
        '  notes: |\n    {{- include "notes-probe" . | nindent 4 }}\n'
    )
    docs = helm_template(ci(ci_file), chart=chart)
    text = next(d for d in docs if d["metadata"]["name"] == "notes-probe")["data"]["notes"]
    assert "outbox-relay 0.1.0" in text
    assert "migrate" in text


# ------------------------------------------------------- optional settings
# values path -> (env var, a valid value as in a values file, the env value the relay reads).
# Falsy values (false, 0) are here on purpose: they are set, so they must be rendered.
SETTINGS: dict[str, tuple[str, Any, str]] = {
    "outbox.shards": ("OUTBOX_SHARDS", 64, "64"),
    "logFormat": ("OUTBOX_LOG_FORMAT", "text", "text"),
    "kafka.topicPrefix": ("OUTBOX_KAFKA_TOPIC_PREFIX", "prod.", "prod."),
    "kafka.deliveryTimeout": ("OUTBOX_KAFKA_DELIVERY_TIMEOUT", 45, "45"),
    "kafka.exactlyOnce": ("OUTBOX_KAFKA_EXACTLY_ONCE", True, "true"),
    "kafka.transactionalIdPrefix": ("OUTBOX_KAFKA_TRANSACTIONAL_ID_PREFIX", "shop-", "shop-"),
    "kafka.progressTopic": ("OUTBOX_KAFKA_PROGRESS_TOPIC", "shop.progress", "shop.progress"),
    "webhook.timeout": ("OUTBOX_WEBHOOK_TIMEOUT", 7.5, "7.5"),
    "webhook.concurrency": ("OUTBOX_WEBHOOK_CONCURRENCY", 32, "32"),
    "webhook.allowPrivate": ("OUTBOX_WEBHOOK_ALLOW_PRIVATE", False, "false"),
    "webhook.breakerFailures": ("OUTBOX_WEBHOOK_BREAKER_FAILURES", 8, "8"),
    "webhook.breakerCooldown": ("OUTBOX_WEBHOOK_BREAKER_COOLDOWN", 60, "60"),
    "relay.batchSize": ("OUTBOX_BATCH_SIZE", 500, "500"),
    "relay.wakeup": ("OUTBOX_WAKEUP", "poll", "poll"),
    "relay.pollInterval": ("OUTBOX_POLL_INTERVAL", 0.5, "0.5"),
    "relay.heartbeatInterval": ("OUTBOX_HEARTBEAT_INTERVAL", 20, "20"),
    "relay.rebalanceInterval": ("OUTBOX_REBALANCE_INTERVAL", 3, "3"),
    "relay.rescanInterval": ("OUTBOX_RESCAN_INTERVAL", 30, "30"),
    "relay.leases": ("OUTBOX_LEASES", False, "false"),
    "relay.leaseNamespace": ("OUTBOX_LEASE_NAMESPACE", 2_000_000_000, "2000000000"),
    "relay.maxAttempts": ("OUTBOX_MAX_ATTEMPTS", 25, "25"),
    "relay.retryBackoffBase": ("OUTBOX_RETRY_BACKOFF_BASE", 0.25, "0.25"),
    "relay.retryBackoffMax": ("OUTBOX_RETRY_BACKOFF_MAX", 600, "600"),
    "relay.strictOrder": ("OUTBOX_STRICT_ORDER", True, "true"),
    "relay.keepSent": ("OUTBOX_KEEP_SENT", True, "true"),
    "retention.period": ("OUTBOX_RETENTION", "7d", "7d"),
    "retention.batch": ("OUTBOX_RETENTION_BATCH", 2000, "2000"),
    "retention.interval": ("OUTBOX_RETENTION_INTERVAL", "5m", "5m"),
    "guard.interval": ("OUTBOX_GUARD_INTERVAL", 45, "45"),
    "guard.xactAge": ("OUTBOX_GUARD_XACT_AGE", "10m", "10m"),
    # a values file gives float64: a large whole number must not become 5e+07
    "guard.slotXminAge": ("OUTBOX_GUARD_SLOT_XMIN_AGE", 50_000_000, "50000000"),
    "guard.deadTuples": ("OUTBOX_GUARD_DEAD_TUPLES", 2_000_000, "2000000"),
    "guard.pendingSlo": ("OUTBOX_PENDING_SLO", 0, "0"),
    "metrics.gaugeInterval": ("OUTBOX_GAUGE_INTERVAL", "250ms", "250ms"),
}
SETTING_VARS = {var for var, _, _ in SETTINGS.values()}
#: what `outbox-relay migrate` reads: the shard count of the table it creates, the log format
MIGRATE_SETTING_VARS = {"OUTBOX_SHARDS", "OUTBOX_LOG_FORMAT"}


def settings_env(c: dict[str, Any]) -> dict[str, str]:
    """The optional settings a rendered container gets: env var -> value."""
    return {e["name"]: e["value"] for e in c.get("env", []) if e["name"] in SETTING_VARS}


def expected_env(paths: Any = SETTINGS) -> dict[str, str]:
    return {SETTINGS[p][0]: SETTINGS[p][2] for p in paths}


@pytest.fixture(scope="session")
def all_settings(yaml_mod: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A values file setting every optional setting (one replica: leases is false)."""
    values = nested({path: value for path, (_, value, _) in SETTINGS.items()})
    values["replicaCount"] = 1
    return values_file(tmp_path_factory.mktemp("values"), "all-settings.yaml", values, yaml_mod)


def test_settings_table_covers_values_yaml(yaml_mod: Any) -> None:
    """Every null default of values.yaml is an optional setting the chart renders."""
    values = yaml_mod.safe_load((CHART / "values.yaml").read_text())

    def null_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
        found = set()
        for key, value in node.items():
            if isinstance(value, dict):
                found |= null_paths(value, f"{prefix}{key}.")
            elif value is None:
                found.add(f"{prefix}{key}")
        return found

    assert null_paths(values) - {"podDisruptionBudget.maxUnavailable"} == set(SETTINGS)


def test_readme_lists_every_setting() -> None:
    readme = (CHART / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("| `")]
    rows = {line.split("|")[1].strip(): line for line in lines}
    for path, (var, _, _) in SETTINGS.items():
        assert f"`{var}`" in rows.get(f"`{path}`", ""), f"README.md has no row `{path}` -> {var}"


@pytest.mark.parametrize("path", SETTINGS)
def test_setting_renders_only_when_set(
    helm_template: HelmTemplate, yaml_mod: Any, tmp_path: Path, path: str
) -> None:
    var, value, rendered = SETTINGS[path]
    extra = {"replicaCount": 1} if path == "relay.leases" else {}
    overrides = values_file(tmp_path, "one.yaml", {**nested({path: value}), **extra}, yaml_mod)
    docs = helm_template(ci("default-values.yaml"), overrides)
    assert settings_env(container(relay_deployment(docs), "outbox-relay")) == {var: rendered}
    migrate = settings_env(container(migration_job(docs), "migrate"))
    assert migrate == ({var: rendered} if var in MIGRATE_SETTING_VARS else {})


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_unset_settings_are_left_out(helm_template: HelmTemplate, ci_file: str) -> None:
    for doc in workloads(helm_template(ci(ci_file))):
        for c in pod_spec(doc)["containers"]:
            assert settings_env(c) == {}, f"{ci_file}: {doc['metadata']['name']}/{c['name']}"


def test_setting_set_back_to_null_is_left_out(helm_template: HelmTemplate) -> None:
    docs = helm_template(ci("default-values.yaml"), sets=["relay.batchSize=500"])
    assert settings_env(container(relay_deployment(docs), "outbox-relay")) == {
        "OUTBOX_BATCH_SIZE": "500"
    }
    docs = helm_template(
        ci("default-values.yaml"), sets=["relay.batchSize=500", "relay.batchSize=null"]
    )
    assert settings_env(container(relay_deployment(docs), "outbox-relay")) == {}


def test_all_settings_render(helm_template: HelmTemplate, all_settings: Path) -> None:
    docs = helm_template(ci("default-values.yaml"), all_settings)
    relay = container(relay_deployment(docs), "outbox-relay")
    assert settings_env(relay) == expected_env()
    migrate = container(migration_job(docs), "migrate")
    assert settings_env(migrate) == expected_env(
        p for p in SETTINGS if SETTINGS[p][0] in MIGRATE_SETTING_VARS
    )
    # after the chart's own variables, before extraEnv
    names = [e["name"] for e in relay["env"]]
    assert names.index("OUTBOX_HTTP_PORT") < min(names.index(v) for v in SETTING_VARS)


def test_sidecar_gets_the_same_settings(
    helm_template: HelmTemplate, yaml_mod: Any, all_settings: Path, tmp_path: Path
) -> None:
    docs = helm_template(ci("sidecar-values.yaml"), all_settings)
    (dep,) = by_kind(docs, "Deployment")
    assert settings_env(container(dep, "outbox-relay")) == expected_env()
    assert settings_env(container(dep, "app")) == {}
    # and from a producer chart, through the subchart's values
    relay_values = yaml_mod.safe_load(all_settings.read_text())
    producer = values_file(tmp_path, "producer.yaml", {"outbox-relay": relay_values}, yaml_mod)
    docs = helm_template(producer, chart=_producer_chart(tmp_path), release="shop")
    (dep,) = by_kind(docs, "Deployment")
    assert settings_env(container(dep, "outbox-relay")) == expected_env()


@pytest.mark.parametrize("var", sorted(SETTING_VARS))
def test_setting_names_are_relay_settings(var: str) -> None:
    """Settings ignores unknown OUTBOX_ variables: a misspelt name would be silently unused."""
    from outbox_relay.settings import Settings

    assert var.removeprefix("OUTBOX_").lower() in Settings.model_fields


def test_rendered_settings_parse_in_the_relay(
    helm_template: HelmTemplate, all_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay reads each rendered value as the value given in values.yaml."""
    from outbox_relay.settings import Settings, load_settings

    docs = helm_template(ci("default-values.yaml"), all_settings)
    env = settings_env(container(relay_deployment(docs), "outbox-relay"))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    from_env = load_settings()
    given = {
        var.removeprefix("OUTBOX_").lower(): value
        for var, value, _ in SETTINGS.values()
        if var.removeprefix("OUTBOX_").lower() in Settings.model_fields
    }
    from_values = load_settings(**given)
    assert given
    for field in given:
        assert getattr(from_env, field) == getattr(from_values, field), field


# ------------------------------------------------------------------ schema
def test_values_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False


def test_chart_yaml(yaml_mod: Any) -> None:
    meta = yaml_mod.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "outbox-relay"
    # the image the chart runs by default is tagged with the package's version
    assert meta["appVersion"] == outbox_relay.__version__
    values = yaml_mod.safe_load((CHART / "values.yaml").read_text())
    assert values["replicaCount"] == 2
    assert values["mode"] == "deployment"


BAD_VALUES = [
    pytest.param(["replicaCount=0"], "replicaCount", id="replicas-zero"),
    pytest.param(["replicaCount=1.5"], "replicaCount", id="replicas-non-integer"),
    pytest.param(["replicaCount=two"], "replicaCount", id="replicas-string"),
    pytest.param(["sink=bogus"], "sink", id="sink-bogus"),
    pytest.param(["mode=daemonset"], "mode", id="mode-bogus"),
    pytest.param(["secret.databaseUrl="], "databaseUrl", id="no-database-url"),
    pytest.param(["secret.databaseUrl=mysql://x/y"], "databaseUrl", id="database-url-not-pg"),
    pytest.param(["kafka.bootstrapServers="], "bootstrapServers", id="kafka-no-bootstrap"),
    pytest.param(["kafka.bootstrapServers=no-port"], "bootstrapServers", id="kafka-bad-bootstrap"),
    pytest.param(["sink=webhook"], "url", id="webhook-no-url"),
    pytest.param(["sink=webhook", "webhook.url=ftp://x"], "url", id="webhook-bad-url"),
    pytest.param(["replicas=3"], "replicas", id="unknown-top-level-key"),
    pytest.param(["http.port=80"], "port", id="privileged-port"),
    pytest.param(["shutdownTimeout=0"], "shutdownTimeout", id="shutdown-timeout-zero"),
    pytest.param(["logLevel=verbose"], "logLevel", id="log-level-bogus"),
    pytest.param(["outbox.table=bad-name"], "table", id="table-not-identifier"),
    pytest.param(["securityContext.runAsNonRoot=false"], "runAsNonRoot", id="root"),
    pytest.param(["image.pullPolicy=Sometimes"], "pullPolicy", id="pull-policy"),
    pytest.param(["relay.batchSize=0"], "batchSize", id="batch-size-zero"),
    pytest.param(["relay.batchSize=100001"], "batchSize", id="batch-size-too-big"),
    pytest.param(["relay.bachSize=10"], "bachSize", id="relay-unknown-key"),
    pytest.param(["relay.wakeup=listen"], "wakeup", id="wakeup-bogus"),
    pytest.param(["relay.leases=false"], "replicaCount", id="no-leases-several-replicas"),
    pytest.param(["relay.rescanInterval=3601"], "rescanInterval", id="rescan-interval-too-big"),
    pytest.param(["relay.keepSent=1"], "keepSent", id="keep-sent-not-bool"),
    pytest.param(["kafka.exactlyOnce=yes"], "exactlyOnce", id="exactly-once-not-bool"),
    pytest.param(["outbox.shards=2048"], "shards", id="shards-too-many"),
    pytest.param(["logFormat=yaml"], "logFormat", id="log-format-bogus"),
    pytest.param(["webhook.concurrency=0"], "concurrency", id="webhook-concurrency-zero"),
    pytest.param(["webhook.timeout=301"], "timeout", id="webhook-timeout-too-long"),
    pytest.param(["retention.period=7 days"], "period", id="retention-not-a-duration"),
    pytest.param(["guard.xactAge=0s"], "xactAge", id="xact-age-zero-duration"),
    pytest.param(["guard.slotXminAge=0"], "slotXminAge", id="slot-xmin-age-zero"),
    pytest.param(["secret.webhookHeaders.X-Tenant=1"], "webhookHeaders", id="header-not-string"),
]


@pytest.mark.parametrize(("sets", "field"), BAD_VALUES)
def test_schema_rejects_bad_values(helm: str, sets: list[str], field: str) -> None:
    base = [str(CHART), "-f", str(ci("default-values.yaml"))]
    set_args = [a for s in sets for a in ("--set", s)]
    # the same values without the bad setting render fine: the failure is the schema's
    assert run([helm, "template", "rel", *base]).returncode == 0
    for cmd in (["template", "rel"], ["lint", "--strict"]):
        proc = run([helm, *cmd, *base, *set_args])
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {sets}:\n{out}"
        assert "schema" in out, out
        assert field in out, out


def test_schema_accepts_existing_secret_without_database_url(helm_template: HelmTemplate) -> None:
    docs = helm_template(
        ci("default-values.yaml"), sets=["secret.databaseUrl=", "existingSecret=my-db"]
    )
    env = env_of(container(relay_deployment(docs), "outbox-relay"))
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "my-db"
    assert by_kind(docs, "Secret") == []
