"""What each handler logs: one JSON line per request, event and scheduled run, at LOG_LEVEL."""
import json
import logging

import pytest

from app import app
from tests.conftest import in_order, scheduled_event, state_event


def lines(caplog):
    """The JSON operation lines logged so far."""
    found = []
    for record in caplog.records:
        try:
            parsed = json.loads(record.getMessage())
        except ValueError:
            continue
        if isinstance(parsed, dict) and "operation" in parsed:
            found.append((record.levelname, parsed))
    return found


@pytest.fixture
def capture(caplog):
    caplog.set_level(logging.DEBUG, logger="devbox")
    app.log.propagate = True  # Chalice's own handler writes to stdout; let caplog see the records too
    yield caplog
    app.log.propagate = False


def test_a_start_logs_one_line_with_box_instance_caller_outcome_calls_and_duration(stopped_devbox, make_client,
                                                                                     caller_ip, capture):
    caller_ip("203.0.113.7")
    make_client(stopped_devbox.env()).http.post("/start")
    ((level, line),) = lines(capture)
    assert level == "INFO"
    assert line["operation"] == "start" and line["box"] == "devbox" and line["caller"] == "203.0.113.7"
    assert line["instance"] == stopped_devbox.instance_id and line["outcome"] == "start" and line["status"] == 200
    assert in_order(line["calls"]) == ["DescribeInstances", "DescribeSecurityGroupRules", "AuthorizeSecurityGroupIngress",
                             "StartInstances"]
    assert line["aws_calls"] == 4 and line["duration_ms"] > 0


def test_info_lines_reach_the_log_although_chalice_defaults_to_error(devbox, make_client, capture):
    make_client(devbox.env()).http.get("/status")
    assert app.log.level == logging.INFO
    assert [line["operation"] for _, line in lines(capture)] == ["status"]


def test_log_level_warning_drops_the_info_lines(devbox, make_client, capture):
    make_client(devbox.env(LOG_LEVEL="WARNING")).http.get("/status")
    assert lines(capture) == []


def test_an_aws_refusal_is_logged_with_its_code_and_nothing_secret(stopped_devbox, make_client, inject_fault,
                                                                   capture):
    inject_fault("ec2", "StartInstances", "UnauthorizedOperation", status=403)
    response = make_client(stopped_devbox.env()).http.post("/start")
    assert response.status_code == 502
    ((level, line),) = lines(capture)
    assert level == "ERROR"
    assert line["outcome"] == "failed" and line["status"] == 502
    assert line["error"]["code"] == "UpstreamError" and line["error"]["aws_code"] == "UnauthorizedOperation"
    text = capture.text
    for secret in ("testing", "Authorization", "X-Amz-Security-Token", "Signature="):
        assert secret not in text


def test_a_refused_request_is_logged_as_refused(stopped_devbox, make_client, capture):
    make_client(stopped_devbox.env()).http.post("/start", body="{", headers={"Content-Type": "application/json"})
    ((level, line),) = lines(capture)
    assert (level, line["outcome"], line["status"], line["error"]["code"]) == ("INFO", "refused", 400, "BadRequestError")


def test_event_handlers_and_the_schedule_log_their_outcome(devbox, make_client, capture):
    api = make_client(devbox.env())
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    found = {line["operation"]: line for _, line in lines(capture)}
    assert set(found) == {"on_running", "on_stopped", "housekeeping"}
    assert found["on_running"]["instance"] == devbox.instance_id
    assert "upserted devbox.example.com" in found["on_running"]["outcome"]
    assert found["on_stopped"]["outcome"].startswith("revoked")
    assert in_order(found["housekeeping"]["calls"]) == ["DescribeInstances", "DescribeSecurityGroupRules"]


def test_a_failing_event_handler_logs_an_error_line_and_raises_for_lambda_to_retry(devbox, make_client, capture,
                                                                                   inject_fault):
    api = make_client(devbox.env())
    inject_fault("route53", "ChangeResourceRecordSets", "InvalidInput")
    with pytest.raises(Exception):
        api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    ((level, line),) = lines(capture)
    assert level == "ERROR" and line["outcome"] == "failed" and line["error"]["aws_code"] == "InvalidInput"


def test_an_unknown_log_level_keeps_info_and_says_so(devbox, make_client, capture):
    make_client(devbox.env(LOG_LEVEL="LOUD")).http.get("/status")
    assert app.log.level == logging.INFO
    assert "LOG_LEVEL 'LOUD' is not one of" in capture.text
