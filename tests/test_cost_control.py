"""Cost control: spot interruptions, cost in status, resize on start, the max-runtime safety net."""
import json
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from chalicelib import cost
from tests.conftest import REGION, scheduled_event, state_event

TOPIC_NAME = "devbox-alerts"


@pytest.fixture
def inbox(devbox):
    """An SQS queue subscribed to the notification topic: what the user would receive."""
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topic = sns.create_topic(Name=TOPIC_NAME)["TopicArn"]
    queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

    class Inbox:
        arn = topic

        def messages(self):
            found = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
            return [json.loads(m["Body"]) for m in found]

    return Inbox()


def interruption_event(api, instance_id, kind="EC2 Spot Instance Interruption Warning"):
    event = state_event(api, instance_id, "running")
    event["detail-type"] = kind
    event["detail"] = {"instance-id": instance_id, "instance-action": "stop"}
    return event


def test_interruption_warning_is_reported_in_status(api, devbox):
    api.lambda_.invoke("on_interruption", interruption_event(api, devbox.instance_id))
    doc = api.http.get("/status").json_body
    assert "EC2 Spot Instance Interruption Warning" in doc["last_interruption"]
    assert doc["last_interruption"].startswith(datetime.now(timezone.utc).strftime("%Y-%m-%dT"))


def test_interruption_warning_is_published_when_topic_set(devbox, make_client, inbox):
    api = make_client(devbox.env(NOTIFY_TOPIC_ARN=inbox.arn))
    api.lambda_.invoke("on_interruption", interruption_event(api, devbox.instance_id))
    messages = inbox.messages()
    assert len(messages) == 1
    assert "devbox" in messages[0]["Subject"]
    details = json.loads(messages[0]["Message"])
    assert details["event"] == "EC2 Spot Instance Interruption Warning"
    assert details["instance_id"] == devbox.instance_id and "devbox start" in details["what_happens"]


def test_rebalance_recommendation_is_recorded_too(api, devbox):
    api.lambda_.invoke("on_interruption",
                       interruption_event(api, devbox.instance_id, "EC2 Instance Rebalance Recommendation"))
    assert "Rebalance" in api.http.get("/status").json_body["last_interruption"]


def test_interruption_of_another_instance_is_ignored(api, devbox):
    api.lambda_.invoke("on_interruption", interruption_event(api, "i-0aaaaaaaaaaaaaaaa"))
    assert api.http.get("/status").json_body["last_interruption"] is None


def test_interruption_handler_listens_for_both_event_kinds():
    from app import app

    patterns = {s.name: s.event_pattern for s in app.event_sources if hasattr(s, "event_pattern")}
    assert set(patterns["on_interruption"]["detail-type"]) == {
        "EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"}


def test_status_reports_price_uptime_and_cost(api, devbox):
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    doc = api.http.get("/status").json_body
    assert doc["spot_price_per_hour"] > 0
    assert doc["uptime_seconds"] >= 0
    assert doc["estimated_cost"] == pytest.approx(doc["spot_price_per_hour"] * doc["uptime_seconds"] / 3600, abs=1e-3)


def test_cost_is_price_times_session_hours():
    launched = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
    box = {"InstanceType": "t3.large", "LaunchTime": launched,
           "Tags": [{"Key": cost.PRICE_TAG, "Value": "0.030000 t3.large us-east-1a"}]}
    fields = cost.cost_fields(box, "running", now=launched + timedelta(hours=2, minutes=30))
    assert fields == {"spot_price_per_hour": 0.03, "uptime_seconds": 9000, "estimated_cost": 0.075}


def test_price_recorded_for_another_type_is_not_shown():
    box = {"InstanceType": "m6i.xlarge", "LaunchTime": datetime.now(timezone.utc),
           "Tags": [{"Key": cost.PRICE_TAG, "Value": "0.030000 t3.large us-east-1a"}]}
    assert cost.cost_fields(box, "running")["spot_price_per_hour"] is None


def test_stopped_box_has_no_uptime_or_cost(stopped_devbox, make_client):
    doc = make_client(stopped_devbox.env()).http.get("/status").json_body
    assert doc["uptime_seconds"] is None and doc["estimated_cost"] is None


def test_start_with_allowed_type_resizes_stopped_box(stopped_devbox, make_client):
    api = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge"))
    response = api.http.post("/start", body=json.dumps({"instance_type": "m6i.xlarge"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.json_body["instance_type"] == "m6i.xlarge"
    found = stopped_devbox.ec2.describe_instances(InstanceIds=[stopped_devbox.instance_id])
    assert found["Reservations"][0]["Instances"][0]["InstanceType"] == "m6i.xlarge"


def test_start_with_type_not_allowed_is_400_and_changes_nothing(stopped_devbox, make_client):
    api = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES="t3.large"))
    response = api.http.post("/start", body=json.dumps({"instance_type": "p5.48xlarge"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "t3.large" in response.json_body["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_resizing_is_off_without_allowed_types(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body=json.dumps({"instance_type": "t3.xlarge"}), headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "ALLOWED_INSTANCE_TYPES" in response.json_body["Message"]


def test_resize_of_running_box_is_409(devbox, make_client):
    api = make_client(devbox.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge"))
    response = api.http.post("/start", body=json.dumps({"instance_type": "m6i.xlarge"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 409
    assert "stop it" in response.json_body["Message"]
    assert devbox.rules() == []


def test_same_type_on_running_box_is_fine(devbox, make_client):
    api = make_client(devbox.env(ALLOWED_INSTANCE_TYPES="t3.large"))
    response = api.http.post("/start", body=json.dumps({"instance_type": "t3.large"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200


def test_failed_start_after_in_place_resize_of_on_demand_box_restores_the_old_type(empty_box, make_client,
                                                                                   inject_fault):
    stopped_devbox = empty_box
    stopped_devbox.launch(spot=False)
    stopped_devbox.stop()
    api = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge"))
    inject_fault("ec2", "StartInstances", "InsufficientInstanceCapacity", status=500)
    response = api.http.post("/start", body=json.dumps({"instance_type": "m6i.xlarge"}),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 503
    found = stopped_devbox.ec2.describe_instances(InstanceIds=[stopped_devbox.instance_id])
    assert found["Reservations"][0]["Instances"][0]["InstanceType"] == "t3.large"
    assert stopped_devbox.rules() == []


def test_max_runtime_stops_a_box_left_running(devbox, make_client, inbox, monkeypatch):
    from chalicelib import service

    later = datetime.now(timezone.utc) + timedelta(hours=5)
    monkeypatch.setattr(service, "_now", lambda: later)
    api = make_client(devbox.env(MAX_RUNTIME_HOURS="4", NOTIFY_TOPIC_ARN=inbox.arn))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.state() in ("stopping", "stopped")
    assert "stopped" in inbox.messages()[0]["Subject"]


def test_max_runtime_leaves_a_young_box_alone(devbox, make_client):
    api = make_client(devbox.env(MAX_RUNTIME_HOURS="4"))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.state() == "running"


def test_max_runtime_unset_means_off(devbox, api, monkeypatch, aws_calls):
    from chalicelib import service

    monkeypatch.setattr(service, "_now", lambda: datetime.now(timezone.utc) + timedelta(days=30))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.state() == "running"
    assert aws_calls.calls == ["DescribeInstances", "DescribeSecurityGroupRules"]
