"""What else keeps the box up besides a session: a devbox-keep deadline, and load (a long build).

Recorded /proc/loadavg and keep files (tests/fixtures/idle), as the watcher's other tests record ss and ps.
"""
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

from tests.test_idle_watch import HOUR, MINUTE, NOW, PS, ROOT, SS, Box, watch

KEEP = ROOT / "infra" / "idle" / "devbox-keep"


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def loadavg(name: str) -> float:
    return watch.parse_loadavg((PS / f"{name}.txt").read_text())


def decide(load: Optional[str] = "loadavg-quiet", keeps: Sequence["watch.Keep"] = (),
           last_active: Optional[float] = None, now: float = NOW, tcp: str = "tcp-none",
           **settings: str) -> "watch.Decision":
    config, problems = watch.load_config(settings)
    assert problems == ()
    return watch.decide(now, 2 * HOUR, (SS / f"{tcp}.txt").read_text(), [], last_active, config,
                        None if load is None else loadavg(load), keeps)


def put_keep(box: Box, fixture: str, name: str = "alice", written: float = NOW) -> Path:
    """A devbox-keep file from the fixtures, written at `written`."""
    box.keep_dir.mkdir(exist_ok=True)
    path = box.keep_dir / name
    shutil.copyfile(PS / f"{fixture}.txt", path)
    os.utime(path, (written, written))
    return path


# --- load ------------------------------------------------------------------------------------------


def test_five_minute_load_is_read_from_proc_loadavg() -> None:
    assert loadavg("loadavg-build") == 3.61
    assert loadavg("loadavg-quiet") == 0.03


@pytest.mark.parametrize("text", ["", "0.08\n", "0.08 abc 0.01 1/1 1\n", "0.08 -1.00 0.01 1/1 1\n",
                                  "0.08 nan 0.01 1/1 1\n"])
def test_unreadable_loadavg_is_an_error_not_idleness(text: str) -> None:
    with pytest.raises(ValueError, match="unexpected loadavg"):
        watch.parse_loadavg(text)


def test_a_build_holding_the_load_above_the_threshold_keeps_the_box_busy() -> None:
    decision = decide(load="loadavg-build", last_active=NOW - 5 * HOUR)
    assert decision.action == "active"
    assert decision.record and decision.last_active == NOW
    assert decision.reason == "0 ssh connection(s), 0 mosh-server process(es), load 3.61 above 1"
    assert decision.tag == "busy: load above 1"


def test_load_at_the_threshold_or_below_is_not_busy() -> None:
    assert decide(load="loadavg-at-threshold").action == "poweroff"
    # The 1-minute figure is high, the 5-minute one below: a build just ended.
    assert decide(load="loadavg-build-ending").action == "poweroff"


def test_threshold_comes_from_the_setting_and_zero_turns_load_off() -> None:
    assert decide(load="loadavg-build", IDLE_LOAD_THRESHOLD="4").action == "poweroff"
    assert decide(load="loadavg-build", IDLE_LOAD_THRESHOLD="3.5").tag == "busy: load above 3.5"
    assert decide(load="loadavg-build", IDLE_LOAD_THRESHOLD="0").action == "poweroff"


def test_a_session_is_named_before_load_in_the_tag() -> None:
    decision = decide(load="loadavg-build", tcp="tcp-ssh-ipv4")
    assert decision.tag == "busy: ssh session"
    assert decision.reason.endswith(", load 3.61 above 1")


@pytest.mark.parametrize("value, expected", [("1.0", 1.0), ("0", 0.0), ("2.5", 2.5), ("0.75", 0.75), ("999.99", 999.99),
                                             ("", 1.0), (" 3 ", 3.0)])
def test_load_threshold_setting_is_read(value: str, expected: float) -> None:
    assert watch.load_config({"IDLE_LOAD_THRESHOLD": value}) == (watch.Config(load_threshold=expected), ())


@pytest.mark.parametrize("value", ["-1", "1e3", "1,5", "nan", "inf", "01.0", "1.", ".5", "1.234", "1000", "²",
                                   "${IdleLoadThreshold}"])
