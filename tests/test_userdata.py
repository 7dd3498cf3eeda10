"""Tests of devbox.userdata: the #cloud-config that mounts the data volume and installs the idle watcher."""
import base64
import configparser
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from devbox import userdata

ROOT = Path(__file__).resolve().parent.parent
IDLE = ROOT / "infra" / "idle"
VOLUME = ROOT / "infra" / "volume"
# What CloudFormation's Fn::Sub replaces: ${Name} and ${Resource.Attr}, but not the ${!Literal} escape.
SUB_VARIABLE = re.compile(r"\$\{(?!!)([^}]*)\}")


def load(document: str) -> Dict[str, Any]:
    loaded = yaml.safe_load(document)
    assert isinstance(loaded, dict)
    return loaded


def files_by_path(document: str) -> Dict[str, Dict[str, Any]]:
    return {entry["path"]: entry for entry in load(document)["write_files"]}


def content(entry: Dict[str, Any]) -> bytes:
    if entry.get("encoding") == "gz+b64":
        return gzip.decompress(base64.b64decode(entry["content"], validate=True))
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
    assert set(load(document)) == {"bootcmd", "ssh_deletekeys", "write_files", "runcmd"}


def test_embedded_files_equal_the_infra_files_byte_for_byte() -> None:
    files = files_by_path(userdata.cloud_config())
    for source, entries in ((IDLE, userdata.FILES), (VOLUME, userdata.VOLUME_FILES)):
        for name, target, _mode in entries:
            assert files[target]["encoding"] == "gz+b64"
            assert content(files[target]) == (source / name).read_bytes(), name


def test_files_get_the_right_modes_and_owner() -> None:
    files = files_by_path(userdata.cloud_config())
    modes = {path: entry["permissions"] for path, entry in files.items()}
    assert modes == {
        "/usr/local/sbin/devbox-idle-watch": "0755",
        "/etc/systemd/system/devbox-idle.service": "0644",
        "/etc/systemd/system/devbox-idle.timer": "0644",
        "/etc/default/devbox-idle": "0644",
        "/var/lib/cloud/scripts/per-boot/devbox-on-new-root": "0755",
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



def test_user_data_is_the_same_for_the_same_files() -> None:
    # gzip without a timestamp: an unchanged stack must not get new user data on each deploy.
    assert userdata.cloud_config() == userdata.cloud_config()


# --- the data volume ------------------------------------------------------------------------------


def test_bootcmd_unpacks_the_data_volume_script_then_runs_it_with_the_timeout() -> None:
    unpack, run = load(userdata.cloud_config(volume_timeout_s=90))["bootcmd"]
    assert unpack.endswith(f"mv -f {userdata.BOOT_SCRIPT_PATH}.new {userdata.BOOT_SCRIPT_PATH}")
    assert run == f"DEVBOX_VOLUME_TIMEOUT=90 {userdata.BOOT_SCRIPT_PATH} boot"


def test_default_volume_timeout_is_ten_minutes() -> None:
    assert load(userdata.cloud_config())["bootcmd"][1].startswith("DEVBOX_VOLUME_TIMEOUT=600 ")


def test_bootcmd_line_writes_the_script_byte_for_byte_when_a_shell_runs_it(tmp_path: Path) -> None:
    unpack = load(userdata.cloud_config())["bootcmd"][0].replace("/usr/local/sbin/", f"{tmp_path}/")
    # cloud-init writes the bootcmd lines into a file and runs it with /bin/sh.
    subprocess.run(["/bin/sh", "-c", unpack], check=True, timeout=30)
    installed = tmp_path / userdata.BOOT_SCRIPT
    assert installed.read_bytes() == (VOLUME / userdata.BOOT_SCRIPT).read_bytes()
    assert os.access(installed, os.X_OK)
    assert not (tmp_path / f"{userdata.BOOT_SCRIPT}.new").exists()


def test_bootcmd_is_read_from_the_volume_folder_when_built(tmp_path: Path) -> None:
    shutil.copytree(VOLUME, tmp_path, dirs_exist_ok=True)
    (tmp_path / userdata.BOOT_SCRIPT).write_bytes(b"#!/bin/sh\necho changed\n")
    unpack = load(userdata.cloud_config(volume_dir=tmp_path))["bootcmd"][0]
    packed = unpack.split()[1]
    assert gzip.decompress(base64.b64decode(packed, validate=True)) == b"#!/bin/sh\necho changed\n"


def test_ssh_module_keeps_the_host_keys_the_boot_script_restored() -> None:
    config = load(userdata.cloud_config())
    assert config["ssh_deletekeys"] is False
    # Left to its default, which only makes the key types that are missing (a safety net).
    assert "ssh_genkeytypes" not in config


def test_on_new_root_runner_is_a_per_boot_script_that_starts_a_background_unit() -> None:
    hook = files_by_path(userdata.cloud_config())["/var/lib/cloud/scripts/per-boot/devbox-on-new-root"]
    text = content(hook).decode()
    assert text.startswith("#!/bin/sh\n")
    assert "systemd-run --no-block" in text
    assert f"{userdata.BOOT_SCRIPT_PATH} on-new-root" in text


@pytest.mark.parametrize("timeout", [0, -5, 1.5, "600", True])
def test_volume_timeout_that_is_not_a_positive_whole_number_is_rejected(timeout: Any) -> None:
    with pytest.raises(ValueError, match="volume_timeout_s"):
        userdata.cloud_config(volume_timeout_s=timeout)


def test_user_data_fits_the_ec2_limit_after_fn_sub_with_the_longest_idle_minutes() -> None:
    # The document cannot be gzipped as a whole (it goes through Fn::Sub as text); its files are.
    size = len(fn_sub(userdata.cloud_config(), {"IdleMinutes": "10080"}).encode())
    assert size <= userdata.USER_DATA_LIMIT, f"user data is {size} bytes, EC2 allows {userdata.USER_DATA_LIMIT}"
