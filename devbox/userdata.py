"""The devbox instance's user data: a #cloud-config that installs the idle auto-stop watcher.

The watcher's files live in infra/idle/ and are read when the user data is built, then
embedded base64-encoded, so the script is never copied by hand and its text cannot clash
with CloudFormation's Fn::Sub (the base64 alphabet has no "$").
"""
import base64
import json
from pathlib import Path
from typing import List, Optional, Tuple

IDLE_DIR = Path(__file__).resolve().parent.parent / "infra" / "idle"
ENV_FILE = "/etc/default/devbox-idle"
# (file in infra/idle, where it goes on the instance, mode)
FILES: Tuple[Tuple[str, str, str], ...] = (
    ("devbox-idle-watch", "/usr/local/sbin/devbox-idle-watch", "0755"),
    ("devbox-idle.service", "/etc/systemd/system/devbox-idle.service", "0644"),
    ("devbox-idle.timer", "/etc/systemd/system/devbox-idle.timer", "0644"),
)
# EC2 rejects user data above 16 KB (counted before its own base64 encoding).
USER_DATA_LIMIT = 16384


def _quoted(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, whatever characters it holds.
    return json.dumps(value)


def _single_line(name: str, value: str) -> str:
    if not value or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} must be a non-empty single line, not {value!r}")
    return value


def environment_file(idle_minutes_expr: str = "${IdleMinutes}", ssh_port_expr: Optional[str] = None) -> str:
    """The text of /etc/default/devbox-idle, read by devbox-idle.service."""
    lines = [
        "# Written by the devbox user data at first boot; read by devbox-idle.service.",
        "# IDLE_MINUTES=0 turns auto-stop off. Also: GRACE_MINUTES, DRY_RUN=1.",
        f"IDLE_MINUTES={_single_line('idle_minutes_expr', idle_minutes_expr)}",
    ]
    if ssh_port_expr is not None:
        lines.append(f"SSH_PORT={_single_line('ssh_port_expr', ssh_port_expr)}")
    return "\n".join(lines) + "\n"


def cloud_config(
    idle_minutes_expr: str = "${IdleMinutes}",
    *,
    ssh_port_expr: Optional[str] = None,
    source_dir: Optional[Path] = None,
) -> str:
    """Build the #cloud-config user data that installs and starts the idle watcher."""
    source = IDLE_DIR if source_dir is None else source_dir
    lines: List[str] = [
        "#cloud-config",
        "# devbox: power off after IDLE_MINUTES without an SSH or mosh session (see devbox-idle-watch).",
        "write_files:",
    ]
    for name, target, mode in FILES:
        encoded = base64.b64encode((source / name).read_bytes()).decode("ascii")
        lines += [
            f"  - path: {target}",
            "    owner: root:root",
            f"    permissions: {_quoted(mode)}",
            "    encoding: b64",
            f"    content: {encoded}",
        ]
    lines += [
        f"  - path: {ENV_FILE}",
        "    owner: root:root",
        f"    permissions: {_quoted('0644')}",
        f"    content: {_quoted(environment_file(idle_minutes_expr, ssh_port_expr))}",
        # write_files runs before runcmd, so the units are on disk when systemd reloads.
        "runcmd:",
        "  - [systemctl, daemon-reload]",
        "  - [systemctl, enable, --now, devbox-idle.timer]",
    ]
    return "\n".join(lines) + "\n"
