"""The proxy's reconnect guard (devbox.reconnect): a box stopped for idleness is restarted only on purpose.

The scripted clients are real processes: `devbox proxy`, and OpenSSH running it as its
ProxyCommand from the block `devbox ssh-config` wrote, each either without a controlling
terminal (a session of its own, as an IDE spawns ssh) or with a pseudo-terminal as its
controlling terminal (as when ssh is typed by hand).
"""
import io
import os
import pty
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from devbox import api, cli, reconnect
from devbox.api import CliError, DevboxApi
from devbox.progress import Progress, WaitOptions
from devbox.proxy import run_proxy
from devbox.reconnect import ReconnectGuard, age_text, plan_reconnect, record_start
from tests.test_api import FakeApi, client, fake_api, status_doc  # noqa: F401 (fixture)
from tests.test_proxy import BANNER, ROOT, SshLikeServer, child_env, sshd  # noqa: F401 (fixture)

NOW = datetime(2026, 11, 29, 12, 18, tzinfo=timezone.utc)
COOLDOWN = timedelta(minutes=60)
REFUSAL_END = ("; not restarting it for a background reconnect. Start it with `devbox start` (or ssh from a"
               " terminal)")
# Becomes the leader of a new session whose controlling terminal is the pty named by argv[1], then runs argv[2:].
WITH_TERMINAL = ("import fcntl, os, sys, termios; fd = os.open(sys.argv[1], os.O_RDWR);"
                 " fcntl.ioctl(fd, termios.TIOCSCTTY, 0); os.close(fd); os.execvp(sys.argv[2], sys.argv[2:])")
needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None,
                               reason="OpenSSH client missing: apt-get install -y openssh-client")


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def stopped_doc(by: Optional[str], at: Optional[datetime], **changes: Any) -> Dict[str, Any]:
    """The status of a stopped box, as the server answers since it says who stopped it."""
    reasons = {"idle": "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
               "user": "Client.UserInitiatedShutdown: User initiated shutdown",
               "max-runtime": "Client.UserInitiatedShutdown: User initiated shutdown",
               "spot": "Server.SpotInstanceShutdown: Server.SpotInstanceShutdown"}
    fields: Dict[str, Any] = {"state": "stopped", "public_ip": None, "dns_name": None, "launch_time": None,
                              "stopped_by": by, "stopped_at": stamp(at) if at else None,
                              "state_reason": reasons.get(by or ""), "idle": None, **changes}
    return status_doc(**fields)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def state_home(tmp_path: Path) -> Path:
    return tmp_path / "state"


def in_background(command: List[str], env: Dict[str, str], **options: Any) -> "subprocess.CompletedProcess[bytes]":
    """Run command as an IDE runs ssh: in a session of its own, without a controlling terminal."""
    return subprocess.run(command, env=env, capture_output=True, timeout=30, cwd=ROOT, start_new_session=True,
                          **options)


def in_a_terminal(command: List[str], env: Dict[str, str], **options: Any) -> "subprocess.CompletedProcess[bytes]":
    """Run command as a person typing it: a pseudo-terminal is its controlling terminal (stdio stay pipes)."""
    master, slave = pty.openpty()
    try:
        return subprocess.run([sys.executable, "-c", WITH_TERMINAL, os.ttyname(slave), *command], env=env,
                              capture_output=True, timeout=30, cwd=ROOT, start_new_session=True, **options)
    finally:
        os.close(slave)
        os.close(master)


def proxy_command(url: str, port: int, *options: str) -> List[str]:
    return [sys.executable, "-m", "devbox", "proxy", "--url", url, "--port", str(port), "--poll-interval", "0.01",
            "--host-override", "127.0.0.1", *options]


# --- the decision --------------------------------------------------------------------------------------


def test_a_box_stopped_for_idleness_minutes_ago_is_not_restarted_by_a_background_connect() -> None:
    plan = plan_reconnect(stopped_doc("idle", NOW - timedelta(minutes=14)), NOW, COOLDOWN)

    assert not plan.start
    assert plan.refusal == "the box stopped itself for idleness at 12:04 UTC (14 min ago)" + REFUSAL_END


