"""The admin side of fleet mode in the `devbox` command: `devbox boxes` and `devbox stop --box NAME`.

The API is faked at the HTTP level (tests.test_api.FakeApi); what a user sees is asserted on the
captured stdout/stderr.
"""
import json
from typing import Any, Dict

import pytest

from devbox import api
from devbox.api import CliError, DevboxApi
from tests.test_api import FakeApi, fake_api, status_doc  # noqa: F401 (fixtures)
from tests.test_cli import Run, isolated, run  # noqa: F401 (fixtures)
from tests.test_cli_hostile import CLEAR, HOSTILE, OSC52, assert_inert

ALICE = "arn:aws:iam::123456789012:user/alice"
BOB = "arn:aws:iam::123456789012:user/bob"
CAROL = "arn:aws:iam::123456789012:role/carol"


def box_entry(box: str, owner: str, **changes: Any) -> Dict[str, Any]:
    """One entry of GET /boxes: a running spot box unless told otherwise."""
    entry: Dict[str, Any] = {
        "box": box, "owner": owner, "state": "running", "instance_type": "t3.large", "market": "spot",
        "launch_time": "2024-05-01T10:00:00+00:00", "uptime_seconds": 3900, "dns_name": f"{box}.example.com",
        "cost_this_month_usd": 12.5,
    }
    return {**entry, **changes}


def listing(*entries: Dict[str, Any], **changes: Any) -> Dict[str, Any]:
    return {"boxes": list(entries), "count": len(entries), "max_boxes": 20, **changes}


THREE = listing(
    box_entry("carol", CAROL, state="none", instance_type=None, market=None, launch_time=None, uptime_seconds=None,
              dns_name=None, cost_this_month_usd=None),
    box_entry("alice", ALICE, uptime_seconds=93784, cost_this_month_usd=3.456),
    box_entry("bob", BOB, state="stopped", instance_type="m5.xlarge", uptime_seconds=None, cost_this_month_usd=0),
)


# --- devbox boxes -----------------------------------------------------------------------------------


def test_boxes_prints_a_table_sorted_by_name_then_the_count(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, THREE))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "BOX    OWNER                                 STATE    TYPE       UPTIME     COST THIS MONTH",
        "alice  arn:aws:iam::123456789012:user/alice  running  t3.large   1d 2h 03m  $3.46",
        "bob    arn:aws:iam::123456789012:user/bob    stopped  m5.xlarge  -          $0.00",
        "carol  arn:aws:iam::123456789012:role/carol  none     -          -          -",
        "3 of at most 20 boxes",
    ]
    assert fake_api.calls() == ["GET /boxes"]


def test_boxes_marks_a_box_being_removed_in_its_state(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, listing(
        box_entry("bob", BOB, state="stopped", uptime_seconds=None, removing="2026-11-29T20:00:00Z"))))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert out.splitlines()[1].split("  ")[:3] == ["bob", "arn:aws:iam::123456789012:user/bob",
                                                    "stopped (being removed)"]


def test_boxes_shows_short_uptimes_in_minutes_and_seconds(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, listing(box_entry("dev-1", ALICE, uptime_seconds=125.7))))

    code, out, _ = run("boxes", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines()[1].split()[4:6] == ["2m", "05s"]
    assert out.splitlines()[-1] == "1 of at most 20 boxes"


def test_boxes_of_an_empty_fleet_prints_only_the_count(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, listing()))

    code, out, _ = run("boxes", "--url", fake_api.url)

    assert (code, out) == (0, "0 of at most 20 boxes\n")


def test_boxes_without_a_limit_counts_the_boxes(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, {"boxes": [box_entry("alice", ALICE)]}))

    code, out, _ = run("boxes", "--url", fake_api.url)

    assert code == 0
    assert out.splitlines()[-1] == "1 box"


