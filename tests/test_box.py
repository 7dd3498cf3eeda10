"""The box's decisions without AWS (plan, attempts, tokens, which instance is current) and its steps with Stubber."""
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.stub import ANY, Stubber

from chalicelib import box
from chalicelib.errors import CapacityError, StateConflictError, UpstreamError

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def instance(instance_id, state="stopped", kind="t3.large", spot=True, launched=T0, tags=(), reason=None,
             volumes=(), subnet="subnet-0aaaaaaaaaaaaaaaa", zone="us-east-1a", request=None):
    found = {
        "InstanceId": instance_id, "State": {"Name": state}, "InstanceType": kind,
        "RootDeviceName": "/dev/sda1", "LaunchTime": launched + timedelta(days=3),
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeId": "vol-root", "Status": "attached",
                                                                     "AttachTime": launched}}]
        + [{"DeviceName": "/dev/sdf", "Ebs": {"VolumeId": v, "Status": "attached", "AttachTime": launched}}
           for v in volumes],
        "Tags": [{"Key": "devbox:box", "Value": "devbox"}] + [{"Key": k, "Value": v} for k, v in tags],
        "SubnetId": subnet, "Placement": {"AvailabilityZone": zone},
    }
    if spot:
        found["InstanceLifecycle"] = "spot"
    if reason:
        found["StateReason"] = {"Code": reason, "Message": reason}
    if request:
        found["SpotInstanceRequestId"] = request
    return found


def view(*instances):
    return box.BoxView("devbox", tuple(instances))


RETIRED = (("devbox:retired", "2026-11-01T12:00:00Z"),)


def test_current_is_the_newest_live_instance_by_launch_not_by_last_start():
    # LaunchTime moves on every start; the root volume's attach time does not.
    old = instance("i-old", state="running", launched=T0)
    old["LaunchTime"] = T0 + timedelta(days=30)
    new = instance("i-new", state="pending", launched=T0 + timedelta(hours=1))
    seen = view(old, new)
    assert seen.current["InstanceId"] == "i-new"
    assert [i["InstanceId"] for i in seen.strays] == ["i-old"]


def test_the_apps_launch_stamp_orders_launches_within_one_second():
    a = instance("i-a", tags=(("devbox:launched", "2026-11-01T12:00:00.900000Z"),))
    b = instance("i-b", tags=(("devbox:launched", "2026-11-01T12:00:00.100000Z"),))
    assert view(a, b).current["InstanceId"] == "i-a" and view(b, a).current["InstanceId"] == "i-a"


def test_retired_and_terminated_instances_are_never_current():
    seen = view(instance("i-a", tags=RETIRED, launched=T0 + timedelta(hours=2)),
                instance("i-b", state="terminated", launched=T0 + timedelta(hours=3)),
                instance("i-c", launched=T0))
    assert seen.current["InstanceId"] == "i-c"
    assert [i["InstanceId"] for i in seen.retiring] == ["i-a"]
    assert seen.newest["InstanceId"] == "i-b"


def test_a_box_with_only_terminated_instances_has_no_current_one():
    seen = view(instance("i-b", state="terminated"))
    assert seen.current is None and seen.strays == []


@pytest.mark.parametrize("state,reason,wanted,rebuild,expected", [
    ("running", None, None, False, ("none", ())),
    ("pending", None, "t3.large", False, ("none", ())),
    ("stopped", "Client.UserInitiatedShutdown", None, False, ("start", ())),
    ("stopped", None, "t3.large", False, ("start", ())),
    ("stopped", None, "m6i.xlarge", False, ("relaunch", ("m6i.xlarge",))),
    ("stopped", None, None, True, ("relaunch", ("t3.large",))),
    ("stopped", None, "m6i.xlarge", True, ("relaunch", ("m6i.xlarge",))),
    ("stopped", "Server.SpotInstanceShutdown", None, False, ("relaunch", ("t3.large", "m6i.xlarge", "c6i.large"))),
    ("stopped", "Server.SpotInstanceShutdown", "c6i.large", False, ("relaunch", ("c6i.large", "t3.large", "m6i.xlarge"))),
])
def test_plan_for_a_spot_box(state, reason, wanted, rebuild, expected):
    plan = box.plan_start(view(instance("i-a", state=state, reason=reason)), wanted, rebuild,
                          ("t3.large", "m6i.xlarge", "c6i.large"))
    assert (plan.action, plan.types) == expected


def test_an_on_demand_box_is_resized_in_place():
    plan = box.plan_start(view(instance("i-a", spot=False)), "m6i.xlarge", False, ("t3.large", "m6i.xlarge"))
    assert (plan.action, plan.new_type) == ("resize", "m6i.xlarge")


