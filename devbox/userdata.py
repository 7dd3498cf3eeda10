"""The devbox instance's user data: a #cloud-config for disposable instances around a durable /home.

It does three things on the instance:
- every boot, early (a ``bootcmd``): infra/volume/devbox-data-volume mounts the box's data volume at
  /home and keeps the SSH host keys on it (see that script);
- late in every boot: infra/volume/devbox-on-new-root starts the user's ``~/.devbox/on-new-root``
  (as root, once per root disk, in the background);
- installs the idle auto-stop watcher from infra/idle/.

The on-instance files are read when the user data is built and embedded gzip-compressed and base64
encoded: nothing is copied by hand, the text cannot clash with CloudFormation's Fn::Sub (the base64
alphabet has no "$"), and the whole stays under EC2's 16 KB limit.
"""
import base64
import gzip
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

INFRA = Path(__file__).resolve().parent.parent / "infra"
IDLE_DIR = INFRA / "idle"
VOLUME_DIR = INFRA / "volume"
ENV_FILE = "/etc/default/devbox-idle"
# (file in infra/idle, where it goes on the instance, mode)
FILES: Tuple[Tuple[str, str, str], ...] = (
    ("devbox-idle-watch", "/usr/local/sbin/devbox-idle-watch", "0755"),
    ("devbox-idle.service", "/etc/systemd/system/devbox-idle.service", "0644"),
    ("devbox-idle.timer", "/etc/systemd/system/devbox-idle.timer", "0644"),
)
# (file in infra/volume, where it goes on the instance, mode). cloud-init's scripts_per_boot
# module runs what is in /var/lib/cloud/scripts/per-boot on every boot, in its final stage.
VOLUME_FILES: Tuple[Tuple[str, str, str], ...] = (
    ("devbox-on-new-root", "/var/lib/cloud/scripts/per-boot/devbox-on-new-root", "0755"),
)
BOOT_SCRIPT = "devbox-data-volume"
BOOT_SCRIPT_PATH = "/usr/local/sbin/devbox-data-volume"
# How long a boot waits for the data volume before it goes on with the root disk's /home.
VOLUME_TIMEOUT_S = 600
# EC2 rejects user data above 16 KB (counted before its own base64 encoding).
USER_DATA_LIMIT = 16384


def _quoted(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, whatever characters it holds.
    return json.dumps(value)


def _packed(data: bytes) -> str:
    # mtime=0: the same files always give the same user data, so a deploy changes it only when they change.
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


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


def boot_commands(volume_dir: Path = VOLUME_DIR, volume_timeout_s: int = VOLUME_TIMEOUT_S) -> List[str]:
    """The bootcmd lines: unpack devbox-data-volume into place, then run it."""
    if isinstance(volume_timeout_s, bool) or not isinstance(volume_timeout_s, int) or volume_timeout_s < 1:
        raise ValueError(f"volume_timeout_s must be a whole number of seconds above 0, not {volume_timeout_s!r}")
    partial = BOOT_SCRIPT_PATH + ".new"
    packed = _packed((volume_dir / BOOT_SCRIPT).read_bytes())
    return [
        f"echo {packed} | base64 -d | gunzip >{partial} && chmod 0755 {partial} && mv -f {partial} {BOOT_SCRIPT_PATH}",
        f"DEVBOX_VOLUME_TIMEOUT={volume_timeout_s} {BOOT_SCRIPT_PATH} boot",
    ]


def _write_files(source: Path, files: Sequence[Tuple[str, str, str]]) -> List[str]:
    lines: List[str] = []
    for name, target, mode in files:
        lines += [
            f"  - path: {target}",
            "    owner: root:root",
            f"    permissions: {_quoted(mode)}",
            "    encoding: gz+b64",
            f"    content: {_packed((source / name).read_bytes())}",
        ]
    return lines


def cloud_config(
    idle_minutes_expr: str = "${IdleMinutes}",
    *,
    ssh_port_expr: Optional[str] = None,
    source_dir: Optional[Path] = None,
    volume_dir: Optional[Path] = None,
    volume_timeout_s: int = VOLUME_TIMEOUT_S,
) -> str:
    """Build the #cloud-config user data: data volume at /home, on-new-root runner, idle watcher."""
    volume = VOLUME_DIR if volume_dir is None else volume_dir
    lines: List[str] = [
        "#cloud-config",
        "# devbox: /home is the box's data volume (devbox-data-volume); the user's ~/.devbox/on-new-root",
        "# runs as root once per root disk; power off after IDLE_MINUTES without a session (devbox-idle-watch).",
        # bootcmd runs on every boot, first among the init stage's modules: before write_files,
        # users_groups and ssh, and (with that whole stage) before sshd starts. So the script
        # comes inside the command itself, and /home is mounted before the default user's home
        # and authorized_keys are made.
        "bootcmd:",
        *(f"  - {_quoted(command)}" for command in boot_commands(volume, volume_timeout_s)),
        # cloud-init's ssh module deletes /etc/ssh/ssh_host_*key* on each new instance unless this
        # is false (devbox-data-volume deletes keys baked into an image instead); it then generates
        # only the key types that are missing, so the keys restored from the volume stay, and a boot
        # whose script failed still gets keys.
        "ssh_deletekeys: false",
        "write_files:",
        *_write_files(IDLE_DIR if source_dir is None else source_dir, FILES),
        f"  - path: {ENV_FILE}",
        "    owner: root:root",
        f"    permissions: {_quoted('0644')}",
        f"    content: {_quoted(environment_file(idle_minutes_expr, ssh_port_expr))}",
        *_write_files(volume, VOLUME_FILES),
        # write_files runs before runcmd, so the units are on disk when systemd reloads.
        "runcmd:",
        "  - [systemctl, daemon-reload]",
        "  - [systemctl, enable, --now, devbox-idle.timer]",
    ]
    return "\n".join(lines) + "\n"
