"""Tests of infra/idle/devbox-idle-watch, the on-instance auto-stop watcher, with recorded `ss` and `ps` output."""
import argparse
import importlib.machinery
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
import yaml

from devbox.deploy import add_deploy_arguments, template_parameters
from devbox.stack import TEMPLATE_PATH

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "idle" / "devbox-idle-watch"
SS = Path(__file__).resolve().parent / "fixtures" / "ss"
PS = Path(__file__).resolve().parent / "fixtures" / "idle"
NOW = 1_750_000_000.0
HOUR = 3600.0
MINUTE = 60.0


def _load_watch() -> ModuleType:
    """Import the suffix-less script as a module."""
    loader = importlib.machinery.SourceFileLoader("devbox_idle_watch", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves string annotations through sys.modules.
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


watch = _load_watch()


def ss(name: str) -> str:
    return (SS / f"{name}.txt").read_text()


def ps(name: str) -> str:
    return (PS / f"{name}.txt").read_text()


def config(**settings: str) -> "watch.Config":
    loaded, problems = watch.load_config(settings)
    assert problems == ()
    return loaded


def decide(
    tcp: str = "tcp-none",
    processes: str = "ps-box-no-mosh",
    uptime: float = 2 * HOUR,
    last_active: Optional[float] = None,
    now: float = NOW,
    **settings: str,
) -> "watch.Decision":
    return watch.decide(now, uptime, ss(tcp), watch.parse_ps(ps(processes)), last_active, config(**settings))


# --- what counts as a session -------------------------------------------------------------------


def test_established_ssh_session_from_ipv4_peer_is_activity() -> None:
    decision = decide(tcp="tcp-ssh-ipv4", last_active=NOW - HOUR)
    assert decision.action == "active"
    assert decision.last_active == NOW
    assert decision.record
    assert "1 ssh" in decision.reason


def test_ssh_sessions_from_ipv6_and_ipv4_mapped_peers_are_activity() -> None:
    decision = decide(tcp="tcp-ssh-ipv6")
    assert decision.action == "active"
    assert "2 ssh" in decision.reason


def test_session_on_the_configured_ssh_port_is_activity() -> None:
    assert decide(tcp="tcp-ssh-port-2222", SSH_PORT="2222").action == "active"


def test_session_on_another_port_than_the_configured_one_is_not_activity() -> None:
    assert decide(tcp="tcp-ssh-port-2222", SSH_PORT="22").action == "poweroff"


@pytest.mark.parametrize("tcp", ["tcp-listening", "tcp-all-listen-only"])
def test_listening_ssh_socket_is_not_activity(tcp: str) -> None:
    assert decide(tcp=tcp).action == "poweroff"


def test_ssh_connection_left_in_time_wait_is_not_activity() -> None:
    assert decide(tcp="tcp-all-closed-session").action == "poweroff"


def test_connections_to_other_ports_and_outbound_ssh_are_not_activity() -> None:
    assert decide(tcp="tcp-other-ports").action == "poweroff"


def test_mosh_server_of_a_login_user_is_activity() -> None:
    decision = decide(processes="ps-box-mosh", last_active=NOW - HOUR)
    assert decision.action == "active"
    assert decision.reason == "0 ssh connection(s), 1 mosh-server process(es)"


def test_mosh_server_of_root_a_system_account_or_nobody_is_not_activity() -> None:
    decision = decide(processes="ps-mosh-server-not-login-user")
    assert decision.action == "poweroff"
    assert "mosh" not in decision.reason


def test_mosh_client_and_lookalike_names_are_not_activity() -> None:
    assert decide(processes="ps-mosh-lookalikes").action == "poweroff"


def test_box_with_daemons_and_a_logged_out_user_is_idle() -> None:
    assert decide(processes="ps-box-no-mosh").action == "poweroff"


@pytest.mark.parametrize(
    "output",
    ["0 0 172.31.20.5:ssh 203.0.113.7:51234", "0 0 172.31.20.5:22", "tcp ESTAB x 0 0 172.31.20.5:22 1.2.3.4:5",
     "0 0 172.31.20.5:²² 203.0.113.7:51234"],
)
def test_unreadable_ss_line_is_an_error_not_idleness(output: str) -> None:
    with pytest.raises(ValueError, match="unexpected ss line"):
        watch.decide(NOW, 2 * HOUR, output, [], None, watch.Config())


def test_ss_header_and_netid_columns_are_understood() -> None:
    output = (
        "Netid State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n"
        "tcp   ESTAB  0      0        172.31.20.5:22    203.0.113.7:51234\n"
    )
    assert watch.parse_ss(output) == [("ESTAB", 22, 51234)]


def test_ps_lines_give_uid_and_the_whole_command_name() -> None:
    assert watch.parse_ps("    0 systemd\n\n 1000 tmux: server\n65534 mosh-server\n") == [
        (0, "systemd"), (1000, "tmux: server"), (65534, "mosh-server")]


@pytest.mark.parametrize("output", ["root mosh-server\n", " 1000mosh-server\n", "-1 mosh-server\n", "¹⁰⁰⁰ mosh-server\n"])
def test_unreadable_ps_line_is_an_error_not_idleness(output: str) -> None:
    with pytest.raises(ValueError, match="unexpected ps line"):
        watch.parse_ps(output)


# --- timing -------------------------------------------------------------------------------------


def test_no_poweroff_during_boot_grace_even_when_idle() -> None:
    decision = decide(uptime=29 * 60, IDLE_MINUTES="10", GRACE_MINUTES="30")
    assert decision.action == "grace"
    assert not decision.poweroff


def test_poweroff_once_boot_grace_is_over() -> None:
    assert decide(uptime=30 * 60, IDLE_MINUTES="10", GRACE_MINUTES="30").action == "poweroff"


def test_grace_defaults_to_idle_minutes() -> None:
    assert config(IDLE_MINUTES="45").grace_minutes == 45
    assert decide(uptime=44 * 60, IDLE_MINUTES="45").action == "grace"


def test_poweroff_exactly_at_idle_threshold() -> None:
    decision = decide(last_active=NOW - 30 * 60)
    assert decision.action == "poweroff"
    assert decision.idle_seconds == 30 * 60


def test_no_poweroff_one_second_before_idle_threshold() -> None:
    decision = decide(last_active=NOW - 30 * 60 + 1)
    assert decision.action == "idle"
    assert not decision.poweroff
    assert not decision.record


def test_activity_resets_the_idle_clock() -> None:
    session = decide(tcp="tcp-ssh-ipv4", last_active=NOW - HOUR)
    later = decide(last_active=session.last_active, now=NOW + 20 * 60)
    assert later.action == "idle"
    assert later.idle_seconds == 20 * 60
    assert decide(last_active=session.last_active, now=NOW + 30 * 60).action == "poweroff"


def test_missing_state_counts_idle_time_from_boot() -> None:
    assert decide(uptime=40 * 60, last_active=None).idle_seconds == 40 * 60
    assert decide(uptime=31 * 60, last_active=None, IDLE_MINUTES="40", GRACE_MINUTES="0").action == "idle"


def test_activity_recorded_before_a_stop_counts_from_this_boot() -> None:
    # The state file survives stop/start; last week's session must not stop a box booted 10 minutes ago.
    decision = decide(uptime=10 * 60, last_active=NOW - 7 * 24 * HOUR, GRACE_MINUTES="0")
    assert decision.action == "idle"
    assert decision.idle_seconds == 10 * 60
    # The boot is recorded as the start of the idle period, so later runs count from the same second.
    assert (decision.record, decision.last_active) == (True, NOW - 10 * 60)


def test_boot_recorded_as_the_idle_start_is_used_as_it_is() -> None:
    # /proc/uptime and the clock are read apart: the boot they give moves a little from run to run.
    decision = decide(uptime=10 * 60 + 0.3, last_active=NOW - 10 * 60, GRACE_MINUTES="0")
    assert (decision.last_active, decision.record) == (NOW - 10 * 60, False)


def test_activity_time_in_the_future_counts_from_now_and_is_recorded() -> None:
    decision = decide(last_active=NOW + 7 * 24 * HOUR)
    assert decision.action == "idle"
    assert decision.idle_seconds == 0
    assert decision.last_active == NOW
    assert decision.record
    assert decision.reason == "idle 0.0 min, limit 30 min; recorded activity was 10080.0 min in the future, counting from now"


def test_activity_time_in_the_future_during_boot_grace_is_recorded_too() -> None:
    decision = decide(uptime=5 * 60, last_active=NOW + HOUR)
    assert decision.action == "grace"
    assert (decision.last_active, decision.record) == (NOW, True)


def test_idle_minutes_zero_disables_auto_stop() -> None:
    assert decide(uptime=100 * HOUR, IDLE_MINUTES="0").action == "disabled"


# --- configuration and state file ----------------------------------------------------------------


def test_defaults_when_environment_is_empty_or_blank() -> None:
    assert watch.load_config({}) == (watch.Config(), ()) == (watch.Config(30, 22, 30, False), ())
    assert watch.load_config({"IDLE_MINUTES": "", "SSH_PORT": " "}) == (watch.Config(30, 22, 30, False), ())


def test_whole_minutes_port_and_dry_run_are_read() -> None:
    settings = {"IDLE_MINUTES": " 45 ", "SSH_PORT": "2222", "GRACE_MINUTES": "5", "DRY_RUN": "Yes"}
    assert watch.load_config(settings) == (watch.Config(45, 2222, 5, True), ())
    assert watch.load_config({"IDLE_MINUTES": "10080", "DRY_RUN": "0"}) == (watch.Config(10080, 22, 10080, False), ())


@pytest.mark.parametrize("value", ["1.5", "²", "٣", "1e3", "-5", "+30", "30 min", "10081", "${IdleMinutes}",
                                   "9" * 5000])
def test_malformed_idle_minutes_is_reported_and_the_default_used(value: str) -> None:
    loaded, problems = watch.load_config({"IDLE_MINUTES": value})
    assert loaded == watch.Config(30, 22, 30, False)
    assert len(problems) == 1
    assert problems[0].startswith("IDLE_MINUTES must be a whole number from 0 to 10080, not ")
    assert problems[0].endswith("; using 30")
    assert len(problems[0]) < 150  # a long value is cut short in the journal


@pytest.mark.parametrize("name, value, expected", [("SSH_PORT", "0", watch.Config(ssh_port=22)),
                                                    ("SSH_PORT", "70000", watch.Config(ssh_port=22)),
                                                    ("SSH_PORT", "２２", watch.Config(ssh_port=22)),
                                                    ("GRACE_MINUTES", "-5", watch.Config(grace_minutes=30))])
def test_malformed_port_or_grace_is_reported_and_the_default_used(name: str, value: str,
                                                                  expected: "watch.Config") -> None:
    loaded, problems = watch.load_config({name: value})
    assert loaded == expected
    assert [p.split(" must ")[0] for p in problems] == [name]


def test_grace_falls_back_to_the_idle_minutes_in_use() -> None:
    loaded, problems = watch.load_config({"IDLE_MINUTES": "15", "GRACE_MINUTES": "0.5"})
    assert loaded.grace_minutes == 15
    assert problems == ("GRACE_MINUTES must be a whole number from 0 to 10080, not '0.5'; using 15",)


def test_unknown_dry_run_value_is_reported_and_auto_stop_stays_on() -> None:
    loaded, problems = watch.load_config({"DRY_RUN": "maybe"})
    assert not loaded.dry_run
    assert problems == ("DRY_RUN must be one of 1, true, yes, 0, false, no, not 'maybe'; using 0",)


def test_missing_state_file_reads_as_unknown(tmp_path: Path) -> None:
    assert watch.read_last_active(tmp_path / "last-active") is None


@pytest.mark.parametrize("content", ["", "yesterday\n", "nan\n", "inf\n", "\x00\x00"])
def test_corrupt_state_file_reads_as_unknown(tmp_path: Path, content: str) -> None:
    state = tmp_path / "last-active"
    state.write_text(content)
    assert watch.read_last_active(state) is None


def test_recorded_activity_time_reads_back(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "devbox-idle" / "last-active"
    watch.write_last_active(state, NOW)
    assert watch.read_last_active(state) == NOW
    assert [p.name for p in state.parent.iterdir()] == ["last-active"]


def test_recorded_activity_time_is_never_rounded_into_the_future(tmp_path: Path) -> None:
    state = tmp_path / "last-active"
    watch.write_last_active(state, NOW + 0.9)
    assert watch.read_last_active(state) == NOW


# --- the template's IdleMinutes parameter ---------------------------------------------------------


@pytest.fixture(scope="module")
def idle_minutes_parameter() -> Dict[str, str]:
    parameter: Dict[str, str] = yaml.safe_load(TEMPLATE_PATH.read_text())["Parameters"]["IdleMinutes"]
    return parameter


def template_allows(parameter: Dict[str, str], value: str) -> bool:
    # CloudFormation matches AllowedPattern against the whole value (Java regex; this one reads the same in Python).
    return re.fullmatch(parameter["AllowedPattern"], value) is not None


@pytest.mark.parametrize("value", ["1.5", "²", "٣", "1e3", "-1", "+30", "030", "", " 30", "10081", "99999"])
def test_template_refuses_idle_minutes_the_watcher_cannot_use(idle_minutes_parameter: Dict[str, str],
                                                              value: str) -> None:
    assert idle_minutes_parameter["Type"] == "String"
    assert not template_allows(idle_minutes_parameter, value)
    assert "whole number of minutes from 0 to 10080" in idle_minutes_parameter["ConstraintDescription"]


def test_every_idle_minutes_the_template_allows_the_watcher_takes_as_is(idle_minutes_parameter: Dict[str, str]) -> None:
    assert template_allows(idle_minutes_parameter, idle_minutes_parameter["Default"])
    allowed = [str(n) for n in range(0, 20000) if template_allows(idle_minutes_parameter, str(n))]
    assert allowed == [str(n) for n in range(0, watch.IDLE_MINUTES_MAX + 1)]
    for value in allowed:
        assert watch.load_config({"IDLE_MINUTES": value}) == (watch.Config(int(value), 22, int(value), False), ())


@pytest.mark.parametrize("minutes", ["0", "45", "10080"])
def test_devbox_deploy_idle_minutes_fits_the_template(idle_minutes_parameter: Dict[str, str], minutes: str) -> None:
    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    parameters = template_parameters(parser.parse_args(["--idle-minutes", minutes]))
    assert template_allows(idle_minutes_parameter, parameters["IdleMinutes"])


# --- main(): the I/O around decide() ------------------------------------------------------------


class Box:
    """A fake instance: uptime, recorded ss, ps and load, devbox-keep's folder and the state in tmp_path.

    The tags it would write and the commands it would run (wall, poweroff) are recorded instead.
    """

    def __init__(self, tmp_path: Path, uptime: float = 2 * HOUR) -> None:
        self.root = tmp_path
        self.state = tmp_path / "state" / "last-active"
        self.notices = self.state.with_name("notices.json")
        self.keep_dir = tmp_path / "keep"
        self.uptime = tmp_path / "uptime"
        self.boot = NOW - uptime
        self.uptime.write_text(f"{uptime:.2f} 12345.67\n")
        self.commands: List[List[str]] = []
        self.tags: List[str] = []
        self.tag_error: Optional[str] = None

    def run(self, command: Sequence[str]) -> None:
        self.commands.append(list(command))

    def tag(self, value: str) -> None:
        if self.tag_error:
            raise watch.TagError(self.tag_error)
        self.tags.append(value)

    @property
    def walls(self) -> List[str]:
        return [command[1] for command in self.commands if command[0] == "wall"]

    @property
    def poweroffs(self) -> int:
        return self.commands.count(watch.POWEROFF)

    def args(self, tcp: str = "tcp-none", processes: Optional[str] = "ps-box-no-mosh",
             load: str = "loadavg-quiet") -> List[str]:
        """Command-line arguments; processes=None lists the real processes with ps."""
        recorded = [] if processes is None else ["--ps-file", str(PS / f"{processes}.txt")]
        return ["--state-file", str(self.state), "--uptime-file", str(self.uptime),
                "--ss-tcp-file", str(SS / f"{tcp}.txt"), *recorded, "--loadavg-file", str(PS / f"{load}.txt"),
                "--keep-dir", str(self.keep_dir)]

    def main(self, now: float = NOW, env: Optional[Dict[str, str]] = None, tcp: str = "tcp-none",
             processes: Optional[str] = "ps-box-no-mosh", load: str = "loadavg-quiet") -> int:
        """One run of the watcher at `now`; the uptime goes on with the clock."""
        self.uptime.write_text(f"{now - self.boot:.2f} 12345.67\n")
        return int(watch.main(self.args(tcp, processes, load), env or {}, runner=self.run, clock=lambda: now,
                              tagger=self.tag))


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def test_idle_box_runs_the_poweroff_command(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    assert box.main() == 0
    assert box.commands == [["systemctl", "poweroff"]]
    assert "poweroff: idle 120.0 min" in capsys.readouterr().out


def test_dry_run_prints_the_decision_and_does_not_power_off(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    assert box.main(env={"DRY_RUN": "1"}) == 0
    assert box.commands == []
    assert capsys.readouterr().out.startswith("dry run: poweroff: idle 120.0 min")


def test_session_is_recorded_and_keeps_the_box_up_in_later_runs(box: Box) -> None:
    assert box.main(tcp="tcp-ssh-ipv4") == 0
    assert watch.read_last_active(box.state) == NOW
    assert box.main(now=NOW + 29 * 60) == 0
    assert box.poweroffs == 0
    assert box.main(now=NOW + 30 * 60) == 0
    assert box.poweroffs == 1


def test_mosh_session_is_recorded_and_the_box_stops_idle_minutes_after_it_ends(box: Box) -> None:
    assert box.main(processes="ps-box-mosh") == 0
    assert watch.read_last_active(box.state) == NOW
    assert box.main(now=NOW + 29 * 60, processes="ps-box-no-mosh") == 0
    assert box.poweroffs == 0
    assert box.main(now=NOW + 30 * 60, processes="ps-box-no-mosh") == 0
    assert box.poweroffs == 1


def test_future_activity_time_stops_the_box_idle_minutes_from_now_not_from_then(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    box.state.parent.mkdir()
    box.state.write_text(f"{NOW + 7 * 24 * HOUR:.0f}\n")  # a week ahead
    for minute in range(30):  # the timer's runs, one a minute
        assert box.main(now=NOW + minute * MINUTE) == 0
    assert box.poweroffs == 0
    assert watch.read_last_active(box.state) == NOW
    assert "recorded activity was 10080.0 min in the future, counting from now" in capsys.readouterr().out
    assert box.main(now=NOW + 30 * MINUTE) == 0
    assert box.poweroffs == 1


def test_corrupt_state_file_does_not_stop_the_watcher(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    box.state.parent.mkdir()
    box.state.write_text("garbage")
    assert box.main(tcp="tcp-ssh-ipv4") == 0
    assert watch.read_last_active(box.state) == NOW
    assert "ignoring bad state file" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "²", "soon"])
def test_malformed_idle_minutes_is_reported_and_an_idle_box_still_stops(
    box: Box, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    assert box.main(env={"IDLE_MINUTES": value}) == 0
    assert box.commands == [["systemctl", "poweroff"]]
    out, err = capsys.readouterr()
    assert err == f"devbox-idle: IDLE_MINUTES must be a whole number from 0 to 10080, not {value!r}; using 30\n"
    assert out.startswith("poweroff: idle 120.0 min, limit 30 min")


def test_malformed_idle_minutes_uses_the_default_not_zero(box: Box) -> None:
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4", env={"IDLE_MINUTES": "1.5"}) == 0
    assert box.main(now=NOW + 29 * MINUTE, env={"IDLE_MINUTES": "1.5"}) == 0
    assert box.poweroffs == 0
    assert box.main(now=NOW + 30 * MINUTE, env={"IDLE_MINUTES": "1.5"}) == 0
    assert box.poweroffs == 1


def test_unreadable_activity_keeps_the_box_up(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    bad = box.root / "bad.txt"
    bad.write_text("0 0 172.31.20.5:ssh 203.0.113.7:51234\n")
    assert watch.main(box.args() + ["--ss-tcp-file", str(bad)], {}, runner=box.run, clock=lambda: NOW) == 1
    assert box.commands == []
    assert "staying up" in capsys.readouterr().err


def test_unreadable_process_list_keeps_the_box_up(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    bad = box.root / "ps.txt"
    bad.write_text("root mosh-server\n")
    assert watch.main(box.args() + ["--ps-file", str(bad)], {}, runner=box.run, clock=lambda: NOW) == 1
    assert box.commands == []
    assert "cannot tell if the box is in use, staying up: unexpected ps line" in capsys.readouterr().err


def test_failing_ss_or_ps_keeps_the_box_up(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(command: List[str], recorded: Optional[str]) -> str:
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(watch, "run_listing", broken)
    assert box.main() == 1
    assert box.commands == []


# --- the real `ss` and `ps` on this machine --------------------------------------------------------

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="iproute2's ss is not installed")
needs_ps = pytest.mark.skipif(shutil.which("ps") is None or not sys.platform.startswith("linux"),
                              reason="needs Linux and procps's ps")


@needs_ss
def test_real_ss_shows_an_established_connection_as_a_session() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)), server.accept()[0]:
            tcp = watch.run_listing(watch.SS_TCP, None)
    decision = watch.decide(NOW, 2 * HOUR, tcp, [], None, watch.Config(ssh_port=port))
    assert decision.action == "active"


def _udp_client_in_the_mosh_range() -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(60000, 61001):
        try:
            client.bind(("127.0.0.1", port))
        except OSError:
            continue
        client.connect(("127.0.0.1", 53))  # as a resolver's query socket would
        return client
    client.close()
    pytest.skip("no free UDP port in 60000-61000")


@needs_ps
def test_real_udp_client_socket_in_the_mosh_port_range_is_not_a_session(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    if any(name == "mosh-server" for _, name in watch.parse_ps(watch.run_listing(watch.PS, None))):
        pytest.skip("a real mosh-server runs on this machine")
    with _udp_client_in_the_mosh_range():
        assert box.main(env={"DRY_RUN": "1"}, processes=None) == 0
    assert capsys.readouterr().out.startswith("dry run: poweroff: idle 120.0 min")
    assert watch.read_last_active(box.state) == box.boot  # the boot, not a session now


@pytest.fixture
def mosh_server_of_a_login_user() -> Iterator[int]:
    """A process named mosh-server, as a login user's: uid 1000 when the tests run as root."""
    uid = 1000 if os.geteuid() == 0 else os.geteuid()
    if uid not in watch.LOGIN_UIDS:
        pytest.skip(f"uid {uid} is not a login user's")
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    # PR_SET_NAME (15) sets the name ps shows, as exec'ing a file called mosh-server would.
    code = ("import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'mosh-server', 0, 0, 0); "
            "print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([python, "-S", "-c", code], stdout=subprocess.PIPE, text=True,
                             user=uid if os.geteuid() == 0 else None, cwd="/")
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield uid
    finally:
        child.kill()
        child.wait()


@needs_ps
def test_real_ps_shows_a_login_users_mosh_server_as_a_session(
    box: Box, mosh_server_of_a_login_user: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (mosh_server_of_a_login_user, "mosh-server") in watch.parse_ps(watch.run_listing(watch.PS, None))
    assert box.main(env={"DRY_RUN": "1"}, processes=None) == 0
    assert capsys.readouterr().out.startswith("dry run: active: 0 ssh connection(s), ")
    assert watch.read_last_active(box.state) == NOW


# --- the script as systemd runs it ---------------------------------------------------------------


def run_script(box: Box, env: Dict[str, str], **files: str) -> "subprocess.CompletedProcess[str]":
    # -S: no site-packages, so only the standard library is importable, as on a fresh Ubuntu.
    return subprocess.run([sys.executable, "-S", str(SCRIPT), *box.args(**files)], env={"PATH": os.defpath, **env},
                          capture_output=True, text=True, timeout=30)


def test_script_is_an_executable_python3_program() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/python3\n")


def test_script_in_dry_run_prints_poweroff_for_an_idle_box(box: Box) -> None:
    box.state.parent.mkdir()
    box.state.write_text("1000\n")  # long before this boot
    result = run_script(box, {"DRY_RUN": "1", "IDLE_MINUTES": "30"}, tcp="tcp-other-ports")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: poweroff: idle 120.0 min, limit 30 min; would run systemctl poweroff")


def test_script_in_dry_run_sees_a_mosh_session(box: Box) -> None:
    result = run_script(box, {"DRY_RUN": "1"}, processes="ps-box-mosh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: active: 0 ssh connection(s), 1 mosh-server process(es)")
    assert box.state.exists()


@pytest.mark.parametrize("value", ["1.5", "²"])
def test_script_reports_a_malformed_setting_and_still_decides(box: Box, value: str) -> None:
    result = run_script(box, {"DRY_RUN": "1", "IDLE_MINUTES": value})
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"devbox-idle: IDLE_MINUTES must be a whole number from 0 to 10080, not {value!r}; using 30\n"
    assert result.stdout.startswith("dry run: poweroff: idle 120.0 min, limit 30 min")