def test_boxes_json_prints_the_listing(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, THREE))

    code, out, err = run("boxes", "--json", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert json.loads(out) == THREE


def test_boxes_refused_to_a_non_admin_says_who_may_list_them(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (403, {"Code": "Forbidden", "Message": "user/eve is not an admin"}))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert code == api.EXIT_AUTH
    assert out == ""
    assert err == ("devbox: only the deployment's ADMIN_OWNERS may list or stop others' boxes"
                   " (HTTP 403 Forbidden): user/eve is not an admin\n")


def test_boxes_with_a_bad_signature_keeps_the_signature_error(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (403, {"message": "Signature expired"}))

    code, _, err = run("boxes", "--url", fake_api.url)

    assert code == api.EXIT_AUTH
    assert err == "devbox: access denied by the devbox API (HTTP 403): Signature expired\n"


def test_boxes_on_a_deployment_without_the_route_says_it_is_not_a_fleet(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (403, {"message": "Missing Authentication Token"}))

    code, _, err = run("boxes", "--url", fake_api.url)

    assert code == api.EXIT_AUTH
    assert err == ("devbox: the devbox API has no fleet routes (HTTP 403: Missing Authentication Token): the"
                   " deployment is not a fleet or predates fleet mode, or the URL is wrong\n")


@pytest.mark.parametrize("status, exit_code", [(404, api.EXIT_NOT_FOUND), (400, api.EXIT_FAILURE)])
def test_boxes_on_a_single_box_deployment_says_so_in_one_line(fake_api: FakeApi, run: Run, status: int,
                                                              exit_code: int) -> None:
    fake_api.answer("GET", "/boxes", (status, {"Code": "NotAFleet", "Message": "this deployment has one box"}))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert (code, out) == (exit_code, "")
    assert err == (f"devbox: the devbox API lists no boxes (HTTP {status} NotAFleet): this deployment has one box;"
                   " is this deployment a fleet?\n")


def test_boxes_shows_escape_sequences_in_server_strings_escaped(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, listing(
        box_entry("alice", ALICE + HOSTILE, state="running" + CLEAR, instance_type="t3" + OSC52),
        box_entry("bob" + HOSTILE, BOB))))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert_inert(out)
    lines = out.splitlines()
    assert len(lines) == 4  # header, two boxes, count: no forged row
    assert lines[1].split()[:2] == [
        "alice", ALICE + "x\\x1b]52;c;ZXZpbA==\\x07\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\r\\x08\\nstate:"]
    assert ALICE + api.printable(HOSTILE) + "  running\\x1b[2J  t3\\x1b]52;c;ZXZpbA==\\x07  1h 05m  $12.50" in lines[1]
    assert lines[2].startswith("bob" + api.printable(HOSTILE) + "  " + BOB)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"boxes": {"alice": {}}}, "boxes is an object, not a list of boxes"),
        ({"boxes": None}, "boxes is null, not a list of boxes"),
        ({"boxes": ["alice"]}, "boxes[0] is 'alice', not an object"),
        (listing(box_entry("alice", ALICE), {**box_entry("bob", BOB), "owner": ["arn"]}),
         "boxes[1].owner is a list, not text"),
        (listing(box_entry("", ALICE)), "boxes[0].box is '', not a box name"),
        (listing({"owner": ALICE}), "boxes[0].box is null, not a box name"),
        (listing(box_entry("alice", ALICE, state={"name": "running"})), "boxes[0].state is an object, not text"),
        (listing(box_entry("alice", ALICE, uptime_seconds="1h" + OSC52)),
         "boxes[0].uptime_seconds is '1h\\x1b]52;c;ZXZpbA==\\x07', not a number of at least 0"),
        (listing(box_entry("alice", ALICE, uptime_seconds=-5)),
         "boxes[0].uptime_seconds is the number -5, not a number of at least 0"),
        (listing(box_entry("alice", ALICE, cost_this_month_usd=True)),
         "boxes[0].cost_this_month_usd is true, not a number"),
        (listing(box_entry("alice", ALICE, cost_this_month_usd=float("inf"))),
         "boxes[0].cost_this_month_usd is the number inf, not a number"),
        (listing(box_entry("alice", ALICE), count="1"), "count is '1', not a whole number of at least 0"),
        (listing(box_entry("alice", ALICE), max_boxes=2.5), "max_boxes is the number 2.5, not a whole number of"
                                                            " at least 0"),
    ],
)
def test_a_malformed_listing_ends_boxes_with_one_line(fake_api: FakeApi, run: Run, document: Dict[str, Any],
                                                      message: str) -> None:
    fake_api.answer("GET", "/boxes", (200, document))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert code == api.EXIT_FAILURE
    assert out == ""
    assert err == f"devbox: the devbox API answered a malformed box listing: {message}\n"
    assert_inert(err)


