"""Tests of infra/idle/devbox-idle-watch, the on-instance auto-stop watcher, with recorded `ss` output."""
import importlib.machinery
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "idle" / "devbox-idle-watch"
SS = Path(__file__).resolve().parent / "fixtures" / "ss"
NOW = 1_750_000_000.0
HOUR = 3600.0


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


def decide(
    tcp: str = "tcp-none",
    udp: str = "udp-no-mosh",
    processes: Sequence[str] = ("systemd", "sshd", "bash"),
    uptime: float = 2 * HOUR,
    last_active: Optional[float] = None,
    now: float = NOW,
    **settings: str,
) -> "watch.Decision":
    return watch.decide(now, uptime, ss(tcp), ss(udp), processes, last_active, watch.load_config(settings))


# --- what counts as a session -------------------------------------------------------------------


def test_established_ssh_session_from_ipv4_peer_is_activity() -> None:
    decision = decide(tcp="tcp-ssh-ipv4", last_active=NOW - HOUR)
    assert decision.action == "active"
    assert decision.last_active == NOW
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


def test_mosh_udp_socket_is_activity() -> None:
    decision = decide(udp="udp-mosh")
    assert decision.action == "active"
    assert "1 mosh" in decision.reason


def test_udp_sockets_outside_the_mosh_range_are_not_activity() -> None:
    assert decide(udp="udp-no-mosh").action == "poweroff"


def test_running_mosh_server_process_is_activity() -> None:
    assert decide(processes=["systemd", "mosh-server", "bash"]).action == "active"


@pytest.mark.parametrize(
    "output",
    ["0 0 172.31.20.5:ssh 203.0.113.7:51234", "0 0 172.31.20.5:22", "tcp ESTAB x 0 0 172.31.20.5:22 1.2.3.4:5"],
)
def test_unreadable_ss_line_is_an_error_not_idleness(output: str) -> None:
    with pytest.raises(ValueError, match="unexpected ss line"):
        watch.decide(NOW, 2 * HOUR, output, "", [], None, watch.Config())


def test_ss_header_and_netid_columns_are_understood() -> None:
    output = (
        "Netid State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n"
        "tcp   ESTAB  0      0        172.31.20.5:22    203.0.113.7:51234\n"
    )
    assert watch.parse_ss(output) == [("ESTAB", 22, 51234)]


# --- timing -------------------------------------------------------------------------------------


def test_no_poweroff_during_boot_grace_even_when_idle() -> None:
    decision = decide(uptime=29 * 60, IDLE_MINUTES="10", GRACE_MINUTES="30")
    assert decision.action == "grace"
    assert not decision.poweroff


def test_poweroff_once_boot_grace_is_over() -> None:
    assert decide(uptime=30 * 60, IDLE_MINUTES="10", GRACE_MINUTES="30").action == "poweroff"


def test_grace_defaults_to_idle_minutes() -> None:
    config = watch.load_config({"IDLE_MINUTES": "45"})
    assert config.grace_minutes == 45
    assert decide(uptime=44 * 60, IDLE_MINUTES="45").action == "grace"


def test_poweroff_exactly_at_idle_threshold() -> None:
    decision = decide(last_active=NOW - 30 * 60)
    assert decision.action == "poweroff"
    assert decision.idle_seconds == 30 * 60


def test_no_poweroff_one_second_before_idle_threshold() -> None:
    decision = decide(last_active=NOW - 30 * 60 + 1)
    assert decision.action == "idle"
    assert not decision.poweroff


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


def test_activity_time_in_the_future_restarts_the_count() -> None:
    decision = decide(last_active=NOW + HOUR)
    assert decision.action == "idle"
    assert decision.idle_seconds == 0


def test_idle_minutes_zero_disables_auto_stop() -> None:
    assert decide(uptime=100 * HOUR, IDLE_MINUTES="0").action == "disabled"


# --- configuration and state file ----------------------------------------------------------------


def test_defaults_when_environment_is_empty_or_blank() -> None:
    assert watch.load_config({}) == watch.Config() == watch.Config(30, 22, 30, False)
    assert watch.load_config({"IDLE_MINUTES": "", "SSH_PORT": " "}) == watch.Config(30, 22, 30, False)


