"""The files in ``cluster/`` and ``Dockerfile.gpu``: the launcher config passes Ray's own
validation, the KubeRay manifests have what KubeRay requires, and they agree with each other,
with the image and with the job config they carry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference.config import parse_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE = "ghcr.io/your-org/inference-gpu:0.1.0"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


# ---------------------------------------------------------------------- Ray cluster launcher
@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    validate_config(config)  # Ray's JSON schema and its own checks; raises when invalid
    return config


def test_launcher_config_passes_rays_validation(launcher: dict[str, Any]) -> None:
    assert launcher["provider"]["type"] == "aws"
    assert launcher["setup_commands"] == []  # no default pip installs: it is all in the image


def test_launcher_head_has_no_gpu_and_runs_no_workers(launcher: dict[str, Any]) -> None:
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0
    assert any("--num-cpus=0" in c for c in launcher["head_start_ray_commands"])


def test_launcher_has_an_autoscaling_gpu_worker_type_from_zero(launcher: dict[str, Any]) -> None:
    workers = {
        name: t
        for name, t in launcher["available_node_types"].items()
        if name != launcher["head_node_type"]
    }
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert launcher["idle_timeout_minutes"] > 0
    assert launcher["docker"]["image"] == IMAGE


def test_launcher_cluster_uses_token_auth(launcher: dict[str, Any]) -> None:
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "/home/ray/.ray/auth_token" in launcher["file_mounts"]


# ---------------------------------------------------------------------- KubeRay
def _container(template: dict[str, Any], where: str) -> dict[str, Any]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    c = containers[0]
    assert c.get("image") == IMAGE, f"{where}: image"
    res = c.get("resources", {})
    assert res.get("limits") and res.get("requests"), f"{where}: resources"
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True, where
    return c


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The fields KubeRay needs for an autoscaling RayCluster (RayCluster.spec or
    RayJob.spec.rayClusterSpec)."""
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion"
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: in-tree autoscaling"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: head rayStartParams"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: head runs workers"
    c = _container(head["template"], f"{where}: head")
    assert "nvidia.com/gpu" not in c["resources"]["limits"], f"{where}: head has a GPU"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379, where
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    for g in groups:
        name = g["groupName"]
        assert isinstance(g["rayStartParams"], dict), f"{where}/{name}: rayStartParams"
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], name
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, f"{where}/{name}: from zero"
        c = _container(g["template"], f"{where}/{name}")
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}/{name}: GPU"


def test_raycluster_has_what_kuberay_requires() -> None:
    (doc,) = _docs("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], "RayCluster")


def test_rayjob_has_what_kuberay_requires() -> None:
    docs = {d["kind"]: d for d in _docs("kuberay-rayjob.yaml")}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("inference run ")
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")


def test_rayjob_carries_a_valid_job_config_that_fits_its_workers() -> None:
    docs = {d["kind"]: d for d in _docs("kuberay-rayjob.yaml")}
    config = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"]))
    scaling = config.scaling
    assert scaling.mode == "autoscale" and scaling.min_workers == 0
    (group,) = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert scaling.gpus_per_worker == int(limits["nvidia.com/gpu"])
    assert scaling.cpus_per_worker <= int(limits["cpu"])
    assert scaling.max_workers <= group["maxReplicas"]
    assert "--config /home/ray/job/job.yaml" in docs["RayJob"]["spec"]["entrypoint"]


def test_launcher_worker_type_fits_one_worker_bundle(launcher: dict[str, Any]) -> None:
    from inference.autoscale import worker_bundle

    docs = {d["kind"]: d for d in _docs("kuberay-rayjob.yaml")}
    scaling = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"])).scaling
    bundle = worker_bundle(scaling)
    gpu = launcher["available_node_types"]["gpu"]["resources"]
    assert all(gpu.get(k, 0) >= v for k, v in bundle.items()), (bundle, gpu)


# ---------------------------------------------------------------------- the image
def test_dockerfile_is_a_vllm_ready_cuda_image_run_as_non_root() -> None:
    text = (REPO / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip install '.[vllm]'" in text
    assert "wget" in text  # KubeRay's probes
    assert "INFERENCE_MODELS_DIR=/home/ray/app/models" in text
    assert "COPY --chown=ray:users models ./models" in text
    assert IMAGE in text  # the tag the cluster configs use
