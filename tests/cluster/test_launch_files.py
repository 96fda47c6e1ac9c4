"""launch/: the cluster definitions parse and name only keys their tools know."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[2] / "launch"

# Keys of the KubeRay v1 CRDs, from the Go types that generate them: github.com/ray-project/kuberay
# ray-operator/apis/ray/v1/rayjob_types.go (RayJobSpec) and raycluster_types.go (RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec); the same fields are listed at https://ray-project.github.io/kuberay/reference/api/
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy"}
# Pod templates are Kubernetes core/v1 types: PodTemplateSpec, PodSpec and Container fields from the
# Kubernetes API reference (https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/).
POD_TEMPLATE = {"metadata", "spec"}
POD_SPEC = {"activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
            "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
            "hostPID", "hostUsers", "hostname", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector",
            "os", "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates",
            "resourceClaims", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
            "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
            "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
            "topologySpreadConstraints", "volumes"}
CONTAINER = {"args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name",
             "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "securityContext",
             "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
             "volumeDevices", "volumeMounts", "workingDir"}


def _unknown(node: dict, known: set[str], where: str) -> list[str]:
    return [f"{where}.{key}" for key in node if key not in known]


def _pod_template(template: dict, where: str) -> list[str]:
    bad = _unknown(template, POD_TEMPLATE, where)
    spec = template.get("spec", {})
    bad += _unknown(spec, POD_SPEC, f"{where}.spec")
    for i, container in enumerate(spec.get("containers", [])):
        bad += _unknown(container, CONTAINER, f"{where}.spec.containers[{i}]")
    return bad


def test_ray_cluster_launcher_yaml_matches_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    # what `ray up` checks before it calls the cloud: defaults merged in, then the schema + cross-field rules
    validate_config(prepare_config(config))
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any("g5" in n["node_config"]["InstanceType"] for name, n in nodes.items() if name != config["head_node_type"])
    assert any("pip install" in c and "lamscale" in c for c in config["setup_commands"])


def test_kuberay_rayjob_names_only_crd_fields():
    job = yaml.safe_load((LAUNCH / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert set(job) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = job["spec"]
    assert "lamscale train" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the YAML
    cluster = spec["rayClusterSpec"]
    bad = _unknown(spec, RAYJOB_SPEC, "spec") + _unknown(cluster, RAYCLUSTER_SPEC, "spec.rayClusterSpec")
    head = cluster["headGroupSpec"]
    bad += _unknown(head, HEAD_GROUP, "headGroupSpec") + _pod_template(head["template"], "headGroupSpec.template")
    assert cluster["workerGroupSpecs"], "no worker group"
    for i, group in enumerate(cluster["workerGroupSpecs"]):
        where = f"workerGroupSpecs[{i}]"
        bad += _unknown(group, WORKER_GROUP, where) + _pod_template(group["template"], f"{where}.template")
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in limits, f"{where} asks for no GPU"
    assert not bad, f"keys the KubeRay CRDs do not define: {bad}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