@pytest.mark.parametrize("state,wanted,rebuild,words", [
    ("stopping", None, False, "stopping"),
    ("running", None, True, "stop it before rebuilding"),
    ("running", "m6i.xlarge", False, "stop it before starting it as m6i.xlarge"),
])
def test_plan_refuses_what_the_state_does_not_allow(state, wanted, rebuild, words):
    with pytest.raises(StateConflictError, match=words):
        box.plan_start(view(instance("i-a", state=state)), wanted, rebuild, ("t3.large", "m6i.xlarge"))


def test_a_box_without_instance_launches_with_its_last_type_first():
    first = box.plan_start(view(), None, False, ("m6i.xlarge",))
    assert (first.action, first.reason, first.types) == ("launch", "first start", (None, "m6i.xlarge"))
    after = box.plan_start(view(instance("i-a", state="terminated", kind="c6i.large")), None, False, ("m6i.xlarge",))
    assert (after.action, after.types) == ("launch", ("c6i.large", "m6i.xlarge"))


def test_attempts_go_through_subnets_for_each_type_then_on_demand():
    attempts = box.launch_attempts(("t3.large", "m6i.xlarge"), ["subnet-a", "subnet-b"], on_demand_fallback=True)
    assert [(a.instance_type, a.market, a.subnet_id) for a in attempts] == [
        ("t3.large", "spot", "subnet-a"), ("t3.large", "spot", "subnet-b"),
        ("m6i.xlarge", "spot", "subnet-a"), ("m6i.xlarge", "spot", "subnet-b"),
        ("t3.large", "on-demand", "subnet-a"), ("t3.large", "on-demand", "subnet-b"),
    ]
    assert all(a.market == "spot" for a in box.launch_attempts(("t3.large",), ["subnet-a"], False))


def test_client_token_is_stable_and_differs_by_what_the_launch_is_for():
    attempt = box.Attempt("t3.large", "spot", "subnet-a")
    token = box.client_token("devbox", "i-old", attempt)
    assert token == box.client_token("devbox", "i-old", attempt) and len(token) <= 64
    others = {box.client_token("devbox", "i-other", attempt), box.client_token("other", "i-old", attempt),
              box.client_token("devbox", "i-old", box.Attempt("m6i.xlarge", "spot", "subnet-a")),
              box.client_token("devbox", "i-old", box.Attempt("t3.large", "on-demand", "subnet-a")),
              box.client_token("devbox", "i-old", attempt, salt="i-stale")}
    assert token not in others and len(others) == 5


def stubbed_ec2():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    return ec2, Stubber(ec2)


def capacity_error(stub, code="InsufficientInstanceCapacity"):
    stub.add_client_error("run_instances", service_error_code=code, service_message="no capacity", http_status_code=500)


SPEC = box.LaunchSpec("devbox", "lt-0123456789abcdef0", "sg-0123456789abcdef0", "vol-0123456789abcdef0")


def test_launch_tries_the_next_attempt_on_a_capacity_refusal_and_names_it():
    ec2, stub = stubbed_ec2()
    capacity_error(stub)
    stub.add_response("run_instances", {"Instances": [instance("i-new", state="pending", kind="m6i.xlarge")]},
                      {"LaunchTemplate": {"LaunchTemplateId": SPEC.launch_template_id, "Version": "$Latest"},
                       "MinCount": 1, "MaxCount": 1, "ClientToken": ANY, "InstanceType": "m6i.xlarge",
                       "InstanceMarketOptions": box.SPOT_MARKET, "NetworkInterfaces": ANY, "TagSpecifications": ANY})
    attempts = box.launch_attempts(("t3.large", "m6i.xlarge"), ["subnet-a"], False)
    with stub:
        launched = box.launch(ec2, SPEC, "i-old", attempts)
    assert launched.instance["InstanceId"] == "i-new" and launched.attempt.instance_type == "m6i.xlarge"
    assert launched.tried == ("t3.large spot in subnet-a: InsufficientInstanceCapacity",)


def test_launch_with_no_capacity_anywhere_is_a_503_naming_every_try():
    ec2, stub = stubbed_ec2()
    for _ in range(2):
        capacity_error(stub)
    with stub, pytest.raises(CapacityError) as caught:
        box.launch(ec2, SPEC, "i-old", box.launch_attempts(("t3.large", "m6i.xlarge"), ["subnet-a"], False))
    assert caught.value.status_code == 503
    assert "t3.large spot in subnet-a" in caught.value.message and "m6i.xlarge spot" in caught.value.message
    assert "ON_DEMAND_FALLBACK" in caught.value.message
    stub.assert_no_pending_responses()


