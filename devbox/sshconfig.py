"""One managed `Host` block in ~/.ssh/config, so that `ssh devbox` goes through `devbox proxy`.

The block sits between two marker lines and is the only part of the file ever changed:
every other byte is kept as it was (line endings, comments, a missing final newline).

ssh_config takes the FIRST value it finds for most options, and a `Host` section runs
until the next `Host` or `Match` line. So a new block goes at the very top of the file,
before any global option, `Include` or `Host *` that would otherwise win, and it ends with
`Match all`, which hands the lines after it back to every host exactly as before.

Quoting follows what OpenSSH's reader does (argv_split in misc.c, used since 8.7): it splits
every line into words, honouring '...' and "..." and the escapes \\' \\" \\\\ (and \\space
outside quotes), and refuses the whole file ("invalid quotes") when a quote is left open, and
then every ssh command fails, for every host. ProxyCommand takes the rest of its line raw
(for the shell), but that line must still split cleanly. ssh_config(5) documents only double
quotes, so a value holding a double quote or a backslash is refused where it is read as a word.
A new file is put in place only after `ssh -G` has read it back with the values meant.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
# Words the shell takes as they are (shlex's set); anything else is quoted.
_SHELL_PLAIN = re.compile(r"[A-Za-z0-9@%+=:,./_-]+")
_SHELL_SPECIAL = re.compile(r"(['\\])")
# `ssh -G` reads the file and resolves the host without connecting; it should answer at once.
SSH_CHECK_TIMEOUT = 15.0


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
    idle_cooldown: Optional[float] = None,
) -> str:
    """The ProxyCommand value: a shell command line that ssh_config splits cleanly, with ssh's % tokens escaped.

    idle_cooldown (minutes) is written only when given: the proxy's own default applies otherwise.
    """
    words = [*executable, "proxy", "--port", str(port)]
    for option, value in (("--url", url), ("--profile", profile), ("--region", region)):
        if value:
            words += [option, value]
    if idle_cooldown is not None:
        words += ["--idle-cooldown", f"{idle_cooldown:g}"]
    for word in words:
        if not word.isprintable():
            raise CliError(f"the ProxyCommand cannot hold line breaks or control characters: {word!r}", EXIT_USAGE)
    # ssh expands %h, %p, ... in ProxyCommand before handing it to the shell.
    return " ".join(shell_word(word) for word in words).replace("%", "%%")


def shell_word(word: str) -> str:
    """word quoted for the shell in a form that ssh_config's reader also splits cleanly.

    shlex.quote puts a trailing backslash just before the closing quote ('a\\'), which
    ssh_config reads as an escaped quote, leaving the quote open. Here a quote or a backslash
    is written outside the single quotes, escaped (\\' or \\\\): the same character to the shell,
    and a complete escape to ssh_config.
    """
    if _SHELL_PLAIN.fullmatch(word):
        return word
    quoted = []
    for piece in _SHELL_SPECIAL.split(word):
        if piece in ("'", "\\"):
            quoted.append("\\" + piece)
        elif piece:
            quoted.append(f"'{piece}'")
    return "".join(quoted) or "''"


def is_host_alias(name: str) -> bool:
    """True for a plain ssh alias (letters, digits, . _ -; no wildcard, no leading -)."""
    return bool(_HOST_ALIAS.fullmatch(name))


def validate_entry(entry: HostEntry) -> None:
    """Refuse values that ssh_config would read differently from what was meant."""
    if not is_host_alias(entry.name):
        raise CliError(f"--host must be a plain alias (letters, digits, . _ -), not {entry.name!r}", EXIT_USAGE)
    if not _HOST_NAME.match(entry.hostname):
        raise CliError(f"the HostName must be a DNS name or an IP address, not {entry.hostname!r}", EXIT_USAGE)
    if entry.user is not None and (not _USER.match(entry.user) or "\\\\" in entry.user):
        raise CliError(f"--user must be a plain user name, not {entry.user!r}", EXIT_USAGE)
    if not entry.proxy_command.isprintable():
        raise CliError(f"the ProxyCommand cannot hold line breaks or control characters: {entry.proxy_command!r}",
                       EXIT_USAGE)
    identity = entry.identity_file
    if identity is not None:
        if not identity or not identity.isprintable():
            raise CliError(f"--identity cannot be empty or hold line breaks or control characters: {identity!r}",
                           EXIT_USAGE)
        if '"' in identity or "\\" in identity:
            # ssh_config(5) quotes with "..." and documents no escape; OpenSSH before 8.7 has none.
            raise CliError(f"--identity cannot hold a double quote or a backslash (an ssh config cannot quote"
                           f" them): {identity!r}", EXIT_USAGE)
        if "${" in identity:
            raise CliError(f"--identity cannot hold ${{ (ssh expands ${{NAME}} in IdentityFile and has no escape"
                           f" for it): {identity!r}", EXIT_USAGE)


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
    # Always quoted: a ' or # in a bare word would open a quote or a comment for ssh_config.
    return f'"{_config_value(value)}"'


def _config_value(value: str) -> str:
    """value as ssh reads it back from a quoted word: its % tokens escaped."""
    return value.replace("%", "%%")


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


def write_config(path: Path, entry: HostEntry, ssh: Optional[str] = "ssh") -> str:
    """Add or update the managed block in the file at path; returns 'created', 'updated' or 'unchanged'.

    The new version is first written next to the file and read by `ssh -G` (ssh: the client's
    name or path; None, or a client that is not installed, skips the check). It replaces the file
    only if ssh accepts it and reads the block's values as meant; the old version is kept as a backup.
    """
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
    program = shutil.which(ssh) if ssh else None
    candidate = write_temporary(target, updated)
    try:
        if program:
            check_config(program, candidate, entry, shown=path)
        if original is not None:
            _write_atomically(backup_path(target), original)
        os.replace(candidate, target)
    except BaseException:
        _remove(candidate)
        raise
    return "created" if original is None else "updated"


def check_config(ssh: str, config: Path, entry: HostEntry, shown: Optional[Path] = None) -> None:
    """Have `ssh -G -F config <alias>` read the file: a CliError if ssh refuses it or reads other values."""
    shown = shown or config
    command = [ssh, "-G", "-F", str(config), entry.name]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                timeout=SSH_CHECK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CliError(f"`ssh -G` did not answer within {SSH_CHECK_TIMEOUT:g} s; {shown} left unchanged",
                       EXIT_FAILURE) from None
    except OSError as err:
        raise CliError(f"cannot run {ssh} -G to check the new file ({err.strerror or err}); {shown} left unchanged",
                       EXIT_FAILURE) from None
    if result.returncode != 0:
        # ssh names the file it read: the temporary one, whose lines are those meant for the real one.
        complaints = [line.replace(str(config), str(shown)) for line in result.stderr.splitlines()
                      if str(config) in line]
        reason = "; ".join(complaints) or result.stderr.strip() or f"exit status {result.returncode}"
        raise CliError(f"ssh refuses the new config ({reason}); {shown} left unchanged", EXIT_FAILURE)
    read: Dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        read.setdefault(key, value)
    for key, meant in _meant_values(entry).items():
        got = read.get(key)
        if not _reads_as(key, got, meant):
            raise CliError(f"ssh would read {key} as {got!r}, not {meant!r}; {shown} left unchanged", EXIT_FAILURE)


def _meant_values(entry: HostEntry) -> Dict[str, str]:
    # The values that are quoted or escaped, as `ssh -G` prints them: % tokens still escaped. (The
    # HostName is a plain word, and a CanonicalizeHostname later in the file may rewrite it.)
    meant = {"proxycommand": entry.proxy_command}
    if entry.user:
        meant["user"] = entry.user
    if entry.identity_file:
        meant["identityfile"] = _config_value(entry.identity_file)
    return meant


def _reads_as(key: str, got: Optional[str], meant: str) -> bool:
    if got is None:
        return False
    if key == "identityfile" and meant.startswith("~"):
        # Some OpenSSH releases print the path with ~ already expanded.
        return got in (meant, os.path.expanduser(meant))
    return got == meant


def write_temporary(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """data in a new file next to path (so a rename to path stays on one file system), flushed to disk."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
    except BaseException:
        _remove(Path(temporary))
        raise
    return Path(temporary)


def _write_atomically(path: Path, data: bytes) -> None:
    # The rename makes a half-written file impossible.
    temporary = write_temporary(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
