"""The `devbox` command through main(), against a real local HTTP server; and the waiting logic."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from devbox import api, cli
from devbox.api import ApiError, CliError
from devbox.progress import MAX_STATUS_FAILURES, Progress, WaitOptions, wait_until_ready, wait_until_stopped
from tests.test_api import FakeApi, fake_api, free_port, no_credentials, status_doc  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
Run = Callable[..., Tuple[int, str, str]]
# What ssh-config says about the check of the new file, with or without an OpenSSH client here.
CHECKED = "ssh -G accepts it" if shutil.which("ssh") else "not checked with `ssh -G`: ssh is not installed"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No deployment record or URL from the surroundings, and a state folder of the test's own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("DEVBOX_URL", raising=False)
    monkeypatch.delenv("DEVBOX_SSH_HOST_OVERRIDE", raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run main(argv); returns (exit code, stdout, stderr)."""

    def invoke(*argv: str) -> Tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the backlog does it; nobody needs to answer)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield int(server.getsockname()[1])


# --- status -------------------------------------------------------------------------------------


def test_status_prints_a_short_table(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(dns_name="devbox.example.com",
                                                       allowed_ips=["198.51.100.7/32", "2001:db8::/64"])))

    code, out, err = run("status", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "box:          devbox",
        "state:        running",
        "instance:     i-0123456789abcdef0",
        "type:         t3.large",
        "market:       spot",
        "zone:         us-east-1a",
        "data volume:  vol-0123456789abcdef0",
        "address:      devbox.example.com (203.0.113.10)",
        "allowed IPs:  198.51.100.7/32, 2001:db8::/64",
        "launched:     2024-05-01 10:00:00 UTC",
    ]


def test_status_of_a_stopped_box_shows_dashes(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(state="stopped", public_ip=None, dns_name=None,
                                                       launch_time=None, allowed_ips=[])))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert "address:      -" in out.splitlines()
    assert "allowed IPs:  none" in out.splitlines()
    assert "launched:     -" in out.splitlines()


def test_status_shows_interruption_price_uptime_and_cost_when_present(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(
        last_interruption="2024-04-30T22:15:00Z EC2 Spot Instance Interruption Warning stop",
        spot_price_per_hour="0.0312", uptime_seconds=3900, estimated_cost=0.0338)))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    lines = out.splitlines()
    assert "last interruption:  2024-04-30 22:15:00 UTC EC2 Spot Instance Interruption Warning stop" in lines
    assert "spot price:         $0.0312/h" in lines
    assert "uptime:             1h 05m" in lines
    assert "estimated cost:     $0.0338" in lines


def test_status_json_prints_the_document(fake_api: FakeApi, run: Run) -> None:
    document = status_doc(spot_price_per_hour=0.03)
    fake_api.answer("GET", "/status", (200, document))

    code, out, _ = run("status", "--json", "--url", fake_api.url)

    assert code == 0
    assert json.loads(out) == document


def test_connection_options_work_before_and_after_the_command(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc()))

    assert run("--url", fake_api.url, "status")[0] == 0
    assert run("status", "--url", fake_api.url)[0] == 0
    assert run("--url", "http://127.0.0.1:1/wrong", "status", "--url", fake_api.url)[0] == 0


def test_url_comes_from_the_environment(fake_api: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_api.answer("GET", "/status", (200, status_doc()))
    monkeypatch.setenv("DEVBOX_URL", fake_api.url)

    assert run("status")[0] == 0
    assert fake_api.calls() == ["GET /status"]


@pytest.mark.parametrize(
    "status, body, exit_code, message",
    [
        (403, {"message": "Signature expired"}, api.EXIT_AUTH,
         "access denied by the devbox API (HTTP 403): Signature expired"),
        (404, {"Code": "NotFoundError", "Message": "no instance i-1"}, api.EXIT_NOT_FOUND,
         "no devbox (HTTP 404): no instance i-1"),
        (409, {"Code": "ConflictError", "Message": "it is stopping"}, api.EXIT_CONFLICT,
         "conflict (HTTP 409): it is stopping"),
        (503, {"Code": "InsufficientCapacity", "Message": "no capacity"}, api.EXIT_UNAVAILABLE,
         "unavailable, try again later (HTTP 503): no capacity"),
        (500, {"Code": "DevboxError", "Message": "boom"}, api.EXIT_FAILURE,
         "the devbox API failed (HTTP 500 DevboxError): boom"),
    ],
)
def test_errors_print_one_line_and_exit_with_their_code(
    fake_api: FakeApi, run: Run, status: int, body: Dict[str, str], exit_code: int, message: str
) -> None:
    fake_api.answer("GET", "/status", (status, body))

    code, out, err = run("status", "--url", fake_api.url)

    assert code == exit_code
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"devbox: {message}")


