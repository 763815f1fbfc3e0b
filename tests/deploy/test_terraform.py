"""terraform/: formatted (terraform fmt -check), every .tf parses (python-hcl2), providers
pinned, every variable described, typed and (where it can be wrong) validated, outputs
described, no secret in any file, the cloud-init templates render to valid cloud-config,
and checkov finds nothing.

`terraform validate` cannot run here: it needs the providers, which cannot be downloaded
on this machine (terraform/README.md). `terraform fmt` and `terraform console` (for the
templates) need none.
"""

from __future__ import annotations

import os
import re

import hcl2
import pytest
import yaml

from tests.deploy.test_k8s import checkov, failed_and_skipped
from tests.deploy.tools import ROOT, run, tool

TF = ROOT / "terraform"
TF_FILES = sorted(TF.glob("*.tf"))
SECRET_WORDS = re.compile(r"token|password|secret|access_key", re.I)


def _clean(node):
    """python-hcl2 8 keeps the quotes of strings and adds __comments__/__is_block__."""
    if isinstance(node, dict):
        return {_clean(k): _clean(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [_clean(item) for item in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


def parsed() -> dict[str, dict]:
    out = {}
    for path in TF_FILES:
        with path.open() as handle:
            out[path.name] = _clean(hcl2.load(handle))
    return out


def blocks(kind: str) -> dict[str, dict]:
    found = {}
    for document in parsed().values():
        for block in document.get(kind, []):
            found.update(block)
    return found


def terraform(*args: str, cwd=TF, stdin: str | None = None):
    environ = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1"}
    return run(tool("terraform"), *args, cwd=cwd, env=environ, input=stdin)


def test_terraform_fmt_finds_nothing_to_change():
    result = terraform("fmt", "-check", "-recursive", "-diff")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_tf_file_parses():
    assert {p.name for p in TF_FILES} >= {"versions.tf", "variables.tf", "main.tf", "outputs.tf"}
    for name, document in parsed().items():
        assert document, name


def test_providers_are_pinned_to_one_version():
    versions = parsed()["versions.tf"]["terraform"][0]
    providers = versions["required_providers"][0]
    assert {"hcloud", "minio", "random"} <= set(providers)
    assert providers["hcloud"]["source"] == "hetznercloud/hcloud"
    for name, spec in providers.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", spec["version"]), f"{name}: {spec['version']}"


def test_variables_are_described_typed_and_validated():
    variables = blocks("variable")
    for name, spec in variables.items():
        assert len(spec.get("description", "")) > 20, f"{name}: describe it"
        assert "type" in spec, name
        if SECRET_WORDS.search(name):
            pytest.fail(f"variable {name}: secrets come from the environment, not variables")
    validated = {name for name, spec in variables.items() if spec.get("validation")}
    assert len(validated) >= len(variables) - 1, sorted(set(variables) - validated)


def test_outputs_are_described():
    outputs = blocks("output")
    assert {"load_balancer_ipv4", "first_server_ipv4", "network_name", "backup_bucket",
            "backup_endpoint"} <= set(outputs)  # fmt: skip
    for name, spec in outputs.items():
        assert spec.get("description"), name


def test_the_infrastructure_is_all_there():
    resources = {kind for block in (d.get("resource", []) for d in parsed().values())
                 for item in block for kind in item}  # fmt: skip
    assert {"hcloud_network", "hcloud_network_subnet", "hcloud_firewall", "hcloud_server",
            "hcloud_volume", "hcloud_volume_attachment", "hcloud_load_balancer",
            "hcloud_load_balancer_service", "hcloud_load_balancer_target",
            "minio_s3_bucket"} <= resources  # fmt: skip


def test_no_secret_in_any_file():
    for path in [*TF_FILES, TF / "terraform.tfvars.example", *sorted((TF / "templates").iterdir())]:
        text = path.read_text()
        assert not re.search(r"(?im)^\s*(hcloud_)?token\s*=\s*\"", text), path.name
        assert not re.search(r"(?i)(access_key|secret_key|password)\s*=\s*\"[^\"$]", text), (
            path.name
        )
    failed, _ = failed_and_skipped(checkov("-d", str(TF), "--framework", "terraform", "secrets"))
    assert not failed, [f"{c['check_id']} {c['file_path']}: {c['check_name']}" for c in failed]


def test_cloud_init_templates_render_to_cloud_config(tmp_path):
    """terraform console evaluates templatefile() without providers."""
    values = {
        "k3s-server.yaml.tftpl": '{k3s_version="v1.32.3+k3s1", token="t", node_ip="10.0.1.11", '
        'first_server="10.0.1.10", cluster_init=false, network_cidr="10.0.0.0/16", volume_id=42}',
        "k3s-agent.yaml.tftpl": '{k3s_version="v1.32.3+k3s1", token="t", node_ip="10.0.1.100", '
        'first_server="10.0.1.10", network_cidr="10.0.0.0/16"}',
    }
    for name, arguments in values.items():
        expression = f'templatefile("{TF / "templates" / name}", {arguments})\n'
        result = terraform("console", cwd=tmp_path, stdin=expression)
        assert result.returncode == 0, result.stderr
        text = result.stdout.strip().removeprefix("<<EOT").removesuffix("EOT")
        assert text.lstrip().startswith("#cloud-config"), name
        config = yaml.safe_load(text)
        k3s = yaml.safe_load(next(f["content"] for f in config["write_files"]
                                  if f["path"] == "/etc/rancher/k3s/config.yaml"))  # fmt: skip
        assert k3s["server"] == "https://10.0.1.10:6443" and k3s["token"] == "t"
        assert "cloud-provider=external" in k3s["kubelet-arg"]
        assert any("INSTALL_K3S_VERSION='v1.32.3+k3s1'" in step for step in config["runcmd"])
