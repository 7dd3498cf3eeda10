"""The `devbox` command facing a hostile or broken server, or a planted API URL (issue 11, item 10).

What a user sees is asserted on the captured stdout/stderr: no control character from the
server reaches the terminal, no signed request leaves over plain http, and a status of the
wrong shape ends a command with one line, never a traceback.
"""
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import requests

from devbox import api
from devbox.progress import Progress
from tests.test_api import FakeApi, fake_api, status_doc  # noqa: F401 (fixtures)
from tests.test_cli import Run, isolated, listener, run, ssh_calls  # noqa: F401 (fixtures)
from tests.test_proxy import SshLikeServer, run_proxy, sshd  # noqa: F401 (fixtures)

# What the adversarial pass sent: clipboard write (OSC 52), window title, clear screen, C1 CSI,
# carriage return and backspace to overwrite a line, a newline forging a table row, bidi override.
OSC52 = "\x1b]52;c;ZXZpbA==\x07"
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
C1_CSI = "\x9b31m"
FORGED_ROW = "\nstate:        stopped"
HOSTILE = f"x{OSC52}{TITLE}{CLEAR}{C1_CSI}\r\x08{FORGED_ROW}\u202e"
RAW = ("\x1b", "\x07", "\x9b", "\r", "\x08", "\u202e")


def assert_inert(text: str) -> None:
    """Only printable characters and line ends: nothing a terminal would act on."""
    assert not any(char in text for char in RAW), ascii(text)
    assert all(char == "\n" or char.isprintable() for char in text), ascii(text)


def hostile_status(**changes: Any) -> Dict[str, Any]:
    """A running box whose every free-text field carries escape sequences (addresses stay usable)."""
    return status_doc(
        box="box" + HOSTILE, instance_id="i-1" + HOSTILE, instance_type="t3" + HOSTILE, market="spot" + HOSTILE,
        availability_zone="az" + HOSTILE, data_volume_id="vol" + HOSTILE, allowed_ips=["1.2.3.4/32" + HOSTILE],
        launch_time="2024" + HOSTILE, last_interruption="2024-04-30T22:15:00Z" + HOSTILE,
        spot_price_per_hour="0.1" + HOSTILE, uptime_seconds="1" + HOSTILE, estimated_cost={"x": HOSTILE},
        **changes,
    )


# --- 1. server strings never reach the terminal raw ---------------------------------------------------


def test_status_table_shows_every_hostile_field_escaped_on_its_own_row(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, hostile_status(dns_name="devbox.example.com" + HOSTILE)))

    code, out, err = run("status", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert_inert(out)
    labels = [line.split(":")[0] for line in out.splitlines()]
    assert labels == ["box", "state", "instance", "type", "market", "zone", "data volume", "address", "allowed IPs",
                      "launched", "last interruption", "spot price", "uptime", "estimated cost"]
    assert out.splitlines()[0] == (
        "box:                boxx\\x1b]52;c;ZXZpbA==\\x07\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\r\\x08"
        "\\nstate:        stopped\\u202e"
    )


def test_stop_reason_and_idle_rows_show_hostile_fields_escaped_each_on_its_own_row(fake_api: FakeApi,
                                                                                   run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(
        state="stopped", stopped_by="idle" + HOSTILE, stopped_at="2026-11-29T12:00:00Z" + HOSTILE,
        state_reason="because" + HOSTILE, idle="busy: " + HOSTILE)))

    code, out, err = run("status", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert_inert(out)
    rows = {line.split(":")[0]: line for line in out.splitlines()}
    assert rows["stopped by"] == "stopped by:   idle" + api.printable(HOSTILE)
    assert rows["stopped at"] == "stopped at:   2026-11-29T12:00:00Z" + api.printable(HOSTILE)
    assert rows["idle"] == "idle:         busy: " + api.printable(HOSTILE)
    assert len(out.splitlines()) == 13


def test_a_hostile_state_reason_ends_start_wait_in_one_escaped_line(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")),
                    (200, status_doc(state="stopped", state_reason="Client.InternalError" + HOSTILE)))

    code, out, err = run("start", "--wait", "--poll-interval", "0", "--url", fake_api.url)

    assert code == api.EXIT_CONFLICT
    assert_inert(err)
    assert err.splitlines()[-1].startswith("devbox: the devbox's instance i-0123456789abcdef0 stopped again while"
                                           " starting; EC2's reason: Client.InternalError" + api.printable(HOSTILE))


def test_a_hostile_idle_stop_time_in_the_proxy_refusal_is_escaped(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(state="stopped", stopped_by="idle",
                                                       stopped_at="soon" + HOSTILE)))

    result = run_proxy(fake_api.url, 22, "--host-override", "127.0.0.1")

    assert result.returncode == api.EXIT_CONFLICT
    assert_inert(result.stderr.decode())
    assert result.stderr.decode().splitlines() == [
        f"devbox: the box stopped itself for idleness at soon{api.printable(HOSTILE)}; not restarting it for a"
        " background reconnect. Start it with `devbox start` (or ssh from a terminal)"
    ]
    assert fake_api.calls() == ["GET /status"]