def test_unreachable_api_is_reported(run: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/"

    code, _, err = run("status", "--url", url)

    assert code == api.EXIT_UNREACHABLE
    assert err == f"devbox: cannot reach the devbox API at {url}status: Connection refused\n"


def test_missing_credentials_are_one_clear_line(fake_api: FakeApi, run: Run, no_credentials: None) -> None:
    code, out, err = run("status", "--url", fake_api.url)

    assert code == api.EXIT_AUTH
    assert out == ""
    assert err == (
        "devbox: no AWS credentials found: pass --profile, set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
        " or log in with `aws sso login`\n"
    )
    assert fake_api.requests == []


def test_no_url_is_a_usage_error(run: Run) -> None:
    code, _, err = run("status")

    assert code == api.EXIT_USAGE
    assert err.startswith("devbox: no devbox API URL: pass --url")


def test_no_command_prints_help(run: Run) -> None:
    code, out, err = run()

    assert code == api.EXIT_USAGE
    assert "usage: devbox" in err and out == ""


def test_bad_arguments_return_2_from_main(run: Run) -> None:
    code, _, err = run("start", "--type", "not a type", "--url", "http://127.0.0.1:1/")

    assert code == 2
    assert "not an EC2 instance type" in err


# --- start / stop --------------------------------------------------------------------------------


def test_start_sends_the_requested_instance_type(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending", instance_type="c7i.2xlarge")))

    code, out, _ = run("start", "--type", "c7i.2xlarge", "--url", fake_api.url)

    assert code == 0
    assert json.loads(fake_api.requests[0].body) == {"instance_type": "c7i.2xlarge"}
    assert "state:        pending" in out.splitlines()
    assert "type:         c7i.2xlarge" in out.splitlines()


def test_start_wait_names_each_step_until_ssh_answers(fake_api: FakeApi, run: Run, listener: int) -> None:
    pending = status_doc(state="pending", public_ip=None, dns_name=None)
    running = status_doc(public_ip="127.0.0.1", dns_name="ec2-127-0-0-1.compute-1.amazonaws.com")
    fake_api.answer("POST", "/start", (200, pending))
    fake_api.answer("GET", "/status", (200, pending), (200, pending), (200, running))

    code, out, err = run("start", "--wait", "--poll-interval", "0", "--port", str(listener), "--url", fake_api.url)

    assert code == 0, err
    assert err.splitlines() == [
        "devbox: waiting: instance i-0123456789abcdef0 pending",
        "devbox: instance i-0123456789abcdef0 running (t3.large spot in us-east-1a, 127.0.0.1)",
        f"devbox: SSH port reachable (127.0.0.1:{listener})",
    ]
    assert "state:        running" in out.splitlines()
    assert fake_api.calls() == ["POST /start", "GET /status", "GET /status", "GET /status"]


def test_start_wait_gives_up_after_the_timeout(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")))

    code, out, err = run("start", "--wait", "--timeout", "0", "--url", fake_api.url)

    assert code == api.EXIT_TIMEOUT
    assert out == ""
    assert err.splitlines()[-1] == "devbox: timed out after 0 s waiting for the instance to run (it is pending)"


def test_start_wait_without_ssh_probe_skips_the_network_checks(fake_api: FakeApi, run: Run) -> None:
    # Local mode: a made-up managed domain that resolves nowhere, and no sshd.
    running = status_doc(dns_name="devbox.local.test", public_ip="192.0.2.1")
    fake_api.answer("POST", "/start", (200, running))
    fake_api.answer("GET", "/status", (200, running))

    code, _, err = run("start", "--wait", "--no-ssh-probe", "--url", fake_api.url)

    assert code == 0, err
    assert err.splitlines()[-1] == "devbox: DNS and SSH checks skipped (--no-ssh-probe)"


def test_stop_wait_polls_until_stopped(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/stop", (200, status_doc(state="stopping")))
    fake_api.answer("GET", "/status", (200, status_doc(state="stopping")),
                    (200, status_doc(state="stopped", public_ip=None, dns_name=None)))

    code, out, err = run("stop", "--wait", "--poll-interval", "0", "--url", fake_api.url)

    assert code == 0
    assert err.splitlines() == ["devbox: waiting: instance i-0123456789abcdef0 stopping",
                                "devbox: instance i-0123456789abcdef0 stopped"]
    assert "state:        stopped" in out.splitlines()


def test_stop_without_wait_returns_at_once(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/stop", (200, status_doc(state="stopping")))

    code, out, _ = run("stop", "--json", "--url", fake_api.url)

    assert code == 0
    assert json.loads(out)["state"] == "stopping"
    assert fake_api.calls() == ["POST /stop"]


def test_ctrl_c_stops_waiting_with_one_line_and_exit_130(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "devbox", "start", "--wait", "--poll-interval", "0.05", "--url", fake_api.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # blocks until the wait has begun
        process.send_signal(signal.SIGINT)
        out, rest = process.communicate(timeout=20)
    finally:
        process.kill()

    assert first == "devbox: waiting: instance i-0123456789abcdef0 pending\n"
    assert process.returncode == 130
    assert out == ""
    assert rest == "devbox: interrupted; the devbox keeps whatever state it has reached\n"


# --- ssh ---------------------------------------------------------------------------------------------


@pytest.fixture
def ssh_calls(monkeypatch: pytest.MonkeyPatch) -> List[List[str]]:
    """Capture the ssh command instead of running it; ssh 'exits' 7."""
    calls: List[List[str]] = []

    def fake_ssh(command: List[str]) -> int:
        calls.append(command)
        return 7

    monkeypatch.setattr(cli, "run_ssh_process", fake_ssh)
    return calls


def test_ssh_starts_waits_then_runs_ssh_and_returns_its_code(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]]
) -> None:
    running = status_doc(public_ip="127.0.0.1", dns_name="ec2-127-0-0-1.compute-1.amazonaws.com")
    fake_api.answer("POST", "/start", (200, running))
    fake_api.answer("GET", "/status", (200, running))

    code, _, _ = run("ssh", "--port", str(listener), "--url", fake_api.url, "--", "-l", "ubuntu", "uptime")

    assert code == 7
    assert fake_api.calls()[0] == "POST /start"
    assert ssh_calls == [
        ["ssh", "-p", str(listener), "-o", "HostKeyAlias=devbox", "127.0.0.1", "-l", "ubuntu", "uptime"]
    ]


def test_ssh_uses_the_managed_name_once_it_points_at_the_box(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: List[Tuple[str, str]] = []

    def record_in_place(name: str, address: str, resolve: Any = None) -> bool:
        checked.append((name, address))
        return True

    monkeypatch.setattr("devbox.progress.dns_in_place", record_in_place)
    running = status_doc(public_ip="127.0.0.1", dns_name="devbox.example.com")
    fake_api.answer("POST", "/start", (200, running))
    fake_api.answer("GET", "/status", (200, running))

    code, _, err = run("ssh", "--port", str(listener), "--url", fake_api.url)

    assert code == 7
    assert checked == [("devbox.example.com", "127.0.0.1")]
    assert "devbox: DNS record in place (devbox.example.com -> 127.0.0.1)" in err.splitlines()
    assert ssh_calls == [["ssh", "-p", str(listener), "-o", "HostKeyAlias=devbox", "devbox.example.com"]]


def test_ssh_with_a_host_alias_leaves_the_address_to_the_ssh_config(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]]
) -> None:
    running = status_doc(public_ip="127.0.0.1")
    fake_api.answer("POST", "/start", (200, running))
    fake_api.answer("GET", "/status", (200, running))

    run("ssh", "--host", "devbox", "--port", str(listener), "--url", fake_api.url, "--", "true")

    assert ssh_calls == [["ssh", "devbox", "true"]]


# --- ssh-config ----------------------------------------------------------------------------------------


def test_ssh_config_writes_the_block_with_the_url_and_managed_name(
    fake_api: FakeApi, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[profile work]\naws_access_key_id = AKIDWORK\naws_secret_access_key = secret\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    fake_api.answer("GET", "/status", (200, status_doc(dns_name="devbox.example.com")))
    config = tmp_path / "ssh" / "config"

    code, out, err = run("ssh-config", "--config", str(config), "--user", "ubuntu", "--identity", "keys/devbox.pem",
                         "--port", "2222", "--url", fake_api.url, "--profile", "work")

    assert code == 0, err
    assert out.splitlines() == [
        f"API URL {fake_api.url} (from --url): written into the ProxyCommand",
        f"{config}: Host devbox block created ({CHECKED}); connect with `ssh devbox`",
    ]
    text = config.read_text()
    assert "    HostName devbox.example.com\n" in text
    assert "    User ubuntu\n" in text
    key = tmp_path / "keys" / "devbox.pem"
    assert f'    IdentityFile "{key}"\n' in text
    assert f"proxy --port 2222 --url {fake_api.url} --profile work\n" in text
    assert "Credential=AKIDWORK/" in fake_api.requests[0].headers["Authorization"]


def test_ssh_config_does_not_write_down_ec2_names(fake_api: FakeApi, run: Run, tmp_path: Path) -> None:
    fake_api.answer("GET", "/status", (200, status_doc()))
    config = tmp_path / "config"

    code, _, _ = run("ssh-config", "--config", str(config), "--url", fake_api.url)

    assert code == 0
    assert "    HostName devbox\n" in config.read_text()


def test_ssh_config_without_status_notes_why_and_goes_on(fake_api: FakeApi, run: Run, tmp_path: Path) -> None:
    fake_api.answer("GET", "/status", (403, {"message": "Forbidden"}))
    config = tmp_path / "config"

    code, _, err = run("ssh-config", "--config", str(config), "--host", "box", "--url", fake_api.url)

    assert code == 0
    assert err == (
        "devbox: note: HostName not taken from the status (access denied by the devbox API (HTTP 403): Forbidden)\n"
    )
    assert "    HostName box\n" in config.read_text()


def test_ssh_config_writes_the_url_of_the_deployment_record(run: Run, tmp_path: Path) -> None:
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    url = f"http://127.0.0.1:{free_port()}/api/"
    (deployed / "dev.json").write_text(json.dumps({"resources": [
        {"name": "rest_api", "resource_type": "rest_api", "rest_api_url": url}], "schema_version": "2.0"}))
    config = tmp_path / "config"

    code, out, err = run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com")

    assert code == 0, err
    assert out.splitlines()[0] == f"API URL {url} (from {deployed / 'dev.json'}): written into the ProxyCommand"
    assert f"--url {url}\n" in config.read_text()


@pytest.mark.parametrize("argv, written", [([], None), (["--idle-cooldown", "60"], None),
                                           (["--idle-cooldown", "15"], "15"), (["--idle-cooldown", "0"], "0"),
                                           (["--idle-cooldown", "90.5"], "90.5")])
def test_ssh_config_writes_the_idle_cooldown_only_when_not_the_default(
    run: Run, tmp_path: Path, argv: List[str], written: Optional[str]
) -> None:
    config = tmp_path / "config"

    code, out, err = run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com", *argv)

    assert code == 0, err
    proxy_line = next(line for line in config.read_text().splitlines() if "ProxyCommand" in line)
    if written is None:
        assert "--idle-cooldown" not in proxy_line
    else:
        assert proxy_line.endswith(f" proxy --port 22 --idle-cooldown {written}")


def test_ssh_config_twice_reports_up_to_date(run: Run, tmp_path: Path) -> None:
    config = tmp_path / "config"
    run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com")

    code, out, _ = run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com")

    assert code == 0
    assert out.splitlines() == [
        "no API URL found: the proxy looks for one each time ssh runs it ($DEVBOX_URL, else"
        " .chalice/deployed/dev.json in or above the folder ssh runs in)",
        f"{config}: the Host devbox block is up to date",
    ]


# --- delegated commands --------------------------------------------------------------------------------


def test_a_missing_delegated_module_is_one_clear_error(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.DELEGATED, "deploy", ("devbox.not_here", "add_deploy_arguments", "run_deploy", "deploy"))

    code, _, err = run("deploy")

    assert code == api.EXIT_FAILURE
    assert err == "devbox: `devbox deploy` is not available in this installation (devbox.not_here is missing)\n"


def test_other_commands_do_not_import_the_delegated_modules() -> None:
    probe = (
        "import sys; from devbox.cli import build_parser, _requested_command; "
        "build_parser(_requested_command(['--url', 'local', 'status'])); "
        "print(sorted(m for m in sys.modules if m in ('devbox.local', 'devbox.deploy', 'boto3', 'requests')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=20,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert result.stdout.strip() == "[]", result.stderr


def test_the_requested_command_skips_option_values() -> None:
    assert cli._requested_command(["--profile", "local", "deploy", "--x"]) == "deploy"
    assert cli._requested_command(["--region=eu-west-1", "local"]) == "local"
    assert cli._requested_command(["-h"]) is None


# --- waiting (devbox.progress) ----------------------------------------------------------------------------


class Clock:
    """Time that passes only when something sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Script:
    """A status source answering a list of documents (or raising errors) in turn; the last repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def status(self) -> Dict[str, Any]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)


class FakeSocket:
    def __init__(self) -> None:
        self.closed = False
        self.timeout: Optional[float] = 1.0

    def close(self) -> None:
        self.closed = True

    def settimeout(self, value: Optional[float]) -> None:
        self.timeout = value


def waiting(clock: Clock, interactive: bool = False, quiet: bool = False) -> Tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    return Progress(stream, interactive=interactive, quiet_until_waiting=quiet, sleep=clock.sleep, clock=clock), stream


def accept(*_: Any, **__: Any) -> Any:
    """A connect function that always succeeds."""
    return FakeSocket()


def refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("not expected to be called")


def test_dns_step_waits_until_the_managed_name_points_at_the_new_ip() -> None:
    clock = Clock()
    progress, stream = waiting(clock)
    answers = [[(2, 1, 6, "", ("198.51.100.1", 0))], [(2, 1, 6, "", ("203.0.113.10", 0))]]
    asked: List[str] = []

    def resolve(name: str, port: Any, type: int = 0) -> Any:
        asked.append(name)
        return answers.pop(0)

    ready = wait_until_ready(Script(status_doc(dns_name="devbox.example.com")), WaitOptions(poll_interval=2),
                             progress, resolve=resolve, connect=accept, clock=clock)

    assert ready.host == "203.0.113.10"
    assert asked == ["devbox.example.com", "devbox.example.com"]
    assert stream.getvalue().splitlines()[1:] == [
        "devbox: waiting: DNS record devbox.example.com -> 203.0.113.10",
        "devbox: DNS record in place (devbox.example.com -> 203.0.113.10)",
        "devbox: SSH port reachable (203.0.113.10:22)",
    ]


@pytest.mark.parametrize("dns_name", ["ec2-203-0-113-10.compute-1.amazonaws.com", "203.0.113.10", None])
def test_names_that_are_not_a_managed_domain_skip_the_dns_step(dns_name: Optional[str]) -> None:
    clock = Clock()
    progress, _ = waiting(clock)

    ready = wait_until_ready(Script(status_doc(dns_name=dns_name)), WaitOptions(), progress,
                             resolve=refuse, connect=accept, clock=clock)

    assert ready.status["state"] == "running"


def test_ssh_probe_retries_until_the_port_accepts_and_closes_its_socket() -> None:
    clock = Clock()
    progress, stream = waiting(clock)
    attempts: List[Tuple[str, int]] = []
    opened = FakeSocket()

    def connect(address: Tuple[str, int], timeout: float) -> Any:
        attempts.append(address)
        if len(attempts) < 3:
            raise TimeoutError("timed out")
        return opened

    ready = wait_until_ready(Script(status_doc()), WaitOptions(ssh_port=2222, poll_interval=2), progress,
                             connect=connect, clock=clock)

    assert attempts == [("203.0.113.10", 2222)] * 3
    assert opened.closed and ready.connection is None
    assert "devbox: waiting: SSH port 203.0.113.10:2222" in stream.getvalue()
    assert clock.now == 1004.0


def test_kept_connection_is_handed_over_blocking() -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    opened = FakeSocket()

    def connect(*_: Any, **__: Any) -> Any:
        return opened

    ready = wait_until_ready(Script(status_doc()), WaitOptions(host_override="127.0.0.1"), progress,
                             keep_connection=True, resolve=refuse, connect=connect, clock=clock)

    assert ready.connection is opened and ready.host == "127.0.0.1"
    assert not opened.closed and opened.timeout is None


def test_passing_status_failures_are_retried_a_few_times() -> None:
    clock = Clock()
    progress, stream = waiting(clock)
    hiccup = ApiError("the devbox API failed (HTTP 502): hiccup", api.EXIT_FAILURE, status=502)
    source = Script(hiccup, hiccup, status_doc())

    wait_until_ready(source, WaitOptions(), progress, connect=accept, clock=clock)

    assert source.calls == 3
    assert "status unavailable, retrying" in stream.getvalue()


def test_lasting_or_permanent_status_failures_end_the_wait() -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    hiccup = ApiError("the devbox API failed (HTTP 502): hiccup", api.EXIT_FAILURE, status=502)

    with pytest.raises(ApiError):
        wait_until_ready(Script(hiccup), WaitOptions(), progress, clock=clock)
    with pytest.raises(ApiError):
        wait_until_ready(Script(ApiError("denied", api.EXIT_AUTH, status=403)), WaitOptions(), progress, clock=clock)
    assert MAX_STATUS_FAILURES >= 1


def test_a_box_that_stops_again_while_starting_ends_the_wait() -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(status_doc(state="pending"), status_doc(state="stopped"))

    with pytest.raises(CliError) as caught:
        wait_until_ready(source, WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert "stopped again" in caught.value.message


def test_a_still_stopped_box_right_after_start_is_waited_for() -> None:
    # EC2's describe calls lag a moment behind StartInstances.
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(status_doc(state="stopped"), status_doc(state="pending"), status_doc())

    ready = wait_until_ready(source, WaitOptions(ssh_probe=False), progress, clock=clock)

    assert ready.status["state"] == "running"


def test_a_terminated_box_ends_the_wait_at_once() -> None:
    clock = Clock()
    progress, _ = waiting(clock)

    with pytest.raises(CliError) as caught:
        wait_until_stopped(Script(status_doc(state="terminated")), WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT


def test_terminal_progress_redraws_one_line_and_clears_it() -> None:
    clock = Clock()
    progress, stream = waiting(clock, interactive=True)

    with progress:
        wait_until_stopped(Script(status_doc(state="stopping"), status_doc(state="stopped")),
                           WaitOptions(poll_interval=0.5), progress, clock=clock)

    output = stream.getvalue()
    assert output.count("\r\x1b[Kdevbox: ") >= 5  # redrawn while the spinner turns
    assert "instance i-0123456789abcdef0 stopping (0s)" in output
    assert output.endswith("devbox: instance i-0123456789abcdef0 stopped\n")


def test_proxy_progress_says_nothing_when_nothing_was_waited_for() -> None:
    clock = Clock()
    progress, stream = waiting(clock, quiet=True)

    wait_until_ready(Script(status_doc()), WaitOptions(), progress, connect=accept, clock=clock)

    assert stream.getvalue() == ""
