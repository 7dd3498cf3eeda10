"""The managed Host block: byte-exact edits of tricky ssh config files, checked with `ssh -G`."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from devbox import sshconfig
from devbox.api import CliError
from devbox.sshconfig import BEGIN_MARKER, END_MARKER, HostEntry

SSH = shutil.which("ssh")
needs_ssh = pytest.mark.skipif(SSH is None, reason="OpenSSH client missing: apt-get install -y openssh-client")

PROXY = "/opt/devbox/bin/devbox proxy --port 22"
ENTRY = HostEntry(name="devbox", hostname="devbox.example.com", proxy_command=PROXY, user="ubuntu",
                  identity_file="~/.ssh/devbox.pem")


def ssh_g(config: Path, host: str = "devbox") -> Dict[str, str]:
    """The options OpenSSH itself resolves for host from config (first value of each keyword)."""
    assert SSH is not None
    result = subprocess.run([SSH, "-G", "-F", str(config), host], capture_output=True, text=True, timeout=10,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    options: Dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key, value)
    return options


def block_of(data: bytes) -> bytes:
    start = data.index(BEGIN_MARKER)
    end = data.index(END_MARKER) + len(END_MARKER)
    while data[end : end + 1] in (b"\r", b"\n"):
        end += 1
    return data[start:end]


def without_block(data: bytes) -> bytes:
    block = block_of(data)
    return data.replace(block, b"", 1)


@needs_ssh
def test_new_config_is_created_private_in_a_private_folder(tmp_path: Path) -> None:
    config = tmp_path / "home" / ".ssh" / "config"

    outcome = sshconfig.write_config(config, ENTRY)

    assert outcome == "created"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert not sshconfig.backup_path(config).exists()
    options = ssh_g(config)
    assert options["hostname"] == "devbox.example.com"
    assert options["user"] == "ubuntu"
    assert options["identityfile"] == "~/.ssh/devbox.pem"
    assert options["proxycommand"] == PROXY
    assert options["hostkeyalias"] == "devbox"
    assert options["serveraliveinterval"] == "30"


@needs_ssh
def test_block_goes_before_host_star_so_its_values_win(tmp_path: Path) -> None:
    original = b"Host *\n    User everyone\n    ServerAliveInterval 5\n    ProxyCommand none\n"
    config = tmp_path / "config"
    config.write_bytes(original)

    sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    assert data.endswith(original)
    assert data.index(END_MARKER) < data.index(b"Host *\n")
    assert ssh_g(config)["user"] == "ubuntu"
    assert ssh_g(config)["serveraliveinterval"] == "30"
    assert ssh_g(config)["proxycommand"] == PROXY
    assert ssh_g(config, "elsewhere")["user"] == "everyone"


@needs_ssh
def test_other_hosts_resolve_exactly_as_before(tmp_path: Path) -> None:
    included = tmp_path / "included.conf"
    included.write_bytes(b"Host *.internal\n    User internal-user\n    Port 2200\n")
    original = (
        b"# my ssh config\n"
        b"ServerAliveInterval 60\n"
        b"User global-user\n"
        b"Include " + str(included).encode() + b"\n"
        b"\n"
        b"Host work\n"
        b"    HostName work.example.org\n"
        b"    # a comment inside a block\n"
        b"Match host *.corp user root\n"
        b"    ForwardAgent yes\n"
        b"Host *\n"
        b"    IdentityFile ~/.ssh/id_ed25519\n"
    )
    before = tmp_path / "before"
    before.write_bytes(original)
    config = tmp_path / "config"
    config.write_bytes(original)

    sshconfig.write_config(config, ENTRY)

    assert without_block(config.read_bytes()) == original
    for host in ("work", "db.internal", "build.corp", "devbox.example.com", "anything"):
        assert ssh_g(config, host) == ssh_g(before, host), host
    # The global preamble comes after the block now, so the block's values win for devbox.
    assert ssh_g(config)["user"] == "ubuntu"
    assert ssh_g(config)["serveraliveinterval"] == "30"


@needs_ssh
def test_crlf_file_gets_a_crlf_block_and_keeps_its_bytes(tmp_path: Path) -> None:
    original = b"# windows-edited\r\nHost work\r\n  HostName work.example.org\r\n\r\nHost *\r\n  User me\r\n"
    config = tmp_path / "config"
    config.write_bytes(original)

    sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    block = block_of(data)
    assert data == block + original
    assert block.count(b"\r\n") == block.count(b"\n")
    assert ssh_g(config)["user"] == "ubuntu"
    assert ssh_g(config, "work")["hostname"] == "work.example.org"


@needs_ssh
def test_file_without_final_newline_is_kept_byte_for_byte(tmp_path: Path) -> None:
    original = b"Host work\n    HostName work.example.org\n    User worker"
    config = tmp_path / "config"
    config.write_bytes(original)

    sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    assert data.endswith(original)
    assert without_block(data) == original
    assert ssh_g(config, "work")["user"] == "worker"
    assert ssh_g(config)["hostname"] == "devbox.example.com"


@needs_ssh
def test_existing_block_is_replaced_in_place(tmp_path: Path) -> None:
    old_block = (
        BEGIN_MARKER + b"\n"
        b"Host devbox\n"
        b"    HostName old.example.com\n"
        b"    ProxyCommand /old/devbox proxy --port 22\n"
        + END_MARKER + b"\n"
    )
    head = b"# personal settings\n\n"
    tail = b"Host work\n    User worker\nHost *\n    User everyone\n"
    config = tmp_path / "config"
    config.write_bytes(head + old_block + tail)

    outcome = sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    assert outcome == "updated"
    assert data.startswith(head)
    assert data.endswith(tail)
    assert b"old.example.com" not in data
    assert data.count(BEGIN_MARKER) == 1
    assert sshconfig.backup_path(config).read_bytes() == head + old_block + tail
    assert stat.S_IMODE(sshconfig.backup_path(config).stat().st_mode) == 0o600
    assert ssh_g(config)["hostname"] == "devbox.example.com"


@needs_ssh
def test_block_found_after_host_star_is_moved_to_the_top(tmp_path: Path) -> None:
    head = b"Host *\n    User everyone\n"
    old_block = BEGIN_MARKER + b"\nHost devbox\n    HostName old.example.com\n" + END_MARKER
    config = tmp_path / "config"
    config.write_bytes(head + old_block)  # no final newline either

    sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    assert data.startswith(BEGIN_MARKER)
    assert data.endswith(head)
    assert without_block(data) == head
    assert ssh_g(config)["user"] == "ubuntu"


def test_block_at_the_end_without_newline_stays_without_one(tmp_path: Path) -> None:
    head = b"# comments only\n"
    config = tmp_path / "config"
    config.write_bytes(head + BEGIN_MARKER + b"\nHost devbox\n    HostName old\n" + END_MARKER)

    sshconfig.write_config(config, ENTRY)

    data = config.read_bytes()
    assert data.startswith(head + BEGIN_MARKER)
    assert data.endswith(END_MARKER)


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    original = b"Host *\n    User everyone\n"
    config = tmp_path / "config"
    config.write_bytes(original)
    sshconfig.write_config(config, ENTRY)
    first = config.read_bytes()

    outcome = sshconfig.write_config(config, ENTRY)

    assert outcome == "unchanged"
    assert config.read_bytes() == first
    assert sshconfig.backup_path(config).read_bytes() == original


@pytest.mark.parametrize(
    "markers",
    [
        BEGIN_MARKER + b"\nHost devbox\n",  # no end
        END_MARKER + b"\n" + BEGIN_MARKER + b"\n",  # reversed
        BEGIN_MARKER + b"\n" + END_MARKER + b"\n" + BEGIN_MARKER + b"\n" + END_MARKER + b"\n",  # twice
    ],
)
def test_damaged_markers_leave_the_file_alone(tmp_path: Path, markers: bytes) -> None:
    config = tmp_path / "config"
    config.write_bytes(b"Host work\n" + markers)

    with pytest.raises(CliError) as caught:
        sshconfig.write_config(config, ENTRY)

    assert "marker lines" in caught.value.message
    assert config.read_bytes() == b"Host work\n" + markers
    assert not sshconfig.backup_path(config).exists()


def test_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "ssh_config"
    real.parent.mkdir()
    real.write_bytes(b"Host work\n")
    link = tmp_path / "config"
    link.symlink_to(real)

    sshconfig.write_config(link, ENTRY)

    assert link.is_symlink()
    assert real.read_bytes().endswith(b"Host work\n")
    assert real.read_bytes().startswith(BEGIN_MARKER)


@needs_ssh
def test_values_with_spaces_and_percent_signs_survive_ssh_parsing(tmp_path: Path) -> None:
    command = sshconfig.proxy_command(["/opt/my tools/100%/devbox"], 2222, "https://x.example.com/api/", "work")
    entry = HostEntry(name="box-2", hostname="box-2", proxy_command=command, identity_file="/keys/my key.pem")
    config = tmp_path / "config"

    sshconfig.write_config(config, entry)

    options = ssh_g(config, "box-2")
    # ssh_config keeps %% until it runs the command, then the shell sees one %.
    assert options["proxycommand"] == (
        "'/opt/my tools/100%%/devbox' proxy --port 2222 --url https://x.example.com/api/ --profile work"
    )
    assert options["identityfile"] == "/keys/my key.pem"
    assert options["hostkeyalias"] == "box-2"
    assert "user" in options  # no User line: ssh's default applies


@pytest.mark.parametrize(
    "changes",
    [{"name": "dev*"}, {"name": "two words"}, {"name": "!devbox"}, {"hostname": "a b"}, {"user": "me\nHost *"},
     {"identity_file": 'x"y'}],
)
def test_values_ssh_would_misread_are_refused(changes: Dict[str, str]) -> None:
    fields = {"name": "devbox", "hostname": "devbox", "proxy_command": PROXY, **changes}

    with pytest.raises(CliError):
        sshconfig.render_block(HostEntry(**fields))


def test_proxy_command_runs_this_devbox_executable(tmp_path: Path) -> None:
    executable = tmp_path / "bin" / "devbox"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\n")

    assert sshconfig.devbox_command(str(executable)) == [str(executable)]
    main_module = str(Path(sshconfig.__file__).with_name("__main__.py"))
    assert sshconfig.devbox_command(main_module) == [os.path.abspath(sys.executable), "-m", "devbox"]


def test_proxy_command_passes_url_profile_and_region_only_when_given() -> None:
    assert sshconfig.proxy_command(["/bin/devbox"], 22) == "/bin/devbox proxy --port 22"
    assert sshconfig.proxy_command(["/bin/devbox"], 22, idle_cooldown=0) == (
        "/bin/devbox proxy --port 22 --idle-cooldown 0"
    )
    assert sshconfig.proxy_command(["/bin/devbox"], 2222, url="https://a.example.com/api/", region="eu-west-1") == (
        "/bin/devbox proxy --port 2222 --url https://a.example.com/api/ --region eu-west-1"
    )


# --- quoting that OpenSSH reads back as meant (issue 11, item 10) ------------------------------------------

# Each was written wrong by shlex.join or a bare word: a backslash before a closing quote, a bare
# quote, a bare #, shell syntax, % tokens.
AWKWARD_WORDS = [
    "https://x.example.com/api\\", "it's", "a'b\\", "\\'", "\\\\", "'", '"', 'say "hi"', "#not a comment",
    "100%h", "$(touch pwned)", "`touch pwned`", "a  b", "~root", "é", "x;y|z&", "",
]
# Prints the words it was started with, as JSON: stands in for `devbox` in the ProxyCommand.
ECHO_ARGS = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]


def run_proxy_command(proxycommand: str) -> List[str]:
    """Run a ProxyCommand as ssh does (% tokens expanded, then `$SHELL -c "exec ..."`); its argv as JSON."""
    command = proxycommand.replace("%%", "%")
    done = subprocess.run(["/bin/sh", "-c", "exec " + command], capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    words: List[str] = json.loads(done.stdout)
    return words


@needs_ssh
@pytest.mark.parametrize("word", AWKWARD_WORDS)
def test_awkward_words_reach_the_proxy_intact_through_ssh_config_and_the_shell(tmp_path: Path, word: str) -> None:
    url = "https://x.example.com/api\\"
    command = sshconfig.proxy_command(ECHO_ARGS, 22, url, profile=word, region=word)
    config = tmp_path / "config"

    sshconfig.write_config(config, HostEntry(name="devbox", hostname="devbox", proxy_command=command))

    proxycommand = ssh_g(config)["proxycommand"]
    assert proxycommand == command
    expected = ["proxy", "--port", "22", "--url", url] + (["--profile", word, "--region", word] if word else [])
    assert run_proxy_command(proxycommand) == expected


@needs_ssh
def test_an_idle_cooldown_reaches_the_proxy_through_ssh_config_and_the_shell(tmp_path: Path) -> None:
    command = sshconfig.proxy_command(ECHO_ARGS, 22, "https://x.example.com/api", profile="it's", idle_cooldown=7.5)
    config = tmp_path / "config"

    sshconfig.write_config(config, HostEntry(name="devbox", hostname="devbox", proxy_command=command))

    assert run_proxy_command(ssh_g(config)["proxycommand"]) == [
        "proxy", "--port", "22", "--url", "https://x.example.com/api", "--profile", "it's", "--idle-cooldown", "7.5"
    ]


@needs_ssh
def test_a_url_ending_in_a_backslash_leaves_every_host_working(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host other\n    HostName other.example.com\n    Port 2200\n")
    command = sshconfig.proxy_command(["/opt/devbox/bin/devbox"], 22, "https://x.example.com/api\\")

    sshconfig.write_config(config, HostEntry(name="devbox", hostname="devbox", proxy_command=command))

    assert "--url 'https://x.example.com/api'\\\\\n" in config.read_text()
    assert ssh_g(config)["proxycommand"] == command
    assert ssh_g(config, "other")["port"] == "2200"


@needs_ssh
@pytest.mark.parametrize("identity", ["/keys/it's.pem", "/keys/it's mine.pem", "/keys/#1.pem", "/keys/100%.pem",
                                      "~/.ssh/o'brien", "/keys/'", "/keys/a=b,c"])
def test_identity_paths_with_quotes_hashes_and_percent_signs_are_read_back_as_written(
    tmp_path: Path, identity: str
) -> None:
    config = tmp_path / "config"

    sshconfig.write_config(config, HostEntry(name="devbox", hostname="devbox", proxy_command=PROXY,
                                             identity_file=identity))

    assert ssh_g(config)["identityfile"] == identity.replace("%", "%%")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"identity_file": '/keys/say "hi".pem'}, "cannot hold a double quote or a backslash"),
        ({"identity_file": "C:\\keys\\devbox.pem"}, "cannot hold a double quote or a backslash"),
        ({"identity_file": "${HOME}/.ssh/devbox.pem"}, "cannot hold ${"),
        ({"identity_file": "/keys/a\tb"}, "line breaks or control characters"),
        ({"identity_file": ""}, "cannot be empty"),
        ({"user": "dom\\\\user"}, "--user must be a plain user name"),
        ({"proxy_command": "devbox proxy\x1b[2J"}, "control characters"),
    ],
)
def test_values_an_ssh_config_cannot_quote_are_refused_with_the_reason(changes: Dict[str, str], message: str) -> None:
    fields = {"name": "devbox", "hostname": "devbox", "proxy_command": PROXY, **changes}

    with pytest.raises(CliError) as caught:
        sshconfig.render_block(HostEntry(**fields))

    assert message in caught.value.message


def test_control_characters_in_proxy_words_are_refused() -> None:
    with pytest.raises(CliError) as caught:
        sshconfig.proxy_command(["/bin/devbox"], 22, "https://x.example.com/api/\n    ProxyJump evil")

    assert "cannot hold line breaks or control characters" in caught.value.message


@needs_ssh
def test_a_file_ssh_refuses_is_left_as_it_was(tmp_path: Path) -> None:
    config = tmp_path / "config"
    original = b"Host broken\n    IdentityFile 'unclosed\n"
    config.write_bytes(original)

    with pytest.raises(CliError) as caught:
        sshconfig.write_config(config, ENTRY)

    # ssh names the real file and the line (the block's 13 lines now come first).
    assert caught.value.message == (
        f"ssh refuses the new config ({config} line 15: invalid quotes; {config}: terminating, 1 bad configuration"
        f" options); {config} left unchanged"
    )
    assert config.read_bytes() == original
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config"]  # no backup, no temporary file


def fake_ssh(folder: Path, script: str) -> str:
    """An `ssh` program made of a shell script (for answers a real ssh would not give)."""
    program = folder / "bin" / "ssh"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(0o755)
    return str(program)


def test_a_file_ssh_reads_differently_is_left_as_it_was(tmp_path: Path) -> None:
    # What an OpenSSH without escapes would answer for a value holding them.
    ssh = fake_ssh(tmp_path, "echo 'hostname devbox.example.com'; echo 'proxycommand something else'\n")
    config = tmp_path / "config"

    with pytest.raises(CliError) as caught:
        sshconfig.write_config(config, ENTRY, ssh=ssh)

    assert caught.value.message == (
        f"ssh would read proxycommand as 'something else', not '{PROXY}'; {config} left unchanged"
    )
    assert not config.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bin"]


def test_the_check_asks_ssh_about_the_new_file_before_it_replaces_the_old(tmp_path: Path) -> None:
    log = tmp_path / "asked"
    ssh = fake_ssh(tmp_path, f'echo "$@" > {log}; cat "$3" >> {log}; exit 255\n')
    config = tmp_path / "config"
    config.write_text("Host old\n")

    with pytest.raises(CliError):
        sshconfig.write_config(config, ENTRY, ssh=ssh)

    asked = log.read_text()
    assert asked.startswith(f"-G -F {tmp_path}/.config.")
    assert asked.endswith(" devbox\n" + sshconfig.render_block(ENTRY).decode() + "Host old\n")
    assert config.read_text() == "Host old\n"


@pytest.mark.parametrize("ssh", [None, "no-such-ssh-client"])
def test_without_an_ssh_client_the_file_is_written_unchecked(tmp_path: Path, ssh: Optional[str]) -> None:
    config = tmp_path / "config"

    assert sshconfig.write_config(config, ENTRY, ssh=ssh) == "created"
    assert config.read_bytes().startswith(BEGIN_MARKER)
