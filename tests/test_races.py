"""Races and repeated or reordered events: the final state is the one a user expects."""
import threading
from datetime import datetime, timedelta, timezone

import pytest

from chalicelib import aws, service
from chalicelib.config import Config
from tests.conftest import state_event


def test_two_callers_starting_at_once_are_both_let_in(stopped_devbox, one_request_at_a_time):
    config = Config.from_env(stopped_devbox.env())
    ec2 = aws.client("ec2")
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def start(ip):
        barrier.wait()
        try:
            results[ip] = service.start(ec2, config, config.box_name, ip)
        except Exception as err:  # collected so the test shows it
            errors.append(err)

    threads = [threading.Thread(target=start, args=(ip,)) for ip in ("203.0.113.7", "198.51.100.9")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert stopped_devbox.state() in ("pending", "running")
    assert stopped_devbox.rule_cidrs() == ["198.51.100.9/32"] * 2 + ["203.0.113.7/32"] * 2


def test_same_caller_twice_at_once_adds_its_rules_once(stopped_devbox, one_request_at_a_time):
    config = Config.from_env(stopped_devbox.env())
    ec2 = aws.client("ec2")
    barrier = threading.Barrier(2)
    errors = []

    def start():
        barrier.wait()
        try:
            service.start(ec2, config, config.box_name, "203.0.113.7")
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32"] * 2


def test_duplicate_rule_from_concurrent_request_is_not_an_error(stopped_devbox, make_client, caller_ip, inject_fault):
    caller_ip("203.0.113.7")
    inject_fault("ec2", "AuthorizeSecurityGroupIngress", "InvalidPermission.Duplicate", times=1)
    response = make_client(stopped_devbox.env()).http.post("/start")
    assert response.status_code == 200
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32"] * 2


def test_late_running_event_after_stop_creates_no_record(api, devbox):
    devbox.stop()
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    assert devbox.a_records() == []


def test_stopped_event_arriving_after_the_next_running_event_changes_nothing(api, devbox, caller_ip):
    caller_ip("203.0.113.7")
    earlier = datetime.now(timezone.utc) - timedelta(seconds=30)
    api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped", when=earlier))
    assert len(devbox.a_records()) == 1
    assert len(devbox.rules()) == 2


def test_failed_revoke_raises_and_the_retry_converges(api, devbox, caller_ip, inject_fault):
    for ip in ("203.0.113.7", "198.51.100.9"):
        caller_ip(ip)
        api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    event = state_event(api, devbox.instance_id, "stopped")
    inject_fault("ec2", "RevokeSecurityGroupIngress", "RequestLimitExceeded", status=503, times=1)
    with pytest.raises(Exception, match="RequestLimitExceeded"):
        api.lambda_.invoke("on_stopped", event)
    assert len(devbox.rules()) == 4
    api.lambda_.invoke("on_stopped", event)  # Lambda's retry of the same event
    assert devbox.rules() == [] and devbox.a_records() == []


def test_rules_already_gone_are_skipped_when_revoking(api, devbox, caller_ip):
    caller_ip("203.0.113.7")
    api.http.post("/start")
    devbox.stop()
    one = devbox.rules()[0]["SecurityGroupRuleId"]
    devbox.ec2.revoke_security_group_ingress(GroupId=devbox.group_id, SecurityGroupRuleIds=[one])
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    assert devbox.rules() == []


def test_record_deleted_in_between_is_fine(api, devbox):
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    event = state_event(api, devbox.instance_id, "stopped")
    api.lambda_.invoke("on_stopped", event)
    api.lambda_.invoke("on_stopped", event)
    assert devbox.a_records() == []


def test_start_racing_a_stopped_handler_keeps_its_access(stopped_devbox, make_client, caller_ip, monkeypatch):
    """The handler saw 'stopped'; then a start re-used the caller's rule; then the handler revokes."""
    from chalicelib import box

    caller_ip("203.0.113.7")
    api = make_client(stopped_devbox.env())
    api.http.post("/start")                      # the caller's rules, stamped now
    stopped_devbox.stop()
    stopped_at = datetime.now(timezone.utc) + timedelta(seconds=2)
    # The next /start happens (in this test) a few seconds after the stop event's time.
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    monkeypatch.setattr(service, "_now", lambda: later)
    api.http.post("/start")
    # The stopped handler had described the box while it was still stopped.
    real = box.describe_box
    monkeypatch.setattr(box, "describe_box", lambda ec2, name: box.BoxView(name, tuple(
        {**i, "State": {"Name": "stopped", "Code": 80}} for i in real(ec2, name).instances)))
    service.on_stopped(aws.client, Config.from_env(stopped_devbox.env()), "devbox", stopped_devbox.instance_id, stopped_at)
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32", "203.0.113.7/32"]
