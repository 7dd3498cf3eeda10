"""A throw-away OpenSSH server on the loopback interface, for end-to-end tests of `ssh devbox`.

It runs the system's real sshd as the current user (root or not) with its own host key,
its own authorized_keys holding one throw-away client key, and a config that touches no
system file except, as root, the privilege separation folder sshd insists on.
As another user, that user's account must not be locked: without PAM, sshd itself refuses
accounts whose password field starts with "!" (a user created without a password).
"""
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from devbox.local import free_port, wait_for_port

SSHD = Path("/usr/sbin/sshd")
# As root, sshd refuses to start without its (empty, root-owned) privilege separation folder.
PRIVSEP_DIR = Path("/run/sshd")
# sshd answers in well under a second; the margin is for a loaded CI machine.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def sshd_missing_reason() -> Optional[str]:
    """Why the real-sshd tests cannot run here, or None when they can."""
    if not SSHD.is_file() or not os.access(SSHD, os.X_OK):
        return f"no OpenSSH server at {SSHD} (install openssh-server)"
    return None


@dataclass
class Sshd:
    """A running sshd: where it listens, who may log in with which key, and its log."""

    port: int
    user: str
    client_key: Path
    host_public_key: str
    log: Path
    process: subprocess.Popen

    def known_hosts_line(self, alias: str) -> str:
        """A known_hosts line trusting this server's host key under the name `alias`."""
        return f"{alias} {self.host_public_key}\n"

    def log_text(self) -> str:
        """What sshd has written so far (for failure messages)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop sshd and the session processes it forked (they share its process group)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)


def generate_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair without passphrase at path and path.pub."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )
    return path


def sshd_config_lines(port: int, host_key: Path, authorized_keys: Path, pid_file: Path, user: str) -> List[str]:
    """An sshd_config that accepts only the throw-away key, for `user` only, on 127.0.0.1:port."""
    return [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        # The test's files live in a temporary folder whose owner and modes sshd would judge.
        "StrictModes no",
        # PAM would need the system's sshd PAM stack (and root) to open a session.
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # CI runs as root; key-only root login is what Debian allows by default anyway.
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel VERBOSE",
    ]


def start_sshd(workdir: Path) -> Sshd:
    """Start sshd in the foreground (-D, logging to stderr with -e) and wait until its port accepts."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Not getpass.getuser(): $USER may name someone else (sudo, su), and sshd checks the real one.
    user = pwd.getpwuid(os.geteuid()).pw_name
    host_key = generate_key(workdir / "ssh_host_ed25519_key", "devbox-test-host")
    client_key = generate_key(workdir / "client_ed25519_key", "devbox-test-client")
    authorized_keys = workdir / "authorized_keys"
    shutil.copyfile(public_key_path(client_key), authorized_keys)
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text("\n".join(sshd_config_lines(port, host_key, authorized_keys, workdir / "sshd.pid", user)) + "\n")
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
    log = workdir / "sshd.log"
    with open(log, "wb") as stream:
        # sshd wants to be started by its absolute path (it re-executes itself for each connection).
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Sshd(port, user, client_key, public_key_text(host_key), log, process)
    try:
        wait_for_port(port, START_TIMEOUT, process)
    except BaseException as err:
        server.stop()
        raise RuntimeError(f"sshd did not start: {err}\n{server.log_text()}") from None
    return server


def public_key_path(private_key: Path) -> Path:
    """Where ssh-keygen put the public half of private_key."""
    return private_key.with_name(private_key.name + ".pub")


def public_key_text(private_key: Path) -> str:
    """The "type base64" part of a key's .pub file (without its comment)."""
    key_type, key_data = public_key_path(private_key).read_text().split()[:2]
    return f"{key_type} {key_data}"
