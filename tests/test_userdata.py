"""Tests of devbox.userdata: the #cloud-config that installs the idle watcher on the instance."""
import base64
import configparser
import re
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from devbox import userdata

ROOT = Path(__file__).resolve().parent.parent
IDLE = ROOT / "infra" / "idle"
# What CloudFormation's Fn::Sub replaces: ${Name} and ${Resource.Attr}, but not the ${!Literal} escape.
SUB_VARIABLE = re.compile(r"\$\{(?!!)([^}]*)\}")


def load(document: str) -> Dict[str, Any]:
    loaded = yaml.safe_load(document)
    assert isinstance(loaded, dict)
    return loaded


def files_by_path(document: str) -> Dict[str, Dict[str, Any]]:
    return {entry["path"]: entry for entry in load(document)["write_files"]}


def content(entry: Dict[str, Any]) -> bytes:
    if entry.get("encoding") == "b64":
        return base64.b64decode(entry["content"], validate=True)
    return str(entry["content"]).encode()


def fn_sub(document: str, values: Dict[str, str]) -> str:
    """Substitute like Fn::Sub does, failing on a variable the template would not define."""

    def replace(match: "re.Match[str]") -> str:
        return values[match.group(1)]

    return SUB_VARIABLE.sub(replace, document)


def unit(text: bytes) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text.decode())
    return parser


def test_user_data_is_a_cloud_config_yaml_document() -> None:
    document = userdata.cloud_config()
    assert document.startswith("#cloud-config\n")
    assert set(load(document)) == {"write_files", "runcmd"}


def test_embedded_files_equal_the_infra_files_byte_for_byte() -> None:
    files = files_by_path(userdata.cloud_config())
    for name, target, _mode in userdata.FILES:
        assert files[target]["encoding"] == "b64"
        assert content(files[target]) == (IDLE / name).read_bytes(), name


def test_files_get_the_right_modes_and_owner() -> None:
    files = files_by_path(userdata.cloud_config())
    modes = {path: entry["permissions"] for path, entry in files.items()}
    assert modes == {
        "/usr/local/sbin/devbox-idle-watch": "0755",
        "/etc/systemd/system/devbox-idle.service": "0644",
        "/etc/systemd/system/devbox-idle.timer": "0644",
        "/etc/default/devbox-idle": "0644",
    }
    assert {entry["owner"] for entry in files.values()} == {"root:root"}


def test_environment_file_sets_idle_minutes_to_the_expression() -> None:
    env_file = files_by_path(userdata.cloud_config())[userdata.ENV_FILE]
    assert "encoding" not in env_file
    lines = [line for line in env_file["content"].splitlines() if not line.startswith("#")]
    assert lines == ["IDLE_MINUTES=${IdleMinutes}"]


def test_other_expressions_and_ssh_port_are_written() -> None:
    env_file = files_by_path(userdata.cloud_config("45", ssh_port_expr="${SshPort}"))[userdata.ENV_FILE]
    lines = [line for line in env_file["content"].splitlines() if not line.startswith("#")]
    assert lines == ["IDLE_MINUTES=45", "SSH_PORT=${SshPort}"]


def test_only_the_idle_expression_is_left_for_fn_sub() -> None:
    document = userdata.cloud_config()
    assert SUB_VARIABLE.findall(document) == ["IdleMinutes"]
    assert "${" not in document.replace("${IdleMinutes}", "")


def test_fn_sub_result_configures_the_watcher() -> None:
    substituted = fn_sub(userdata.cloud_config(), {"IdleMinutes": "20"})
    env_file = files_by_path(substituted)[userdata.ENV_FILE]
    settings = dict(line.split("=", 1) for line in env_file["content"].splitlines() if not line.startswith("#"))
    assert settings == {"IDLE_MINUTES": "20"}


@pytest.mark.parametrize("expr", ["", "30\nDRY_RUN=1", "30\r", "${IdleMinutes}\n"])
def test_expression_that_is_not_one_line_is_rejected(expr: str) -> None:
    with pytest.raises(ValueError, match="single line"):
        userdata.cloud_config(expr)


def test_runcmd_reloads_systemd_and_starts_the_timer() -> None:
    assert load(userdata.cloud_config())["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "devbox-idle.timer"],
    ]


def test_units_point_at_the_installed_script_and_environment_file() -> None:
    files = files_by_path(userdata.cloud_config())
    service = unit(content(files["/etc/systemd/system/devbox-idle.service"]))
    assert service["Service"]["ExecStart"] == "/usr/local/sbin/devbox-idle-watch"
    assert service["Service"]["EnvironmentFile"] == "-" + userdata.ENV_FILE
    assert service["Service"]["Type"] == "oneshot"
    # The state file's folder (/var/lib/devbox-idle) is the one systemd creates for the service.
    assert service["Service"]["StateDirectory"] == "devbox-idle"
    timer = unit(content(files["/etc/systemd/system/devbox-idle.timer"]))
    assert timer["Timer"]["OnUnitActiveSec"] == "1min"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_files_are_read_when_the_user_data_is_built(tmp_path: Path) -> None:
    shutil.copytree(IDLE, tmp_path, dirs_exist_ok=True)
    (tmp_path / "devbox-idle-watch").write_bytes(b"#!/usr/bin/python3\nprint('changed')\n")
    files = files_by_path(userdata.cloud_config(source_dir=tmp_path))
    assert content(files["/usr/local/sbin/devbox-idle-watch"]) == b"#!/usr/bin/python3\nprint('changed')\n"


def test_user_data_fits_the_ec2_limit() -> None:
    size = len(userdata.cloud_config().encode())
    assert size <= userdata.USER_DATA_LIMIT, f"user data is {size} bytes, EC2 allows {userdata.USER_DATA_LIMIT}"

