"""The routes and event handlers as a caller and EventBridge see them (moto behind)."""
import json
from datetime import datetime, timedelta, timezone

import pytest
from chalice import IAMAuthorizer

from app import app
from tests.conftest import DOMAIN, Devbox, state_event


def body(response):
    return json.loads(response.body)


def test_every_route_requires_iam_authorization():
    assert app.routes, "the app has routes"
    for path, methods in app.routes.items():
        for method, entry in methods.items():
            assert isinstance(entry.authorizer, IAMAuthorizer), f"{method} {path} is not IAM-authorized"


def test_status_reports_the_running_spot_box(api, devbox):
    response = api.http.get("/status")
    assert response.status_code == 200
    doc = body(response)
    assert doc["instance_id"] == devbox.instance_id
    assert doc["state"] == "running"
    assert doc["instance_type"] == "t3.large"
    assert doc["lifecycle"] == doc["market"] == "spot"
    assert doc["box"] == "devbox" and doc["interrupted"] is False
    assert doc["data_volume_id"] == devbox.volumes()[0]["VolumeId"]
    assert doc["availability_zone"] == devbox.volumes()[0]["AvailabilityZone"]
    assert doc["public_ip"] == devbox.public_ip()
    assert doc["dns_name"] == DOMAIN
    assert datetime.fromisoformat(doc["launch_time"]).tzinfo is not None
    assert doc["allowed_ips"] == []


def test_status_of_stopped_box_has_no_address(stopped_devbox, make_client):
    doc = body(make_client(stopped_devbox.env()).http.get("/status"))
    assert doc["state"] == "stopped"
    assert doc["public_ip"] is None and doc["dns_name"] is None and doc["launch_time"] is None


def test_status_without_dns_points_at_public_dns_name(moto, make_client):
    box = Devbox(with_dns=False)
    box.launch()
    doc = body(make_client(box.env()).http.get("/status"))
    assert doc["dns_name"] and doc["dns_name"] != DOMAIN
    assert doc["dns_name"].startswith("ec2-")


def test_start_lets_caller_in_and_starts_stopped_box(stopped_devbox, make_client, caller_ip):
    caller_ip("203.0.113.7")
    response = make_client(stopped_devbox.env()).http.post("/start")
    assert response.status_code == 200
    doc = body(response)
    assert doc["state"] in ("pending", "running")
    assert doc["allowed_ips"] == ["203.0.113.7/32"]
    assert stopped_devbox.state() in ("pending", "running")
    rules = {(r["IpProtocol"], r["FromPort"], r["ToPort"]): r for r in stopped_devbox.rules()}
    assert set(rules) == {("tcp", 22, 22), ("icmp", 8, -1)}
    for rule in rules.values():
        assert rule["CidrIpv4"] == "203.0.113.7/32"
        assert rule["Description"].startswith("devbox-access for=203.0.113.7 at=")


def test_start_uses_configured_ssh_port(stopped_devbox, make_client, caller_ip):
    caller_ip("203.0.113.7")
    make_client(stopped_devbox.env(SSH_PORT="2222")).http.post("/start")
    assert {(r["IpProtocol"], r["FromPort"]) for r in stopped_devbox.rules()} == {("tcp", 2222), ("icmp", 8)}


def test_start_for_ipv6_caller_opens_128_with_icmpv6(stopped_devbox, make_client, caller_ip):
    caller_ip("2001:db8::42")
    doc = body(make_client(stopped_devbox.env()).http.post("/start"))
    assert doc["allowed_ips"] == ["2001:db8::42/128"]
    protocols = {(r["IpProtocol"], r["FromPort"], r.get("CidrIpv6")) for r in stopped_devbox.rules()}
    assert protocols == {("tcp", 22, "2001:db8::42/128"), ("icmpv6", 128, "2001:db8::42/128")}


