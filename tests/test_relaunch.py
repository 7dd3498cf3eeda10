"""The box's flows through the API and the event handlers (moto behind): first start, relaunch, recovery."""
import json
import threading

import boto3
import pytest

from chalicelib import aws, service
from chalicelib.config import Config
from tests.conftest import DOMAIN, state_event

TYPES = "t3.large,m6i.xlarge,c6i.large"


def body(response):
    return json.loads(response.body)


def post_start(api, **fields):
    if not fields:
        return api.http.post("/start")
    return api.http.post("/start", body=json.dumps(fields), headers={"Content-Type": "application/json"})


def tags(found):
    return {t["Key"]: t["Value"] for t in found.get("Tags", [])}


def running(api, box):
    """Deliver EC2's running event for the box's current instance (EventBridge's part)."""
    api.lambda_.invoke("on_running", state_event(api, box.instance_id, "running"))


def test_first_start_launches_from_the_template_and_creates_the_data_volume(empty_box, make_client, caller_ip):
    caller_ip("203.0.113.7")
    api = make_client(empty_box.env(DATA_VOLUME_GIB="20"))
    response = post_start(api)
    assert response.status_code == 200
    doc = body(response)
    assert (doc["action"], doc["reason"], doc["state"]) == ("launch", "first start", "pending")
    (instance,) = empty_box.instances()
    (volume,) = empty_box.volumes()
    assert doc["instance_id"] == instance["InstanceId"] and doc["data_volume_id"] == volume["VolumeId"]
    assert instance.get("InstanceLifecycle") == "spot" and doc["market"] == "spot"
    assert tags(instance)["aws:ec2launchtemplate:id"] == empty_box.template_id
    assert tags(instance)["devbox:box"] == "devbox" and tags(instance)["devbox:volume"] == volume["VolumeId"]
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (20, "gp3", True)
    assert volume["AvailabilityZone"] == instance["Placement"]["AvailabilityZone"] == doc["availability_zone"]
    assert volume["Attachments"] == []  # EC2 attaches an existing volume only once the instance runs
    assert doc["allowed_ips"] == ["203.0.113.7/32"]


def test_running_event_attaches_the_data_volume_and_points_the_name_at_the_instance(empty_box, make_client):
    api = make_client(empty_box.env())
    post_start(api)
    running(api, empty_box)
    (volume,) = empty_box.volumes()
    assert [(a["InstanceId"], a["State"]) for a in volume["Attachments"]] == [(empty_box.instance_id, "attached")]
    assert empty_box.a_records()[0]["ResourceRecords"] == [{"Value": empty_box.public_ip()}]
    running(api, empty_box)  # a repeated event changes nothing
    assert len(empty_box.volumes()[0]["Attachments"]) == 1


def test_first_start_honours_subnet_ids_in_order(empty_box, make_client):
    wanted = empty_box.subnets()[2]
    api = make_client(empty_box.env(SUBNET_IDS=wanted["SubnetId"]))
    doc = body(post_start(api))
    assert doc["availability_zone"] == wanted["AvailabilityZone"]
    assert empty_box.current()["SubnetId"] == wanted["SubnetId"]


def test_first_start_moves_to_the_next_zone_when_one_has_no_capacity(empty_box, make_client, inject_fault):
    inject_fault("ec2", "RunInstances", "InsufficientInstanceCapacity", status=500, times=1)
    doc = body(post_start(make_client(empty_box.env())))
    assert doc["availability_zone"] == empty_box.subnets()[1]["AvailabilityZone"]
    assert doc["tried"] == [f"the template type spot in {empty_box.subnets()[0]['SubnetId']}: InsufficientInstanceCapacity"]
    assert empty_box.volumes()[0]["AvailabilityZone"] == doc["availability_zone"]


def test_eight_concurrent_first_starts_give_one_instance_and_one_volume(empty_box, client_tokens,
                                                                       one_request_at_a_time):
    config = Config.from_env(empty_box.env())
    ec2 = aws.client("ec2")
    barrier = threading.Barrier(8)
    answers, errors = [], []

    def start(n):
        barrier.wait()
        try:
            answers.append(service.start(ec2, config, "devbox", f"203.0.113.{n + 10}"))
        except Exception as err:  # collected so the test shows it
            errors.append(err)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(empty_box.instances()) == 1 and len(empty_box.volumes()) == 1
    assert {a["instance_id"] for a in answers} == {empty_box.instance_id}
    assert tags(empty_box.current())["devbox:volume"] == empty_box.volumes()[0]["VolumeId"]
    assert len(empty_box.rules()) == 16


