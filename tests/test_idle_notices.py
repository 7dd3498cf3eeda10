"""The watcher explains itself: the devbox:idle tag only when the state changes, a wall five minutes
before it powers off (once per idle period), and neither ever changes what it decides. End to end
too: the script as systemd runs it, and as the user data installs it, with fake wall and systemctl
and a fake metadata service and EC2."""
import base64
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import yaml

from devbox import userdata
from tests.test_idle_tagging import INSTANCE, FakeAws
from tests.test_idle_watch import HOUR, MINUTE, NOW, SCRIPT, Box, watch

IDLE_TAG = "idle since 2025-06-15T15:06:40Z, stops at 2025-06-15T15:36:40Z"


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def notices(decision_tag: str = "", **fields: object) -> "watch.Notices":
    return watch.Notices(**{"tag": decision_tag, **fields})  # type: ignore[arg-type]


# --- what the tag says -------------------------------------------------------------------------------


def test_idle_box_is_tagged_since_when_and_until_when() -> None:
    config = watch.Config()
    decision = watch.decide(NOW, 2 * HOUR, "", [], NOW, config)
    assert decision.tag == IDLE_TAG
    assert decision.stops_at == NOW + 30 * MINUTE


def test_stop_time_waits_for_the_boot_grace() -> None:
    config = watch.Config(idle_minutes=10, grace_minutes=30)
    decision = watch.decide(NOW, 5 * MINUTE, "", [], None, config)
    assert decision.action == "grace"
    assert decision.tag == f"idle since {watch.utc(NOW - 5 * MINUTE)}, stops at {watch.utc(NOW + 25 * MINUTE)}"


def test_busy_box_is_tagged_with_the_first_reason() -> None:
    assert watch.decide(NOW, HOUR, "", [(1000, "mosh-server")], None, watch.Config()).tag == "busy: mosh"


def test_auto_stop_off_is_tagged_so() -> None:
    assert watch.decide(NOW, HOUR, "", [], None, watch.Config(idle_minutes=0)).tag == "auto-stop off"


def test_tag_values_fit_ec2s_limit() -> None:
    longest = watch.decide(NOW, HOUR, "", [], None, watch.Config(load_threshold=999.99), 1000.0,
                           [watch.Keep("x" * 32, NOW + HOUR, NOW)]).tag
    assert len(longest) <= 256 and len(IDLE_TAG) <= 256


# --- when it tags and warns (pure) -------------------------------------------------------------------


def test_tag_is_written_when_the_state_changes_and_not_again() -> None:
    decision = watch.decide(NOW, 2 * HOUR, "", [], NOW, watch.Config())
    assert watch.plan_notices(decision, watch.Notices(), NOW) == (IDLE_TAG, None)
    assert watch.plan_notices(decision, notices(IDLE_TAG, tagged=True, tried_at=NOW), NOW + 60) == (None, None)


def test_a_failed_tag_is_tried_again_after_ten_minutes() -> None:
    decision = watch.decide(NOW, 2 * HOUR, "", [], NOW, watch.Config())
    failed = notices(IDLE_TAG, tagged=False, tried_at=NOW)
    assert watch.plan_notices(decision, failed, NOW + 9 * MINUTE)[0] is None
    assert watch.plan_notices(decision, failed, NOW + 10 * MINUTE)[0] == IDLE_TAG
    assert watch.plan_notices(decision, notices(IDLE_TAG, tried_at=NOW + HOUR), NOW)[0] == IDLE_TAG  # clock went back


def test_warning_comes_five_minutes_before_the_stop_once() -> None:
    config = watch.Config()
    early = watch.decide(NOW + 24 * MINUTE, 2 * HOUR, "", [], NOW, config)
    assert watch.plan_notices(early, watch.Notices(), NOW + 24 * MINUTE)[1] is None
    due = watch.decide(NOW + 25 * MINUTE, 2 * HOUR, "", [], NOW, config)
    _, warning = watch.plan_notices(due, watch.Notices(), NOW + 25 * MINUTE)
    assert warning == ("devbox: idle since 15:06 UTC (no SSH or mosh session, no devbox-keep, low load);\n"
                       "it powers off at 15:36 UTC, in 5 min. To keep it up, run: devbox-keep 1h\n")
    assert watch.plan_notices(due, notices(warned_for=NOW), NOW + 26 * MINUTE)[1] is None


