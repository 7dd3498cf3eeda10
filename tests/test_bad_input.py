"""Bad input: each answer has the right status and a clear message, and nothing changes."""
import json

import pytest

from app import app


def proxy_event(path, method="POST", body=None, identity=None):
    """An API Gateway proxy event as Lambda receives it (to shape the request context freely)."""
    return {
        "resource": path, "path": path, "httpMethod": method,
        "headers": {"content-type": "application/json"},
        "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
        "requestContext": {"httpMethod": method, "resourcePath": path, "path": f"/api{path}",
                           "identity": identity if identity is not None else {}},
        "body": body, "isBase64Encoded": False,
    }


@pytest.fixture
def invoke(devbox, monkeypatch):
    """Call the app as Lambda would, with the stage's environment set."""
    for key, value in devbox.env().items():
        monkeypatch.setenv(key, value)

    def call(event):
        answer = app(event, None)
        return answer["statusCode"], json.loads(answer["body"])

    return call


@pytest.mark.parametrize("identity", [{}, {"sourceIp": None}, {"sourceIp": ""}])
def test_missing_source_ip_is_400_and_changes_nothing(stopped_devbox, invoke, identity):
    status, answer = invoke(proxy_event("/start", identity=identity))
    assert status == 400
    assert "source IP" in answer["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


@pytest.mark.parametrize("ip", ["not-an-ip", "203.0.113.7/0", "0.0.0.0", "::", "224.0.0.1", "203.0.113.7, 10.0.0.1"])
def test_invalid_source_ip_is_400_and_changes_nothing(stopped_devbox, invoke, ip):
    status, answer = invoke(proxy_event("/start", identity={"sourceIp": ip}))
    assert status == 400
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_ipv4_mapped_ipv6_caller_gets_an_ipv4_rule(stopped_devbox, invoke):
    status, answer = invoke(proxy_event("/start", identity={"sourceIp": "::ffff:203.0.113.7"}))
    assert status == 200
    assert answer["allowed_ips"] == ["203.0.113.7/32"]


def test_oversized_body_is_413_and_changes_nothing(stopped_devbox, make_client):
    big = json.dumps({"instance_type": "x" * 10000})
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


@pytest.mark.parametrize("body", ["[]", "\"start\"", "42", "null"])
def test_body_that_is_not_an_object_is_400(stopped_devbox, make_client, body):
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert stopped_devbox.rules() == []


def test_non_string_instance_type_is_400(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES="t3.large")).http.post(
        "/start", body=json.dumps({"instance_type": 7}), headers={"Content-Type": "application/json"})
    assert response.status_code == 400


def test_stop_refuses_any_field(devbox, api):
    response = api.http.post("/stop", body=json.dumps({"force": True}), headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert devbox.state() == "running"


def test_wrong_content_type_is_415(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body="instance_type=t3.large", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert stopped_devbox.rules() == []


@pytest.mark.parametrize("variable,value", [
    ("BOX_NAME", ""), ("BOX_NAME", "my box"), ("LAUNCH_TEMPLATE_ID", ""), ("LAUNCH_TEMPLATE_ID", "devbox"),
    ("INSTANCE_ID", "i-0123456789abcdef0"), ("SUBNET_IDS", "subnet-1,vpc-2"), ("DATA_VOLUME_GIB", "0"),
    ("ON_DEMAND_FALLBACK", "maybe"), ("SECURITY_GROUP_ID", ""), ("DNS_TTL", "soon"),
    ("DNS_TTL", "-5"), ("SSH_PORT", "70000"), ("HOSTED_ZONE_ID", "not a zone"), ("DOMAIN_NAME", "no spaces.com x"),
    ("ACCESS_TTL_HOURS", "0"), ("RULE_QUOTA", "1"), ("MAX_RUNTIME_HOURS", "forever"),
    ("NOTIFY_TOPIC_ARN", "my-topic"), ("ALLOWED_INSTANCE_TYPES", "t3.large,BIG"),
])
def test_misconfiguration_is_500_naming_the_variable(stopped_devbox, make_client, variable, value):
    response = make_client(stopped_devbox.env(**{variable: value})).http.post("/start")
    assert response.status_code == 500
    assert variable in response.json_body["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_zone_without_domain_is_500(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env(DOMAIN_NAME="")).http.get("/status")
    assert response.status_code == 500
    assert "DOMAIN_NAME" in response.json_body["Message"]


def test_misconfigured_event_handler_raises_naming_the_variable(devbox, make_client):
    from tests.conftest import state_event

    api = make_client(devbox.env(LAUNCH_TEMPLATE_ID=""))
    with pytest.raises(Exception, match="LAUNCH_TEMPLATE_ID"):
        api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))


@pytest.mark.parametrize("topic,words", [
    ("arn:aws:sns:us-east-1:123456789012:devbox-alerts.fifo", "FIFO topic"),
    ("arn:aws:sns:eu-west-1:123456789012:devbox-alerts", "in eu-west-1, but the function runs in us-east-1"),
])
def test_a_topic_sns_would_refuse_later_is_refused_now(stopped_devbox, make_client, topic, words):
    response = make_client(stopped_devbox.env(NOTIFY_TOPIC_ARN=topic)).http.post("/start")
    assert response.status_code == 500
    assert words in response.json_body["Message"] and "NOTIFY_TOPIC_ARN" in response.json_body["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_a_malformed_setting_is_named_but_its_value_is_not_echoed(stopped_devbox, make_client, caplog):
    secret_looking = "arn:aws:sns:us-east-1:210987654321:oops topic"
    response = make_client(stopped_devbox.env(NOTIFY_TOPIC_ARN=secret_looking)).http.get("/status")
    assert response.status_code == 500
    assert "NOTIFY_TOPIC_ARN" in response.json_body["Message"]
    assert "210987654321" not in response.body.decode()
    assert "210987654321" in caplog.text
