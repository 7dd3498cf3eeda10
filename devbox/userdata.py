"""The devbox instance's user data: a #cloud-config for disposable instances around a durable /home.

It does three things on the instance:
- every boot, early (a ``bootcmd``): infra/volume/devbox-data-volume mounts the box's data volume at
  /home and keeps the SSH host keys on it (see that script);
- late in every boot: infra/volume/devbox-on-new-root starts the user's ``~/.devbox/on-new-root``
  (as root, once per root disk, in the background);
- installs the idle auto-stop watcher from infra/idle/ and devbox-keep, which holds the box up.

The on-instance files are read when the user data is built, so nothing is copied by hand. EC2 takes
16 KB of user data, so they go without their comments, docstrings and blank lines (the box only runs
them; they are read here), gzip-compressed and base64 encoded; a small file goes as text when that
is shorter. Either way no "${" reaches CloudFormation's Fn::Sub but the parameters meant for it.
"""
import ast
import base64
import gzip
import io
import json
import re
import tokenize
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

INFRA = Path(__file__).resolve().parent.parent / "infra"
IDLE_DIR = INFRA / "idle"
VOLUME_DIR = INFRA / "volume"
ENV_FILE = "/etc/default/devbox-idle"
# systemd-tmpfiles makes /run/devbox-keep (where devbox-keep writes) at every boot.
KEEP_TMPFILES = "/etc/tmpfiles.d/devbox-keep.conf"
# (file in infra/idle, where it goes on the instance, mode)
FILES: Tuple[Tuple[str, str, str], ...] = (
    ("devbox-idle-watch", "/usr/local/sbin/devbox-idle-watch", "0755"),
    ("devbox-keep", "/usr/local/bin/devbox-keep", "0755"),
    ("devbox-idle.service", "/etc/systemd/system/devbox-idle.service", "0644"),
    ("devbox-idle.timer", "/etc/systemd/system/devbox-idle.timer", "0644"),
    ("devbox-keep.conf", KEEP_TMPFILES, "0644"),
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


def _docstrings(tree: ast.AST) -> List[Tuple[ast.Expr, bool]]:
    """Each docstring of a module, class or function, and whether it is its body's only statement."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                found.append((first, len(node.body) == 1))
    return found


def stripped_python(source: bytes) -> bytes:
    """A Python program without its comments, docstrings and blank lines: the same program, smaller.

    The on-instance scripts are written to be read (comments say why), but EC2 takes 16 KB of user
    data and the box only runs them. Line by line, so every line that stays is as written.
    """
    text = source.decode("utf-8")
    lines = text.splitlines()
    content: Set[int] = set()  # lines inside a multi-line string: its text, not layout
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT and token.start[0] > 1:  # line 1 is the #! line
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col].rstrip()
        elif token.end[0] > token.start[0]:  # a string (or, from Python 3.12, a piece of an f-string)
            content.update(range(token.start[0] + 1, token.end[0] + 1))
    for doc, alone in _docstrings(ast.parse(text)):
        first, last = doc.lineno, doc.end_lineno or doc.lineno
        before, after = lines[first - 1][: doc.col_offset], lines[last - 1][doc.end_col_offset :]
        if before.strip() or after.strip():
            raise ValueError(f"the docstring at line {first} shares a line with code; give it lines of its own")
        # A body that held only the docstring needs a statement.
        lines[first - 1 : last] = [before + "pass" if alone else ""] + [""] * (last - first)
        content.difference_update(range(first, last + 1))
    kept = [line for number, line in enumerate(lines, 1) if number in content or line.strip()]
    return ("\n".join(kept) + "\n").encode("utf-8")


def stripped_shell(source: bytes) -> bytes:
    """A sh script without its comment lines and blank lines; here-documents and quoted text stay as written."""
    kept: List[str] = []
    quote = ""  # the quote a string left open at the end of the line before
    end: Optional[str] = None  # the word that ends the here-document being read
    for number, line in enumerate(source.decode("utf-8").splitlines(), 1):
        if end is not None:
            kept.append(line)
            end = None if line.lstrip("\t") == end else end
            continue
        # Kept when it is inside a string, or continues the line before (a \ at its end).
        continued = bool(kept) and kept[-1].endswith("\\")
        if number > 1 and not quote and not continued and (not line.strip() or line.lstrip().startswith("#")):
            continue
        kept.append(line)
        quote = _open_quote(line, quote)
        heredoc = re.search(r"<<-?\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)", line)
        if heredoc and not quote:
            end = heredoc.group(1)
    return ("\n".join(kept) + "\n").encode("utf-8")


def _open_quote(line: str, quote: str) -> str:
    # The quote still open after line, given the one open before it; "" when none. Backslashes
    # escape outside single quotes; an unquoted # after a blank starts a comment.
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            break
    return quote


def _single_line(name: str, value: str) -> str:
    if not value or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} must be a non-empty single line, not {value!r}")
    return value


def environment_file(idle_minutes_expr: str = "${IdleMinutes}", ssh_port_expr: Optional[str] = None,
                     load_threshold_expr: str = "${IdleLoadThreshold}") -> str:
    """The text of /etc/default/devbox-idle, read by devbox-idle.service."""
    lines = [
        "# From the devbox user data; read by devbox-idle.service. IDLE_MINUTES=0: no auto-stop;",
        "# IDLE_LOAD_THRESHOLD=0: load never keeps the box up. Also: GRACE_MINUTES, DRY_RUN=1.",
        f"IDLE_MINUTES={_single_line('idle_minutes_expr', idle_minutes_expr)}",
        f"IDLE_LOAD_THRESHOLD={_single_line('load_threshold_expr', load_threshold_expr)}",
    ]
    if ssh_port_expr is not None:
        lines.append(f"SSH_PORT={_single_line('ssh_port_expr', ssh_port_expr)}")
    return "\n".join(lines) + "\n"


def boot_commands(volume_dir: Path = VOLUME_DIR, volume_timeout_s: int = VOLUME_TIMEOUT_S) -> List[str]:
    """The bootcmd lines: unpack devbox-data-volume into place, then run it."""
    if isinstance(volume_timeout_s, bool) or not isinstance(volume_timeout_s, int) or volume_timeout_s < 1:
        raise ValueError(f"volume_timeout_s must be a whole number of seconds above 0, not {volume_timeout_s!r}")
    partial = BOOT_SCRIPT_PATH + ".new"
    packed = _packed(stripped_shell((volume_dir / BOOT_SCRIPT).read_bytes()))
    return [
        f"echo {packed} | base64 -d | gunzip >{partial} && chmod 0755 {partial} && mv -f {partial} {BOOT_SCRIPT_PATH}",
        f"DEVBOX_VOLUME_TIMEOUT={volume_timeout_s} {BOOT_SCRIPT_PATH} boot",
    ]


def stripped_config(source: bytes) -> bytes:
    """A systemd unit or tmpfiles.d file without its comment lines (# or ;) and blank lines."""
    lines = source.decode("utf-8").splitlines()
    return ("\n".join(line for line in lines if line.strip() and line.lstrip()[0] not in "#;") + "\n").encode()


def installed(path: Path) -> bytes:
    """What goes onto the instance for an infra file: the same without its comments, which EC2's 16 KB cannot hold."""
    data = path.read_bytes()
    if data.startswith(b"#!/usr/bin/python3\n"):
        return stripped_python(data)
    if data.startswith(b"#!/bin/sh\n"):
        return stripped_shell(data)
    if path.suffix in (".service", ".timer", ".conf"):
        return stripped_config(data)
    raise ValueError(f"{path}: no way to strip it for the user data (a python3 or sh script, a unit or a .conf)")


def _file_entry(target: str, mode: str, data: bytes) -> List[str]:
    # cloud-init's write_files makes files root:root and 0644 unless told otherwise, so only other
    # modes are written out. A small file is smaller as text than gzipped and base64 encoded.
    packed, text = _packed(data), _quoted(data.decode("utf-8"))
    return [
        f"  - path: {target}",
        *([f"    permissions: {_quoted(mode)}"] if mode != "0644" else []),
        # Not as text if it holds "${": Fn::Sub would take that for a parameter.
        *(["    encoding: gz+b64", f"    content: {packed}"] if len(packed) < len(text) or "${" in text
          else [f"    content: {text}"]),
    ]


def _write_files(source: Path, files: Sequence[Tuple[str, str, str]]) -> List[str]:
    lines: List[str] = []
    for name, target, mode in files:
        lines += _file_entry(target, mode, installed(source / name))
    return lines


def cloud_config(
    idle_minutes_expr: str = "${IdleMinutes}",
    *,
    ssh_port_expr: Optional[str] = None,
    load_threshold_expr: str = "${IdleLoadThreshold}",
    source_dir: Optional[Path] = None,
    volume_dir: Optional[Path] = None,
    volume_timeout_s: int = VOLUME_TIMEOUT_S,
) -> str:
    """Build the #cloud-config user data: data volume at /home, on-new-root runner, idle watcher."""
    volume = VOLUME_DIR if volume_dir is None else volume_dir
    lines: List[str] = [
        "#cloud-config",
        "# devbox: /home on the data volume; ~/.devbox/on-new-root once per root disk; idle auto-stop.",
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
        # As text, never gzipped: Fn::Sub fills in the parameters.
        f"  - path: {ENV_FILE}",
        f"    content: {_quoted(environment_file(idle_minutes_expr, ssh_port_expr, load_threshold_expr))}",
        *_write_files(volume, VOLUME_FILES),
        # write_files runs before runcmd, so the units are on disk when systemd reloads. The boot's
        # systemd-tmpfiles ran before the file was written: make devbox-keep's folder now.
        "runcmd:",
        "  - [systemctl, daemon-reload]",
        f"  - [systemd-tmpfiles, --create, {KEEP_TMPFILES}]",
        "  - [systemctl, enable, --now, devbox-idle.timer]",
    ]
    return "\n".join(lines) + "\n"
