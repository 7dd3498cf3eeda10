"""AWS refusing or failing: the caller gets a clear status and no stray access is left."""
import json

from tests.conftest import state_event


def body(response):
    return json.loads(response.body)


def test_capacity_refusal_is_503_and_removes_the_new_rule(stopped_devbox, make_client, caller_ip, inject_fault):
    caller_ip("203.0.113.7")
    inject_fault("ec2", "StartInstances", "InsufficientInstanceCapacity", status=500)
    response = make_client(stopped_devbox.env()).http.post("/start")
    assert response.status_code == 503
    assert "capacity" in body(response)["Message"]
    assert stopped_devbox.rules() == []
    assert stopped_devbox.state() == "stopped"


def test_incorrect_state_refusal_is_409_and_removes_the_new_rule(stopped_devbox, make_client, caller_ip, inject_fault):
    caller_ip("203.0.113.7")
    inject_fault("ec2", "StartInstances", "IncorrectInstanceState")
    response = make_client(stopped_devbox.env()).http.post("/start")
    assert response.status_code == 409
    assert stopped_devbox.rules() == []


def test_failed_start_keeps_rules_of_callers_already_allowed(stopped_devbox, make_client, caller_ip, inject_fault):
    api = make_client(stopped_devbox.env())
    caller_ip("203.0.113.7")
    api.http.post("/start")
    stopped_devbox.stop()
    inject_fault("ec2", "StartInstances", "InsufficientInstanceCapacity", status=500)
    assert api.http.post("/start").status_code == 503
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32", "203.0.113.7/32"]


def test_describe_failure_is_503_with_message_not_traceback(api, inject_fault):
    inject_fault("ec2", "DescribeInstances", "RequestLimitExceeded", status=503, retried=True)
    response = api.http.get("/status")
    assert response.status_code == 503
    assert "RequestLimitExceeded" in body(response)["Message"]
    assert "Traceback" not in response.body.decode()


def test_throttled_describe_is_retried_and_succeeds(api, inject_fault, aws_calls):
    inject_fault("ec2", "DescribeInstances", "RequestLimitExceeded", status=503, times=1, retried=True)
    response = api.http.get("/status")
    assert response.status_code == 200
    assert aws_calls.calls == ["DescribeInstances", "DescribeSecurityGroupRules"]


def test_route53_failure_in_running_handler_raises_for_lambda_retry(api, devbox, inject_fault):
    inject_fault("route53", "ChangeResourceRecordSets", "InvalidInput")
    event = state_event(api, devbox.instance_id, "running")
    try:
        api.lambda_.invoke("on_running", event)
    except Exception as err:  # Lambda marks the invocation failed and retries it
        assert "InvalidInput" in str(err)
    else:
        raise AssertionError("the handler swallowed a Route53 failure")
    assert devbox.a_records() == []


def test_stop_while_pending_is_409(api, devbox, inject_fault):
    inject_fault("ec2", "StopInstances", "IncorrectInstanceState")
    response = api.http.post("/stop")
    assert response.status_code == 409
    assert "try again" in body(response)["Message"]


def test_spot_price_failure_still_writes_the_record(api, devbox, inject_fault):
    inject_fault("ec2", "DescribeSpotPriceHistory", "UnauthorizedOperation", status=403)
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    assert len(devbox.a_records()) == 1
    assert api.http.get("/status").json_body["spot_price_per_hour"] is None


def test_denied_call_does_not_leak_aws_text(api, inject_fault):
    inject_fault("ec2", "DescribeSecurityGroupRules", "UnauthorizedOperation", status=403)
    response = api.http.get("/status")
    assert response.status_code == 502
    assert "IAM role" in body(response)["Message"]
    assert "injected" not in body(response)["Message"]


def test_in_place_resize_refused_by_ec2_is_409_and_changes_nothing(empty_box, make_client, caller_ip, inject_fault):
    stopped_devbox = empty_box
    stopped_devbox.launch(spot=False)
    stopped_devbox.stop()
    caller_ip("203.0.113.7")
    api = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge"))
    inject_fault("ec2", "ModifyInstanceAttribute", "UnsupportedOperation")
    response = api.http.post("/start", body=json.dumps({"instance_type": "m6i.xlarge"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 409
    assert "m6i.xlarge" in body(response)["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []
    assert stopped_devbox.current()["InstanceType"] == "t3.large" and len(stopped_devbox.instances()) == 1
