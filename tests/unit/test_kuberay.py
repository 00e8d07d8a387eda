"""The KubeRay manifests: valid against KubeRay's CRD schemas and Kubernetes' own schemas, with
no unknown field, and generated from the pools file (the two cannot drift apart)."""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cicd_ray.cluster.kuberay import pool_group, projects_of, render
from cicd_ray.errors import SpecError
from cicd_ray.pools import PoolConfig, load_pools, load_projects

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
KUBERNETES_VERSION = "1.33"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}


def crds_dir() -> Path | None:
    """$KUBERAY_CRDS_DIR, else ../shared/kuberay/crds (where CI has them); see kuberay/README."""
    for candidate in (os.environ.get("KUBERAY_CRDS_DIR"), ROOT.parent / "shared/kuberay/crds"):
        if candidate and (Path(candidate) / CRD_FILES["RayService"]).exists():
            return Path(candidate)
    return None


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path.name in ("pools.yaml", "alerts.yaml"):  # not Kubernetes objects (test_alerts)
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def crd_schema(kind: str) -> dict:
    folder = crds_dir()
    if folder is None:
        why = (
            "the KubeRay CRD schemas are not here: set KUBERAY_CRDS_DIR to the crds/ folder "
            "of the kuberay-operator Helm chart (helm pull kuberay/kuberay-operator --untar)"
        )
        if os.environ.get("CI"):
            pytest.fail(why)  # CI has them (../shared/kuberay/crds): missing is a failure
        pytest.skip(why)
    crd = yaml.safe_load((folder / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not define: Kubernetes would drop them without a word."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize(
    "name, doc", manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_every_manifest_is_valid(name, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        schema = crd_schema(doc["kind"])
        jsonschema.validate(doc, schema)
        assert unknown_fields(doc, schema) == []
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_checks_catch_a_misspelt_field():
    schema = crd_schema("RayService")
    doc = next(d for _, d in manifests() if d["kind"] == "RayService")
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert unknown_fields(doc, schema) == [".spec.rayClusterConfig.enableInTreeAutoscalling"]
    doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["version"] = "v3"
    with pytest.raises(jsonschema.ValidationError, match="'v3' is not one of"):
        jsonschema.validate(doc, schema)


def test_the_rayservice_is_generated_from_the_pools_file():
    pools_file = KUBERAY / "pools.yaml"
    committed = (KUBERAY / "rayservice.yaml").read_text()
    image = next(
        c["image"]
        for _, d in manifests()
        if d["kind"] == "RayService"
        for c in d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    )
    fresh = render(
        load_pools(pools_file),
        pools_file.read_text(),
        image,
        version("ray"),
        projects_of(pools_file),
    )
    assert committed == fresh, (
        "kuberay/rayservice.yaml is stale: run "
        "`cicd-ray kuberay kuberay/pools.yaml > kuberay/rayservice.yaml`"
    )


def test_worker_groups_agree_with_the_pools():
    pools = load_pools(KUBERAY / "pools.yaml")
    service = next(d for _, d in manifests() if d["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"control"} | {f"pool-{name}" for name in pools}
    for name, pool in pools.items():
        group = groups[f"pool-{name}"]
        assert (group["minReplicas"], group["maxReplicas"]) == (0, pool.max_workers)
        params = group["rayStartParams"]
        assert yaml.safe_load(yaml.safe_load(params["resources"])) == pool.resources
        assert float(params["num-cpus"]) >= pool.cpus
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["memory"].removesuffix("Mi")) > pool.memory_mb
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    # The ConfigMap the master reads is the pools file itself.
    config_map = next(
        d
        for _, d in manifests()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cicd-ray-pools"
    )
    assert config_map["data"]["pools.yaml"] == (KUBERAY / "pools.yaml").read_text()


def test_a_pool_without_its_own_resource_is_refused():
    with pytest.raises(
        SpecError,
        match=r"pools \(x\)\.resources: a pool on KubeRay needs a "
        r"custom resource of its own, such as \{pool-x: 1\}",
    ):
        pool_group(PoolConfig(name="x"), "image")


def test_redis_keeps_its_data():
    redis = {d["kind"]: d for name, d in manifests() if name == "redis.yaml"}
    conf = redis["ConfigMap"]["data"]["redis.conf"]
    assert "appendonly yes" in conf and "appendfsync everysec" in conf
    volumes = redis["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "cicd-redis-data"}} in volumes


def test_the_grafana_dashboard_queries_only_metrics_that_exist():
    from cicd_ray.master.metrics import NAMES

    dashboard = json.loads((KUBERAY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bray_(cicd_\w+)", e)}
    assert queried, "the dashboard queries no cicd metric"
    for name in queried:
        # Prometheus names: ours with Ray's `ray_` prefix, histograms as _bucket/_sum/_count.
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in NAMES, f"the dashboard queries {name}, which cicd_ray.master.metrics lacks"
    assert set(NAMES) <= {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}, (
        "a metric is on no panel"
    )


def test_the_kuberay_command_puts_the_image_on_every_pod():
    """`cicd-ray kuberay POOLS --image IMAGE`, as a user runs it."""
    from typer.testing import CliRunner

    from cicd_ray.cli.root import app

    done = CliRunner().invoke(
        app, ["kuberay", str(KUBERAY / "pools.yaml"), "--image", "registry.test/team/ci:9.9"]
    )
    assert done.exit_code == 0, done.output
    [service] = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {
        g.get("groupName", "head"): c["image"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
    }
    # Every pod runs the given image but a pool's own (the `large` pool names its JDK image).
    assert images.pop("pool-large") == "registry.example.com/cicd-ray-jdk:0.1.0"
    assert set(images.values()) == {"registry.test/team/ci:9.9"}


def _rayservice(pools: dict) -> dict:
    from cicd_ray.cluster.kuberay import manifests as generate

    return generate(pools, "", "img:1", "2.60.0")[1]


def test_ray_token_authentication_is_on_with_the_token_from_a_secret():
    from cicd_ray.cluster.kuberay import RAY_TOKEN_SECRET

    cluster = _rayservice(load_pools(KUBERAY / "pools.yaml"))["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    # The token never travels as a value in the manifests, and the README makes its Secret.
    assert "auth_token" not in (KUBERAY / "rayservice.yaml").read_text()
    readme = (KUBERAY / "README.md").read_text()
    assert f"kubectl create secret generic {RAY_TOKEN_SECRET}" in readme
    assert "--from-literal=auth_token=" in readme


def test_every_pod_gets_the_artifact_store_from_a_secret():
    """Pods share no disk: the master, the API and every worker read one bucket, named with
    its credentials in a Secret the README makes (and secrets.example.yaml shows)."""
    from cicd_ray.cluster.kuberay import ARTIFACTS_SECRET

    cluster = _rayservice(load_pools(KUBERAY / "pools.yaml"))["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": ARTIFACTS_SECRET}}], group
    readme = (KUBERAY / "README.md").read_text()
    assert f"kubectl create secret generic {ARTIFACTS_SECRET}" in readme
    assert "--from-literal=CICD_RAY_ARTIFACTS=s3://" in readme
    example = [
        d
        for d in yaml.safe_load_all((KUBERAY / "secrets.example.yaml").read_text())
        if d["metadata"]["name"] == ARTIFACTS_SECRET
    ]
    assert set(example[0]["stringData"]) >= {
        "CICD_RAY_ARTIFACTS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }


def test_a_pool_s_nodes_taints_and_image_reach_its_worker_group():
    pools = load_pools(KUBERAY / "pools.yaml")
    groups = {
        g["groupName"]: g
        for g in _rayservice(pools)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    spot = groups["pool-spot"]["template"]["spec"]
    assert spot["nodeSelector"] == {"kubernetes.azure.com/scalesetpriority": "spot"}
    assert spot["tolerations"] == [
        {
            "key": "kubernetes.azure.com/scalesetpriority",
            "operator": "Equal",
            "value": "spot",
            "effect": "NoSchedule",
        }
    ]
    assert pools["spot"].spot_for == ["default"]  # something runs there
    default = groups["pool-default"]["template"]["spec"]
    assert "nodeSelector" not in default and "tolerations" not in default
    assert default["containers"][0]["image"] == "img:1"
    assert groups["pool-large"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/cicd-ray-jdk:0.1.0"
    )


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("node_selector", {"bad key!": "x"}, "node_selector.bad key!"),
        ("node_selector", {"disk": "has space"}, "node_selector.disk"),
        ("tolerations", [{"key": "k", "operator": "Maybe"}], "tolerations.0.operator"),
        ("tolerations", [{"key": "k", "effect": "NoRun"}], "tolerations.0.effect"),
        ("tolerations", [{"key": "k", "colour": "red"}], "tolerations.0.colour"),
        ("tolerations", [{"key": "k", "tolerationSeconds": -1}], "tolerations.0.tolerationSeconds"),
        ("image", "two words", "image"),
        ("image", "", "image"),
    ],
)
def test_bad_kubernetes_pool_fields_are_refused_naming_the_field(tmp_path, field, value, named):
    path = tmp_path / "pools.yaml"
    path.write_text(
        yaml.safe_dump({"pools": [{"name": "p", "resources": {"pool-p": 1}, field: value}]})
    )
    with pytest.raises(SpecError) as caught:
        load_pools(path)
    assert named in str(caught.value), caught.value


def test_the_readme_installs_the_operator_the_manifests_need():
    """One version: kuberay/README.md installs (and pulls the CRDs of) KUBERAY_VERSION, the
    v1.7 line whose CRDs these tests validate against (they know authOptions and
    gcsFaultToleranceOptions, which the 1.1 line did not)."""
    from cicd_ray.cluster.kuberay import KUBERAY_VERSION

    readme = (KUBERAY / "README.md").read_text()
    named = re.findall(r"kuberay/kuberay-operator --version (\S+)", readme)
    assert named and set(named) == {KUBERAY_VERSION}, named
    assert tuple(int(n) for n in KUBERAY_VERSION.split(".")) >= (1, 7, 1)
    cluster = crd_schema("RayService")["properties"]["spec"]["properties"]["rayClusterConfig"]
    assert {"authOptions", "gcsFaultToleranceOptions"} <= set(cluster["properties"])


def test_every_pod_mounts_the_tokens_the_repositories_and_each_project_s_secrets():
    from cicd_ray.cluster.kuberay import (
        REPOS_CONFIG_MAP,
        REPOS_MOUNT,
        SECRETS_MOUNT,
        TOKENS_MOUNT,
        TOKENS_SECRET,
        manifests,
    )

    pools_file = KUBERAY / "pools.yaml"
    projects = projects_of(pools_file)
    assert set(projects) == {"web"}  # the example lists one
    service = manifests(load_pools(pools_file), "", "img:1", "2.60.0", projects=projects)[1]
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CICD_RAY_TOKENS_FILE"] == f"{TOKENS_MOUNT}/tokens"
        assert env["CICD_RAY_REPOS"] == f"{REPOS_MOUNT}/repos.yaml"
        assert env["CICD_RAY_PROJECTS"] == "/etc/cicd-ray/pools.yaml"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tokens"]["secret"] == {
            "secretName": TOKENS_SECRET,
            "defaultMode": 0o400,
            "optional": True,
        }
        assert volumes["repos"]["configMap"] == {"name": REPOS_CONFIG_MAP, "optional": True}
        assert volumes["project-web"]["secret"]["secretName"] == "cicd-ray-project-web"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["project-web"] == f"{SECRETS_MOUNT}/web"
    readme = (KUBERAY / "README.md").read_text()
    assert f"kubectl create secret generic {TOKENS_SECRET}" in readme
    assert f"kubectl create configmap {REPOS_CONFIG_MAP}" in readme
    assert load_projects(pools_file)["web"].weight == 2


def test_every_pod_mounts_the_default_project_s_secrets_for_root_only():
    from cicd_ray.cluster.kuberay import PROJECT_SECRET, SECRETS_MOUNT

    cluster = _rayservice(load_pools(KUBERAY / "pools.yaml"))["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["CICD_RAY_SECRETS_DIR"]["value"] == SECRETS_MOUNT
        assert env["CICD_RAY_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True
        [volume] = [v for v in pod["volumes"] if v["name"] == "project-default"]
        assert volume["secret"] == {
            "secretName": PROJECT_SECRET,
            "defaultMode": 0o400,
            "optional": True,
        }
        assert {
            "name": "project-default",
            "mountPath": f"{SECRETS_MOUNT}/default",
            "readOnly": True,
        } in container["volumeMounts"]
    assert f"kubectl create secret generic {PROJECT_SECRET}" in (KUBERAY / "README.md").read_text()