@pytest.mark.parametrize("name, value", [("IDLE_MINUTES", "thirty"), ("SSH_PORT", "0"), ("SSH_PORT", "70000"),
                                          ("GRACE_MINUTES", "-5"), ("IDLE_MINUTES", "${IdleMinutes}")])
def test_malformed_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(watch.ConfigError, match=name):
        watch.load_config({name: value})


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


def test_process_names_come_from_proc_comm(tmp_path: Path) -> None:
    for pid, name in (("1", "systemd"), ("4242", "mosh-server")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(name + "\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "7").mkdir()  # exited: no comm any more
    assert sorted(watch.list_processes(tmp_path)) == ["mosh-server", "systemd"]


# --- main(): the I/O around decide() ------------------------------------------------------------


class Box:
    """A fake instance: uptime, /proc, recorded ss output and a state file in tmp_path."""

    def __init__(self, tmp_path: Path, uptime: float = 2 * HOUR) -> None:
        self.root = tmp_path
        self.state = tmp_path / "state" / "last-active"
        self.uptime = tmp_path / "uptime"
        self.uptime.write_text(f"{uptime:.2f} 12345.67\n")
        self.proc = tmp_path / "proc"
        self.proc.mkdir()
        self.commands: List[List[str]] = []

    def run(self, command: Sequence[str]) -> None:
        self.commands.append(list(command))

    def args(self, tcp: str = "tcp-none", udp: str = "udp-no-mosh") -> List[str]:
        return ["--state-file", str(self.state), "--uptime-file", str(self.uptime), "--proc-dir", str(self.proc),
                "--ss-tcp-file", str(SS / f"{tcp}.txt"), "--ss-udp-file", str(SS / f"{udp}.txt")]

    def main(self, now: float = NOW, env: Optional[Dict[str, str]] = None, **files: str) -> int:
        return int(watch.main(self.args(**files), env or {}, runner=self.run, clock=lambda: now))


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
    assert box.commands == []
    assert box.main(now=NOW + 30 * 60) == 0
    assert box.commands == [["systemctl", "poweroff"]]


def test_corrupt_state_file_does_not_stop_the_watcher(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    box.state.parent.mkdir()
    box.state.write_text("garbage")
    assert box.main(tcp="tcp-ssh-ipv4") == 0
    assert watch.read_last_active(box.state) == NOW
    assert "ignoring bad state file" in capsys.readouterr().err


def test_malformed_setting_exits_without_powering_off(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    assert box.main(env={"IDLE_MINUTES": "soon"}) == 2
    assert box.commands == []
    assert "IDLE_MINUTES" in capsys.readouterr().err


def test_unreadable_activity_keeps_the_box_up(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    bad = box.root / "bad.txt"
    bad.write_text("0 0 172.31.20.5:ssh 203.0.113.7:51234\n")
    assert watch.main(box.args()[:-2] + ["--ss-udp-file", str(bad)], {}, runner=box.run, clock=lambda: NOW) == 1
    assert box.commands == []
    assert "staying up" in capsys.readouterr().err


def test_failing_ss_keeps_the_box_up(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_ss(command: List[str], recorded: Optional[str]) -> str:
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(watch, "run_ss", broken_ss)
    assert box.main() == 1
    assert box.commands == []


# --- the real `ss` on this machine -----------------------------------------------------------------

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="iproute2's ss is not installed")


@needs_ss
def test_real_ss_shows_an_established_connection_as_a_session() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)), server.accept()[0]:
            tcp = watch.run_ss(watch.SS_TCP, None)
    decision = watch.decide(NOW, 2 * HOUR, tcp, "", [], None, watch.Config(ssh_port=port))
    assert decision.action == "active"


@needs_ss
def test_real_ss_lists_an_unconnected_udp_socket_like_mosh_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mosh:
        for port in watch.MOSH_PORTS:
            try:
                mosh.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        udp = watch.run_ss(watch.SS_UDP, None)
    assert ("UNCONN", port, None) in watch.parse_ss(udp)


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
    result = run_script(box, {"DRY_RUN": "1"}, udp="udp-mosh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: active: 0 ssh connection(s), 1 mosh")
    assert box.state.exists()
