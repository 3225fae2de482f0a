"""deploy/kubernetes/: every manifest validates strictly against the Kubernetes schema, and the
pieces agree with each other (config, mountpoint, drain time, probes, metrics port).

The pod itself is run for real, with podman, in tests/test_container.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s3ckptfs.config import load_config_file, parse_options

yaml = pytest.importorskip("yaml")

K8S_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))


def validator() -> str:
    beside = Path(sys.executable).with_name("kubernetes-validate")
    found = str(beside) if beside.exists() else shutil.which("kubernetes-validate")
    if found is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return found


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_validates_strictly(manifest):
    result = subprocess.run([validator(), "--strict", str(manifest)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout + result.stderr


def resources() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[document["kind"]] = document
    return found


def test_manifests_agree_with_each_other(tmp_path):
    every = resources()
    assert {"Namespace", "ServiceAccount", "Secret", "ConfigMap", "DaemonSet", "Job"} <= set(every)

    config_file = tmp_path / "config.toml"
    config_file.write_text(every["ConfigMap"]["data"]["config.toml"])
    mount, option_items = load_config_file(config_file)  # the daemon's own parser
    options = parse_options(option_items)
    mountpoint = mount["mountpoint"]

    pod = every["DaemonSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    propagated = mounts["mounts"]
    assert propagated["mountPropagation"] == "Bidirectional"
    assert mountpoint.startswith(propagated["mountPath"].rstrip("/") + "/"), "mount inside the propagated dir"
    assert volumes["mounts"]["hostPath"]["path"] == propagated["mountPath"]
    assert mount["cache_dir"].startswith(mounts["cache"]["mountPath"] + "/")
    assert "hostPath" in volumes["cache"] and "hostPath" in volumes["runtime"]
    assert mounts["runtime"]["mountPath"] == "/run/s3ckptfs"
    assert volumes["fuse"]["hostPath"]["path"] == "/dev/fuse"
    assert container["securityContext"]["privileged"] is True
    assert options.allow_other, "training pods run as other users"

    assert pod["terminationGracePeriodSeconds"] >= options.drain_timeout
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert f"s3ckptfs unmount {mountpoint}" in pre_stop
    assert container["readinessProbe"]["exec"]["command"][-1] == "ready"
    assert "livenessProbe" not in container
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}

    annotations = every["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == options.metrics_port
    assert options.metrics_addr == "0.0.0.0"
    env = {item["name"]: item for item in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is True

    job = every["Job"]["spec"]["template"]["spec"]
    for spec in [*job["initContainers"], *job["containers"]]:
        ckpt = [m for m in spec["volumeMounts"] if m["name"] == "checkpoints"]
        assert ckpt and ckpt[0]["mountPropagation"] == "HostToContainer"
        assert ckpt[0]["mountPath"] == propagated["mountPath"], "same path as on the node"
    assert mountpoint in " ".join(job["initContainers"][0]["command"])
