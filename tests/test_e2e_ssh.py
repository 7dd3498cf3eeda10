"""`ssh devbox` end to end: real OpenSSH client and server, the devbox ProxyCommand, the local stack.

The chain under test is the one a user runs: `devbox ssh-config` writes the Host block,
`ssh -F that-config devbox CMD` runs the block's ProxyCommand (`devbox proxy`), which
calls /start on `chalice local` (moto behind it), waits for the box to run and relays the
SSH stream. moto's instance has a made-up address, so the proxy is pointed at a real sshd
on 127.0.0.1 through DEVBOX_SSH_HOST_OVERRIDE, which ssh hands on to its ProxyCommand.
"""
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from devbox.local import LocalStack, wait_until
from devbox.proxy import HOST_OVERRIDE_ENV
from tests.sshd_fixture import Sshd, sshd_missing_reason, start_sshd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason())),
]

ALIAS = "devbox"
CALLER_RULE = "127.0.0.1/32"
# Generous (a run takes about a second): on a loaded CI machine moto and chalice local are slow.
SSH_TIMEOUT = 60


class SshClient:
    """Runs `ssh -F <generated config> devbox ...` the way a user would, in an empty folder."""

    def __init__(self, stack: LocalStack, sshd: Sshd, workdir: Path) -> None:
        self.stack = stack
        self.sshd = sshd
        self.workdir = workdir
        self.config = workdir / "ssh_config"
        self.known_hosts = workdir / "known_hosts"
        # The server's key is trusted under the alias only: the connection succeeds only if
        # ssh checks it as HostKeyAlias devbox (and really talks to this sshd).
        self.known_hosts.write_text(sshd.known_hosts_line(ALIAS))

    def write_config(self) -> "subprocess.CompletedProcess[str]":
        """`devbox ssh-config` into the temporary config, aimed at this stack and sshd."""
        return subprocess.run(
            [sys.executable, "-m", "devbox", "ssh-config", "--config", str(self.config), "--host", ALIAS,
             "--user", self.sshd.user, "--identity", str(self.sshd.client_key), "--port", str(self.sshd.port),
             "--url", self.stack.url],
            env=self.stack.client_env(), cwd=str(self.workdir), capture_output=True, text=True, timeout=60,
        )

    def env(self) -> Dict[str, str]:
        """ssh's environment, which its ProxyCommand inherits: credentials and the sshd override."""
        env = self.stack.client_env()
        # The block carries --url itself; DEVBOX_URL must not be what makes it work.
        env.pop("DEVBOX_URL", None)
        # No agent: only the block's IdentityFile may log in.
        env.pop("SSH_AUTH_SOCK", None)
        env[HOST_OVERRIDE_ENV] = "127.0.0.1"
        return env

    def options(self) -> List[str]:
        return ["-F", str(self.config), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]

    def run(self, *args: str) -> "subprocess.CompletedProcess[str]":
        """ssh with the generated config and the given arguments (host, command)."""
        return subprocess.run(["ssh", *self.options(), *args], env=self.env(), cwd=str(self.workdir),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SSH_TIMEOUT)


def instance_state(stack: LocalStack) -> str:
    """The state of the box's current instance as moto reports it ("none" before the first start)."""
    current = stack.current()
    return str(current["State"]["Name"]) if current else "none"


def stop_box(stack: LocalStack) -> None:
    """Stop the instance behind the app's back and wait until the app has revoked access."""
    current = stack.current()
    assert current is not None, "the box has no instance to stop"
    stack.aws("ec2").stop_instances(InstanceIds=[current["InstanceId"]])
    assert wait_until(lambda: instance_state(stack) == "stopped")
    # The relay hands EC2's 'stopped' event to on_stopped, which revokes the caller's rules;
    # an ssh started before that could see its fresh rule revoked by the stale event.
    assert wait_until(lambda: stack.access_rules() == [], timeout=30), stack.access_rules()