def test_no_warning_for_a_busy_box_or_with_auto_stop_off() -> None:
    busy = watch.decide(NOW, 2 * HOUR, "", [(1000, "mosh-server")], NOW, watch.Config())
    off = watch.decide(NOW, 2 * HOUR, "", [], NOW, watch.Config(idle_minutes=0))
    assert watch.plan_notices(busy, watch.Notices(), NOW)[1] is None
    assert watch.plan_notices(off, watch.Notices(), NOW)[1] is None


# --- main(): the box over time ---------------------------------------------------------------------------


def test_an_idle_period_is_tagged_once_warned_once_and_ends_in_a_poweroff(box: Box) -> None:
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4") == 0
    for minute in range(1, 31):
        assert box.main(now=NOW + minute * MINUTE) == 0
    assert box.tags == ["busy: ssh session", IDLE_TAG]
    assert len(box.walls) == 1
    assert box.commands.index(["wall", box.walls[0]]) < box.commands.index(watch.POWEROFF)
    assert box.poweroffs == 1


def test_a_new_idle_period_is_tagged_and_warned_again(box: Box) -> None:
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4") == 0
    assert box.main(now=NOW + 26 * MINUTE) == 0
    assert box.main(now=NOW + 27 * MINUTE, tcp="tcp-ssh-ipv4") == 0  # came back in time
    assert box.main(now=NOW + 53 * MINUTE) == 0
    assert len(box.tags) == 4 and box.tags[2] == "busy: ssh session"
    assert box.tags[3].startswith(f"idle since {watch.utc(NOW + 27 * MINUTE)}")
    assert len(box.walls) == 2
    assert box.poweroffs == 0


def test_an_idle_period_from_boot_is_tagged_and_warned_once(tmp_path: Path) -> None:
    # Booted 26 min 0.37 s ago, nobody came: the boot grace ends in under five minutes.
    box = Box(tmp_path, uptime=26 * MINUTE + 0.37)
    for minute in range(0, 5):
        assert box.main(now=NOW + minute * MINUTE) == 0
    assert box.tags == [f"idle since {watch.utc(box.boot)}, stops at {watch.utc(box.boot + 30 * MINUTE)}"]
    assert len(box.walls) == 1
    assert box.poweroffs == 1


