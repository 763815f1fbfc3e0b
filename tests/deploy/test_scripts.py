"""Shell scripts: shellcheck-clean, every one in the repository; deploy-hetzner.sh shows
every step with --dry-run and runs none, and refuses to run with a tool or a credential
missing, naming each."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.tools import ROOT, run, tool

DEPLOY = ROOT / "deploy-hetzner.sh"
CREDENTIALS = {
    "HCLOUD_TOKEN": "h" * 64,
    "MINIO_USER": "AKIAEXAMPLE",
    "MINIO_PASSWORD": "s" * 40,
    "BATCHSENDER_IMAGE": "ghcr.io/acme/batchsender@sha256:" + "a" * 64,
    "BATCHSENDER_API_HOST": "mail.example.com",
    "BATCHSENDER_DASHBOARD_HOST": "dashboard.example.com",
    "ACME_EMAIL": "ops@example.com",
}
TOOLS = ("terraform", "kubectl", "helm", "ssh", "scp", "openssl")


def shell_scripts() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    scripts = []
    for name in listed:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".py", ".md", ".yaml", ".yml", ".json"):
            continue
        with path.open("rb") as handle:
            head = handle.read(64)
        if path.suffix == ".sh" or head.startswith(
            (b"#!/bin/bash", b"#!/usr/bin/env bash", b"#!/bin/sh")
        ):
            scripts.append(path)
    return scripts


def test_every_shell_script_is_shellcheck_clean():
    scripts = shell_scripts()
    assert {ROOT / "setup-dev.sh", DEPLOY} <= set(scripts)
    result = run(tool("shellcheck"), "--external-sources", *map(str, scripts))
    assert result.returncode == 0, result.stdout


def stubs(folder: Path, log: Path) -> Path:
    """A PATH of stand-ins for every tool the script calls: each records its arguments;
    kubectl kustomize (local rendering) is passed on to the real kubectl."""
    folder.mkdir()
    real_kubectl = tool("kubectl")
    for name in TOOLS:
        body = f'printf "%s\\n" "{name} $*" >> "{log}"\n'
        if name == "kubectl":
            body += f'if [ "$1" = kustomize ]; then exec "{real_kubectl}" "$@"; fi\n'
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(0o755)
    for name in (
        "bash",
        "sed",
        "grep",
        "mktemp",
        "rm",
        "cat",
        "realpath",
        "dirname",
        "mkdir",
        "chmod",
    ):
        found = subprocess.run(["which", name], capture_output=True, text=True).stdout.strip()
        if found:
            (folder / name).symlink_to(found)
    return folder


def deploy(tmp_path: Path, *args: str, environ: dict[str, str], tools: bool = True):
    log = tmp_path / "calls.log"
    log.touch()
    path = stubs(tmp_path / "bin", log)
    if not tools:
        for name in ("helm", "terraform"):
            (path / name).unlink()
    result = subprocess.run(["bash", str(DEPLOY), *args], capture_output=True, text=True,
                            timeout=120, env={"PATH": str(path), "HOME": str(tmp_path), **environ})  # fmt: skip
    return result, log.read_text().splitlines()


def test_dry_run_shows_every_step_and_runs_nothing(tmp_path):
    result, calls = deploy(tmp_path, "--dry-run", environ=CREDENTIALS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("terraform -chdir=", "apply -input=false", "scp ", "kubectl wait --for=condition=Ready nodes",
                 "helm upgrade --install nats", "helm upgrade --install keda",
                 "deploy-phase=namespaces", "deploy-phase=data", "wait job/batchsender-migrate",
                 "deploy-phase=app", "rollout status deployment/batchsender-worker",
                 "A <load_balancer_ipv4>"):  # fmt: skip
        assert step in out, f"dry run does not show {step!r}"
    assert [c for c in calls if not c.startswith("kubectl kustomize")] == [], calls
    assert CREDENTIALS["HCLOUD_TOKEN"] not in out and CREDENTIALS["MINIO_PASSWORD"] not in out
    # the manifests it would apply carry the installation's image digest
    assert "image: " + CREDENTIALS["BATCHSENDER_IMAGE"] in out


def test_refuses_to_run_without_tools_or_credentials_naming_them(tmp_path):
    environ = {k: v for k, v in CREDENTIALS.items() if k not in ("HCLOUD_TOKEN", "ACME_EMAIL")}
    result, calls = deploy(tmp_path, "--yes", environ=environ, tools=False)
    assert result.returncode == 2, result.stdout + result.stderr
    for missing in ("tool: terraform", "tool: helm", "HCLOUD_TOKEN", "ACME_EMAIL"):
        assert missing in result.stderr, missing
    assert calls == [], "nothing may run before the preflight passes"


def test_refuses_an_image_named_by_tag(tmp_path):
    environ = {**CREDENTIALS, "BATCHSENDER_IMAGE": "ghcr.io/acme/batchsender:latest"}
    result, calls = deploy(tmp_path, environ=environ)
    assert result.returncode == 2
    assert "BATCHSENDER_IMAGE must name the image by digest" in result.stderr
    assert calls == []