def test_status_json_stays_json_with_the_escapes_encoded(fake_api: FakeApi, run: Run) -> None:
    document = hostile_status()
    fake_api.answer("GET", "/status", (200, document))

    code, out, _ = run("status", "--json", "--url", fake_api.url)

    assert code == 0
    assert_inert(out)
    assert json.loads(out) == document


def test_start_lines_and_wait_progress_show_hostile_fields_escaped(fake_api: FakeApi, run: Run) -> None:
    pending = hostile_status(state="pending", public_ip=None, dns_name=None)
    fake_api.answer("POST", "/start", (200, {**pending, "action": "relaunch", "reason": "because" + HOSTILE,
                                             "tried": ["t3 spot" + HOSTILE, OSC52]}))
    fake_api.answer("GET", "/status", (200, pending), (200, hostile_status()))

    code, out, err = run("start", "--wait", "--no-ssh-probe", "--poll-interval", "0", "--url", fake_api.url)

    assert code == 0, err
    assert_inert(out)
    assert_inert(err)
    lines = out.splitlines()
    assert lines[0].startswith("launched a new instance i-1x\\x1b]52;c;ZXZpbA==\\x07")
    assert lines[1:3] == ["  refused first: t3 spot" + api.printable(HOSTILE),
                          "  refused first: \\x1b]52;c;ZXZpbA==\\x07"]
    assert [line.split(":")[0] for line in lines[3:]][:2] == ["box", "state"]
    assert len(err.splitlines()) == 3  # waiting, running, checks skipped: no forged lines


def test_stop_wait_progress_shows_hostile_fields_escaped(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/stop", (200, hostile_status(state="stopping")))
    fake_api.answer("GET", "/status", (200, hostile_status(state="stopping")),
                    (200, hostile_status(state="stopped", public_ip=None, dns_name=None)))

    code, out, err = run("stop", "--wait", "--poll-interval", "0", "--url", fake_api.url)

    assert code == 0, err
    assert_inert(out)
    assert_inert(err)
    assert err.splitlines() == [
        f"devbox: waiting: instance i-1{api.printable(HOSTILE)} stopping",
        f"devbox: instance i-1{api.printable(HOSTILE)} stopped",
    ]


def test_a_hostile_state_is_shown_escaped_while_waiting_and_when_timing_out(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending" + HOSTILE)))

    code, out, err = run("start", "--wait", "--timeout", "0", "--url", fake_api.url)

    assert code == api.EXIT_TIMEOUT
    assert_inert(out)
    assert_inert(err)
    assert err.splitlines()[-1] == (
        f"devbox: timed out after 0 s waiting for the instance to run (it is pending{api.printable(HOSTILE)})"
    )


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 500, 502, 503])
def test_error_messages_are_one_escaped_line(fake_api: FakeApi, run: Run, status: int) -> None:
    fake_api.answer("GET", "/status", (status, {"Code": "Code" + HOSTILE, "Message": "message" + HOSTILE}))

    code, out, err = run("status", "--url", fake_api.url)

    assert code != 0 and out == ""
    assert_inert(err)
    assert len(err.splitlines()) == 1
    assert "message" + api.printable(" ".join(HOSTILE.split())) in err


