"""`devbox proxy` as a real subprocess: the fake API says running, a local TCP server plays sshd."""
import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from devbox import api
from tests.test_api import FakeApi, fake_api, free_port, no_instance_doc, status_doc  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
# The proxies started here read it (a marker of a recent `devbox start`); nothing writes it.
STATE_HOME = Path(tempfile.mkdtemp(prefix="devbox-test-state-"))
atexit.register(shutil.rmtree, STATE_HOME, True)
BANNER = b"SSH-2.0-FakeServer_1.0\r\n"
# Every byte value, many times: the relay must be binary-clean and survive partial writes.
PAYLOAD = bytes(range(256)) * 4096


class SshLikeServer:
    """A TCP server on 127.0.0.1 that greets like sshd, then either echoes or reads one line.

    "echo": reads until the client half-closes, then sends all it read back and closes;
    it only answers if the proxy passes the end of stdin on as a FIN.
    "line": reads the client's first line (ssh's own banner), then closes.
    """

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: List[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.sendall(BANNER)
            data = bytearray()
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
                if self.mode == "line" and b"\n" in data:
                    break
            self.received.append(bytes(data))
            if self.mode == "echo":
                connection.sendall(bytes(data))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def sshd() -> Iterator[SshLikeServer]:
    server = SshLikeServer()
    yield server
    server.close()


def child_env(**extra: str) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DEVBOX_SSH_HOST_OVERRIDE"}
    env["PYTHONPATH"] = str(ROOT)
    # No marker of a `devbox start` from this machine's real state folder.
    env["XDG_STATE_HOME"] = str(STATE_HOME)
    env.update(extra)
    return env


def user_stopped_doc() -> Dict[str, Any]:
    """What the proxy reads before /start when it runs without a terminal: a box its user stopped."""
    return status_doc(state="stopped", public_ip=None, dns_name=None, launch_time=None, stopped_by="user",
                      stopped_at="2024-05-01T09:00:00Z", state_reason="Client.UserInitiatedShutdown: User initiated"
                      " shutdown")


def run_proxy(url: str, port: int, *options: str, data: bytes = b"", env: Optional[Dict[str, str]] = None
              ) -> "subprocess.CompletedProcess[bytes]":
    """`devbox proxy` as ssh runs it from an IDE: no controlling terminal (a session of its own)."""
    command = [sys.executable, "-m", "devbox", "proxy", "--url", url, "--port", str(port),
               "--poll-interval", "0.01", *options]
    return subprocess.run(command, input=data, capture_output=True, timeout=20, env=env or child_env(), cwd=ROOT,
                          start_new_session=True)


def test_stdin_reaches_the_server_and_its_answer_comes_back_on_stdout(fake_api: FakeApi, sshd: SshLikeServer) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending", public_ip=None, dns_name=None)))
    fake_api.answer("GET", "/status", (200, user_stopped_doc()),
                    (200, status_doc(state="pending", public_ip=None, dns_name=None)), (200, status_doc()))

    result = run_proxy(fake_api.url, sshd.port, "--host-override", "127.0.0.1", data=PAYLOAD)

    assert result.returncode == 0, result.stderr
    assert result.stdout == BANNER + PAYLOAD
    assert sshd.received == [PAYLOAD]
    # Without a terminal the proxy first reads why the box is stopped (devbox.reconnect).
    assert fake_api.calls() == ["GET /status", "POST /start", "GET /status", "GET /status"]
    progress = result.stderr.decode()
    assert "devbox: waiting: instance i-0123456789abcdef0 pending" in progress
    assert f"SSH port reachable (127.0.0.1:{sshd.port})" in progress


def test_a_running_box_is_proxied_silently_with_the_override_from_the_environment(
    fake_api: FakeApi, sshd: SshLikeServer
) -> None:
    fake_api.answer("POST", "/start", (200, {**status_doc(), "action": "none", "reason": "already running"}))
    fake_api.answer("GET", "/status", (200, status_doc()))

    result = run_proxy(fake_api.url, sshd.port, data=b"hello\n", env=child_env(DEVBOX_SSH_HOST_OVERRIDE="127.0.0.1"))

    assert result.returncode == 0, result.stderr
    assert result.stdout == BANNER + b"hello\n"
    assert result.stderr == b""


@pytest.mark.parametrize(
    "action, reason, said",
    [
        ("launch", "first start",
         "devbox: first start: launched i-0fedcba9876543210 (t3.large spot in us-east-1a) with data volume"
         " vol-0123456789abcdef0 for /home"),
        ("relaunch", "interrupted by the spot service",
         "devbox: launched a new instance i-0fedcba9876543210 (t3.large spot in us-east-1a) because: interrupted"
         " by the spot service; data volume vol-0123456789abcdef0 follows it"),
    ],
)
def test_a_box_that_needs_a_new_instance_gets_one_and_is_proxied(
    fake_api: FakeApi, sshd: SshLikeServer, action: str, reason: str, said: str
) -> None:
    new = "i-0fedcba9876543210"
    pending = status_doc(instance_id=new, state="pending", public_ip=None, dns_name=None)
    fake_api.answer("POST", "/start", (200, {**pending, "action": action, "reason": reason,
                                             "tried": ["t3.large spot in subnet-0aaa: InsufficientInstanceCapacity"]}))
    fake_api.answer("GET", "/status", (200, user_stopped_doc()), (200, pending), (200, status_doc(instance_id=new)))

    result = run_proxy(fake_api.url, sshd.port, "--host-override", "127.0.0.1", data=b"hello\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout == BANNER + b"hello\n"
    assert result.stderr.decode().splitlines() == [
        said,
        "devbox:   refused first: t3.large spot in subnet-0aaa: InsufficientInstanceCapacity",
        f"devbox: waiting: instance {new} pending",
        f"devbox: instance {new} running (t3.large spot in us-east-1a, 203.0.113.10)",
        f"devbox: SSH port reachable (127.0.0.1:{sshd.port})",
    ]


def test_a_new_instance_that_vanishes_ends_the_proxy_with_one_line(fake_api: FakeApi) -> None:
    new = "i-0fedcba9876543210"
    pending = status_doc(instance_id=new, state="pending", public_ip=None, dns_name=None)
    fake_api.answer("POST", "/start", (200, {**pending, "action": "relaunch", "reason": "rebuild", "tried": []}))
    fake_api.answer("GET", "/status", (200, no_instance_doc()), (200, pending), (200, no_instance_doc()))

    result = run_proxy(fake_api.url, 22, "--host-override", "127.0.0.1")

    assert result.returncode == api.EXIT_CONFLICT
    assert result.stdout == b""
    assert result.stderr.decode().splitlines()[-1] == (
        f"devbox: the devbox's instance {new} is gone (EC2 terminated it; the spot service may have taken the"
        " capacity back at launch); `devbox start` launches a new one with the same data volume"
    )


def test_a_start_that_falls_back_to_stopped_ends_the_proxy_with_ec2s_reason(fake_api: FakeApi) -> None:
    fallback = status_doc(state="stopped", public_ip=None, dns_name=None,
                          state_reason="Client.InternalError: Client error on launch")
    fake_api.answer("GET", "/status", (200, user_stopped_doc()), (200, status_doc(state="pending")), (200, fallback))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    result = run_proxy(fake_api.url, 22, "--host-override", "127.0.0.1")

    assert result.returncode == api.EXIT_CONFLICT
    assert result.stdout == b""
    assert result.stderr.decode().splitlines()[-1] == (
        "devbox: the devbox's instance i-0123456789abcdef0 stopped again while starting; EC2's reason:"
        " Client.InternalError: Client error on launch (EC2 gives this reason, among others, when it may not use"
        " the volumes' KMS key: see KmsKeyId)"
    )


def test_without_ssh_probe_the_proxy_connects_once_the_box_runs(fake_api: FakeApi, sshd: SshLikeServer) -> None:
    fake_api.answer("POST", "/start", (200, status_doc()))
    fake_api.answer("GET", "/status", (200, status_doc()))

    result = run_proxy(fake_api.url, sshd.port, "--no-ssh-probe", "--host-override", "127.0.0.1", data=b"x" * 10)

    assert result.returncode == 0, result.stderr
    assert result.stdout == BANNER + b"x" * 10


def test_a_closed_port_without_probe_fails_with_one_line(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc()))
    fake_api.answer("GET", "/status", (200, status_doc()))
    port = free_port()

    result = run_proxy(fake_api.url, port, "--no-ssh-probe", "--host-override", "127.0.0.1")

    assert result.returncode == api.EXIT_UNREACHABLE
    assert result.stdout == b""
    assert result.stderr.decode().splitlines()[-1] == (
        f"devbox: cannot connect to the devbox at 127.0.0.1:{port}: Connection refused"
    )


@pytest.mark.parametrize(
    "status, message, exit_code",
    [
        (404, "instance i-0123456789abcdef0 does not exist", api.EXIT_NOT_FOUND),
        (409, "the instance is stopping; start it once it has stopped", api.EXIT_CONFLICT),
        (503, "no spot capacity for t3.large right now", api.EXIT_UNAVAILABLE),
        (403, "User: arn:aws:iam::123456789012:user/me is not authorized", api.EXIT_AUTH),
    ],
)
def test_api_errors_end_the_proxy_with_one_line_for_ssh_to_show(
    fake_api: FakeApi, status: int, message: str, exit_code: int
) -> None:
    fake_api.answer("GET", "/status", (200, user_stopped_doc()))
    fake_api.answer("POST", "/start", (status, {"Code": "X", "Message": message}))

    result = run_proxy(fake_api.url, 22, "--host-override", "127.0.0.1")

    assert result.returncode == exit_code
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("devbox: ") and lines[0].endswith(message)


def test_a_box_that_never_runs_times_out(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")))

    result = run_proxy(fake_api.url, 22, "--timeout", "0.2")

    assert result.returncode == api.EXIT_TIMEOUT
    assert result.stdout == b""
    assert result.stderr.decode().splitlines()[-1] == (
        "devbox: timed out after 0.2 s waiting for the instance to run (it is pending)"
    )


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client missing: apt-get install -y openssh-client")
def test_ssh_reaches_the_server_through_the_block_that_ssh_config_wrote(fake_api: FakeApi, tmp_path: Path) -> None:
    server = SshLikeServer(mode="line")
    fake_api.answer("GET", "/status", (200, status_doc(dns_name="devbox.example.com")))
    fake_api.answer("POST", "/start", (200, status_doc(dns_name="devbox.example.com")))
    config = tmp_path / "ssh_config"
    env = child_env(DEVBOX_SSH_HOST_OVERRIDE="127.0.0.1")
    try:
        written = subprocess.run(
            [sys.executable, "-m", "devbox", "ssh-config", "--config", str(config), "--url", fake_api.url,
             "--port", str(server.port), "--user", "ubuntu"],
            capture_output=True, timeout=20, env=env, cwd=tmp_path,
        )
        assert written.returncode == 0, written.stderr
        assert b"HostName devbox.example.com" in config.read_bytes()

        result = subprocess.run(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "devbox", "true"],
            capture_output=True, timeout=30, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
        )
    finally:
        server.close()

    # The fake server hangs up after ssh's banner: ssh fails, but only after talking through the proxy.
    assert result.returncode == 255
    assert server.received and server.received[0].startswith(b"SSH-2.0-OpenSSH")
    assert "POST /start" in fake_api.calls()
