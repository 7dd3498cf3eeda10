"""One managed `Host` block in ~/.ssh/config, so that `ssh devbox` goes through `devbox proxy`.

The block sits between two marker lines and is the only part of the file ever changed:
every other byte is kept as it was (line endings, comments, a missing final newline).

ssh_config takes the FIRST value it finds for most options, and a `Host` section runs
until the next `Host` or `Match` line. So a new block goes at the very top of the file,
before any global option, `Include` or `Host *` that would otherwise win, and it ends with
`Match all`, which hands the lines after it back to every host exactly as before.
"""
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from devbox.api import EXIT_FAILURE, EXIT_USAGE, CliError

BEGIN_MARKER = b"# >>> devbox managed block >>>"
END_MARKER = b"# <<< devbox managed block <<<"
BACKUP_SUFFIX = ".devbox.bak"
DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_HOST = "devbox"
# An ssh Host pattern without wildcards or negation: the alias typed after `ssh`.
_HOST_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_USER = re.compile(r"^[A-Za-z0-9_.@\\-]+$")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


@dataclass(frozen=True)
class HostEntry:
    """The settings of the managed Host block."""

    name: str
    hostname: str
    proxy_command: str
    user: Optional[str] = None
    identity_file: Optional[str] = None


def devbox_command(argv0: Optional[str] = None) -> List[str]:
    """How this client can be run again from a ProxyCommand: its absolute path, or python -m devbox."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = os.path.basename(argv0)
    if name in ("devbox", "devbox.exe") and os.path.isfile(argv0):
        return [os.path.abspath(argv0)]
    if name != "__main__.py":
        found = shutil.which("devbox")
        if found:
            return [os.path.abspath(found)]
    # Not resolved further: a virtualenv's python is a symlink that must stay one.
    return [os.path.abspath(sys.executable), "-m", "devbox"]


def proxy_command(
    executable: Sequence[str],
    port: int = 22,
    url: Optional[str] = None,
    profile: Optional[str] = None,
    region: Optional[str] = None,
) -> str:
    """The ProxyCommand value: a shell command line, with ssh's % tokens escaped."""
    words = [*executable, "proxy", "--port", str(port)]
    for option, value in (("--url", url), ("--profile", profile), ("--region", region)):
        if value:
            words += [option, value]
    line = shlex.join(words)
    if "\n" in line or "\r" in line:
        raise CliError("the ProxyCommand cannot span lines", EXIT_USAGE)
    # ssh expands %h, %p, ... in ProxyCommand before handing it to the shell.
    return line.replace("%", "%%")


def validate_entry(entry: HostEntry) -> None:
    """Refuse values that ssh_config would read differently from what was meant."""
    if not _HOST_ALIAS.match(entry.name):
        raise CliError(f"--host must be a plain alias (letters, digits, . _ -), not {entry.name!r}", EXIT_USAGE)
    if not _HOST_NAME.match(entry.hostname):
        raise CliError(f"the HostName must be a DNS name or an IP address, not {entry.hostname!r}", EXIT_USAGE)
    if entry.user is not None and not _USER.match(entry.user):
        raise CliError(f"--user must be a plain user name, not {entry.user!r}", EXIT_USAGE)
    if entry.identity_file is not None and (not entry.identity_file or any(c in entry.identity_file for c in '"\r\n')):
        raise CliError(f"--identity cannot be empty or hold quotes or line breaks: {entry.identity_file!r}", EXIT_USAGE)


def render_block(entry: HostEntry, newline: bytes = b"\n") -> bytes:
    """The managed block, marker lines included, ending with a newline."""
    validate_entry(entry)
    lines = [
        BEGIN_MARKER.decode(),
        "# Written by `devbox ssh-config`: run it again rather than editing these lines.",
        f"Host {entry.name}",
        f"    HostName {entry.hostname}",
    ]
    if entry.user:
        lines.append(f"    User {entry.user}")
    if entry.identity_file:
        lines.append(f"    IdentityFile {_config_word(entry.identity_file)}")
        # Without it ssh offers every agent key first and may hit MaxAuthTries before this one.
        lines.append("    IdentitiesOnly yes")
    lines += [
        f"    ProxyCommand {entry.proxy_command}",
        # The address changes at every start; the host key must not look like it does.
        f"    HostKeyAlias {entry.name}",
        "    ServerAliveInterval 30",
        "# Ends the devbox section: what follows applies to every host, as it did before.",
        "Match all",
        END_MARKER.decode(),
    ]
    return newline.join(line.encode() for line in lines) + newline


def _config_word(value: str) -> str:
    escaped = value.replace("%", "%%")
    return f'"{escaped}"' if any(c.isspace() for c in escaped) else escaped


def detect_newline(data: bytes) -> bytes:
    """The file's line ending, judged by its first line (LF for an empty file)."""
    end = data.find(b"\n")
    return b"\r\n" if end > 0 and data[end - 1 : end] == b"\r" else b"\n"


def update_config(original: bytes, entry: HostEntry) -> bytes:
    """The config with the managed block added or replaced; every other byte unchanged."""
    newline = detect_newline(original)
    block = render_block(entry, newline)
    lines = _LINE.findall(original)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if not begins and not ends:
        return block + original
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        numbers = ", ".join(str(i + 1) for i in sorted(begins + ends))
        raise CliError(
            f"the devbox block's marker lines are damaged or repeated (lines {numbers}): fix or remove them by hand",
            EXIT_FAILURE,
        )
    first, last = begins[0], ends[0]
    before, after = b"".join(lines[:first]), b"".join(lines[last + 1 :])
    if not all(_is_inert(line) for line in lines[:first]):
        # Something above the block would win over it (first value wins): move it to the top.
        return block + before + after
    if not lines[last].endswith(b"\n"):
        # The old block ended the file without a newline; that byte stays absent.
        block = block[: -len(newline)]
    return before + block + after


def _is_inert(line: bytes) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith(b"#")


def backup_path(path: Path) -> Path:
    """Where the previous version of a config file is kept (config -> config.devbox.bak)."""
    return path.with_name(path.name + BACKUP_SUFFIX)


def write_config(path: Path, entry: HostEntry) -> str:
    """Add or update the managed block in the file at path; returns 'created', 'updated' or 'unchanged'."""
    # A config symlinked by a dotfile manager stays a symlink: write where it points.
    target = Path(os.path.realpath(path.expanduser()))
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o700, parents=True)
        os.chmod(target.parent, 0o700)
    try:
        original: Optional[bytes] = target.read_bytes()
    except FileNotFoundError:
        original = None
    updated = update_config(original or b"", entry)
    if original == updated:
        return "unchanged"
    if original is not None:
        _write_atomically(backup_path(target), original)
    _write_atomically(target, updated)
    return "created" if original is None else "updated"


def _write_atomically(path: Path, data: bytes) -> None:
    # mkstemp creates the file 0600; the rename makes a half-written config impossible.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
