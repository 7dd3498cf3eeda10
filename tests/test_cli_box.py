"""The `devbox` command with the box model: a box with no instance, relaunches, rebuilds, interruptions.

The API is faked at the HTTP level (tests.test_api.FakeApi); the waits run on a fake clock.
"""
import json
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List

import pytest

from devbox import api, cli
from devbox.api import CliError
from devbox.progress import NO_INSTANCE_GRACE, WaitOptions, start_report, wait_until_ready, wait_until_stopped
from tests.test_api import FakeApi, fake_api, no_instance_doc, status_doc  # noqa: F401 (fixtures)
from tests.test_cli import (  # noqa: F401 (fixtures)
    Clock,
    Run,
    Script,
    accept,
    isolated,
    listener,
    run,
    ssh_calls,
    waiting,
)

NEW = "i-0fedcba9876543210"
VOLUME = "vol-0123456789abcdef0"
REFUSALS = [
    "t3.large spot in subnet-0aaa: InsufficientInstanceCapacity",
    "t3.large spot in subnet-0bbb: InsufficientInstanceCapacity",
]


def started(action: str, reason: str, **changes: Any) -> Dict[str, Any]:
    """A /start answer: the status document plus what /start did."""
    fields: Dict[str, Any] = {"state": "pending", "public_ip": None, "dns_name": None, **changes}
    return {**status_doc(**fields), "action": action, "reason": reason,
            **({"tried": []} if action in ("launch", "relaunch") and "tried" not in changes else {})}


# --- devbox start: what happened ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        (started("none", "already running", state="running"), ["i-0123456789abcdef0 is already running"]),
        (started("start", "stopped"), ["started i-0123456789abcdef0 (t3.large spot in us-east-1a)"]),
        (started("resize", "resize to m6i.xlarge", instance_type="m6i.xlarge", market="on-demand"),
         ["resized and started i-0123456789abcdef0 (m6i.xlarge on-demand in us-east-1a)"]),
        (started("relaunch", "interrupted by the spot service", instance_id=NEW, tried=REFUSALS,
                 instance_type="m6i.large"),
         [f"launched a new instance {NEW} (m6i.large spot in us-east-1a) because: interrupted by the spot"
          f" service; data volume {VOLUME} follows it",
          f"  refused first: {REFUSALS[0]}",
          f"  refused first: {REFUSALS[1]}"]),
        (started("relaunch", "resize to m6i.xlarge", instance_id=NEW, instance_type="m6i.xlarge"),
         [f"launched a new instance {NEW} (m6i.xlarge spot in us-east-1a) because: resize to m6i.xlarge;"
          f" data volume {VOLUME} follows it"]),
        (started("launch", "first start", instance_id=NEW, availability_zone="us-east-1b"),
         [f"first start: launched {NEW} (t3.large spot in us-east-1b) with data volume {VOLUME} for /home"]),
        (started("launch", "the box has no instance", instance_id=NEW),
         [f"launched a new instance {NEW} (t3.large spot in us-east-1a) because: the box has no instance;"
          f" data volume {VOLUME} follows it"]),
        (started("warp", "a later server's action"),
         ["warp: i-0123456789abcdef0 (t3.large spot in us-east-1a) (a later server's action)"]),
    ],
)
def test_start_says_what_it_did_before_the_table(
    fake_api: FakeApi, run: Run, answer: Dict[str, Any], expected: List[str]
) -> None:
    fake_api.answer("POST", "/start", (200, answer))

    code, out, err = run("start", "--url", fake_api.url)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:len(expected)] == expected
    assert lines[len(expected)] == "box:          devbox"


