"""The Kubernetes manifests validate strictly against a current Kubernetes and hold the promised defaults.

``kubernetes-validate --strict`` (offline: the schemas ship with it) rejects unknown fields and
schema errors; the rest reads the manifests as a reviewer would: every file is in the
kustomization, the pods are non-root with no capabilities, shutdown is longer than the worker's,
and a NetworkPolicy fences the workers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, find_binary

K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
WORKER_SHUTDOWN_SECONDS = 10  # worker.build_worker's graceful_shutdown_timeout
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load(name: str) -> Any:
    return yaml.safe_load((K8S / name).read_text())


def test_every_manifest_validates_strictly() -> None:
    done = _validate(*MANIFESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(MANIFESTS), done.stdout


def test_an_unknown_field_fails_validation(tmp_path: Path) -> None:
    # Positive control: strict validation catches a misspelt field.
    bad = _load("deployment.yaml")
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert _validate(path).returncode != 0


def test_the_kustomization_lists_every_manifest() -> None:
    assert sorted(_load("kustomization.yaml")["resources"]) == sorted(p.name for p in MANIFESTS)


def test_workers_are_unprivileged_and_shut_down_gracefully() -> None:
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > WORKER_SHUTDOWN_SECONDS * 3
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert "limits" in container["resources"], container["name"]
    worker = pod["containers"][0]
    assert {p["name"] for p in worker["ports"]} == {"metrics"}
    assert worker["readinessProbe"]["httpGet"]["path"] == "/metrics"


def test_secrets_stay_out_of_the_configmap() -> None:
    data = _load("configmap.yaml")["data"]
    for key in data:
        assert not any(word in key for word in ("KEY=", "TOKEN", "PASSWORD", "SECRET", "PAYLOAD_KEYS")), key
    assert "SANDBOX_DATABASE_URL" not in data


@pytest.mark.parametrize("kind", ["NetworkPolicy", "PodDisruptionBudget"])
def test_the_workers_are_fenced_and_kept_available(kind: str) -> None:
    labels = _load("deployment.yaml")["spec"]["selector"]["matchLabels"]
    docs = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
    (doc,) = [d for d in docs if d["kind"] == kind]
    selector = doc["spec"]["podSelector"] if kind == "NetworkPolicy" else doc["spec"]["selector"]
    assert selector["matchLabels"] == labels
    if kind == "NetworkPolicy":
        assert set(doc["spec"]["policyTypes"]) == {"Ingress", "Egress"}