def test_an_answer_without_a_listing_ends_boxes_with_one_line(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/boxes", (200, status_doc()))

    code, out, err = run("boxes", "--url", fake_api.url)

    assert (code, out) == (api.EXIT_FAILURE, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("devbox: the devbox API answered HTTP 200 without a box listing (")


# --- devbox stop --box ----------------------------------------------------------------------------------


def test_stop_box_posts_to_the_box_and_prints_its_status(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/boxes/bob/stop", (200, status_doc(box="bob", owner=BOB, state="stopping")))

    code, out, err = run("stop", "--box", "bob", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert fake_api.calls() == ["POST /boxes/bob/stop"]
    assert json.loads(fake_api.requests[0].body or b"{}") == {}
    assert fake_api.requests[0].headers["Authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert out.splitlines()[:3] == [
        "box:          bob",
        "owner:        arn:aws:iam::123456789012:user/bob",
        "state:        stopping",
    ]


def test_status_of_a_box_being_removed_says_starts_are_refused(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("GET", "/status", (200, status_doc(box="bob", owner=BOB, state="stopped",
                                                       removing="2026-11-29T20:00:00Z")))

    code, out, err = run("status", "--url", fake_api.url)

    assert (code, err) == (0, "")
    assert out.splitlines()[2:4] == [
        "state:        stopped",
        "removing:     an admin began removing this box at 2026-11-29 20:00:00 UTC; starts are refused until that"
        " has finished",
    ]


def test_stop_box_json_prints_the_status_document(fake_api: FakeApi, run: Run) -> None:
    document = status_doc(box="bob", owner=BOB, state="stopping")
    fake_api.answer("POST", "/boxes/bob/stop", (200, document))

    code, out, _ = run("stop", "--box", "bob", "--json", "--url", fake_api.url)

    assert code == 0
    assert json.loads(out) == document


def test_stop_without_box_still_stops_your_own(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/stop", (200, status_doc(state="stopping")))

    code, out, _ = run("stop", "--url", fake_api.url)

    assert code == 0
    assert fake_api.calls() == ["POST /stop"]
    assert out.splitlines()[:2] == ["box:          devbox", "state:        stopping"]


def test_stop_box_refused_to_a_non_admin_says_who_may_stop_it(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/boxes/bob/stop", (403, {"Code": "Forbidden", "Message": "admins only"}))

    code, out, err = run("stop", "--box", "bob", "--url", fake_api.url)

    assert (code, out) == (api.EXIT_AUTH, "")
    assert err == ("devbox: only the deployment's ADMIN_OWNERS may list or stop others' boxes"
                   " (HTTP 403 Forbidden): admins only\n")


def test_stop_of_an_unknown_box_names_it(fake_api: FakeApi, run: Run) -> None:
    fake_api.answer("POST", "/boxes/nobody/stop", (404, {"Code": "NotFound", "Message": "no box nobody"}))

    code, out, err = run("stop", "--box", "nobody", "--url", fake_api.url)

    assert (code, out) == (api.EXIT_NOT_FOUND, "")
    assert err == "devbox: no box nobody (HTTP 404 NotFound): no box nobody\n"


@pytest.mark.parametrize("name", ["Bob", "-bob", "bob-", "b_b", "bob/../stop", "a" * 64, "", "bob\x1b[2J", "bób"])
def test_a_bad_box_name_is_refused_without_any_request(fake_api: FakeApi, run: Run, name: str) -> None:
    code, out, err = run("stop", f"--box={name}", "--url", fake_api.url)

    assert (code, out) == (api.EXIT_USAGE, "")
    assert "argument --box: not a box name: " in err
    assert "1-63 lowercase letters, digits and hyphens" in err
    assert_inert(err)
    assert fake_api.requests == []


@pytest.mark.parametrize("name", ["a", "bob", "dev-box-2", "0", "a" * 63])
def test_box_names_that_are_dns_labels_are_accepted(name: str) -> None:
    assert api.check_box_name(name) == name


def test_the_client_refuses_a_bad_box_name_before_any_request(fake_api: FakeApi) -> None:
    client = DevboxApi(fake_api.url, api.make_auth(fake_api.url), timeout=5.0)

    with pytest.raises(CliError) as raised:
        client.stop_box("../stop")

    assert raised.value.exit_code == api.EXIT_USAGE
    assert raised.value.message.startswith("not a box name: '../stop'")
    assert fake_api.requests == []


def test_stop_box_with_wait_is_a_usage_error_without_any_request(fake_api: FakeApi, run: Run) -> None:
    code, out, err = run("stop", "--box", "bob", "--wait", "--url", fake_api.url)

    assert (code, out) == (api.EXIT_USAGE, "")
    assert err == ("devbox: --wait follows only your own box; see whether bob is stopped with `devbox boxes`\n")
    assert fake_api.requests == []


def test_help_lists_the_boxes_command(run: Run) -> None:
    code, out, _ = run("--help")

    assert code == 0
    assert "boxes" in out
    assert "fleet admins: list every box of the fleet" in " ".join(out.split())