def test_start_on_a_server_without_actions_prints_only_the_table(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    code, out, _ = run("start", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines()[0] == "box:          devbox"


def test_start_json_prints_the_answer_as_it_came(fake_api: FakeApi, run: Run) -> None:
    answer = started("relaunch", "interrupted by the spot service", instance_id=NEW, tried=REFUSALS)
    fake_api.answer("POST", "/start", (200, answer))

    code, out, _ = run("start", "--json", "--url", fake_api.url)

    assert code == 0
    assert json.loads(out) == answer


@pytest.mark.parametrize(
    "argv, body",
    [
        (["--rebuild"], {"rebuild": True}),
        (["--rebuild", "--type", "m6i.xlarge"], {"instance_type": "m6i.xlarge", "rebuild": True}),
        ([], {}),
    ],
)
def test_start_rebuild_asks_for_a_new_instance(fake_api: FakeApi, run: Run, argv: List[str],
                                               body: Dict[str, Any]) -> None:
    fake_api.answer("POST", "/start", (200, started("relaunch", "rebuild", instance_id=NEW)))

    code, _, _ = run("start", *argv, "--url", fake_api.url)

    assert code == 0
    assert json.loads(fake_api.requests[0].body) == body


def test_start_rebuild_wait_follows_the_new_instance(fake_api: FakeApi, run: Run, listener: int) -> None:
    fake_api.answer("POST", "/start", (200, started("relaunch", "rebuild", instance_id=NEW)))
    fake_api.answer("GET", "/status", (200, status_doc(instance_id=NEW, state="pending", public_ip=None)),
                    (200, status_doc(instance_id=NEW, public_ip="127.0.0.1")))

    code, out, err = run("start", "--rebuild", "--wait", "--poll-interval", "0", "--port", str(listener),
                         "--url", fake_api.url)

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"launched a new instance {NEW} (t3.large spot in us-east-1a) because: rebuild;"
                        f" data volume {VOLUME} follows it")
    assert f"instance:     {NEW}" in lines and "state:        running" in lines
    assert err.splitlines()[:2] == [
        f"devbox: waiting: instance {NEW} pending",
        f"devbox: instance {NEW} running (t3.large spot in us-east-1a, 127.0.0.1)",
    ]


def test_rebuilding_a_running_box_is_a_conflict_in_one_line(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (409, {"Code": "ConflictError",
                                             "Message": "the devbox is running; stop it before rebuilding it"}))

    code, out, err = run("start", "--rebuild", "--url", fake_api.url)

    assert code == api.EXIT_CONFLICT
    assert out == ""
    assert err == "devbox: conflict (HTTP 409): the devbox is running; stop it before rebuilding it\n"


def test_no_capacity_anywhere_names_what_was_tried(fake_api: FakeApi, run: Run) -> None:
    message = ("AWS has no capacity for the box right now; tried " + "; ".join(REFUSALS)
               + ". Nothing was changed: try again in a few minutes")
    fake_api.answer("POST", "/start", (503, {"Code": "InsufficientCapacity", "Message": message}))

    code, out, err = run("start", "--url", fake_api.url)

    assert code == api.EXIT_UNAVAILABLE
    assert out == ""
    assert err == f"devbox: unavailable, try again later (HTTP 503): {message}\n"


@pytest.mark.parametrize("tried", ["t3.large spot: Unsupported", {"not": "a list"}, 42, [None, ""]])
def test_a_malformed_tried_field_is_shown_or_skipped(tried: Any) -> None:
    lines = start_report(started("relaunch", "interrupted by the spot service", tried=tried))

    assert len(lines) == (2 if isinstance(tried, str) else 1)


# --- devbox status --------------------------------------------------------------------------------------


def test_status_of_a_box_without_an_instance_says_start_launches_one(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, no_instance_doc(data_volume_id=None, availability_zone=None,
                                                            allowed_ips=[])))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines() == [
        "box:          devbox",
        "state:        none (no instance yet: `devbox start` launches one)",
        "instance:     -",
        "type:         -",
        "market:       -",
        "zone:         -",
        "data volume:  -",
        "address:      -",
        "allowed IPs:  none",
        "launched:     -",
    ]


def test_status_of_an_interrupted_box_explains_what_start_does(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(
        state="stopped", interrupted=True, public_ip=None, dns_name=None, launch_time=None,
        last_interruption="2024-04-30T22:15:00Z EC2 Spot Instance Interruption Warning stop")))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    lines = out.splitlines()
    assert lines[1:3] == [
        "state:              stopped",
        "interrupted:        the spot service stopped this instance; `devbox start` launches a new instance"
        " with the same data volume",
    ]
    assert f"data volume:        {VOLUME}" in lines