def test_an_idle_stop_older_than_the_cooldown_may_be_restarted() -> None:
    assert plan_reconnect(stopped_doc("idle", NOW - timedelta(minutes=60)), NOW, COOLDOWN).start
    assert not plan_reconnect(stopped_doc("idle", NOW - timedelta(minutes=59)), NOW, COOLDOWN).start


@pytest.mark.parametrize("by", ["user", "max-runtime", "spot", None, "a later reason", 7])
def test_a_box_stopped_for_any_other_reason_is_started_as_before(by: Any) -> None:
    assert plan_reconnect(stopped_doc(by, NOW - timedelta(minutes=1)), NOW, COOLDOWN).start


@pytest.mark.parametrize("document", [status_doc(), status_doc(state="pending"), status_doc(state="none"),
                                      status_doc(state="stopping", stopped_by="idle")])
def test_a_box_that_is_not_stopped_is_started_as_before(document: Dict[str, Any]) -> None:
    assert plan_reconnect(document, NOW, COOLDOWN).start


@pytest.mark.parametrize("at, shown", [(None, "(time unknown)"), ("yesterday\x1b[2J", "at yesterday\\x1b[2J"),
                                       (["2026"], "at ['2026']")])
def test_an_idle_stop_of_unknown_time_counts_as_recent(at: Any, shown: str) -> None:
    plan = plan_reconnect(stopped_doc("idle", None, stopped_at=at), NOW, COOLDOWN)

    assert not plan.start
    assert plan.refusal == f"the box stopped itself for idleness {shown}" + REFUSAL_END


def test_an_idle_stop_of_another_day_is_shown_with_its_date() -> None:
    plan = plan_reconnect(stopped_doc("idle", NOW - timedelta(hours=13)), NOW, timedelta(days=1))

    assert plan.refusal == ("the box stopped itself for idleness at 2026-11-28 23:18 UTC (13 h 00 min ago)"
                            + REFUSAL_END)


def test_an_idle_stop_stamped_ahead_of_the_local_clock_is_just_now() -> None:
    plan = plan_reconnect(stopped_doc("idle", NOW + timedelta(minutes=3)), NOW, COOLDOWN)

    assert plan.refusal == "the box stopped itself for idleness at 12:21 UTC (just now)" + REFUSAL_END


@pytest.mark.parametrize("minutes, said", [(0.5, "just now"), (1, "1 min ago"), (119, "119 min ago"),
                                           (125, "2 h 05 min ago"), (3 * 1440, "3 days ago")])
def test_ages_read_as_a_person_says_them(minutes: float, said: str) -> None:
    assert age_text(timedelta(minutes=minutes)) == said


def guard(terminal: bool = False, started: Optional[datetime] = None, cooldown: float = 60) -> ReconnectGuard:
    return ReconnectGuard("https://api.example.com/api", cooldown, from_terminal=lambda: terminal,
                          started=lambda url: started, clock=lambda: NOW)


def idle_status(reads: List[int]) -> Any:
    def read() -> Dict[str, Any]:
        reads.append(1)
        return stopped_doc("idle", NOW - timedelta(minutes=5))
    return read


def test_a_connect_from_a_terminal_starts_the_box_without_reading_the_status() -> None:
    reads: List[int] = []

    plan = guard(terminal=True).check(idle_status(reads))

    assert (plan.start, plan.why, reads) == (True, "run from a terminal", [])


@pytest.mark.parametrize("ago, allowed", [(timedelta(minutes=2), True), (timedelta(minutes=59), True),
                                          (timedelta(minutes=61), False), (-timedelta(minutes=10), False)])
def test_a_devbox_start_within_the_cooldown_lets_a_background_connect_start_the_box(ago: timedelta,
                                                                                    allowed: bool) -> None:
    reads: List[int] = []

    plan = guard(started=NOW - ago).check(idle_status(reads))

    assert plan.start is allowed
    # A marker from the future (a clock that ran ahead) proves nothing.
    assert reads == ([] if allowed else [1])


