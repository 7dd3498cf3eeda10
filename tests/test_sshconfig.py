"""The managed Host block: byte-exact edits of tricky ssh config files, checked with `ssh -G`."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict

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
    assert sshconfig.proxy_command(["/bin/devbox"], 2222, url="https://a.example.com/api/", region="eu-west-1") == (
        "/bin/devbox proxy --port 2222 --url https://a.example.com/api/ --region eu-west-1"
    )