def test_status_from_a_server_without_market_shows_the_lifecycle(fake_api: FakeApi, run: Run) -> None:
    document = status_doc()
    for field in ("box", "market", "availability_zone", "data_volume_id", "interrupted"):
        del document[field]
    fake_api.answer("GET", "/status", (200, document))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert "market:       spot" in out.splitlines()
    assert "box:          -" in out.splitlines()
    assert not any(line.startswith("interrupted:") for line in out.splitlines())


@pytest.mark.parametrize(
    "changes",
    [
        {"allowed_ips": "198.51.100.7/32"},
        {"allowed_ips": [1, None, {"cidr": "x"}]},
        {"allowed_ips": 7},
        {"interrupted": "yes", "state": ["stopped"]},
        {"box": {"name": "devbox"}, "data_volume_id": 12, "availability_zone": ["us-east-1a"]},
        {"launch_time": 1714557600, "last_interruption": 3, "spot_price_per_hour": "abc", "uptime_seconds": "x",
         "estimated_cost": {"total": None}},
        {"launch_time": "not a time", "last_interruption": {"when": "2024-04-30T22:15:00Z", "what": None}},
        {"public_ip": 5, "dns_name": ["a"]},
        {"state": "stopped", "stopped_by": {"who": "idle"}, "stopped_at": 1714557600, "state_reason": ["x"]},
        {"state": "stopped", "stopped_by": "aliens", "stopped_at": "not a time", "idle": {"since": None}},
        {"state": "stopped", "stopped_by": None, "stopped_at": ["2026"], "state_reason": 42, "idle": 0},
    ],
)
def test_a_malformed_status_is_shown_without_crashing(changes: Dict[str, Any]) -> None:
    text = cli.format_status(status_doc(**changes))

    assert text.splitlines()[0].startswith("box:")
    assert all(line.isprintable() for line in text.splitlines())


def test_escape_sequences_in_the_status_are_shown_escaped(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(
        box="dev\x1b[2Jbox", last_interruption="2024-04-30T22:15:00Z stop\x1b]0;pwned\x07\nnext")))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    lines = out.splitlines()
    assert lines[0] == "box:                dev\\x1b[2Jbox"
    assert "last interruption:  2024-04-30 22:15:00 UTC stop\\x1b]0;pwned\\x07\\nnext" in lines


# --- devbox status: who stopped the box, and what the idle watcher says ------------------------------------

NOW = datetime(2026, 11, 29, 12, 18, tzinfo=timezone.utc)


def stopped_doc(**changes: Any) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"state": "stopped", "public_ip": None, "dns_name": None, "launch_time": None,
                              "state_reason": None, "stopped_by": None, "stopped_at": None, "idle": None, **changes}
    return status_doc(**fields)


def test_status_of_a_box_stopped_for_idleness_says_who_and_when(fake_api: FakeApi, run: Run) -> None:
    stopped_at = (datetime.now(timezone.utc) - timedelta(minutes=14)).replace(microsecond=0)
    fake_api.answer("GET", "/status", (200, stopped_doc(
        stopped_by="idle", stopped_at=stopped_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        state_reason="Client.InstanceInitiatedShutdown: Instance initiated shutdown")))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines()[1:4] == [
        "state:        stopped",
        "stopped by:   idle (the box's idle watcher shut it down)",
        f"stopped at:   {stopped_at:%Y-%m-%d %H:%M:%S} UTC (14 min ago)",
    ]


@pytest.mark.parametrize(
    "by, said",
    [
        ("user", "user (a stop through the API, `devbox stop`, or the EC2 console)"),
        ("max-runtime", "max-runtime (it ran longer than MAX_RUNTIME_HOURS)"),
        ("spot", "spot (the spot service took the capacity back)"),
        ("a later reason", "a later reason"),
    ],
)
def test_status_names_each_stop_reason(by: str, said: str) -> None:
    lines = cli.format_status(stopped_doc(stopped_by=by, stopped_at="2026-11-29T09:18:00Z"), now=NOW).splitlines()

    assert f"stopped by:   {said}" in lines
    assert "stopped at:   2026-11-29 09:18:00 UTC (3 h 00 min ago)" in lines


def test_status_of_a_start_ec2_could_not_carry_out_gives_ec2s_reason() -> None:
    document = stopped_doc(state_reason="Client.InternalError: Client error on launch")

    lines = cli.format_status(document, now=NOW).splitlines()

    assert "stopped by:   EC2: Client.InternalError: Client error on launch" in lines
    assert not any(line.startswith("stopped at:") for line in lines)