def test_an_error_body_that_is_not_json_is_one_escaped_line(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (502, f"<html>{HOSTILE}</html>".encode()))

    code, _, err = run("status", "--url", fake_api.url)

    assert code == api.EXIT_FAILURE
    assert_inert(err)
    assert len(err.splitlines()) == 1


def test_ssh_progress_shows_hostile_fields_escaped(
    fake_api: FakeApi, run: Run, listener: int, ssh_calls: List[List[str]]
) -> None:
    running = hostile_status(public_ip="127.0.0.1", dns_name=None)
    fake_api.answer("POST", "/start", (200, {**running, "action": "start", "reason": HOSTILE}))
    fake_api.answer("GET", "/status", (200, running))

    code, out, err = run("ssh", "--port", str(listener), "--url", fake_api.url)

    assert code == 7  # what the fake ssh returns
    assert out == ""
    assert_inert(err)
    assert len(err.splitlines()) == 3  # started, running, SSH port reachable


def test_proxy_progress_on_stderr_shows_hostile_fields_escaped(fake_api: FakeApi, sshd: SshLikeServer) -> None:
    pending = hostile_status(state="pending", public_ip=None, dns_name=None)
    fake_api.answer("POST", "/start", (200, {**pending, "action": "relaunch", "reason": HOSTILE, "tried": [OSC52]}))
    fake_api.answer("GET", "/status", (200, hostile_status(state="stopped", stopped_by="user")), (200, pending),
                    (200, hostile_status()))

    result = run_proxy(fake_api.url, sshd.port, "--host-override", "127.0.0.1", data=b"hello\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"hello\n")
    progress = result.stderr.decode()
    assert_inert(progress)
    assert len(progress.splitlines()) == 5  # launched, refused first, waiting, running, SSH port reachable


def test_proxy_error_line_from_the_api_is_escaped(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(state="stopping")))
    fake_api.answer("POST", "/start", (409, {"Code": "Conflict", "Message": OSC52 + "it is stopping" + FORGED_ROW}))

    result = run_proxy(fake_api.url, 22, "--host-override", "127.0.0.1")

    assert result.returncode == api.EXIT_CONFLICT
    assert result.stdout == b""
    assert_inert(result.stderr.decode())
    assert len(result.stderr.decode().splitlines()) == 1


def test_progress_escapes_whatever_text_it_is_given() -> None:
    stream = io.StringIO()
    progress = Progress(stream, interactive=False)

    progress.waiting(HOSTILE)
    progress.note(OSC52)
    progress.done(TITLE)

    assert_inert(stream.getvalue())
    assert len(stream.getvalue().splitlines()) == 3


# --- 2. the API URL: https off loopback, and where it came from ---------------------------------------