def test_a_failed_tag_changes_nothing_the_watcher_does(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    box.tag_error = "EC2 refused (HTTP 403): UnauthorizedOperation: You are not authorized"
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4") == 0
    for minute in range(1, 31):
        assert box.main(now=NOW + minute * MINUTE) == 0
    assert box.poweroffs == 1 and len(box.walls) == 1
    err = capsys.readouterr().err
    # "busy" at once, "idle" at once (a new state), then again every ten minutes: 11 and 21.
    assert err.count("devbox-idle: cannot tag devbox:idle='busy: ssh session'") == 1
    assert err.count("devbox-idle: cannot tag devbox:idle='idle since 2025-06-15T15:06:40Z") == 3


def test_a_failed_wall_changes_nothing_the_watcher_does(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    def run(command: List[str]) -> None:
        if command[0] == "wall":
            raise subprocess.CalledProcessError(1, command)
        box.commands.append(list(command))

    box.state.parent.mkdir()
    box.state.write_text(f"{NOW:.0f}\n")
    for minute in (25, 26, 30):
        assert watch.main(box.args(), {}, runner=run, clock=lambda: NOW + minute * MINUTE, tagger=box.tag) == 0
    assert box.commands == [watch.POWEROFF]
    assert capsys.readouterr().err.count("cannot warn the terminals") == 1


def test_dry_run_tags_nothing_and_warns_nobody(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    box.state.parent.mkdir()
    box.state.write_text(f"{NOW:.0f}\n")
    assert box.main(now=NOW + 26 * MINUTE, env={"DRY_RUN": "1"}) == 0
    assert box.tags == [] and box.commands == []
    out = capsys.readouterr().out
    assert f"dry run: would tag devbox:idle={IDLE_TAG}\n" in out
    assert "dry run: would warn: devbox: idle since 15:06 UTC" in out
    assert not box.notices.exists()


def test_what_was_told_survives_in_the_state_folder(box: Box) -> None:
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4") == 0
    assert json.loads(box.notices.read_text()) == {"tag": "busy: ssh session", "tagged": True, "tried_at": NOW,
                                                   "warned_for": None}


def test_a_corrupt_notices_file_means_the_tag_is_written_again(box: Box) -> None:
    box.notices.parent.mkdir()
    box.notices.write_text("{garbage")
    assert box.main(now=NOW, tcp="tcp-ssh-ipv4") == 0
    assert box.tags == ["busy: ssh session"]


# --- the script end to end: as in the repository and as the user data installs it ----------------------


def installed_watch(tmp_path: Path) -> Path:
    """devbox-idle-watch as the instance gets it: out of the user data, stripped of comments."""
    entry = next(e for e in yaml.safe_load(userdata.cloud_config())["write_files"]
                 if e["path"] == "/usr/local/sbin/devbox-idle-watch")
    script = tmp_path / "installed-devbox-idle-watch"
    script.write_bytes(gzip.decompress(base64.b64decode(entry["content"])))
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """wall and systemctl that only write down how they were called."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("wall", "systemctl"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >>"{tmp_path}/{name}.calls"\n')
        tool.chmod(0o755)
    return folder


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    fake = FakeAws(monkeypatch)
    yield fake
    fake.close()


@pytest.fixture(params=["repository", "user data"])
def script(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return SCRIPT if request.param == "repository" else installed_watch(tmp_path)


def run_script(script: Path, box: Box, fake_bin: Path, aws: FakeAws, env: Dict[str, str],
               tcp: str = "tcp-none") -> "subprocess.CompletedProcess[str]":
    # -S: only the standard library, as on a fresh Ubuntu; PATH finds the fake wall and systemctl first.
    return subprocess.run([sys.executable, "-S", str(script), *box.args(tcp=tcp), "--imds-url", aws.imds_url,
                           "--ec2-url", aws.ec2_url],
                          env={"PATH": f"{fake_bin}:{os.defpath}", **env}, capture_output=True, text=True, timeout=60)


def test_script_tags_its_instance_warns_and_powers_off(script: Path, box: Box, fake_bin: Path, aws: FakeAws,
                                                       tmp_path: Path) -> None:
    result = run_script(script, box, fake_bin, aws, {}, tcp="tcp-ssh-ipv4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == "tagged devbox:idle=busy: ssh session"
    assert [(c["ResourceId.1"], c["Tag.1.Key"], c["Tag.1.Value"]) for c in aws.creates] == [
        (INSTANCE, "devbox:idle", "busy: ssh session")]
    # The session ended long ago: the grace and the idle time are over on the next run.
    box.state.write_text(f"{int(box.state.read_text()) - 2 * 3600}\n")
    result = run_script(script, box, fake_bin, aws, {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("poweroff: idle ")
    assert aws.creates[-1]["Tag.1.Value"].startswith("idle since ")
    assert (tmp_path / "systemctl.calls").read_text() == "poweroff\n"
    assert aws.bad_signatures == 0


def test_script_warns_five_minutes_ahead_through_wall(script: Path, box: Box, fake_bin: Path, aws: FakeAws,
                                                      tmp_path: Path) -> None:
    box.state.parent.mkdir()
    box.state.write_text(f"{int(time.time()) - 26 * 60}\n")
    result = run_script(script, box, fake_bin, aws, {"IDLE_MINUTES": "30", "GRACE_MINUTES": "0"})
    assert result.returncode == 0, result.stderr
    assert "To keep it up, run: devbox-keep 1h" in (tmp_path / "wall.calls").read_text()
    assert not (tmp_path / "systemctl.calls").exists()


def test_script_without_aws_still_powers_off(script: Path, box: Box, fake_bin: Path, aws: FakeAws,
                                            tmp_path: Path) -> None:
    aws.close()  # no metadata service: not on EC2, or the network is down
    box.state.parent.mkdir()
    box.state.write_text("1000\n")
    result = run_script(script, box, fake_bin, aws, {})
    assert result.returncode == 0
    assert "devbox-idle: cannot tag devbox:idle=" in result.stderr
    assert (tmp_path / "systemctl.calls").read_text() == "poweroff\n"