def test_spoofed_forwarded_for_header_is_ignored(stopped_devbox, make_client, caller_ip):
    caller_ip("203.0.113.7")
    make_client(stopped_devbox.env()).http.post(
        "/start", headers={"X-Forwarded-For": "0.0.0.0/0", "X-Real-IP": "198.51.100.9"}
    )
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32", "203.0.113.7/32"]


def test_start_twice_is_idempotent(stopped_devbox, make_client, caller_ip):
    caller_ip("203.0.113.7")
    api = make_client(stopped_devbox.env())
    first = api.http.post("/start")
    second = api.http.post("/start")
    assert first.status_code == second.status_code == 200
    assert len(stopped_devbox.rules()) == 2
    assert body(second)["allowed_ips"] == ["203.0.113.7/32"]


def test_start_of_running_box_only_adds_access(api, devbox, caller_ip):
    caller_ip("203.0.113.8")
    doc = body(api.http.post("/start"))
    assert doc["state"] == "running"
    assert doc["allowed_ips"] == ["203.0.113.8/32"]


def test_start_of_box_whose_instance_was_terminated_launches_one_with_the_same_volume(api, devbox, caller_ip):
    volume_id = devbox.volumes()[0]["VolumeId"]
    devbox.ec2.terminate_instances(InstanceIds=[devbox.instance_id])
    caller_ip("203.0.113.7")
    response = api.http.post("/start")
    assert response.status_code == 200
    doc = body(response)
    assert doc["action"] == "launch" and doc["state"] == "pending"
    assert doc["data_volume_id"] == volume_id
    assert [v["VolumeId"] for v in devbox.volumes()] == [volume_id]
    assert devbox.current()["InstanceId"] == doc["instance_id"]


def test_start_with_unknown_field_is_rejected(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body=json.dumps({"colour": "red"}), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "colour" in body(response)["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_start_with_malformed_json_is_rejected(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env()).http.post(
        "/start", body="{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_missing_launch_template_gives_500_naming_the_variable(devbox, make_client):
    env = devbox.env()
    del env["LAUNCH_TEMPLATE_ID"]
    response = make_client(env).http.get("/status")
    assert response.status_code == 500
    assert "LAUNCH_TEMPLATE_ID" in body(response)["Message"]


def test_leftover_instance_id_gives_500_saying_what_replaced_it(devbox, make_client):
    response = make_client(devbox.env(INSTANCE_ID="i-0123456789abcdef0")).http.post("/start")
    assert response.status_code == 500
    message = body(response)["Message"]
    assert "INSTANCE_ID is no longer used" in message and "BOX_NAME" in message and "LAUNCH_TEMPLATE_ID" in message
    assert devbox.rules() == [] and devbox.state() == "running"


def test_malformed_group_id_gives_500_naming_the_variable(devbox, make_client):
    response = make_client(devbox.env(SECURITY_GROUP_ID="default")).http.post("/start")
    assert response.status_code == 500
    assert "SECURITY_GROUP_ID" in body(response)["Message"]
    assert devbox.rules() == []


def test_status_of_a_box_never_started_says_none(empty_box, make_client):
    response = make_client(empty_box.env()).http.get("/status")
    assert response.status_code == 200
    doc = body(response)
    assert doc["box"] == "devbox" and doc["state"] == "none"
    assert doc["instance_id"] is None and doc["data_volume_id"] is None and doc["market"] is None
    assert doc["interrupted"] is False


def test_stop_of_a_box_never_started_changes_nothing(empty_box, make_client):
    response = make_client(empty_box.env()).http.post("/stop")
    assert response.status_code == 200
    assert body(response)["state"] == "none"
    assert empty_box.instances() == []


def test_stop_stops_running_box(api, devbox):
    response = api.http.post("/stop")
    assert response.status_code == 200
    assert body(response)["state"] in ("stopping", "stopped")
    assert devbox.state() in ("stopping", "stopped")


def test_stop_of_stopped_box_is_not_an_error(stopped_devbox, make_client):
    response = make_client(stopped_devbox.env()).http.post("/stop")
    assert response.status_code == 200
    assert body(response)["state"] == "stopped"


def test_running_event_upserts_record_to_public_ip(api, devbox):
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    records = devbox.a_records()
    assert len(records) == 1
    assert records[0]["Name"].rstrip(".") == DOMAIN
    assert records[0]["TTL"] == 60
    assert records[0]["ResourceRecords"] == [{"Value": devbox.public_ip()}]


def test_running_event_uses_configured_ttl(devbox, make_client):
    api = make_client(devbox.env(DNS_TTL="15"))
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    assert devbox.a_records()[0]["TTL"] == 15


def test_running_event_twice_leaves_one_record(api, devbox):
    event = state_event(api, devbox.instance_id, "running")
    api.lambda_.invoke("on_running", event)
    api.lambda_.invoke("on_running", event)
    assert len(devbox.a_records()) == 1


def test_running_event_without_dns_changes_nothing(moto, make_client):
    box = Devbox(with_dns=False)
    box.launch()
    api = make_client(box.env())
    response = api.lambda_.invoke("on_running", state_event(api, box.instance_id, "running"))
    assert response.payload is None
    assert box.a_records() == []
    assert box.volumes()[0]["Attachments"][0]["InstanceId"] == box.instance_id


def test_events_for_other_instances_change_nothing(api, devbox, caller_ip):
    api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, "i-0aaaaaaaaaaaaaaaa", "running"))
    devbox.stop()
    api.lambda_.invoke("on_stopped", state_event(api, "i-0aaaaaaaaaaaaaaaa", "stopped"))
    assert devbox.a_records() == []
    assert len(devbox.rules()) == 2