def failure_report(done: "subprocess.CompletedProcess[str]", sshd: Sshd) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}\nsshd log:\n{sshd.log_text()}"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="devbox-e2e-ssh-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def sshd(workdir: Path) -> Iterator[Sshd]:
    server = start_sshd(workdir / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(workdir: Path) -> Iterator[LocalStack]:
    with LocalStack(new_folder(workdir / "stack"), say=lambda _: None) as running:
        yield running


def new_folder(path: Path) -> Path:
    """path, created (LocalStack writes its logs into an existing folder)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _client(stack: LocalStack, sshd: Sshd, folder: Path) -> SshClient:
    client = SshClient(stack, sshd, new_folder(folder))
    written = client.write_config()
    assert written.returncode == 0, written.stderr
    return client


@pytest.fixture(scope="module")
def ssh(stack: LocalStack, sshd: Sshd, workdir: Path) -> SshClient:
    """An ssh client whose config was written by `devbox ssh-config` for the module's stack."""
    return _client(stack, sshd, workdir / "client")


@pytest.fixture
def stopped_box(stack: LocalStack) -> LocalStack:
    """The module's stack with its box not running (no instance as created, or stopped by this fixture)."""
    if instance_state(stack) not in ("stopped", "none"):
        stop_box(stack)
    return stack


def test_ssh_starts_the_stopped_box_then_logs_in(ssh: SshClient, stopped_box: LocalStack) -> None:
    assert CALLER_RULE not in stopped_box.access_rules()

    done = ssh.run(ALIAS, "true")

    assert done.returncode == 0, failure_report(done, ssh.sshd)
    assert instance_state(stopped_box) == "running"
    assert CALLER_RULE in stopped_box.access_rules()


def test_remote_command_output_comes_back_through_the_proxy(ssh: SshClient) -> None:
    done = ssh.run(ALIAS, "echo", "hello")

    assert done.returncode == 0, failure_report(done, ssh.sshd)
    assert done.stdout == "hello\n"


def test_config_block_routes_the_alias_through_the_devbox_proxy(ssh: SshClient) -> None:
    done = ssh.run("-G", ALIAS)

    assert done.returncode == 0, done.stderr
    settings = dict(line.partition(" ")[::2] for line in done.stdout.splitlines())
    assert settings.get("hostkeyalias") == ALIAS
    assert settings.get("user") == ssh.sshd.user
    assert settings.get("identityfile") == str(ssh.sshd.client_key)
    proxy = settings.get("proxycommand", "")
    assert f" -m devbox proxy --port {ssh.sshd.port} --url {ssh.stack.url}" in proxy, proxy


def test_box_stopped_again_is_started_by_the_next_ssh(ssh: SshClient, stack: LocalStack) -> None:
    first = ssh.run(ALIAS, "true")
    assert first.returncode == 0, failure_report(first, ssh.sshd)
    stop_box(stack)

    done = ssh.run(ALIAS, "echo", "back")

    assert done.returncode == 0, failure_report(done, ssh.sshd)
    assert done.stdout == "back\n"
    assert instance_state(stack) == "running"
    assert CALLER_RULE in stack.access_rules()


def test_box_whose_instance_was_terminated_is_relaunched_by_ssh_with_its_data_volume(sshd: Sshd, workdir: Path) -> None:
    # A stack of its own, so the other tests keep their instance.
    with LocalStack(new_folder(workdir / "terminated-stack"), say=lambda _: None) as doomed:
        ssh = _client(doomed, sshd, workdir / "terminated-client")
        first = ssh.run(ALIAS, "true")
        assert first.returncode == 0, failure_report(first, ssh.sshd)
        old = doomed.current()
        assert old is not None
        volume_ids = [v["VolumeId"] for v in doomed.data_volumes()]
        doomed.aws("ec2").terminate_instances(InstanceIds=[old["InstanceId"]])
        assert wait_until(lambda: doomed.access_rules() == [], timeout=30)

        done = ssh.run(ALIAS, "echo", "back")
        new = doomed.current()

        assert done.returncode == 0, failure_report(done, ssh.sshd)
        assert done.stdout == "back\n"
        assert new is not None and new["InstanceId"] != old["InstanceId"]
        assert [v["VolumeId"] for v in doomed.data_volumes()] == volume_ids
        assert wait_until(lambda: doomed.volume_holder() == new["InstanceId"])