def test_a_cooldown_of_zero_turns_the_guard_off() -> None:
    reads: List[int] = []

    plan = guard(cooldown=0).check(idle_status(reads))

    assert plan.start and reads == []


def test_the_guard_raises_the_refusal_as_a_conflict() -> None:
    with pytest.raises(CliError) as caught:
        guard().enforce(idle_status([]))

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message == "the box stopped itself for idleness at 12:13 UTC (5 min ago)" + REFUSAL_END


# --- the marker `devbox start` leaves -------------------------------------------------------------------


def test_the_marker_records_the_start_per_api(state_home: Path) -> None:
    environ = {"XDG_STATE_HOME": str(state_home)}

    record_start("https://a.example.com/api/", NOW, environ)

    assert reconnect.last_start("https://a.example.com/api", environ) == NOW
    assert reconnect.last_start("https://b.example.com/api", environ) is None
    assert reconnect.marker_path("https://a.example.com/api", environ).parent == state_home / "devbox"


def test_a_relative_state_home_is_ignored_as_xdg_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    path = reconnect.marker_path("https://a.example.com/api", {"XDG_STATE_HOME": "relative/state"})

    assert path.parent == tmp_path / ".local" / "state" / "devbox"


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\xff\xfe", b"2026-13-45T99:00:00Z x\n"])
def test_an_unreadable_marker_counts_as_no_start(state_home: Path, content: bytes) -> None:
    environ = {"XDG_STATE_HOME": str(state_home)}
    path = reconnect.marker_path("https://a.example.com/api", environ)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    assert reconnect.last_start("https://a.example.com/api", environ) is None