def test_status_of_a_running_box_shows_what_the_idle_watcher_said(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(
        idle="idle since 2026-11-29T11:50:00Z, stops at 2026-11-29T12:20:00Z", stopped_by=None, stopped_at=None,
        state_reason=None)))

    code, out, _ = run("status", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines()[1:3] == [
        "state:        running",
        "idle:         idle since 2026-11-29T11:50:00Z, stops at 2026-11-29T12:20:00Z",
    ]
    assert not any(line.startswith("stopped") for line in out.splitlines())


# --- a start that falls back to stopped (devbox.progress) -------------------------------------------------


@pytest.mark.parametrize(
    "reason, said",
    [
        ("Client.InternalError: Client error on launch",
         "; EC2's reason: Client.InternalError: Client error on launch (EC2 gives this reason, among others, when it"
         " may not use the volumes' KMS key: see KmsKeyId)"),
        ("Server.InsufficientInstanceCapacity: Insufficient capacity",
         "; EC2's reason: Server.InsufficientInstanceCapacity: Insufficient capacity"),
        (None, "; the API gave no reason (`devbox status` shows the box)"),
        ({"code": 1}, "; EC2's reason: {'code': 1}"),
    ],
)
def test_a_start_that_falls_back_to_stopped_gives_ec2s_reason_not_a_guess(reason: Any, said: str) -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(status_doc(instance_id=NEW, state="pending"),
                    stopped_doc(instance_id=NEW, state_reason=reason))

    with pytest.raises(CliError) as caught:
        wait_until_ready(source, WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message == f"the devbox's instance {NEW} stopped again while starting" + said
    assert "spot interruption?" not in caught.value.message


def test_start_wait_and_ssh_end_with_ec2s_reason_in_one_line(fake_api: FakeApi, run: Run,
                                                             ssh_calls: List[List[str]]) -> None:
    fake_api.answer("POST", "/start", (200, started("start", "stopped")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")),
                    (200, stopped_doc(state_reason="Client.InternalError: Client error on launch")))

    for command in (["start", "--wait"], ["ssh"]):
        code, _, err = run(*command, "--poll-interval", "0", "--url", fake_api.url)

        assert code == api.EXIT_CONFLICT
        assert err.splitlines()[-1].startswith(
            "devbox: the devbox's instance i-0123456789abcdef0 stopped again while starting; EC2's reason:"
            " Client.InternalError: Client error on launch")
        fake_api.answer("GET", "/status", (200, status_doc(state="pending")),
                        (200, stopped_doc(state_reason="Client.InternalError: Client error on launch")))
    assert ssh_calls == []


# --- waiting after a relaunch (devbox.progress) -------------------------------------------------------


def test_the_wait_names_the_new_instance() -> None:
    clock = Clock()
    progress, stream = waiting(clock)
    source = Script(status_doc(instance_id=NEW, state="pending"), status_doc(instance_id=NEW))

    ready = wait_until_ready(source, WaitOptions(), progress, connect=accept, clock=clock)

    assert ready.status["instance_id"] == NEW
    assert stream.getvalue().splitlines()[:2] == [
        f"devbox: waiting: instance {NEW} pending",
        f"devbox: instance {NEW} running (t3.large spot in us-east-1a, 203.0.113.10)",
    ]


def test_a_new_instance_that_vanishes_ends_the_wait_as_a_conflict() -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(status_doc(instance_id=NEW, state="pending"), no_instance_doc())

    with pytest.raises(CliError) as caught:
        wait_until_ready(source, WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message == (
        f"the devbox's instance {NEW} is gone (EC2 terminated it; the spot service may have taken the capacity"
        " back at launch); `devbox start` launches a new one with the same data volume"
    )
    assert source.calls == 2


def test_no_instance_from_the_first_poll_ends_the_wait_after_a_short_grace() -> None:
    clock = Clock()
    progress, stream = waiting(clock)
    source = Script(no_instance_doc())

    with pytest.raises(CliError) as caught:
        wait_until_ready(source, WaitOptions(poll_interval=2), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message.startswith("the instance /start launched is gone")
    assert clock.now - 1000.0 == NO_INSTANCE_GRACE
    assert stream.getvalue() == "devbox: waiting: instance launching\n"


def test_a_launch_not_yet_listed_is_waited_for() -> None:
    # EC2's describe calls may lag a moment behind RunInstances.
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(no_instance_doc(), status_doc(instance_id=NEW, state="pending"), status_doc(instance_id=NEW))

    ready = wait_until_ready(source, WaitOptions(ssh_probe=False), progress, clock=clock)

    assert ready.status["instance_id"] == NEW


@pytest.mark.parametrize("state", ["terminated", "shutting-down"])
def test_a_terminated_instance_ends_the_wait_and_says_start_launches_another(state: str) -> None:
    clock = Clock()
    progress, _ = waiting(clock)

    with pytest.raises(CliError) as caught:
        wait_until_ready(Script(status_doc(instance_id=NEW, state=state)), WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message.startswith(f"the devbox's instance {NEW} is {state} (the spot service may")
    assert caught.value.message.endswith("`devbox start` launches a new one with the same data volume")


def test_a_spot_stop_while_starting_says_start_launches_a_new_instance() -> None:
    clock = Clock()
    progress, _ = waiting(clock)
    source = Script(status_doc(instance_id=NEW, state="pending"),
                    status_doc(instance_id=NEW, state="stopped", interrupted=True))

    with pytest.raises(CliError) as caught:
        wait_until_ready(source, WaitOptions(), progress, clock=clock)

    assert caught.value.exit_code == api.EXIT_CONFLICT
    assert caught.value.message == (
        f"the spot service stopped the devbox's instance {NEW} while it was starting; `devbox start` launches a"
        " new instance with the same data volume"
    )


def test_stop_wait_on_a_box_without_an_instance_returns_at_once() -> None:
    clock = Clock()
    progress, stream = waiting(clock)

    status = wait_until_stopped(Script(no_instance_doc()), WaitOptions(), progress, clock=clock)

    assert status["state"] == "none"
    assert stream.getvalue() == "devbox: the box has no instance: nothing runs\n"
    assert clock.now == 1000.0


# --- devbox ssh on a box that needs a new instance --------------------------------------------------------


@pytest.mark.parametrize(
    "before, answer, said",
    [
        (no_instance_doc(), started("launch", "first start", instance_id=NEW),
         f"devbox: first start: launched {NEW} (t3.large spot in us-east-1a) with data volume {VOLUME} for /home"),
        (status_doc(state="stopped", interrupted=True),
         started("relaunch", "interrupted by the spot service", instance_id=NEW, tried=REFUSALS[:1]),
         f"devbox: launched a new instance {NEW} (t3.large spot in us-east-1a) because: interrupted by the spot"
         f" service; data volume {VOLUME} follows it"),
    ],
)
def test_ssh_gets_a_new_instance_from_start_and_connects_to_it(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]], before: Dict[str, Any],
    answer: Dict[str, Any], said: str
) -> None:
    fake_api.answer("POST", "/start", (200, answer))
    fake_api.answer("GET", "/status", (200, status_doc(instance_id=NEW, state="pending", public_ip=None)),
                    (200, status_doc(instance_id=NEW, public_ip="127.0.0.1")))

    code, out, err = run("ssh", "--poll-interval", "0", "--port", str(listener), "--url", fake_api.url)

    assert code == 7
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == said
    assert lines[1:len(answer["tried"]) + 1] == [f"devbox:   refused first: {entry}" for entry in answer["tried"]]
    assert f"devbox: instance {NEW} running (t3.large spot in us-east-1a, 127.0.0.1)" in lines
    assert fake_api.calls()[0] == "POST /start"
    assert ssh_calls == [["ssh", "-p", str(listener), "-o", "HostKeyAlias=devbox", "127.0.0.1"]]


def test_ssh_to_a_running_box_says_nothing_about_the_start(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]]
) -> None:
    running = status_doc(public_ip="127.0.0.1")
    fake_api.answer("POST", "/start", (200, {**running, "action": "none", "reason": "already running"}))
    fake_api.answer("GET", "/status", (200, running))

    code, _, err = run("ssh", "--port", str(listener), "--url", fake_api.url)

    assert code == 7
    assert "already" not in err
