"""The local relay: one event per state change of each of the box's instances, shaped as EventBridge sends it."""
import pytest

from devbox.relay import Relay, state_change_event

OLD, NEW = "i-0123456789abcdef0", "i-0fedcba9876543210"


def make_relay(polls, fail_once=()):
    delivered = []
    failing = set(fail_once)

    def handler(name):
        def handle(event, context):
            key = (event["detail"]["instance-id"], name)
            if key in failing:
                failing.discard(key)
                raise RuntimeError("handler failed")
            delivered.append(key)
        return handle

    relay = Relay(lambda: polls.pop(0), {"running": handler("running"), "stopped": handler("stopped"),
                                         "terminated": handler("terminated")},
                  lambda iid, state: state_change_event(iid, state, "us-east-1"), lambda _: None)
    return relay, delivered


def test_first_poll_only_learns_the_states():
    relay, delivered = make_relay([{OLD: "stopped"}])
    assert relay.poll_once() == [] and delivered == []


def test_each_change_is_delivered_once():
    states = ["stopped", "pending", "running", "running", "stopping", "stopped"]
    relay, delivered = make_relay([{OLD: s} for s in states])
    for _ in states:
        relay.poll_once()
    assert delivered == [(OLD, "running"), (OLD, "stopped")]


def test_an_instance_launched_later_gets_its_first_state_delivered():
    # A relaunch: the new instance is already running at its first poll, the old one terminates.
    relay, delivered = make_relay([{OLD: "stopped"}, {OLD: "stopped", NEW: "running"},
                                   {OLD: "terminated", NEW: "running"}])
    for _ in range(3):
        relay.poll_once()
    assert delivered == [(NEW, "running"), (OLD, "terminated")]


def test_a_failed_handler_is_delivered_again_on_the_next_poll():
    relay, delivered = make_relay([{OLD: "stopped"}, {OLD: "running"}, {OLD: "running"}],
                                  fail_once=[(OLD, "running")])
    relay.poll_once()
    with pytest.raises(RuntimeError):
        relay.poll_once()
    relay.poll_once()
    assert delivered == [(OLD, "running")]


def test_event_has_eventbridge_shape():
    event = state_change_event("i-0123456789abcdef0", "running", "eu-west-1")
    assert event["source"] == "aws.ec2"
    assert event["detail-type"] == "EC2 Instance State-change Notification"
    assert event["detail"] == {"instance-id": "i-0123456789abcdef0", "state": "running"}
    assert event["region"] == "eu-west-1" and event["time"].endswith("Z")