def test_stopped_event_revokes_app_rules_and_deletes_record(api, devbox, caller_ip):
    caller_ip("203.0.113.7")
    api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    assert devbox.rules() == []
    assert devbox.a_records() == []


def test_manual_rules_survive_a_stop(api, devbox, caller_ip):
    devbox.add_manual_rule("198.51.100.0/24")
    caller_ip("203.0.113.7")
    api.http.post("/start")
    devbox.stop()
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    assert devbox.rule_cidrs() == ["198.51.100.0/24"]
    assert body(api.http.get("/status"))["allowed_ips"] == []


def test_stopped_event_twice_raises_nothing(api, devbox):
    api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    event = state_event(api, devbox.instance_id, "stopped")
    api.lambda_.invoke("on_stopped", event)
    api.lambda_.invoke("on_stopped", event)
    assert devbox.rules() == [] and devbox.a_records() == []


def test_stale_stopped_event_keeps_new_session_access(api, devbox, caller_ip):
    caller_ip("203.0.113.7")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    stopped_at = datetime.now(timezone.utc) - timedelta(seconds=5)
    api.http.post("/start")  # a new session begins before the stopped event is handled
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped", when=stopped_at))
    assert devbox.rule_cidrs() == ["203.0.113.7/32", "203.0.113.7/32"]
    assert len(devbox.a_records()) == 1


def test_stopped_event_spares_rules_added_after_it(api, devbox, caller_ip):
    """A start that is still under way (box not yet pending) keeps the rule it just added."""
    devbox.stop()
    caller_ip("203.0.113.7")
    api.http.post("/start")
    devbox.stop()  # the box is stopped again, but the rule is newer than the event
    long_ago = datetime.now(timezone.utc) - timedelta(minutes=10)
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped", when=long_ago))
    assert len(devbox.rules()) == 2


@pytest.mark.parametrize("path", ["/status", "/start", "/stop"])
def test_wrong_method_is_405(api, path):
    method = api.http.post if path == "/status" else api.http.get
    assert method(path).status_code == 405


def test_unknown_path_is_refused(api):
    assert api.http.get("/nope").status_code in (403, 404)
