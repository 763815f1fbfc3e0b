"""k8s/: every overlay renders (kubectl kustomize), every object passes strict schema
validation (kubernetes-validate for Kubernetes' own kinds, the CRD schemas in k8s/schemas
for the operators' kinds), checkov finds nothing unexplained, and the manifests say what
the deployment depends on: probes, limits, drain deadlines, one autoscaler per workload on
the right queue, NetworkPolicies, no committed secret, the migration before the rollout.

No cluster is needed (none can run here): everything is read from the rendered YAML.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from engine.config import load_settings
from engine.topology import Topology
from tests.deploy.tools import (
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    ROOT,
    by_kind,
    kustomize,
    rendered,
    run,
    tool,
)

SCHEMAS = K8S / "schemas"
APP_COMPONENTS = ("api", "worker", "web")
HEARTBEAT_TIMEOUT = 30  # WORKER_HEARTBEAT_TIMEOUT's default, in the probes' code


def test_there_is_a_dev_and_a_production_overlay():
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = {doc["kind"] for doc in rendered(overlay)}
    assert {"Deployment", "ScaledObject", "Job", "Ingress", "NetworkPolicy", "Cluster"} <= kinds


def test_the_external_secrets_component_renders(tmp_path):
    """The optional component, in a kustomization of its own around production (as an
    operator would add it; kustomize takes relative paths only)."""
    production = os.path.relpath(K8S / "overlays" / "production", tmp_path)
    component = os.path.relpath(K8S / "components" / "external-secrets", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{production}]\ncomponents: [{component}]\n"
    )
    docs = [doc for doc in yaml.safe_load_all(kustomize(tmp_path)) if doc]
    assert set(by_kind(docs, "ExternalSecret")) == {
        "batchsender-app", "batchsender-clickhouse", "batchsender-dragonfly",
        "batchsender-backup-s3",
    }  # fmt: skip
    assert _validate_custom(docs) >= 14


# --- schemas -----------------------------------------------------------------------------


def _k8s_definitions() -> dict:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = folder / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the JSON Schema kept in k8s/schemas/."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*/*")):
        if path.suffix not in (".json", ".yaml"):
            continue
        schema = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        )
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        assert key not in schemas, f"two schemas for {key}"
        schemas[key] = schema
    return schemas


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    definitions = _k8s_definitions()
    registry = referencing.Registry().with_resource(
        definitions["$id"], referencing.Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _validate_custom(docs: list[dict]) -> int:
    schemas = crd_schemas()
    checked = 0
    for doc in docs:
        schema = schemas.get((doc["apiVersion"], doc["kind"]))
        if schema is None:
            continue
        errors = [
            f"{'/'.join(map(str, error.absolute_path))}: {error.message[:300]}"
            for error in _validator(schema).iter_errors(doc)
        ]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)
        checked += 1
    return checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_strict_schema_validation(overlay):
    """Kubernetes' own kinds against the pinned version's schema (kubernetes-validate,
    strict: an unknown field is an error); every other kind must have a CRD schema here."""
    custom = crd_schemas()
    for doc in rendered(overlay):
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in custom:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(
                f"{name} ({doc['apiVersion']}): no schema, neither Kubernetes' nor in k8s/schemas/"
            )
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {'/'.join(map(str, error.path))}: {error.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd_schemas(overlay):
    docs = rendered(overlay)
    assert _validate_custom(docs) >= 10, "fewer custom resources checked than there are"


def test_every_crd_schema_is_used_and_names_its_source():
    used = {(doc["apiVersion"], doc["kind"]) for overlay in OVERLAYS for doc in rendered(overlay)}
    used |= {("external-secrets.io/v1beta1", "ExternalSecret")}  # the optional component
    for key, schema in crd_schemas().items():
        assert key in used, f"schema of {key} that nothing uses"
        assert schema.get("$comment"), f"schema of {key}: say where it comes from ($comment)"


# --- checkov -----------------------------------------------------------------------------


def checkov(*args: str) -> dict:
    result = run(tool("checkov"), "--skip-download", "--quiet", "-o", "json", *args, timeout=300)
    assert result.returncode in (0, 1) and result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout)


def failed_and_skipped(report: dict | list) -> tuple[list[dict], list[dict]]:
    """checkov's JSON: one report per framework (a list), or one; a bare summary when no
    check applied at all."""
    reports = report if isinstance(report, list) else [report]
    results = [r.get("results", {}) for r in reports]
    failed = [c for r in results for c in r.get("failed_checks", [])]
    skipped = [c for r in results for c in r.get("skipped_checks", [])]
    return failed, skipped


def test_checkov_finds_nothing_unexplained_in_the_rendered_manifests(tmp_path):
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(kustomize(K8S / "overlays" / overlay))
    failed, skipped = failed_and_skipped(checkov("-d", str(tmp_path), "--framework", "kubernetes"))
    assert not failed, "\n".join(
        f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in failed
    )
    for check in skipped:  # checkov.io/skipN: CHECK=reason
        assert len(check.get("suppress_comment") or "") > 20, f"skip without a reason: {check}"


def test_checkov_finds_no_secret_in_k8s():
    failed, _ = failed_and_skipped(checkov("-d", str(K8S), "--framework", "secrets"))
    assert not failed, [f"{c['check_id']} {c['file_path']}" for c in failed]


# --- the workloads -----------------------------------------------------------------------


def _deployments(overlay: str = "production") -> dict[str, dict]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in by_kind(rendered(overlay), "Deployment").values()}  # fmt: skip


def _pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def test_there_is_a_deployment_for_api_workers_and_web_of_one_image():
    deployments = _deployments()
    assert set(deployments) == set(APP_COMPONENTS)
    images = {
        c["image"] for _, spec in _pod_specs(rendered("production")) for c in spec["containers"]
    }
    assert len(images) == 1, images
    args = {
        name: d["spec"]["template"]["spec"]["containers"][0]["args"]
        for name, d in deployments.items()
    }
    assert args == {name: ["batchsender", name] for name in APP_COMPONENTS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_keep_tini_have_limits_and_run_restricted(overlay):
    for doc, spec in _pod_specs(rendered(overlay)):
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            assert "command" not in container, (
                f"{name}: command replaces tini (ENTRYPOINT): use args"
            )
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (name, kind)
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: METRICS_DIR and the heartbeats need a writable /tmp"


def test_http_probes_use_health_live_and_health():
    """Liveness /health/live, readiness /health (the dependencies) where the process has
    it: the API; the web dashboard has /health/live only (web/app.py)."""
    for component, ready in (("api", "/health"), ("web", "/health/live")):
        container = _deployments()[component]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live", component
        assert container["readinessProbe"]["httpGet"]["path"] == ready, component
        assert container["startupProbe"]["httpGet"]["path"] == "/health/live", component


def test_worker_probes_read_the_heartbeat_files():
    container = _deployments()["worker"]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        code = container[probe]["exec"]["command"][-1]
        assert "/tmp/batchsender-heartbeat-*/*" in code and f"< {HEARTBEAT_TIMEOUT}" in code, probe
    # the supervisor's heartbeat folders (engine/supervisor.py: mkdtemp prefix)
    assert 'prefix="batchsender-heartbeat-"' in (ROOT / "engine" / "supervisor.py").read_text()


def _config(overlay: str = "production") -> dict[str, str]:
    return by_kind(rendered(overlay), "ConfigMap")["batchsender-config"]["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_is_longer_than_the_drain_deadline(overlay):
    drain = float(_config(overlay)["DRAIN_TIMEOUT"])
    worker = _deployments(overlay)["worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > drain + 5
    api = _deployments(overlay)["api"]["spec"]["template"]["spec"]
    assert api["terminationGracePeriodSeconds"] > 60  # aiohttp's shutdown timeout


def _environment(doc: dict, container: dict, config: dict[str, str]) -> dict[str, str]:
    """The environment a container would get, secrets replaced by strong dummy values."""
    secret = "Zq8vN3xWk2Lp7Rt5Yb9Hc4Md6Fg1Js0A"  # 32 characters, many distinct
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "batchsender-config"
            environ.update(config)
        else:
            assert source["secretRef"]["name"] == "batchsender-app", doc["metadata"]["name"]
            environ.update(UNSUBSCRIBE_SECRET=secret, CREDENTIALS_KEYS=secret[::-1])
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            environ[item["name"]] = (
                "postgresql://batchsender:pw@batchsender-pg-rw.batchsender:5432/batchsender"
                if ref["key"] == "uri"
                else "0123456789abcdef"
            )
        else:
            environ[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: environ[m.group(1)], item["value"]
            )
    return environ


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_gets_settings_that_load_in_prod(overlay):
    """engine/config.py's own validation, on the environment the manifests give: a missing,
    misspelt or malformed setting fails here, not at the first pod start."""
    config = _config(overlay)
    for doc, spec in _pod_specs(rendered(overlay)):
        for container in spec["containers"]:
            environ = _environment(doc, container, config)
            settings = load_settings(environ)
            assert settings.env == "prod"
            assert settings.nats_url == "nats://nats:4222"
            assert settings.worker_processes == 1
            assert settings.clickhouse_url.endswith("@clickhouse-batchsender:8123")


# --- autoscaling -------------------------------------------------------------------------


def _scaled_objects(overlay: str) -> dict[str, dict]:
    return by_kind(rendered(overlay), "ScaledObject")


def test_workers_scale_2_to_50_on_the_send_consumer_or_cpu():
    scaled = _scaled_objects("production")
    assert list(scaled) == ["batchsender-worker"]
    spec = scaled["batchsender-worker"]["spec"]
    assert spec["scaleTargetRef"]["name"] == "batchsender-worker"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 50)
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"nats-jetstream", "cpu"}
    assert triggers["cpu"]["metricType"] == "Utilization"
    assert triggers["cpu"]["metadata"] == {"value": "60"}
    nats = triggers["nats-jetstream"]
    assert nats["metricType"] == "AverageValue"  # per pod: ceil(depth / 1000)
    metadata = nats["metadata"]
    assert metadata["lagThreshold"] == "1000"
    # the names the engine gives the SEND stream and its consumer (engine/topology.py)
    topology = Topology(load_settings({**_environment_for_names()}).nats_prefix)
    assert metadata["stream"] == topology.send_stream
    consumers = [c.durable_name for c in topology.consumer_configs()[topology.send_stream]]
    assert consumers == [metadata["consumer"]] == ["send"]


def _environment_for_names() -> dict[str, str]:
    config = _config()
    worker = _deployments()["worker"]
    return _environment(worker, worker["spec"]["template"]["spec"]["containers"][0], config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_reads_the_consumer_from_its_leader_in_the_deployments_namespace(overlay):
    """The headless service names each server (KEDA asks the consumer's leader by name, not
    whichever follower a ClusterIP picks), in the namespace NATS and the workers run in."""
    worker = _deployments(overlay)["worker"]
    trigger = next(t for t in _scaled_objects(overlay)["batchsender-worker"]["spec"]["triggers"]
                   if t["type"] == "nats-jetstream")  # fmt: skip
    host, _, port = trigger["metadata"]["natsServerMonitoringEndpoint"].partition(":")
    service, namespace = host.split(".")[:2]
    assert service.endswith("-headless") and port == "8222"
    assert namespace == worker["metadata"]["namespace"]
    releases = (K8S / "helm" / "releases.txt").read_text().split("\n")
    nats = next(line.split() for line in releases if line.startswith("nats "))
    assert (nats[0], nats[1]) == (service.removesuffix("-headless"), namespace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_autoscaler_per_deployment_and_none_owns_a_replica_count_it_does_not_set(overlay):
    docs = rendered(overlay)
    targets = [
        h["spec"]["scaleTargetRef"]["name"]
        for h in by_kind(docs, "HorizontalPodAutoscaler").values()
    ]
    keda = [s["spec"]["scaleTargetRef"]["name"] for s in by_kind(docs, "ScaledObject").values()]
    # KEDA makes its own HPA for a ScaledObject: a second one on the same Deployment fights it
    assert not set(targets) & set(keda), "an HPA besides KEDA's on the same Deployment"
    assert len(targets + keda) == len(set(targets + keda))
    assert sorted(targets + keda) == ["batchsender-api", "batchsender-worker"]
    for name in targets + keda:
        deployment = by_kind(docs, "Deployment")[name]
        assert "replicas" not in deployment["spec"], (
            f"{name}: an apply would reset the autoscaler's count"
        )


def test_the_api_scales_on_cpu():
    hpa = by_kind(rendered("production"), "HorizontalPodAutoscaler")["batchsender-api"]["spec"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["minReplicas"] >= 2


def test_nats_is_three_servers_and_never_autoscaled():
    values = yaml.safe_load((K8S / "helm" / "values" / "nats.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        scaled = [
            d["spec"]["scaleTargetRef"]["name"]
            for d in docs
            if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
        ]
        assert not [name for name in scaled if "nats" in name]


# --- availability ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_pdb_and_spreads_over_nodes(overlay):
    docs = rendered(overlay)
    budgets = by_kind(docs, "PodDisruptionBudget").values()
    for name, deployment in by_kind(docs, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
                   for b in budgets), f"{name}: no PodDisruptionBudget"  # fmt: skip
        spread = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
        if overlay == "production" or name != "batchsender-api":
            assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname"}, name


# --- reachability ------------------------------------------------------------------------


def _policies(overlay: str = "production") -> dict[str, dict]:
    return by_kind(rendered(overlay), "NetworkPolicy")


def test_the_namespace_denies_ingress_by_default():
    deny = _policies()["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_only_traefik_reaches_the_api_and_web_and_only_monitoring_the_metrics():
    traefik = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}}  # fmt: skip
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    for policy in _policies().values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports & {6001, 3000} and selector.get("app.kubernetes.io/name") == "batchsender":
                assert rule["from"] in ([traefik], [monitoring]), policy["metadata"]["name"]
            if 6002 in ports:
                assert rule["from"] == [monitoring], policy["metadata"]["name"]
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source"


def test_the_ingress_routes_only_api_webhooks_unsubscribe_and_web_with_tls():
    docs = rendered("production")
    ingresses = by_kind(docs, "Ingress")
    issuers = set(by_kind(docs, "ClusterIssuer"))
    main = ingresses["batchsender"]
    assert main["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] in issuers
    hosts = {h for tls in main["spec"]["tls"] for h in tls["hosts"]}
    routes = set()
    for ingress in ingresses.values():
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] in hosts
            for path in rule["http"]["paths"]:
                routes.add((path["path"], path["backend"]["service"]["name"]))
    assert routes == {
        ("/api", "batchsender-api"), ("/webhooks", "batchsender-api"),
        ("/unsubscribe", "batchsender-api"), ("/", "batchsender-web"),
        ("/api/metrics", "batchsender-api"),
    }  # fmt: skip
    blocked = ingresses["batchsender-metrics-blocked"]
    assert blocked["spec"]["rules"][0]["http"]["paths"][0]["pathType"] == "Exact"
    middleware = blocked["metadata"]["annotations"][
        "traefik.ingress.kubernetes.io/router.middlewares"
    ]
    name = middleware.split("@")[0].split("-", 1)[1]
    assert by_kind(docs, "Middleware")[name]["spec"]["ipAllowList"]["sourceRange"] == [
        "127.0.0.1/32"
    ]


def test_prometheus_scrapes_the_api_as_the_rules_expect():
    docs = rendered("production")
    services = by_kind(docs, "Service")
    assert "batchsender-api" in services  # a ServiceMonitor's job is the Service's name
    rules = (ROOT / "monitoring" / "rules" / "alerts.yml").read_text()
    assert 'up{job="batchsender-api"}' in rules
    monitor = by_kind(docs, "ServiceMonitor")["batchsender-api"]["spec"]["endpoints"][0]
    assert monitor["path"] == "/api/metrics"
    pod_monitor = by_kind(docs, "PodMonitor")["batchsender-worker"]["spec"]["podMetricsEndpoints"][
        0
    ]
    assert pod_monitor["relabelings"][0]["replacement"] == "batchsender-worker"


# --- secrets, monitoring copies, phases --------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_committed(overlay):
    assert not by_kind(rendered(overlay), "Secret")
    for path in (K8S / "secrets").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "Secret"
            values = set(doc["stringData"].values()) - {"batchsender"}
            assert values == {"CHANGE_ME"}, f"{path.name}: only CHANGE_ME placeholders"


def test_the_monitoring_copies_are_up_to_date():
    result = run("python", str(K8S / "render_monitoring.py"), "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_migration_runs_before_the_application():
    docs = rendered("production")
    phase = {
        (d["kind"], d["metadata"]["name"]): d["metadata"]["labels"]["batchsender.io/deploy-phase"]
        for d in docs
    }
    job = by_kind(docs, "Job")["batchsender-migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["batchsender", "migrate"]
    assert phase[("Job", "batchsender-migrate")] == "migrate"
    assert phase[("ConfigMap", "batchsender-config")] == "migrate"  # the Job needs it
    for name in by_kind(docs, "Deployment"):
        assert phase[("Deployment", name)] == "app"
    for kind in ("Cluster", "ClickHouseInstallation", "Dragonfly"):
        assert {p for (k, _), p in phase.items() if k == kind} == {"data"}
    script = (ROOT / "deploy-hetzner.sh").read_text()
    order = re.findall(r"^\s*apply_phase (\w+)", script, re.M)
    assert order == ["namespaces", "foundation", "data", "migrate", "app", "autoscale"]
    assert set(order) == set(phase.values())
    assert script.index("wait job/batchsender-migrate") < script.index("apply_phase app")
    # KEDA only once the consumer exists (the API and workers create it when they start)
    assert phase[("ScaledObject", "batchsender-worker")] == "autoscale"
    assert script.index("rollout status deployment/batchsender-worker") < script.index(
        "apply_phase autoscale"
    )


def test_helm_releases_are_pinned_with_values_in_the_repository():
    lines = [line.split() for line in (K8S / "helm" / "releases.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    names = [line[0] for line in lines]
    for release, _namespace, _chart, repository, version, values in lines:
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", version), f"{release}: {version} is not one version"
        assert repository.startswith(("https://", "oci://")), release
        assert isinstance(yaml.safe_load((K8S / "helm" / "values" / values).read_text()), dict), (
            values
        )
    for needed in ("nats", "cnpg", "clickhouse-operator", "dragonfly-operator", "kube-prometheus-stack",
                   "cert-manager", "keda", "hcloud-csi"):  # fmt: skip
        assert needed in names
    # CRDs before their users: the monitoring stack's (PodMonitor) before the charts using them
    assert names.index("kube-prometheus-stack") < names.index("keda") < names.index("nats")
