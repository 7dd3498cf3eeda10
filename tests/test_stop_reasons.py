"""Why the box stopped, and since when: /status's stopped_by and stopped_at, from what EC2 already says."""
from datetime import datetime, timedelta, timezone

import pytest

from chalicelib.instance import stop_fields
from tests.conftest import scheduled_event

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


def stopped(code, transition="", tags=(), launched=NOW - timedelta(hours=2)):
    return {"State": {"Name": "stopped"}, "StateReason": {"Code": code, "Message": code},
            "StateTransitionReason": transition, "LaunchTime": launched,
            "Tags": [{"Key": k, "Value": v} for k, v in tags]}


@pytest.mark.parametrize("code,by", [
    ("Client.InstanceInitiatedShutdown", "idle"),
    ("Client.UserInitiatedShutdown", "user"),
    ("Server.SpotInstanceShutdown", "spot"),
    ("Server.ScheduledStop", None),
])
def test_each_state_reason_names_who_stopped_the_box(code, by):
    assert stop_fields(stopped(code), "stopped")["stopped_by"] == by


def test_the_stop_time_comes_from_the_state_transition_reason():
    fields = stop_fields(stopped("Client.UserInitiatedShutdown", "User initiated (2026-11-29 11:58:07 GMT)"), "stopped")
    assert fields == {"stopped_by": "user", "stopped_at": "2026-11-29T11:58:07Z"}


def test_an_idle_stop_without_a_time_takes_the_watchers_last_word():
    fields = stop_fields(stopped("Client.InstanceInitiatedShutdown", "", tags=[
        ("devbox:idle", "idle since 2026-11-29T11:20:00Z, stops at 2026-11-29T11:50:00Z")]), "stopped")
    assert fields == {"stopped_by": "idle", "stopped_at": "2026-11-29T11:50:00Z"}


def test_max_runtime_tag_counts_only_for_the_session_it_ended():
    this_session = stopped("Client.UserInitiatedShutdown", tags=[("devbox:stopped-by", "max-runtime 2026-11-29T11:59:00Z")])
    assert stop_fields(this_session, "stopped")["stopped_by"] == "max-runtime"
    later_session = stopped("Client.UserInitiatedShutdown", launched=NOW,
                            tags=[("devbox:stopped-by", "max-runtime 2026-11-29T11:59:00Z")])
    assert stop_fields(later_session, "stopped")["stopped_by"] == "user"


def test_a_box_that_is_not_stopped_has_no_stop_fields():
    assert stop_fields({"State": {"Name": "running"}}, "running") == {"stopped_by": None, "stopped_at": None}


def test_status_of_a_box_the_user_stopped(stopped_devbox, make_client):
    doc = make_client(stopped_devbox.env()).http.get("/status").json_body
    assert doc["stopped_by"] == "user" and doc["stopped_at"].endswith("Z")
    stopped_at = datetime.strptime(doc["stopped_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stopped_at).total_seconds()) < 120


def test_status_of_an_interrupted_box_says_spot(devbox, make_client):
    devbox.interrupt()
    assert make_client(devbox.env()).http.get("/status").json_body["stopped_by"] == "spot"


def test_status_of_a_box_the_max_runtime_job_stopped(devbox, make_client, monkeypatch):
    from chalicelib import service

    monkeypatch.setattr(service, "_now", lambda: datetime.now(timezone.utc) + timedelta(hours=5))
    api = make_client(devbox.env(MAX_RUNTIME_HOURS="4"))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert api.http.get("/status").json_body["stopped_by"] == "max-runtime"


def test_status_of_a_running_box_shows_what_the_watcher_said(devbox, make_client):
    devbox.ec2.create_tags(Resources=[devbox.instance_id], Tags=[{"Key": "devbox:idle", "Value": "busy: ssh session"}])
    doc = make_client(devbox.env()).http.get("/status").json_body
    assert (doc["idle"], doc["stopped_by"], doc["stopped_at"]) == ("busy: ssh session", None, None)
