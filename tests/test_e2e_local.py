"""End to end on the local stack: real moto server, the API server (SigV4 checked), the relay, the real CLI."""
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from devbox.local import LocalStack, LocalStackError, free_port, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack():
    with tempfile.TemporaryDirectory(prefix="devbox-e2e-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None) as running:
            yield running


def devbox(stack, *args):
    return subprocess.run([sys.executable, "-m", "devbox", *args], env=stack.client_env(), capture_output=True,
                          text=True, timeout=120)


def test_start_status_stop_through_the_cli(stack):
    started = devbox(stack, "start", "--wait", "--no-ssh-probe", "--timeout", "60")
    assert started.returncode == 0, started.stderr
    assert wait_until(lambda: stack.access_rules() == ["127.0.0.1/32", "127.0.0.1/32"])
    assert wait_until(lambda: stack.a_record() is not None)

    status = devbox(stack, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["state"] == "running"
    assert doc["dns_name"] == "devbox.local.test"
    assert doc["allowed_ips"] == ["127.0.0.1/32"]
    assert stack.a_record() == doc["public_ip"]

    stopped = devbox(stack, "stop", "--wait", "--timeout", "60")
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: stack.access_rules() == [])
    assert wait_until(lambda: stack.a_record() is None)
    assert stack.relay is not None and stack.relay.errors == []


def test_cli_reports_unreachable_api_in_one_line(stack):
    env = {**stack.client_env(), "DEVBOX_URL": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "devbox", "status"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def _listening(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_command_passes_and_leaves_no_process_behind():
    api_port, moto_port = free_port(), free_port()
    done = subprocess.run(
        [sys.executable, "-m", "devbox", "local", "--demo", "--port", str(api_port), "--moto-port", str(moto_port)],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo passed" in done.stdout
    assert not _listening(api_port) and not _listening(moto_port)
    # The relay and chalice local run with --project-dir in the demo's own temp folder.
    assert _processes_mentioning(f"--port\0{api_port}") == []
    assert [cmd for cmd in _processes_mentioning("/devbox-local-") if "devbox.relay" in cmd] == []


def _processes_mentioning(text):
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in raw:
            found.append(raw.replace("\0", " "))
    return found


def _occupied_port():
    """A listening socket on a free loopback port, as another program holding the port would be."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize("which, name, log", [
    ("api_port", "the devbox API server (devbox.peer_server)", "api.log"),
    ("moto_port", "the fake AWS server (devbox.fakeaws)", "moto.log"),
])
def test_port_held_by_another_process_is_not_reported_up(which, name, log):
    holder, port = _occupied_port()
    said = []
    try:
        with tempfile.TemporaryDirectory(prefix="devbox-e2e-held-") as workdir:
            stack = LocalStack(Path(workdir), say=said.append, **{which: port})
            with pytest.raises(LocalStackError) as caught:
                stack.start()
            message = caught.value.message
            assert message.startswith(f"{name} exited with code 1 before serving on 127.0.0.1:{port}")
            assert "in use" in message  # the OS's (or werkzeug's) reason, quoted from the log
            assert message.endswith(f"its log: {Path(workdir) / log}")
            assert stack.processes == []
    finally:
        holder.close()
    assert not any(line.startswith("the devbox API") for line in said)
    assert _processes_mentioning(f"--port\0{port}") == []


def test_devbox_local_on_a_held_port_fails_in_one_line_and_keeps_its_logs():
    holder, port = _occupied_port()
    try:
        done = subprocess.run([sys.executable, "-m", "devbox", "local", "--port", str(port)], capture_output=True,
                              text=True, timeout=120, cwd=str(ROOT))
    finally:
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "The local devbox stack is up" not in done.stdout
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("devbox: ")]
    assert len(error) == 1, done.stderr
    assert (f"the devbox API server (devbox.peer_server) exited with code 1 before serving on 127.0.0.1:{port}"
            in error[0])
    log = Path(re.search(r"its log: (\S+)$", error[0]).group(1))
    try:
        assert "Address already in use" in log.read_text()
        assert f"logs kept in {log.parent}" in done.stderr
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)
