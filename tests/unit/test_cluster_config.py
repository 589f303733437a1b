"""`cluster.yaml` and `cluster.local.yaml` pass Ray's own cluster-config validator, offline, keep their
security properties, and keep the same head and worker commands.

The validator is the one `ray up` runs before it touches a machine: `prepare_config` merges the file with the
provider's defaults (for AWS a YAML file shipped with Ray; no boto3, no credentials, no network), then
`validate_config` checks the result against Ray's JSON schema. tests/cluster launches cluster.local.yaml for
real; cluster.yaml's AWS part (instances, security group, IAM, the AMI) is checked only here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_LOCAL_YAML = REPO / "cluster.local.yaml"

# A literal that looks like a credential. Values that start with `$`, `<`, `"$(` or `...` are references
# or placeholders, not literals.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "hex token": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    "assigned credential": re.compile(
        r"(password|passwd|secret|secret_key|token|api_key|apikey)['\"]?\s*[=:]\s*['\"]?[A-Za-z0-9+/_\-!@#%^&*]{8,}",
        re.I,
    ),
    "credentials in a URL": re.compile(r"://[^/\s:@$<]+:[^/\s@$<]{4,}@"),
}


def secret_literals(text: str) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for what, pattern in SECRET_PATTERNS.items() for m in pattern.finditer(text)]


def validated(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it launches anything: defaults merged in, then the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return validated(raw)


@pytest.fixture(scope="module")
def local_raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_LOCAL_YAML.read_text())


@pytest.fixture(scope="module", params=["cluster.yaml", "cluster.local.yaml"])
def either(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(text, prepared) of each of the two files, for the properties they share."""
    text = (REPO / request.param).read_text()
    return text, validated(yaml.safe_load(text))


def the_command(commands: list[str], marker: str) -> str:
    found = [cmd for cmd in commands if marker in cmd]
    assert len(found) == 1, f"expected one command with {marker!r}, found {len(found)}: {commands}"
    return found[0]