@pytest.fixture
def no_requests(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Record any HTTP request the client would send (and send none)."""
    sent: List[str] = []

    def record(self: requests.Session, method: str, url: str, **_: Any) -> Any:
        sent.append(f"{method} {url}")
        raise requests.ConnectionError("no network in this test")

    monkeypatch.setattr(requests.Session, "request", record)
    return sent


def plant_record(folder: Path, url: str, stage: str = "dev") -> Path:
    """A chalice deployment record, as a repository could carry one."""
    deployed = folder / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    record = deployed / f"{stage}.json"
    record.write_text(json.dumps({"resources": [
        {"name": "rest_api", "resource_type": "rest_api", "rest_api_url": url}], "schema_version": "2.0"}))
    return record


def test_a_planted_http_record_gets_no_signed_request(
    run: Run, tmp_path: Path, no_requests: List[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = plant_record(tmp_path, "http://collector.example.net/api/")
    below = tmp_path / "src"
    below.mkdir()
    monkeypatch.chdir(below)

    for command in (["status"], ["start"], ["stop"], ["ssh"], ["proxy"]):
        code, out, err = run(*command)

        assert code == api.EXIT_USAGE, command
        assert out == ""
        assert err == (
            f"devbox: refusing to sign requests for http://collector.example.net/api/ (from {record}): plain http"
            " would show your AWS access key id and session token to the network; use its https URL (http is"
            " allowed only for 127.0.0.1, ::1 and localhost)\n"
        )
    assert no_requests == []


@pytest.mark.parametrize("how", ["--url", "DEVBOX_URL"])
def test_plain_http_off_loopback_is_refused_from_the_option_and_the_environment(
    run: Run, no_requests: List[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    url = "http://10.0.0.5:8000/api/"
    argv = ["status"]
    if how == "--url":
        argv += ["--url", url]
    else:
        monkeypatch.setenv("DEVBOX_URL", url)

    code, _, err = run(*argv)

    assert code == api.EXIT_USAGE
    assert f"refusing to sign requests for {url} (from {'--url' if how == '--url' else '$DEVBOX_URL'})" in err
    assert no_requests == []


def test_ssh_config_refuses_a_planted_http_record_and_writes_nothing(
    run: Run, tmp_path: Path, no_requests: List[str]
) -> None:
    plant_record(tmp_path, "http://collector.example.net/api/")
    config = tmp_path / "ssh_config"

    code, out, err = run("ssh-config", "--config", str(config))

    assert code == api.EXIT_USAGE
    assert out == ""
    assert err.startswith("devbox: refusing to sign requests for http://collector.example.net/api/")
    assert not config.exists()
    assert no_requests == []


def test_ssh_config_says_which_file_the_url_it_writes_came_from(
    run: Run, tmp_path: Path, no_requests: List[str]
) -> None:
    url = "https://abc123.execute-api.us-east-1.amazonaws.com/api/"
    record = plant_record(tmp_path, url)
    config = tmp_path / "ssh_config"

    code, out, err = run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com")

    assert code == 0, err
    assert out.splitlines()[0] == f"API URL {url} (from {record}): written into the ProxyCommand"
    assert f"--url {url}\n" in config.read_text()


def test_ssh_config_says_a_url_from_the_environment_is_not_written(
    run: Run, tmp_path: Path, no_requests: List[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "https://abc123.execute-api.us-east-1.amazonaws.com/api/"
    monkeypatch.setenv("DEVBOX_URL", url)
    config = tmp_path / "ssh_config"

    code, out, _ = run("ssh-config", "--config", str(config), "--hostname", "devbox.example.com")

    assert code == 0
    assert out.splitlines()[0] == (
        f"API URL {url} (from $DEVBOX_URL): not written into the block; the proxy reads $DEVBOX_URL each time ssh"
        " runs it"
    )
    assert "--url" not in config.read_text()


def test_status_verbose_names_the_api_and_its_source(fake_api: FakeApi, run: Run, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    fake_api.answer("GET", "/status", (200, status_doc()))
    monkeypatch.setenv("DEVBOX_URL", fake_api.url)

    code, out, _ = run("status", "--verbose")

    assert code == 0
    assert out.splitlines()[-1] == f"api:          {fake_api.url} (from $DEVBOX_URL)"


# --- 3. ssh-config writes only what ssh reads as meant ---------------------------------------------------


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client missing: apt-get install -y openssh-client")
def test_ssh_config_with_a_backslash_url_and_a_quote_in_the_key_path_keeps_ssh_working(
    run: Run, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.write_text("Host other\n    Port 2200\n")
    url = "https://x.example.com/api\\"

    code, out, err = run("ssh-config", "--config", str(config), "--url", url, "--identity", "keys/o'brien.pem",
                         "--hostname", "devbox.example.com")

    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"{config}: Host devbox block updated (ssh -G accepts it; previous")
    for host, option, value in (("devbox", "identityfile", str(tmp_path / "keys" / "o'brien.pem")),
                                ("other", "port", "2200")):
        done = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert f"{option} {value}" in done.stdout.splitlines()


def test_ssh_config_without_an_ssh_client_says_the_check_was_skipped(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    config = tmp_path / "config"

    code, out, _ = run("ssh-config", "--config", str(config), "--url", "https://x.example.com/api/",
                       "--hostname", "devbox.example.com")

    assert code == 0
    assert out.splitlines()[-1] == (
        f"{config}: Host devbox block created (not checked with `ssh -G`: ssh is not installed);"
        " connect with `ssh devbox`"
    )


# --- 4. a status of the wrong shape: one line, no traceback ------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"public_ip": ["127.0.0.1"]}, "public_ip is a list, not an IP address"),
        ({"public_ip": {"v4": "127.0.0.1"}}, "public_ip is an object, not an IP address"),
        ({"public_ip": "-oProxyCommand=touch /tmp/x"}, "public_ip is '-oProxyCommand=touch /tmp/x', not an IP address"),
        ({"public_ip": None, "dns_name": {"name": "devbox.example.com"}}, "dns_name is an object, not a DNS name"),
        ({"public_ip": None, "dns_name": "-oProxyCommand=sh"}, "dns_name is '-oProxyCommand=sh', not a DNS name"),
        ({"state": ["running"]}, "state is a list, not a state such as running or stopped"),
        ({"state": None}, "state is null, not a state such as running or stopped"),
        ({"instance_id": {"id": "i-1"}}, "instance_id is an object, not text"),
        # Before these checks, both reached the progress line raw ("SSH port ...", "DNS record ...").
        ({"public_ip": "127.0.0.1" + OSC52}, "public_ip is '127.0.0.1\\x1b]52;c;ZXZpbA==\\x07', not an IP address"),
        ({"public_ip": "127.0.0.1", "dns_name": "devbox.example.com" + CLEAR},
         "dns_name is 'devbox.example.com\\x1b[2J', not a DNS name"),
    ],
)
def test_a_malformed_status_ends_start_wait_and_ssh_with_one_line(
    fake_api: FakeApi, run: Run, ssh_calls: List[List[str]], changes: Dict[str, Any], message: str
) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(**changes)))

    for command in (["start", "--wait"], ["ssh"]):
        code, _, err = run(*command, "--poll-interval", "0", "--url", fake_api.url)

        assert code == api.EXIT_FAILURE, (command, err)
        assert err.splitlines()[-1] == f"devbox: the devbox API answered a malformed status: {message}"
        assert "Traceback" not in err
        assert_inert(err)
    assert ssh_calls == []


def test_a_malformed_state_ends_stop_wait_with_one_line(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/stop", (200, status_doc(state="stopping")))
    fake_api.answer("GET", "/status", (200, status_doc(state={"name": "stopped"})))

    code, _, err = run("stop", "--wait", "--url", fake_api.url)

    assert code == api.EXIT_FAILURE
    assert err == "devbox: the devbox API answered a malformed status: state is an object, not a state such as" \
                  " running or stopped\n"


@pytest.mark.parametrize("dns_name, shown", [({"name": "x"}, "an object"), (["devbox.example.com"], "a list"),
                                             ("evil name\nHost *", "'evil name\\nHost *'")])
def test_ssh_config_with_a_malformed_dns_name_notes_it_in_one_line_and_writes_the_alias(
    fake_api: FakeApi, run: Run, tmp_path: Path, dns_name: Any, shown: str
) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(dns_name=dns_name)))
    config = tmp_path / "config"

    code, _, err = run("ssh-config", "--config", str(config), "--url", fake_api.url)

    assert code == 0
    assert err == ("devbox: note: HostName not taken from the status (the devbox API answered a malformed status:"
                   f" dns_name is {shown}, not a DNS name)\n")
    assert "    HostName devbox\n" in config.read_text()


def test_a_malformed_address_ends_the_proxy_with_one_line(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc()))
    fake_api.answer("GET", "/status", (200, status_doc(public_ip=["203.0.113.10"])))

    result = run_proxy(fake_api.url, 22)

    assert result.returncode == api.EXIT_FAILURE
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "devbox: the devbox API answered a malformed status: public_ip is a list, not an IP address\n"
    )