def test_stopped_box_starts_the_same_instance_with_the_same_volume(stopped_devbox, make_client):
    before, volume = stopped_devbox.instance_id, stopped_devbox.volumes()[0]["VolumeId"]
    doc = body(post_start(make_client(stopped_devbox.env())))
    assert (doc["action"], doc["instance_id"], doc["data_volume_id"]) == ("start", before, volume)
    assert len(stopped_devbox.instances()) == 1


def test_resizing_a_stopped_spot_box_relaunches_it_and_the_volume_follows(stopped_devbox, make_client):
    old, volume = stopped_devbox.instance_id, stopped_devbox.volumes()[0]["VolumeId"]
    api = make_client(stopped_devbox.env(ALLOWED_INSTANCE_TYPES=TYPES))
    doc = body(post_start(api, instance_type="m6i.xlarge"))
    assert (doc["action"], doc["reason"]) == ("relaunch", "resize to m6i.xlarge")
    new = stopped_devbox.current()
    assert new["InstanceId"] == doc["instance_id"] != old
    assert (new["InstanceType"], new.get("InstanceLifecycle")) == ("m6i.xlarge", "spot")
    assert new["Placement"]["AvailabilityZone"] == stopped_devbox.volumes()[0]["AvailabilityZone"]
    (retired,) = [i for i in stopped_devbox.instances(live_only=False) if i["InstanceId"] == old]
    assert retired["State"]["Name"] == "terminated" and "devbox:retired" in tags(retired)
    running(api, stopped_devbox)
    assert [a["InstanceId"] for a in stopped_devbox.volumes()[0]["Attachments"]] == [new["InstanceId"]]
    assert [v["VolumeId"] for v in stopped_devbox.volumes()] == [volume]


def test_resizing_a_running_box_is_refused_and_changes_nothing(devbox, make_client):
    response = post_start(make_client(devbox.env(ALLOWED_INSTANCE_TYPES=TYPES)), instance_type="m6i.xlarge")
    assert response.status_code == 409
    assert len(devbox.instances()) == 1 and devbox.rules() == []


def test_status_says_the_spot_service_stopped_the_box(devbox, make_client):
    devbox.interrupt()
    doc = body(make_client(devbox.env()).http.get("/status"))
    assert doc["state"] == "stopped" and doc["interrupted"] is True


def test_interrupted_box_is_relaunched_on_its_type_with_its_volume(devbox, make_client, caller_ip):
    old, volume = devbox.instance_id, devbox.volumes()[0]["VolumeId"]
    devbox.interrupt()
    caller_ip("203.0.113.7")
    api = make_client(devbox.env())
    doc = body(post_start(api))
    assert (doc["action"], doc["reason"]) == ("relaunch", "interrupted by the spot service")
    assert (doc["instance_type"], doc["market"], doc["data_volume_id"]) == ("t3.large", "spot", volume)
    assert devbox.instance_id != old and doc["allowed_ips"] == ["203.0.113.7/32"]
    running(api, devbox)
    assert devbox.volumes()[0]["Attachments"][0]["InstanceId"] == devbox.instance_id


def test_interrupted_box_goes_to_the_next_allowed_type_when_its_own_has_no_capacity(devbox, make_client,
                                                                                     inject_fault):
    devbox.interrupt()
    inject_fault("ec2", "RunInstances", "InsufficientInstanceCapacity", status=500, times=1)
    doc = body(post_start(make_client(devbox.env(ALLOWED_INSTANCE_TYPES=TYPES))))
    assert (doc["instance_type"], doc["market"]) == ("m6i.xlarge", "spot")
    assert doc["tried"] == [f"t3.large spot in {devbox.subnets()[0]['SubnetId']}: InsufficientInstanceCapacity"]