def test_passes_rays_validator_with_the_three_node_types(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert prepared["head_node_type"] == "head"
    assert types["gpu_worker"]["resources"].get("GPU") == 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= prepared["max_workers"]
    assert types["head"]["max_workers"] == 0


def test_no_command_comes_from_rays_aws_defaults(prepared: dict[str, Any]) -> None:
    # Ray's defaults install a nightly Ray wheel and boto3 with whatever pip is first on PATH: every command
    # list must be this file's own.
    commands = [cmd for key, value in prepared.items() if key.endswith("_commands") for cmd in value]
    assert not [cmd for cmd in commands if "ray-wheels" in cmd or "tensorflow2_p310" in cmd]


@pytest.mark.parametrize(
    ("misspell", "name"),
    [
        (lambda c: c.__setitem__("max_wokers", c.pop("max_workers")), "max_wokers"),
        (lambda c: c.__setitem__("head_start_ray_comands", c.pop("head_start_ray_commands")), "head_start_ray_comands"),
        (lambda c: c["available_node_types"]["cpu_worker"].__setitem__(
            "min_wokers", c["available_node_types"]["cpu_worker"].pop("min_workers")), "min_wokers"),
        (lambda c: c["available_node_types"]["gpu_worker"].__setitem__("node_confg", {}), "node_confg"),
    ],
)
def test_a_misspelled_field_fails_naming_it(raw: dict[str, Any], misspell: Any, name: str) -> None:
    config = copy.deepcopy(raw)
    misspell(config)
    with pytest.raises(jsonschema.ValidationError, match=rf"'{name}' was unexpected"):
        validated(config)


def test_head_node_type_must_exist(raw: dict[str, Any]) -> None:
    config = copy.deepcopy(raw)
    config["head_node_type"] = "hed"
    with pytest.raises(ValueError, match="head_node_type"):
        validated(config)


def test_every_node_type_installs_mlray(prepared: dict[str, Any]) -> None:
    install = "~/mlray-env/bin/pip install -q ~/mlray"
    assert install in prepared["head_setup_commands"]
    for name, node_type in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            continue
        # A node type's own list replaces the global setup and worker setup commands.
        effective = node_type.get("worker_setup_commands", prepared["worker_setup_commands"])
        assert install in effective, name
    gpu_setup = prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    assert any("torch.cuda.is_available()" in cmd for cmd in gpu_setup)


def test_what_pip_install_needs_is_mounted_from_the_repository(raw: dict[str, Any]) -> None:
    mounts = raw["file_mounts"]
    for remote in ("~/mlray/pyproject.toml", "~/mlray/README.md", "~/mlray/mlray", "~/mlray/serve_apps"):
        assert (REPO / mounts[remote]).exists(), remote


def test_secrets_come_from_a_folder_outside_the_repository(raw: dict[str, Any], local_raw: dict[str, Any]) -> None:
    for config in (raw, local_raw):
        local = Path(config["file_mounts"]["~/.mlray/secrets"]).expanduser().resolve()
        assert REPO not in local.parents and local != REPO


def test_ray_token_auth_on_head_and_workers(either: tuple[str, dict[str, Any]]) -> None:
    _, prepared = either
    head = the_command(prepared["head_start_ray_commands"], "ray start --head")
    worker = the_command(prepared["worker_start_ray_commands"], "ray start --address=$RAY_HEAD_IP:6379")
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.mlray/secrets/ray_token" in cmd
        assert "MLRAY_RAY_AUTH_MODE=token" in cmd  # mlray's own Ray CLI calls stay on token auth
        # A .bashrc that changes PATH for SSH sessions must not choose the jobs' python.
        assert cmd.index("unset SSH_CLIENT SSH_CONNECTION") < cmd.index("ray start")
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        starts = [i for i, cmd in enumerate(commands) if "ray start" in cmd]
        assert commands.index("ray stop") < starts[0]


def test_dashboard_only_on_loopback(either: tuple[str, dict[str, Any]]) -> None:
    text, prepared = either
    head = the_command(prepared["head_start_ray_commands"], "ray start --head")
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert not re.search(r"dashboard-host[= ]0\.0\.0\.0", text)


def test_mlflow_server_on_the_head_with_basic_auth_and_proxied_artifacts(either: tuple[str, dict[str, Any]]) -> None:
    _, prepared = either
    commands = prepared["head_start_ray_commands"]
    server = the_command(commands, "mlflow server")
    assert "--app-name basic-auth" in server
    # On the head's own address, where the other nodes reach it: not a wildcard, not loopback only.
    assert "MLFLOW_HOST=$(hostname -I | awk '{print $1}')" in server and "--host $MLFLOW_HOST" in server
    assert "0.0.0.0" not in server
    assert "--serve-artifacts" in server and "--artifacts-destination" in server
    assert re.search(r"--backend-store-uri (sqlite|postgresql)", server)
    assert "MLFLOW_AUTH_CONFIG_PATH=" in server and ". ~/.mlray/secrets/mlflow.env" in server
    # The server is up (and its jobs user exists) before Ray starts, so jobs never see it missing.
    assert commands.index(server) < commands.index(the_command(commands, "ray start --head"))
    assert any("'mlflow[auth]==3.17.2'" in cmd or "import flask_wtf" in cmd for cmd in prepared["head_setup_commands"])
    # Jobs on every node get the server's address, proxied artifacts and their credentials from a file.
    head = the_command(commands, "ray start --head")
    worker = the_command(prepared["worker_start_ray_commands"], "ray start --address")
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    for cmd in (head, worker):
        assert "MLRAY_ARTIFACT_ROOT=mlflow-artifacts:/" in cmd
        assert ". ~/.mlray/secrets/jobs.env" in cmd


def test_no_inbound_rule_is_added_and_nodes_are_terminated_on_down(raw: dict[str, Any]) -> None:
    assert "security_group" not in raw["provider"]  # only Ray's own group: intra-cluster and SSH
    assert raw["provider"]["cache_stopped_nodes"] is False


def test_no_secret_literal_in_the_file(either: tuple[str, dict[str, Any]]) -> None:
    text, _ = either
    assert secret_literals(text) == []


@pytest.mark.parametrize(
    "line",
    [
        "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "export MLFLOW_TRACKING_PASSWORD=hunter2hunter2",
        "MLFLOW_AUTH_ADMIN_PASSWORD: 'correct-horse-battery'",
        "RAY_AUTH_TOKEN=3f1c9a0b7d2e4f6a8b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a",
        "--backend-store-uri postgresql://mlflow:s3cretpass@db.internal/mlflow",
        "-----BEGIN RSA PRIVATE KEY-----",
    ],
)
def test_the_secret_check_catches_literals(line: str) -> None:
    assert secret_literals(line)


@pytest.mark.parametrize(
    "line",
    [
        "RAY_AUTH_TOKEN_PATH=$HOME/.mlray/secrets/ray_token",
        "MLFLOW_TRACKING_PASSWORD=<12+ characters>",
        "auth=('admin', e['MLFLOW_AUTH_ADMIN_PASSWORD'])",
        "--backend-store-uri postgresql://USER@HOST/mlflow",
    ],
)
def test_the_secret_check_lets_references_through(line: str) -> None:
    assert secret_literals(line) == []


# -- cluster.local.yaml: the file tests/cluster launches ---------------------------------------------------


def test_the_local_file_passes_rays_validator_with_its_one_node_type(local_raw: dict[str, Any]) -> None:
    prepared = validated(local_raw)
    assert prepared["provider"]["type"] == "local"
    # Ray's local provider makes its own single node type; the worker starts only when a job needs it.
    assert prepared["available_node_types"] == {"local.cluster.node": {
        "node_config": {}, "resources": {}, "min_workers": 0, "max_workers": 1}}
    provider = prepared["provider"]
    assert provider["worker_ips"] and provider["head_ip"] not in provider["worker_ips"]


@pytest.mark.parametrize(
    ("misspell", "error", "message"),
    [
        (lambda c: c.__setitem__("idle_timout_minutes", c.pop("idle_timeout_minutes")), jsonschema.ValidationError,
         "'idle_timout_minutes' was unexpected"),
        (lambda c: c.__setitem__("head_setup_comands", c.pop("head_setup_commands")), jsonschema.ValidationError,
         "'head_setup_comands' was unexpected"),
        (lambda c: c["provider"].__setitem__("worker_ip", c["provider"].pop("worker_ips")), click.ClickException,
         "Please supply a `head_ip` and list of `worker_ips`"),
        (lambda c: c.__setitem__("available_node_types", {"cpu_worker": {}}), click.ClickException,
         "The field available_node_types is not supported for on-premise clusters"),
    ],
)
def test_a_misspelled_local_field_fails_with_rays_message(local_raw: dict[str, Any], misspell: Any, error: type,
                                                          message: str) -> None:
    config = copy.deepcopy(local_raw)
    misspell(config)
    with pytest.raises(error, match=re.escape(message)):
        validated(config)


def test_the_local_file_starts_ray_and_mlflow_with_cluster_yamls_commands(raw: dict[str, Any],
                                                                          local_raw: dict[str, Any]) -> None:
    # Word for word, but for the line that picks Ray's v1 autoscaler on the local provider (see its header).
    v1 = "export RAY_enable_autoscaler_v2=0; "
    local_head = [cmd.replace(v1, "") for cmd in local_raw["head_start_ray_commands"]]
    assert sum(v1 in cmd for cmd in local_raw["head_start_ray_commands"]) == 1
    assert local_head == raw["head_start_ray_commands"]
    assert local_raw["worker_start_ray_commands"] == raw["worker_start_ray_commands"]
    auth_ini = the_command(raw["head_setup_commands"], "basic_auth.ini")
    assert the_command(local_raw["head_setup_commands"], "basic_auth.ini") == auth_ini
    path = the_command(raw["setup_commands"], "mlray-env/bin' ~/.bashrc")
    assert the_command(local_raw["setup_commands"], "mlray-env/bin' ~/.bashrc") == path
    assert local_raw["file_mounts"]["~/.mlray/secrets"] == raw["file_mounts"]["~/.mlray/secrets"]
