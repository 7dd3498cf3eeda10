"""Tests of devbox.userdata: the #cloud-config that mounts the data volume and installs the idle watcher."""
import ast
import base64
import configparser
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

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


def test_embedded_files_are_the_infra_files_without_their_comments() -> None:
    files = files_by_path(userdata.cloud_config())
    for source, entries in ((IDLE, userdata.FILES), (VOLUME, userdata.VOLUME_FILES)):
        for name, target, _mode in entries:
            assert content(files[target]) == userdata.installed(source / name), name


def test_files_get_the_right_modes_and_cloud_inits_default_owner() -> None:
    files = files_by_path(userdata.cloud_config())
    # cloud-init's write_files defaults: root:root, 0644.
    modes = {path: entry.get("permissions", "0644") for path, entry in files.items()}
    assert modes == {
        "/usr/local/sbin/devbox-idle-watch": "0755",
        "/usr/local/bin/devbox-keep": "0755",
        "/etc/systemd/system/devbox-idle.service": "0644",
        "/etc/systemd/system/devbox-idle.timer": "0644",
        "/etc/tmpfiles.d/devbox-keep.conf": "0644",
        "/etc/default/devbox-idle": "0644",
        "/var/lib/cloud/scripts/per-boot/devbox-on-new-root": "0755",
    }
    assert {entry.get("owner", "root:root") for entry in files.values()} == {"root:root"}


def settings_in(document: str) -> List[str]:
    env_file = files_by_path(document)[userdata.ENV_FILE]
    assert "encoding" not in env_file
    return [line for line in env_file["content"].splitlines() if not line.startswith("#")]


def test_environment_file_sets_idle_minutes_and_load_threshold_to_the_expressions() -> None:
    assert settings_in(userdata.cloud_config()) == ["IDLE_MINUTES=${IdleMinutes}",
                                                    "IDLE_LOAD_THRESHOLD=${IdleLoadThreshold}"]


def test_other_expressions_and_ssh_port_are_written() -> None:
    document = userdata.cloud_config("45", ssh_port_expr="${SshPort}", load_threshold_expr="2.5")
    assert settings_in(document) == ["IDLE_MINUTES=45", "IDLE_LOAD_THRESHOLD=2.5", "SSH_PORT=${SshPort}"]


def test_only_the_template_parameters_are_left_for_fn_sub() -> None:
    document = userdata.cloud_config()
    assert SUB_VARIABLE.findall(document) == ["IdleMinutes", "IdleLoadThreshold"]
    assert "${" not in document.replace("${IdleMinutes}", "").replace("${IdleLoadThreshold}", "")


def test_fn_sub_result_configures_the_watcher() -> None:
    substituted = fn_sub(userdata.cloud_config(), {"IdleMinutes": "20", "IdleLoadThreshold": "1.0"})
    settings = dict(line.split("=", 1) for line in settings_in(substituted))
    assert settings == {"IDLE_MINUTES": "20", "IDLE_LOAD_THRESHOLD": "1.0"}


@pytest.mark.parametrize("expr", ["", "30\nDRY_RUN=1", "30\r", "${IdleMinutes}\n"])
def test_expression_that_is_not_one_line_is_rejected(expr: str) -> None:
    with pytest.raises(ValueError, match="single line"):
        userdata.cloud_config(expr)
    with pytest.raises(ValueError, match="single line"):
        userdata.cloud_config(load_threshold_expr=expr)


def test_runcmd_reloads_systemd_makes_the_keep_folder_and_starts_the_timer() -> None:
    assert load(userdata.cloud_config())["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/devbox-keep.conf"],
        ["systemctl", "enable", "--now", "devbox-idle.timer"],
    ]


def test_keep_folder_is_world_writable_and_sticky_and_made_at_every_boot() -> None:
    conf = content(files_by_path(userdata.cloud_config())[userdata.KEEP_TMPFILES]).decode()
    assert conf == "d /run/devbox-keep 1777 root root -\n"


def test_units_point_at_the_installed_script_and_environment_file() -> None:
    files = files_by_path(userdata.cloud_config())
    service = unit(content(files["/etc/systemd/system/devbox-idle.service"]))
    assert service["Service"]["ExecStart"] == "/usr/local/sbin/devbox-idle-watch"
    assert service["Service"]["EnvironmentFile"] == "-" + userdata.ENV_FILE
    assert service["Service"]["Type"] == "oneshot"
    # Every print reaches the journal before a poweroff; a hung run does not stop the later ones.
    assert service["Service"]["Environment"] == "PYTHONUNBUFFERED=1"
    assert service["Service"]["TimeoutStartSec"] == "50s"
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
    assert installed.read_bytes() == userdata.stripped_shell((VOLUME / userdata.BOOT_SCRIPT).read_bytes())
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


def test_user_data_fits_the_ec2_limit_after_fn_sub_with_the_longest_parameters() -> None:
    # The document cannot be gzipped as a whole (it goes through Fn::Sub as text); its files are.
    size = len(fn_sub(userdata.cloud_config(), {"IdleMinutes": "10080", "IdleLoadThreshold": "999.99"}).encode())
    assert size <= userdata.USER_DATA_LIMIT, f"user data is {size} bytes, EC2 allows {userdata.USER_DATA_LIMIT}"


# --- what goes onto the box: the infra files without their comments -------------------------------