def test_a_marker_that_cannot_be_written_does_not_fail_the_start(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")

    record_start("https://a.example.com/api", NOW, {"XDG_STATE_HOME": str(blocked)})

    assert not (blocked / "devbox").exists()


def test_devbox_start_leaves_the_marker(fake_api: FakeApi, monkeypatch: pytest.MonkeyPatch, state_home: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    before = utc_now().replace(microsecond=0)

    assert cli.main(["start", "--url", fake_api.url]) == 0

    started = reconnect.last_start(fake_api.url.rstrip("/"))
    assert started is not None and before <= started <= utc_now()


def test_a_refused_start_leaves_no_marker(fake_api: FakeApi, monkeypatch: pytest.MonkeyPatch, state_home: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    fake_api.answer("POST", "/start", (503, {"Code": "InsufficientCapacity", "Message": "no capacity"}))

    assert cli.main(["start", "--url", fake_api.url]) == api.EXIT_UNAVAILABLE

    assert reconnect.last_start(fake_api.url) is None


# --- the terminal check, in real processes ----------------------------------------------------------------


PROBE = [sys.executable, "-c", "from devbox.reconnect import has_controlling_terminal as t; print(t())"]


def test_a_process_without_a_controlling_terminal_is_a_background_one() -> None:
    done = in_background(PROBE, child_env())

    assert done.stdout == b"False\n", done.stderr


def test_a_process_whose_controlling_terminal_is_a_pty_was_run_by_a_person() -> None:
    done = in_a_terminal(PROBE, child_env())

    assert done.stdout == b"True\n", done.stderr


# --- scripted clients reconnecting ------------------------------------------------------------------------


def test_a_reconnect_loop_starts_nothing_until_the_idle_stop_is_older_than_the_cooldown(
    fake_api: FakeApi, sshd: SshLikeServer
) -> None:
    stopped_at = NOW - timedelta(minutes=1)
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", stopped_at)))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    box = client(fake_api.url)
    clock = [NOW]
    reconnecting = ReconnectGuard(box.url, from_terminal=lambda: False, started=lambda url: None,
                                  clock=lambda: clock[0])
    options = WaitOptions(timeout=10, poll_interval=0.01, host_override="127.0.0.1", ssh_port=sshd.port)

    # Every 5 s for a minute, then every 5 s in the cooldown's last minute: never a /start.
    moments = [NOW + timedelta(seconds=5 * i) for i in range(12)]
    moments += [stopped_at + timedelta(minutes=59, seconds=5 * i) for i in range(11)]
    for moment in moments:
        clock[0] = moment
        with pytest.raises(CliError) as caught:
            run_proxy(box, options, Progress(stream=io.StringIO()), guard=reconnecting)
        assert caught.value.message.startswith("the box stopped itself for idleness at 12:17 UTC (")
    assert fake_api.calls() == ["GET /status"] * len(moments)

    # An hour after the idle stop, a reconnect is taken as someone coming back.
    clock[0] = stopped_at + COOLDOWN
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", stopped_at)), (200, status_doc()))
    assert relay_once(box, options, reconnecting) == BANNER + b"hello\n"
    assert fake_api.calls()[len(moments):] == ["GET /status", "POST /start", "GET /status"]


def relay_once(box: DevboxApi, options: WaitOptions, reconnecting: ReconnectGuard) -> bytes:
    """run_proxy in this process over pipes; what came back from the server."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    os.write(stdin_write, b"hello\n")
    os.close(stdin_write)
    try:
        assert run_proxy(box, options, Progress(stream=io.StringIO()), stdin_read, stdout_write,
                         guard=reconnecting) == 0
        with os.fdopen(stdout_read, "rb") as answer:
            return answer.read()
    finally:
        os.close(stdin_read)


def proxy_env(state_home: Path) -> Dict[str, str]:
    return child_env(XDG_STATE_HOME=str(state_home))


def test_the_refusal_is_one_line_saying_why_since_when_and_how_to_start(fake_api: FakeApi, state_home: Path) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=14))))

    done = in_background(proxy_command(fake_api.url, 22), proxy_env(state_home), input=b"")

    assert done.returncode == api.EXIT_CONFLICT
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("devbox: the box stopped itself for idleness at ")
    assert lines[0].endswith(" (14 min ago)" + REFUSAL_END)
    assert fake_api.calls() == ["GET /status"]


def test_a_proxy_run_from_a_terminal_starts_a_box_stopped_for_idleness(
    fake_api: FakeApi, sshd: SshLikeServer, state_home: Path
) -> None:
    # Read before /start, the first answer would refuse; the wait reads it as "not started yet".
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=3))),
                    (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    done = in_a_terminal(proxy_command(fake_api.url, sshd.port), proxy_env(state_home), input=b"hello\n")

    assert done.returncode == 0, done.stderr
    assert done.stdout == BANNER + b"hello\n"
    # No status read before /start: a person asked.
    assert fake_api.calls() == ["POST /start", "GET /status", "GET /status"]


def test_a_recent_devbox_start_lets_a_background_reconnect_start_the_box(
    fake_api: FakeApi, sshd: SshLikeServer, state_home: Path
) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=3))),
                    (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    record_start(fake_api.url, utc_now() - timedelta(minutes=30), {"XDG_STATE_HOME": str(state_home)})

    done = in_background(proxy_command(fake_api.url, sshd.port), proxy_env(state_home), input=b"hello\n")

    assert done.returncode == 0, done.stderr
    assert done.stdout == BANNER + b"hello\n"
    assert fake_api.calls() == ["POST /start", "GET /status", "GET /status"]


def test_an_idle_stop_older_than_the_cooldown_lets_a_background_reconnect_start_the_box(
    fake_api: FakeApi, sshd: SshLikeServer, state_home: Path
) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=31))),
                    (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    done = in_background(proxy_command(fake_api.url, sshd.port, "--idle-cooldown", "30"), proxy_env(state_home),
                         input=b"hello\n")

    assert done.returncode == 0, done.stderr
    assert fake_api.calls() == ["GET /status", "POST /start", "GET /status"]


@pytest.mark.parametrize("by", ["user", "max-runtime", "spot"])
def test_a_box_stopped_by_a_user_the_max_runtime_job_or_spot_is_started_by_a_background_reconnect(
    fake_api: FakeApi, sshd: SshLikeServer, state_home: Path, by: str
) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc(by, utc_now() - timedelta(minutes=2))), (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    done = in_background(proxy_command(fake_api.url, sshd.port), proxy_env(state_home), input=b"hello\n")

    assert done.returncode == 0, done.stderr
    assert done.stdout == BANNER + b"hello\n"
    assert fake_api.calls() == ["GET /status", "POST /start", "GET /status"]


def test_idle_cooldown_zero_starts_as_before_without_reading_the_status(
    fake_api: FakeApi, sshd: SshLikeServer, state_home: Path
) -> None:
    fake_api.answer("GET", "/status", (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    done = in_background(proxy_command(fake_api.url, sshd.port, "--idle-cooldown", "0"), proxy_env(state_home),
                         input=b"hello\n")

    assert done.returncode == 0, done.stderr
    assert fake_api.calls() == ["POST /start", "GET /status"]


@pytest.mark.parametrize("value", ["-1", "abc", "10081", "nan"])
def test_a_bad_idle_cooldown_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["proxy", "--url", "http://127.0.0.1:1/api", "--idle-cooldown", value]) == api.EXIT_USAGE
    assert "--idle-cooldown" in capsys.readouterr().err


# --- OpenSSH as the scripted client ------------------------------------------------------------------------


@pytest.fixture
def ssh_client(fake_api: FakeApi, state_home: Path, tmp_path: Path) -> Iterator["SshScript"]:
    server = SshLikeServer(mode="line")
    try:
        yield SshScript(fake_api, server, state_home, tmp_path)
    finally:
        server.close()


class SshScript:
    """`ssh -F <config from devbox ssh-config> devbox true`, run again and again like a reconnecting IDE."""

    def __init__(self, fake: FakeApi, server: SshLikeServer, state_home: Path, folder: Path) -> None:
        self.server = server
        self.config = folder / "ssh_config"
        self.env = child_env(XDG_STATE_HOME=str(state_home), DEVBOX_SSH_HOST_OVERRIDE="127.0.0.1")
        written = subprocess.run(
            [sys.executable, "-m", "devbox", "ssh-config", "--config", str(self.config), "--url", fake.url,
             "--port", str(server.port), "--hostname", "devbox.example.com"],
            capture_output=True, timeout=30, env=self.env, cwd=folder,
        )
        assert written.returncode == 0, written.stderr

    def command(self) -> List[str]:
        return ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "devbox", "true"]


@needs_ssh
def test_an_ide_reconnecting_every_few_seconds_after_an_idle_stop_starts_nothing(
    ssh_client: SshScript, fake_api: FakeApi
) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=3))))
    fake_api.answer("POST", "/start", (200, status_doc()))

    for attempt in range(4):
        if attempt:
            time.sleep(1)
        done = in_background(ssh_client.command(), ssh_client.env, stdin=subprocess.DEVNULL)

        assert done.returncode == 255
        said = [line for line in done.stderr.decode().splitlines() if line.startswith("devbox: ")]
        assert len(said) == 1 and said[0].endswith(" (3 min ago)" + REFUSAL_END), done.stderr

    assert fake_api.calls() == ["GET /status"] * 4
    assert ssh_client.server.received == []


@needs_ssh
def test_the_same_ssh_typed_in_a_terminal_starts_the_box(ssh_client: SshScript, fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, stopped_doc("idle", utc_now() - timedelta(minutes=3))),
                    (200, status_doc()))
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    done = in_a_terminal(ssh_client.command(), ssh_client.env, stdin=subprocess.DEVNULL)

    # The fake server hangs up after ssh's banner: ssh fails, but only after talking through the proxy.
    assert done.returncode == 255
    assert fake_api.calls()[0] == "POST /start"
    assert ssh_client.server.received and ssh_client.server.received[0].startswith(b"SSH-2.0-OpenSSH")