def test_no_capacity_anywhere_is_503_and_leaves_the_box_as_it_was(devbox, make_client, caller_ip, inject_fault):
    old, volume = devbox.instance_id, devbox.volumes()[0]
    devbox.interrupt()
    caller_ip("203.0.113.7")
    inject_fault("ec2", "RunInstances", "InsufficientInstanceCapacity", status=500)
    response = post_start(make_client(devbox.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge")))
    assert response.status_code == 503
    message = body(response)["Message"]
    assert "t3.large spot" in message and "m6i.xlarge spot" in message and "Nothing was changed" in message
    (still,) = devbox.instances()
    # EC2 may still restart the interrupted instance when capacity returns: it stays as it was.
    assert still["InstanceId"] == old and still["State"]["Name"] == "stopped" and "devbox:retired" not in tags(still)
    assert devbox.volumes()[0]["Attachments"] == volume["Attachments"]
    assert devbox.rules() == []


def test_on_demand_fallback_when_spot_has_no_capacity(devbox, make_client, inject_fault):
    devbox.interrupt()
    inject_fault("ec2", "RunInstances", "InsufficientInstanceCapacity", status=500, times=1)
    doc = body(post_start(make_client(devbox.env(ON_DEMAND_FALLBACK="true"))))
    assert (doc["instance_type"], doc["market"]) == ("t3.large", "on-demand")
    assert devbox.current().get("InstanceLifecycle") is None


def test_rebuild_relaunches_from_the_templates_latest_version(stopped_devbox, make_client):
    old = stopped_devbox.instance_id
    stopped_devbox.ec2.create_launch_template_version(
        LaunchTemplateId=stopped_devbox.template_id, SourceVersion="1",
        LaunchTemplateData={"ImageId": "ami-0fedcba9876543210"})
    doc = body(post_start(make_client(stopped_devbox.env()), rebuild=True))
    assert (doc["action"], doc["reason"], doc["instance_type"]) == ("relaunch", "rebuild", "t3.large")
    new = stopped_devbox.current()
    assert new["InstanceId"] != old and new["ImageId"] == "ami-0fedcba9876543210"
    assert tags(new)["aws:ec2launchtemplate:version"] == "2"
    assert tags(new)["devbox:volume"] == stopped_devbox.volumes()[0]["VolumeId"]


def test_rebuild_of_a_running_box_is_refused(devbox, make_client):
    response = post_start(make_client(devbox.env()), rebuild=True)
    assert response.status_code == 409 and "stop it before rebuilding" in body(response)["Message"]
    assert len(devbox.instances()) == 1


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_rebuild_must_be_a_boolean(stopped_devbox, make_client, value):
    response = post_start(make_client(stopped_devbox.env()), rebuild=value)
    if value is None:  # JSON null means "not asked"
        assert response.status_code == 200
        return
    assert response.status_code == 400 and "rebuild" in body(response)["Message"]
    assert stopped_devbox.state() == "stopped" and stopped_devbox.rules() == []


def test_events_of_a_retired_instance_leave_access_and_the_record_alone(stopped_devbox, make_client, caller_ip):
    old = stopped_devbox.instance_id
    caller_ip("203.0.113.7")
    api = make_client(stopped_devbox.env())
    post_start(api, rebuild=True)
    running(api, stopped_devbox)
    for state in ("stopped", "terminated"):
        response = api.lambda_.invoke("on_stopped", state_event(api, old, state))
        assert response.payload is None
    assert stopped_devbox.rule_cidrs() == ["203.0.113.7/32"] * 2
    assert len(stopped_devbox.a_records()) == 1
    api.lambda_.invoke("on_running", state_event(api, old, "running"))
    assert stopped_devbox.a_records()[0]["ResourceRecords"] == [{"Value": stopped_devbox.public_ip()}]


def test_relaunch_cut_off_before_retiring_is_finished_by_the_next_start(stopped_devbox, make_client, inject_fault,
                                                                       client_tokens):
    old = stopped_devbox.instance_id
    api = make_client(stopped_devbox.env())
    inject_fault("ec2", "CreateTags", "InternalError", status=500, times=1)  # the retire tag: cut off there
    assert post_start(api, rebuild=True).status_code >= 500
    assert len(stopped_devbox.instances()) == 2
    doc = body(post_start(api))
    assert doc["action"] == "none"  # the new instance is the box's current one: nothing launched again
    (live,) = stopped_devbox.instances()
    assert live["InstanceId"] == doc["instance_id"] != old
    gone = [i for i in stopped_devbox.instances(live_only=False) if i["InstanceId"] == old]
    assert gone[0]["State"]["Name"] == "terminated" and "devbox:retired" in tags(gone[0])
    # The new instance runs (moto: at once), so this start also moved the volume to it.
    assert [a["InstanceId"] for a in stopped_devbox.volumes()[0]["Attachments"]] == [live["InstanceId"]]
    assert len(stopped_devbox.volumes()) == 1


def test_a_running_box_whose_volume_never_got_attached_gets_it_at_the_next_start(stopped_devbox, make_client):
    api = make_client(stopped_devbox.env())
    post_start(api, rebuild=True)  # the running event never comes (say, its retries ran out)
    assert stopped_devbox.volumes()[0]["Attachments"] == []
    stopped_devbox.current()  # moto: running at the next describe
    doc = body(post_start(api))
    assert doc["action"] == "none" and len(stopped_devbox.instances()) == 1
    assert stopped_devbox.volumes()[0]["Attachments"][0]["InstanceId"] == stopped_devbox.instance_id


def test_a_box_whose_first_start_was_cut_off_before_the_volume_gets_one(empty_box, make_client, inject_fault):
    api = make_client(empty_box.env())
    inject_fault("ec2", "CreateVolume", "InternalError", status=500, times=1)
    assert post_start(api).status_code >= 500
    assert len(empty_box.instances()) == 1 and empty_box.volumes() == []
    doc = body(post_start(api))
    (volume,) = empty_box.volumes()
    assert doc["data_volume_id"] == volume["VolumeId"] and len(empty_box.instances()) == 1
    running(api, empty_box)
    assert empty_box.volumes()[0]["Attachments"][0]["InstanceId"] == empty_box.instance_id


def test_running_event_of_an_instance_that_is_not_current_changes_nothing(devbox, make_client):
    api = make_client(devbox.env())
    current = devbox.instance_id
    stray = devbox.ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "devbox:box", "Value": "devbox"},
                                              {"Key": "devbox:retired", "Value": "2026-11-29T00:00:00Z"}]}],
    )["Instances"][0]["InstanceId"]
    api.lambda_.invoke("on_running", state_event(api, stray, "running"))
    assert devbox.a_records() == []
    assert devbox.volumes()[0]["Attachments"][0]["InstanceId"] == current