def without_docstrings(tree: ast.AST) -> ast.AST:
    """The tree with each docstring removed, or replaced by `pass` where it was the whole body."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return tree


@pytest.mark.parametrize("name", ["devbox-idle-watch"])
def test_a_stripped_python_script_is_the_same_program(name: str) -> None:
    source = (IDLE / name).read_bytes()
    stripped = userdata.installed(IDLE / name)
    assert ast.dump(ast.parse(stripped)) == ast.dump(without_docstrings(ast.parse(source)))
    assert stripped.startswith(b"#!/usr/bin/python3\n")
    text = stripped.decode()
    assert '"""' not in text and "\n\n" not in text
    assert not [line for line in text.splitlines()[1:] if line.lstrip().startswith("#")]
    assert len(stripped) < 0.8 * len(source)


def test_python_stripping_keeps_strings_that_look_like_comments_and_bodies_that_were_only_a_docstring() -> None:
    source = (b'#!/usr/bin/python3\n"""Module."""\n\n\nclass Error(Exception):\n    """Only a docstring."""\n\n\n'
              b'TEXT = """first\n\n# not a comment\n"""  # a comment\nURL = "http://x/#frag"  # another\n'
              b'value = f"""a\n\n{TEXT}"""\n')
    stripped = userdata.stripped_python(source)
    assert stripped == (b'#!/usr/bin/python3\nclass Error(Exception):\n    pass\n'
                        b'TEXT = """first\n\n# not a comment\n"""\nURL = "http://x/#frag"\n'
                        b'value = f"""a\n\n{TEXT}"""\n')
    namespace: Dict[str, Any] = {}
    exec(compile(stripped, "stripped", "exec"), namespace)
    assert namespace["TEXT"] == "first\n\n# not a comment\n" and namespace["URL"] == "http://x/#frag"


def test_a_docstring_sharing_a_line_with_code_is_refused() -> None:
    with pytest.raises(ValueError, match="shares a line with code"):
        userdata.stripped_python(b'#!/usr/bin/python3\ndef f(): """Doc."""; return 1\n')


def test_shell_stripping_drops_only_comment_and_blank_lines() -> None:
    source = "\n".join([
        "#!/bin/sh", "# a comment", "", "set -eu", "    # indented comment",
        "echo a \\", "# continues the echo",
        'x="two', '# lines"', "y='it''s # not'",
        "cat <<EOF", "# kept", "", "EOF",
        "cat <<-'END'", "\t# kept", "\tEND",
        "echo done # trailing comments stay", ""])
    assert userdata.stripped_shell(source.encode()).decode().splitlines() == [
        "#!/bin/sh", "set -eu",
        "echo a \\", "# continues the echo",
        'x="two', '# lines"', "y='it''s # not'",
        "cat <<EOF", "# kept", "", "EOF",
        "cat <<-'END'", "\t# kept", "\tEND",
        "echo done # trailing comments stay"]


@pytest.mark.parametrize("path", [VOLUME / "devbox-data-volume", VOLUME / "devbox-on-new-root", IDLE / "devbox-keep"])
def test_stripped_shell_scripts_are_their_lines_less_comments_and_still_parse(path: Path, tmp_path: Path) -> None:
    source = path.read_text().splitlines()
    stripped = userdata.installed(path).decode().splitlines()
    # The kept lines are the source's, in order; the ones in between, dropped, all blank or comments.
    dropped: List[str] = []
    position = 0
    for kept in stripped:
        found = source.index(kept, position)
        dropped += source[position:found]
        position = found + 1
    dropped += source[position:]
    assert all(not line.strip() or line.lstrip().startswith("#") for line in dropped)
    copy = tmp_path / path.name
    copy.write_text("\n".join(stripped) + "\n")
    assert subprocess.run(["/bin/sh", "-n", str(copy)], capture_output=True, timeout=30).returncode == 0


def test_the_data_volume_scripts_warning_text_survives_stripping() -> None:
    stripped = userdata.installed(VOLUME / "devbox-data-volume").decode()
    assert "\n\n  *** devbox: the data volume is NOT mounted ***\n" in stripped


def test_units_and_conf_files_lose_only_their_comment_and_blank_lines() -> None:
    for name in ("devbox-idle.service", "devbox-idle.timer", "devbox-keep.conf"):
        source = [line for line in (IDLE / name).read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith(("#", ";"))]
        assert userdata.installed(IDLE / name).decode().splitlines() == source


def test_a_file_of_unknown_kind_is_not_installed(tmp_path: Path) -> None:
    odd = tmp_path / "notes.txt"
    odd.write_text("# keep me\n")
    with pytest.raises(ValueError, match="no way to strip it"):
        userdata.installed(odd)


def test_small_files_go_as_text_but_never_text_that_fn_sub_would_read(tmp_path: Path) -> None:
    shutil.copytree(IDLE, tmp_path, dirs_exist_ok=True)
    (tmp_path / "devbox-keep.conf").write_text("d /run/${Whatever} 1777 root root -\n")
    files = files_by_path(userdata.cloud_config(source_dir=tmp_path))
    assert files[userdata.KEEP_TMPFILES]["encoding"] == "gz+b64"
    assert "encoding" not in files_by_path(userdata.cloud_config())[userdata.KEEP_TMPFILES]