def test_malformed_load_threshold_is_reported_and_the_default_used(value: str) -> None:
    loaded, problems = watch.load_config({"IDLE_LOAD_THRESHOLD": value})
    assert loaded.load_threshold == 1.0
    assert len(problems) == 1
    assert problems[0].startswith("IDLE_LOAD_THRESHOLD must be a number from 0 to 999.99")
    assert problems[0].endswith("; using 1.0")


def test_a_long_build_keeps_the_box_up_and_it_stops_idle_minutes_after_the_load_falls(box: Box) -> None:
    for minute in range(0, 120, 10):  # two hours of build, nobody logged in
        assert box.main(now=NOW + minute * MINUTE, load="loadavg-build") == 0
    assert box.poweroffs == 0
    build_over = NOW + 110 * MINUTE
    assert watch.read_last_active(box.state) == build_over
    assert box.main(now=build_over + 29 * MINUTE, load="loadavg-build-ending") == 0
    assert box.poweroffs == 0
    assert box.main(now=build_over + 30 * MINUTE, load="loadavg-quiet") == 0
    assert box.poweroffs == 1


def test_unreadable_load_keeps_the_box_up(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "loadavg"
    bad.write_text("garbage\n")
    args = box.args() + ["--loadavg-file", str(bad)]
    assert watch.main(args, {}, runner=box.run, clock=lambda: NOW, tagger=box.tag) == 1
    assert box.commands == [] and box.tags == []
    assert "cannot tell if the box is in use, staying up: unexpected loadavg" in capsys.readouterr().err


def test_real_proc_loadavg_is_readable() -> None:
    if not Path("/proc/loadavg").exists():
        pytest.skip("no /proc/loadavg")
    assert watch.parse_loadavg(Path("/proc/loadavg").read_text()) >= 0


# --- devbox-keep deadlines -------------------------------------------------------------------------


def test_a_deadline_ahead_keeps_the_box_busy_until_then() -> None:
    keep = watch.Keep("alice", NOW + 2 * HOUR, NOW)
    decision = decide(keeps=[keep], last_active=NOW - 5 * HOUR)
    assert decision.action == "active"
    assert decision.tag == "busy: devbox-keep until 2025-06-15T17:06:40Z"
    assert "devbox-keep until 2025-06-15T17:06:40Z (alice)" in decision.reason
    assert decide(keeps=[keep], now=NOW + 2 * HOUR, last_active=NOW - 5 * HOUR).action == "poweroff"


def test_the_latest_of_several_deadlines_counts() -> None:
    keeps = [watch.Keep("alice", NOW + HOUR, NOW), watch.Keep("bob", NOW + 3 * HOUR, NOW - HOUR)]
    assert decide(keeps=keeps).tag == f"busy: devbox-keep until {watch.utc(NOW + 3 * HOUR)}"


def test_a_past_deadline_is_ignored() -> None:
    assert decide(keeps=[watch.Keep("alice", NOW - 1, NOW - HOUR)]).action == "poweroff"


def test_a_far_future_deadline_holds_only_a_day_after_it_was_written() -> None:
    keep = watch.Keep("alice", 4102444800.0, NOW)  # 2100-01-01, written by hand
    assert decide(keeps=[keep], now=NOW + 23 * HOUR).tag == f"busy: devbox-keep until {watch.utc(NOW + 24 * HOUR)}"
    assert decide(keeps=[keep], now=NOW + 24 * HOUR, last_active=NOW).action == "poweroff"


def test_a_deadline_file_dated_ahead_of_the_clock_does_not_count() -> None:
    # Re-dating the file each minute must not make a cap that never comes.
    keep = watch.Keep("alice", NOW + HOUR, NOW + 2 * HOUR)
    assert decide(keeps=[keep]).action == "poweroff"
    assert watch.kept_until(watch.Keep("alice", NOW + HOUR, NOW + 30), NOW) == NOW + HOUR  # clocks differ a little


def test_keep_files_are_read_with_their_owner_and_write_time(box: Box) -> None:
    put_keep(box, "keep-2h", written=NOW - 60)
    (keeps, problems) = watch.read_keeps(box.keep_dir)
    assert problems == []
    (keep,) = keeps
    assert (keep.until, keep.written) == (NOW + 2 * HOUR, NOW - 60)
    assert keep.owner in (os.environ.get("USER", keep.owner), "root", str(os.geteuid()))


def test_missing_keep_folder_means_no_deadline(tmp_path: Path) -> None:
    assert watch.read_keeps(tmp_path / "nope") == ([], [])


def test_a_malformed_keep_file_is_ignored_and_reported_without_its_content(box: Box,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    put_keep(box, "keep-not-a-time", "alice")
    put_keep(box, "keep-secret-looking", "bob")
    assert box.main() == 0
    assert box.poweroffs == 1
    err = capsys.readouterr().err
    assert f"ignoring devbox-keep file {box.keep_dir / 'alice'}: not a time in whole seconds since 1970" in err
    assert f"ignoring devbox-keep file {box.keep_dir / 'bob'}" in err
    assert "tomorrow" not in err and "$6$" not in err


def test_a_symlink_in_the_keep_folder_is_not_followed(box: Box, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(f"{int(NOW + HOUR)}\n")
    box.keep_dir.mkdir()
    (box.keep_dir / "mallory").symlink_to(target)
    keeps, problems = watch.read_keeps(box.keep_dir)
    assert keeps == []
    assert len(problems) == 1 and "mallory" in problems[0]


def test_a_fifo_in_the_keep_folder_does_not_block_the_watcher(box: Box) -> None:
    box.keep_dir.mkdir()
    os.mkfifo(box.keep_dir / "mallory")
    started = time.monotonic()
    keeps, problems = watch.read_keeps(box.keep_dir)
    assert time.monotonic() - started < 5
    assert keeps == [] and problems == [f"ignoring devbox-keep file {box.keep_dir / 'mallory'}: "
                                        "not a regular file of root or a login user"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to a system account")
def test_a_keep_file_of_a_system_account_does_not_count(box: Box) -> None:
    path = put_keep(box, "keep-2h")
    os.chown(path, 999, 999)
    keeps, problems = watch.read_keeps(box.keep_dir)
    assert keeps == [] and "not a regular file of root or a login user" in problems[0]


def test_only_a_bounded_number_of_keep_files_is_read(box: Box) -> None:
    box.keep_dir.mkdir()
    for number in range(500):
        (box.keep_dir / f"user{number:03d}").write_text("1\n")
    keeps, problems = watch.read_keeps(box.keep_dir)
    assert len(keeps) + len(problems) <= 64


def test_partial_writes_of_devbox_keep_are_skipped(box: Box) -> None:
    box.keep_dir.mkdir()
    (box.keep_dir / ".alice.1234").write_text("17")
    assert watch.read_keeps(box.keep_dir) == ([], [])


def test_a_keep_file_holds_the_box_up_and_it_stops_idle_minutes_after_the_deadline(box: Box) -> None:
    put_keep(box, "keep-2h")
    for minute in range(0, 120, 15):
        assert box.main(now=NOW + minute * MINUTE) == 0
    assert box.poweroffs == 0
    assert box.tags == ["busy: devbox-keep until 2025-06-15T17:06:40Z"]
    last_busy = NOW + 105 * MINUTE
    assert box.main(now=last_busy + 29 * MINUTE) == 0
    assert box.poweroffs == 0
    assert box.main(now=last_busy + 30 * MINUTE) == 0
    assert box.poweroffs == 1


def test_a_hand_made_keep_for_the_year_2100_does_not_hold_the_box_up_past_a_day(box: Box) -> None:
    put_keep(box, "keep-year-2100")
    assert box.main(now=NOW + 23 * HOUR) == 0
    assert box.poweroffs == 0
    assert box.main(now=NOW + 24 * HOUR + 30 * MINUTE) == 0
    assert box.poweroffs == 1


def test_an_expired_keep_file_is_ignored_quietly(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    put_keep(box, "keep-expired", written=NOW - 3 * HOUR)
    assert box.main() == 0
    assert box.poweroffs == 1
    assert capsys.readouterr().err == ""


# --- the devbox-keep command ---------------------------------------------------------------------


def keep_command(keep_dir: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(["/bin/sh", str(KEEP), *args], env={"PATH": os.defpath, "DEVBOX_KEEP_DIR": str(keep_dir)},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def keep_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "devbox-keep"
    folder.mkdir(parents=True)
    folder.chmod(0o1777)  # as /etc/tmpfiles.d/devbox-keep.conf makes it
    return folder


def test_keep_command_is_an_executable_sh_script() -> None:
    assert os.access(KEEP, os.X_OK)
    assert KEEP.read_text().startswith("#!/bin/sh\n")


SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
def test_keep_command_passes_shellcheck() -> None:
    result = subprocess.run([str(SHELLCHECK), str(KEEP)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("duration, seconds", [("2h", 7200), ("30m", 1800), ("1h30m", 5400), ("08h", 28800),
                                               ("90m", 5400), ("24h", 86400), ("0h5m", 300)])
def test_keep_command_writes_the_deadline_the_watcher_honours(keep_dir: Path, duration: str, seconds: int) -> None:
    before = int(time.time())
    result = keep_command(keep_dir, duration)
    after = int(time.time())
    assert result.returncode == 0, result.stderr
    assert "this box stays up until" in result.stdout and "devbox-keep off" in result.stdout
    (path,) = list(keep_dir.iterdir())
    assert before + seconds <= int(path.read_text()) <= after + seconds
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # the watcher (root) and status can read it
    keeps, problems = watch.read_keeps(keep_dir)
    assert problems == [] and watch.kept_until(keeps[0], time.time()) == int(path.read_text())


@pytest.mark.parametrize("args", [["25h"], ["0m"], ["0h0m"], ["2d"], ["h"], ["1.5h"], ["-1h"], ["2h; rm -rf /"],
                                  ["2h", "3h"], ["30m1h"]])
def test_keep_command_refuses_what_is_not_a_time_up_to_a_day(keep_dir: Path, args: List[str]) -> None:
    result = keep_command(keep_dir, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("devbox-keep: give a time")
    assert list(keep_dir.iterdir()) == []


def test_keep_command_off_removes_only_the_callers_deadline(keep_dir: Path) -> None:
    assert keep_command(keep_dir, "1h").returncode == 0
    (keep_dir / "someone-else").write_text(f"{int(time.time()) + 3600}\n")
    result = keep_command(keep_dir, "off")
    assert result.returncode == 0 and "your deadline is gone" in result.stdout
    assert [p.name for p in keep_dir.iterdir()] == ["someone-else"]
    assert keep_command(keep_dir, "off").returncode == 0  # nothing to remove is fine


def test_keep_command_status_lists_the_deadlines_ahead(keep_dir: Path) -> None:
    assert keep_command(keep_dir).stdout.startswith("no devbox-keep deadline")
    (keep_dir / "bob").write_text(f"{int(time.time()) - 60}\n")  # over
    (keep_dir / "carol").write_text("garbage\n")
    assert keep_command(keep_dir, "2h").returncode == 0
    lines = keep_command(keep_dir, "status").stdout.splitlines()
    assert len(lines) == 1 and " keeps this box up until " in lines[0] and lines[0].endswith(" UTC")


def test_keep_command_status_skips_what_is_not_a_regular_file(keep_dir: Path, tmp_path: Path) -> None:
    os.mkfifo(keep_dir / "mallory")  # cat would wait on it for ever
    (keep_dir / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text(f"{int(time.time()) + 3600}\n")
    result = keep_command(keep_dir, "status")
    assert result.returncode == 0 and result.stdout.startswith("no devbox-keep deadline")


def test_keep_command_says_when_its_folder_is_missing(tmp_path: Path) -> None:
    result = keep_command(tmp_path / "missing", "1h")
    assert result.returncode == 1
    assert "is missing; systemd-tmpfiles makes it at boot" in result.stderr


def test_a_deadline_set_with_devbox_keep_keeps_the_watcher_from_stopping_the_box(box: Box, keep_dir: Path) -> None:
    box.keep_dir = keep_dir
    assert keep_command(keep_dir, "1h").returncode == 0
    now = time.time()
    assert box.main(now=now) == 0
    assert box.poweroffs == 0
    assert box.tags[-1].startswith("busy: devbox-keep until ")
    assert box.main(now=now + HOUR + 31 * MINUTE) == 0
    assert box.poweroffs == 1
