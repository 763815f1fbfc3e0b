"""The Dockerfile: hadolint and checkov clean, multi-stage on a base pinned by version and
digest, non-root, tini as PID 1 so that SIGTERM reaches the supervisor's drain, a
HEALTHCHECK, and a .dockerignore that lets only the package in.

No Docker engine runs here, so the image is not built: these are the offline checks.
"""

from __future__ import annotations

import json
import re

from tests.deploy.test_k8s import checkov, failed_and_skipped
from tests.deploy.tools import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing():
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_rule_ignored_says_why():
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        if "hadolint ignore" in line:
            assert re.search(r"hadolint ignore=\S+\s+\S.{10,}", line), f"line {number}: say why"


def test_checkov_finds_nothing_in_the_dockerfile():
    failed, skipped = failed_and_skipped(
        checkov("-f", str(DOCKERFILE), "--framework", "dockerfile")
    )
    assert not failed, [f"{c['check_id']}: {c['check_name']}" for c in failed]
    assert not skipped


def test_multi_stage_on_a_base_pinned_by_version_and_digest():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 3, froms  # base, build, runtime
    base = froms[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64} AS base", base), base
    assert all(args.startswith("base AS ") for args in froms[1:]), froms


def test_runs_as_a_non_root_user_under_tini():
    steps = instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    entrypoint = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--"]  # exec form: tini is PID 1
    command = json.loads(next(args for word, args in steps if word == "CMD"))
    assert command == ["batchsender", "worker"]
    assert not [args for word, args in steps if word == "STOPSIGNAL" and "TERM" not in args]


def test_has_a_healthcheck_that_knows_each_command():
    check = next(args for word, args in instructions() if word == "HEALTHCHECK")
    assert "CMD [" in check
    code = json.loads(check[check.index("[") :])[-1]
    assert "/health/live" in code and "batchsender-heartbeat-" in code
    compile(code, "HEALTHCHECK", "exec")


def test_dockerignore_lets_in_only_what_the_image_copies():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    assert lines[0] == "*", "an allow-list: everything is out unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            copied |= {source.rstrip("/") for source in args.split()[:-1]}
    assert copied == allowed, (copied, allowed)
    assert "**/.env*" in lines
    for path in allowed:
        assert (ROOT / path).exists(), path


def test_every_package_of_the_distribution_is_in_the_image():
    """pyproject.toml's packages (devkit, the development kit, apart) are all copied: a new
    top-level package missing here would be missing from the image."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {
        source.rstrip("/")
        for word, args in instructions()
        if word == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
    }
    assert packages - {"devkit"} <= copied, sorted(packages - {"devkit"} - copied)