def test_launch_stops_at_an_error_that_is_not_about_capacity():
    ec2, stub = stubbed_ec2()
    stub.add_client_error("run_instances", service_error_code="InvalidLaunchTemplateId.NotFound", http_status_code=400)
    with stub, pytest.raises(UpstreamError, match="InvalidLaunchTemplateId.NotFound"):
        box.launch(ec2, SPEC, "i-old", box.launch_attempts(("t3.large", "m6i.xlarge"), ["subnet-a"], False))


def test_a_token_that_names_a_terminated_instance_is_salted_with_it():
    ec2, stub = stubbed_ec2()
    attempt = box.Attempt("t3.large", "spot", "subnet-a")
    stub.add_response("run_instances", {"Instances": [instance("i-stale", state="terminated")]},
                      {"LaunchTemplate": ANY, "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.large",
                       "ClientToken": box.client_token("devbox", "first", attempt), "InstanceMarketOptions": ANY,
                       "NetworkInterfaces": ANY, "TagSpecifications": ANY})
    stub.add_response("run_instances", {"Instances": [instance("i-fresh", state="pending")]},
                      {"LaunchTemplate": ANY, "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.large",
                       "ClientToken": box.client_token("devbox", "first", attempt, salt="i-stale"),
                       "InstanceMarketOptions": ANY, "NetworkInterfaces": ANY, "TagSpecifications": ANY})
    with stub:
        assert box.launch(ec2, SPEC, "first", [attempt]).instance["InstanceId"] == "i-fresh"


def test_the_launch_request_tags_everything_with_the_box_and_names_its_volume():
    ec2, stub = stubbed_ec2()
    captured = {}

    def keep(params, **_):
        captured.update(params)

    ec2.meta.events.register("provide-client-params.ec2.RunInstances", keep)
    stub.add_response("run_instances", {"Instances": [instance("i-new", state="pending")]}, None)
    with stub:
        box.run_instance(ec2, SPEC, box.Attempt("t3.large", "spot", "subnet-a"), "token")
    tags = {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]} for spec in captured["TagSpecifications"]}
    launched = tags["instance"].pop("devbox:launched")
    assert datetime.strptime(launched, "%Y-%m-%dT%H:%M:%S.%fZ") > datetime(2026, 1, 1)
    assert tags["instance"] == {"devbox:box": "devbox", "Name": "devbox", "devbox:volume": SPEC.volume_id}
    assert tags["volume"] == {"devbox:box": "devbox"}
    assert tags["spot-instances-request"] == {"devbox:box": "devbox"}
    assert captured["NetworkInterfaces"] == [{"DeviceIndex": 0, "SubnetId": "subnet-a", "Groups": [SPEC.security_group_id],
                                              "AssociatePublicIpAddress": True, "DeleteOnTermination": True}]


def test_an_on_demand_launch_asks_for_no_market_and_tags_no_spot_request():
    ec2, stub = stubbed_ec2()
    captured = {}
    ec2.meta.events.register("provide-client-params.ec2.RunInstances", lambda params, **_: captured.update(params))
    stub.add_response("run_instances", {"Instances": [instance("i-new", state="pending", spot=False)]}, None)
    with stub:
        box.run_instance(ec2, SPEC, box.Attempt("t3.large", "on-demand", None), "token")
    assert "InstanceMarketOptions" not in captured and "NetworkInterfaces" not in captured
    assert "spot-instances-request" not in {s["ResourceType"] for s in captured["TagSpecifications"]}


def test_retire_tags_detaches_cancels_then_terminates_in_that_order():
    ec2, stub = stubbed_ec2()
    old = instance("i-old", volumes=["vol-data"], request="sir-0123")
    stub.add_response("create_tags", {}, {"Resources": ["i-old"], "Tags": [{"Key": "devbox:retired", "Value": ANY}]})
    stub.add_response("detach_volume", {}, {"VolumeId": "vol-data", "InstanceId": "i-old"})
    # Terminating first would reopen the persistent request and launch a replacement.
    stub.add_response("cancel_spot_instance_requests", {}, {"SpotInstanceRequestIds": ["sir-0123"]})
    stub.add_response("terminate_instances", {}, {"InstanceIds": ["i-old"]})
    with stub:
        done = box.retire(ec2, old, "vol-data", T0)
    stub.assert_no_pending_responses()
    assert done == ["tagged retired", "detached vol-data", "cancelled sir-0123", "terminated"]


def test_retire_finishes_what_a_cut_off_one_left():
    ec2, stub = stubbed_ec2()
    half_done = instance("i-old", tags=RETIRED, request="sir-0123")
    stub.add_client_error("cancel_spot_instance_requests", service_error_code="InvalidSpotInstanceRequestID.NotFound")
    stub.add_response("terminate_instances", {}, {"InstanceIds": ["i-old"]})
    with stub:
        assert box.retire(ec2, half_done, "vol-data", T0) == ["terminated"]
    stub.assert_no_pending_responses()
