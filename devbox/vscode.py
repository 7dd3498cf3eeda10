"""VS Code and the devbox: a connect timeout that outlasts a cold start, and `devbox code`.

A stopped box takes about 20 to 40 s to answer on SSH, while Remote-SSH gives up after
`remote.SSH.connectTimeout` seconds (15 by default), so a first connect from VS Code fails.
`devbox ssh-config --vscode` raises the setting to 120 in VS Code's user settings.json.

That file is JSON with comments and trailing commas (JSONC), edited by hand and by VS Code's
settings editor, so it is changed by the smallest text edit that does the job: the value is
replaced when the setting is a top-level member, else one member is inserted after the opening
brace. The result is read back (comments and trailing commas stripped) and must hold the same
settings as before, this one aside. A file that cannot be read that way, or a setting in an odd
shape, is left as it is, and the line to add is printed instead.
"""
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from devbox.api import EXIT_FAILURE, EXIT_USAGE, CliError

SETTING = "remote.SSH.connectTimeout"
CONNECT_TIMEOUT = 120
BACKUP_SUFFIX = ".devbox.bak"
# Where VS Code installs its launcher on macOS when `code` was never put on PATH.
MAC_LAUNCHER = "/Applications/Visual Studio Code.app/Contents/Resources/app/bin/code"
# `ssh -G` only reads the config; it should answer at once.
SSH_G_TIMEOUT = 15.0
_BOM = "\ufeff"
# JSONC's tokens. Whitespace is JSON's four characters only: anything else (a form feed, a
# no-break space) is a file this editor does not claim to understand.
_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\n]+)
      | (?P<comment>//[^\n]*|/\*.*?\*/)
      | (?P<string>"(?:[^"\\\x00-\x1f]|\\.)*")
      | (?P<punct>[{}\[\]:,])
      | (?P<word>[^ \t\r\n{}\[\]:,"/]+)""",
    re.VERBOSE | re.DOTALL,
)


class _Unsafe(Exception):
    """The file cannot be edited safely; the message says why."""


@dataclass(frozen=True)
class _Token:
    kind: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class _Scan:
    tokens: List[_Token]  # every token, spaces and comments included
    significant: List[_Token]  # the JSON tokens
    document: Dict[str, Any]
    members: List[Any]  # (key, index in significant of its value's first token), top level only


@dataclass(frozen=True)
class SettingsEdit:
    """What to do to settings.json ("created", "updated", "unchanged" or "manual"), the new text, and why."""

    outcome: str
    text: Optional[str]
    detail: str
    backup: Optional[Path] = None


def default_settings_path(
    platform: str = sys.platform, environ: Optional[Mapping[str, str]] = None, home: Optional[Path] = None
) -> Path:
    """VS Code's user settings.json on this system."""
    environ = os.environ if environ is None else environ
    home = home or Path.home()
    if platform == "darwin":
        return home / "Library" / "Application Support" / "Code" / "User" / "settings.json"
    if platform.startswith("win") and environ.get("APPDATA"):
        return Path(environ["APPDATA"]) / "Code" / "User" / "settings.json"
    # Electron's appData on Linux: $XDG_CONFIG_HOME, else ~/.config.
    config_home = environ.get("XDG_CONFIG_HOME", "")
    base = Path(config_home) if os.path.isabs(config_home) else home / ".config"
    return base / "Code" / "User" / "settings.json"


def manual_line(seconds: int = CONNECT_TIMEOUT) -> str:
    """The line to add by hand to the file's outer object."""
    return f'"{SETTING}": {seconds},'


def plan_timeout_edit(original: Optional[str], seconds: int = CONNECT_TIMEOUT) -> SettingsEdit:
    """The edit that makes VS Code wait `seconds` for an SSH connection (original: None when there is no file)."""
    member = f'"{SETTING}": {seconds}'
    bom = _BOM if original and original.startswith(_BOM) else ""
    body = (original or "")[len(bom):]
    if not body.strip(" \t\r\n"):
        # VS Code reads an empty file as no settings at all.
        outcome = "created" if original is None else "updated"
        return SettingsEdit(outcome, f"{bom}{{\n    {member}\n}}\n", f"{SETTING} set to {seconds}")
    try:
        scan = _scan(body)
    except _Unsafe as err:
        return SettingsEdit("manual", None, str(err))
    found = [index for key, index in scan.members if key == SETTING]
    if len(found) > 1:
        return SettingsEdit("manual", None, f"{SETTING} is set {len(found)} times")
    if found:
        value = scan.document[SETTING]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return SettingsEdit("manual", None, f"{SETTING} holds {json.dumps(value)[:40]}, not a number of seconds")
        if value >= seconds:
            return SettingsEdit("unchanged", None, f"{SETTING} is already {value:g} (at least {seconds})")
        token = scan.significant[found[0]]
        edited = body[: token.start] + str(seconds) + body[token.end :]
        detail = f"{SETTING} set to {seconds} (was {value:g})"
    else:
        edited = _insert_member(body, scan, member)
        detail = f"{SETTING} set to {seconds}"
    problem = _check_edit(scan.document, edited, seconds)
    if problem:
        return SettingsEdit("manual", None, problem)
    return SettingsEdit("updated", bom + edited, detail)


def set_connect_timeout(path: Path, seconds: int = CONNECT_TIMEOUT) -> SettingsEdit:
    """Apply plan_timeout_edit to the file at path, keeping the previous version next to it."""
    # A settings file symlinked by a dotfile manager stays a symlink: write where it points.
    target = Path(os.path.realpath(path.expanduser()))
    if not target.parent.is_dir():
        return SettingsEdit("manual", None, f"there is no folder {target.parent} (is VS Code installed?)")
    try:
        raw: Optional[bytes] = target.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as err:
        return SettingsEdit("manual", None, f"it cannot be read ({err.strerror or err})")
    try:
        original = None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return SettingsEdit("manual", None, "it is not UTF-8 text")
    edit = plan_timeout_edit(original, seconds)
    if edit.text is None:
        return edit
    backup = None
    try:
        if raw is not None:
            backup = target.with_name(target.name + BACKUP_SUFFIX)
            _write_atomically(backup, raw, target)
        _write_atomically(target, edit.text.encode("utf-8"), target)
    except OSError as err:
        return SettingsEdit("manual", None, f"it cannot be written ({err.strerror or err})")
    return replace(edit, backup=backup)


def _scan(body: str) -> _Scan:
    tokens: List[_Token] = []
    position = 0
    while position < len(body):
        match = _TOKEN.match(body, position)
        if match is None or match.end() == position:
            line = body.count("\n", 0, position) + 1
            raise _Unsafe(f"line {line} is not JSON with comments")
        kind = str(match.lastgroup)
        tokens.append(_Token(kind, match.start(), match.end(), match.group()))
        position = match.end()
    significant = [token for token in tokens if token.kind not in ("space", "comment")]
    document = _parse(body, significant)
    members = []
    depth = 0
    for index, token in enumerate(significant):
        if token.kind == "punct" and token.text in "{[":
            depth += 1
        elif token.kind == "punct" and token.text in "}]":
            depth -= 1
        elif depth == 1 and token.kind == "string" and significant[index + 1].text == ":":
            members.append((json.loads(token.text), index + 2))
    return _Scan(tokens, significant, document, members)


def _parse(body: str, significant: List[_Token]) -> Dict[str, Any]:
    """The JSON document the tokens make, trailing commas dropped; an _Unsafe error if they make none."""
    kept = [
        token
        for index, token in enumerate(significant)
        if not (token.text == "," and index + 1 < len(significant) and significant[index + 1].text in ("}", "]"))
    ]
    text = " ".join(token.text for token in kept)
    try:
        # NaN and Infinity: Python's json takes them, VS Code's parser does not.
        document = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        # err.pos is in the joined tokens: count back to the token, and from it to the file's line.
        index, end = 0, 0
        while index < len(kept) - 1:
            end += len(kept[index].text) + 1
            if end > err.pos:
                break
            index += 1
        line = body.count("\n", 0, kept[index].start) + 1 if kept else 1
        raise _Unsafe(f"line {line}: {err.msg}") from None
    except ValueError as err:
        raise _Unsafe(str(err)) from None
    if not isinstance(document, dict):
        raise _Unsafe("its top level is not an object")
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _insert_member(body: str, scan: _Scan, member: str) -> str:
    """body with member as the first one of the top-level object."""
    opening, first = scan.significant[0], scan.significant[1]
    has_members = first.text != "}"
    comma = "," if has_members else ""
    # After the first line break that follows the brace outside a comment, so that a comment on
    # the brace's line stays there and comments above the first member stay with it.
    for token in scan.tokens:
        if token.kind == "space" and opening.end <= token.start < first.start and "\n" in token.text:
            at = token.start + token.text.index("\n") + 1
            newline = "\r\n" if body[at - 2 : at] == "\r\n" else "\n"
            following = next((t for t in scan.tokens if t.start >= at and t.kind != "space"), first)
            return body[:at] + _indent(body, following) + member + comma + newline + body[at:]
    if has_members:
        # A one-line object stays on one line.
        return body[: opening.end] + member + ", " + body[opening.end :]
    return body[: opening.end] + "\n    " + member + "\n" + body[opening.end :]


def _indent(body: str, token: _Token) -> str:
    """The indentation of token's line, if token (a member or a comment) starts it; else four spaces."""
    line_start = body.rfind("\n", 0, token.start) + 1
    prefix = body[line_start : token.start]
    return prefix if prefix.strip(" \t") == "" and token.text != "}" else "    "


def _check_edit(before: Dict[str, Any], edited: str, seconds: int) -> Optional[str]:
    """None when edited reads as before with the setting at seconds; else why the edit is refused."""
    try:
        after = _scan(edited).document
    except _Unsafe as err:
        return f"the edited file would not read back ({err})"
    value = after.get(SETTING)
    others_kept = {k: v for k, v in after.items() if k != SETTING} == {k: v for k, v in before.items() if k != SETTING}
    if type(value) is not int or value != seconds or not others_kept:
        return "the edit would not read back as meant"
    return None


def _write_atomically(path: Path, data: bytes, mode_from: Path) -> None:
    # Written next to the file, then renamed over it: no reader sees half a file.
    from devbox.sshconfig import write_temporary

    try:
        mode = os.stat(mode_from).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    temporary = write_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- devbox code ----------------------------------------------------------------------------------------


def find_launcher(which: Callable[[str], Optional[str]] = shutil.which, platform: str = sys.platform) -> str:
    """The path of VS Code's `code` launcher, or a one-line CliError saying it is not on PATH."""
    found = which("code")
    if found:
        return found
    if platform == "darwin" and os.access(MAC_LAUNCHER, os.X_OK):
        return MAC_LAUNCHER
    raise CliError(
        "`code` (VS Code's command-line launcher) is not on PATH: in VS Code, run \"Shell Command: Install"
        " 'code' command in PATH\" from the command palette, or add VS Code's bin folder to PATH",
        EXIT_FAILURE,
    )


def ssh_view(host: str, ssh: Optional[str] = None) -> Dict[str, str]:
    """What OpenSSH resolves for host from the user's config (`ssh -G`): the first value of each keyword."""
    program = ssh or shutil.which("ssh")
    if program is None:
        raise CliError("ssh is not installed (VS Code's Remote - SSH runs the OpenSSH client)", EXIT_FAILURE)
    try:
        result = subprocess.run([program, "-G", host], capture_output=True, text=True, errors="replace",
                                timeout=SSH_G_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CliError(f"`ssh -G {host}` failed: {err}", EXIT_FAILURE) from None
    if result.returncode != 0:
        reason = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise CliError(f"ssh cannot read its config for {host}: {reason}", EXIT_FAILURE)
    view: Dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        view.setdefault(key, value)
    return view


def remote_folder(host: str, path: Optional[str], view: Mapping[str, str]) -> str:
    """The folder to open on the box: path, with ~ and relative paths taken from the login user's home.

    The box keeps /home on its data volume, so a login user's home is /home/USER (root's is /root).
    """
    if "proxycommand" not in view and view.get("hostname", host).lower() == host.lower():
        raise CliError(
            f"your ssh config has no Host {host} block, so VS Code could not reach the box: run"
            " `devbox ssh-config --vscode` first (or pass --host with your alias)",
            EXIT_USAGE,
        )
    user = view.get("user") or "root"
    home = "/root" if user == "root" else posixpath.join("/home", user)
    if path is None or path in ("", "~"):
        return home
    if not path.isprintable():
        raise CliError(f"the folder cannot hold line breaks or control characters: {path!r}", EXIT_USAGE)
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path if path.startswith("/") else posixpath.join(home, path)


def code_command(launcher: str, host: str, folder: str) -> List[str]:
    """The command that opens folder on host in VS Code through Remote-SSH."""
    return [launcher, "--remote", f"ssh-remote+{host}", folder]


def open_remote(command: List[str]) -> int:
    """Run the `code` launcher (it hands the request to VS Code and returns); its exit code."""
    try:
        return subprocess.call(command)
    except OSError as err:
        raise CliError(f"cannot run {command[0]}: {err.strerror or err}", EXIT_FAILURE) from None