def test_housekeeping_terminates_a_retired_instance_a_relaunch_left_running(devbox, make_client):
    from tests.conftest import scheduled_event

    api = make_client(devbox.env())
    devbox.ec2.create_tags(Resources=[devbox.instance_id], Tags=[{"Key": "devbox:retired", "Value": "2026-11-29T00:00:00Z"}])
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.instances() == []
    assert len(devbox.volumes()) == 1


def test_status_of_a_box_whose_instance_is_gone_still_names_its_volume(devbox, make_client, aws_calls):
    volume = devbox.volumes()[0]
    devbox.ec2.terminate_instances(InstanceIds=[devbox.instance_id])
    doc = body(make_client(devbox.env()).http.get("/status"))
    assert (doc["state"], doc["instance_id"]) == ("none", None)
    assert (doc["data_volume_id"], doc["availability_zone"]) == (volume["VolumeId"], volume["AvailabilityZone"])
    assert aws_calls.calls == ["DescribeInstances", "DescribeSecurityGroupRules", "DescribeVolumes"]


def test_status_names_the_managed_domain_after_a_relaunch(stopped_devbox, make_client):
    api = make_client(stopped_devbox.env())
    post_start(api, rebuild=True)
    running(api, stopped_devbox)
    doc = body(api.http.get("/status"))
    assert doc["dns_name"] == DOMAIN and doc["state"] == "running"


def test_the_data_volume_is_encrypted_with_the_configured_key(empty_box, make_client):
    key = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["Arn"]
    doc = body(post_start(make_client(empty_box.env(KMS_KEY_ID=key))))
    (volume,) = empty_box.volumes()
    assert doc["data_volume_id"] == volume["VolumeId"] and volume["KmsKeyId"] == key


def test_status_tells_why_ec2_stopped_the_box(stopped_devbox, make_client):
    doc = body(make_client(stopped_devbox.env()).http.get("/status"))
    assert doc["state_reason"] == "Client.UserInitiatedShutdown: User initiated shutdown"
    stopped_devbox.ec2.start_instances(InstanceIds=[stopped_devbox.instance_id])
    assert body(make_client(stopped_devbox.env()).http.get("/status"))["state_reason"] is None
