"""The local relay: one event per state change, with the shape EventBridge gives it."""
from devbox.relay import Relay, state_change_event


def make_relay(states):
    delivered = []
    relay = Relay(lambda: states.pop(0),
                  {"running": lambda e, c: delivered.append(("running", e)),
                   "stopped": lambda e, c: delivered.append(("stopped", e))},
                  lambda state: state_change_event("i-0123456789abcdef0", state, "us-east-1"), lambda _: None)
    return relay, delivered


def test_first_poll_only_learns_the_state():
    relay, delivered = make_relay(["stopped"])
    assert relay.poll_once() is None and delivered == []


def test_each_change_is_delivered_once():
    relay, delivered = make_relay(["stopped", "pending", "running", "running", "stopping", "stopped"])
    for _ in range(6):
        relay.poll_once()
    assert [state for state, _ in delivered] == ["running", "stopped"]


def test_event_has_eventbridge_shape():
    event = state_change_event("i-0123456789abcdef0", "running", "eu-west-1")
    assert event["source"] == "aws.ec2"
    assert event["detail-type"] == "EC2 Instance State-change Notification"
    assert event["detail"] == {"instance-id": "i-0123456789abcdef0", "state": "running"}
    assert event["region"] == "eu-west-1" and event["time"].endswith("Z")
