"""The laptop side's AWS helpers: finding a box's resources by tag, and removing them."""
from typing import Any, Dict, Iterator, List

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from devbox import boxaws

IMAGE_ID = "ami-0123456789abcdef0"
BOX_FILTER = {"Name": "tag:devbox:box", "Values": ["devbox"]}


@pytest.fixture
def ec2() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("ec2")


def run(ec2: Any, box: str, **tags: str) -> str:
    tag_list = [{"Key": k, "Value": v} for k, v in {"devbox:box": box, **tags}.items()]
    return str(ec2.run_instances(
        ImageId=IMAGE_ID, InstanceType="t3.large", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}],
    )["Instances"][0]["InstanceId"])


def volume(ec2: Any, **tags: str) -> str:
    return str(ec2.create_volume(
        AvailabilityZone="us-east-1a", Size=8,
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["VolumeId"])


def spot_request(ec2: Any, box: str) -> str:
    return str(ec2.request_spot_instances(
        InstanceCount=1, Type="persistent", LaunchSpecification={"ImageId": IMAGE_ID, "InstanceType": "t3.large"},
        TagSpecifications=[{"ResourceType": "spot-instances-request", "Tags": [{"Key": "devbox:box", "Value": box}]}],
    )["SpotInstanceRequests"][0]["SpotInstanceRequestId"])


def ids(items: List[Dict[str, Any]], key: str) -> List[str]:
    return [str(item[key]) for item in items]


# --- clients -------------------------------------------------------------------------------


def test_session_clients_share_one_config_with_standard_retries_and_are_made_once() -> None:
    clients = boxaws.session_clients(region="eu-west-1", user_agent_extra="devbox-test")
    ec2 = clients("ec2")

    assert clients("ec2") is ec2
    assert ec2.meta.region_name == "eu-west-1"
    assert ec2.meta.config.retries["mode"] == "standard"
    assert "devbox-test" in ec2.meta.config.user_agent_extra


def test_session_client_factory_points_every_client_at_an_endpoint() -> None:
    session = boto3.session.Session(region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    clients = boxaws.session_client_factory(session, endpoint_url="http://127.0.0.1:5000")
    assert clients("ec2").meta.endpoint_url == "http://127.0.0.1:5000"
    assert clients("route53").meta.endpoint_url == "http://127.0.0.1:5000"


# --- finding the box's resources ---------------------------------------------------------------


def test_find_instances_returns_the_boxs_live_instances_retired_ones_included(ec2: Any) -> None:
    current = run(ec2, "devbox")
    retired = run(ec2, "devbox", **{"devbox:retired": "2024-01-01T00:00:00Z"})
    stopped = run(ec2, "devbox")
    ec2.stop_instances(InstanceIds=[stopped])
    gone = run(ec2, "devbox")
    ec2.terminate_instances(InstanceIds=[gone])
    run(ec2, "devbox-alice")

    assert sorted(ids(boxaws.find_instances(ec2, "devbox"), "InstanceId")) == sorted([current, retired, stopped])
    everything = boxaws.find_instances(ec2, "devbox", include_terminated=True)
    assert sorted(ids(everything, "InstanceId")) == sorted([current, retired, stopped, gone])


def test_find_instances_reads_every_page() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [{"InstanceId": "i-1"}]}], "NextToken": "t"},
                          {"Filters": [BOX_FILTER]})
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [{"InstanceId": "i-2"}]}]},
                          {"Filters": [BOX_FILTER], "NextToken": "t"})
        assert ids(boxaws.find_instances(ec2, "devbox", include_terminated=True), "InstanceId") == ["i-1", "i-2"]
        stub.assert_no_pending_responses()


def test_describe_instance_of_an_unknown_id_is_none() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error("describe_instances", "InvalidInstanceID.NotFound", "no such instance")
        assert boxaws.describe_instance(ec2, "i-0123456789abcdef0") is None


def test_find_spot_requests_returns_only_the_boxs(ec2: Any) -> None:
    mine = spot_request(ec2, "devbox")
    spot_request(ec2, "devbox-alice")
    assert ids(boxaws.find_spot_requests(ec2, "devbox"), "SpotInstanceRequestId") == [mine]


def test_find_spot_requests_asks_for_the_states_that_can_still_launch_and_reads_every_page() -> None:
    ec2 = boto3.client("ec2")
    filters = [BOX_FILTER, {"Name": "state", "Values": ["open", "active", "disabled"]}]
    with Stubber(ec2) as stub:
        stub.add_response("describe_spot_instance_requests",
                          {"SpotInstanceRequests": [{"SpotInstanceRequestId": "sir-1"}], "NextToken": "t"}, {"Filters": filters})
        stub.add_response("describe_spot_instance_requests",
                          {"SpotInstanceRequests": [{"SpotInstanceRequestId": "sir-2"}]}, {"Filters": filters, "NextToken": "t"})
        assert ids(boxaws.find_spot_requests(ec2, "devbox"), "SpotInstanceRequestId") == ["sir-1", "sir-2"]
        stub.assert_no_pending_responses()


def test_find_data_volumes_needs_both_the_box_and_the_data_role(ec2: Any) -> None:
    data = volume(ec2, **{"devbox:box": "devbox", "devbox:role": "data"})
    volume(ec2, **{"devbox:box": "devbox"})  # a root volume the launch tagged with the box
    volume(ec2, **{"devbox:box": "devbox-alice", "devbox:role": "data"})
    assert ids(boxaws.find_data_volumes(ec2, "devbox"), "VolumeId") == [data]


def test_instance_spot_request_ids_skips_instances_without_one() -> None:
    instances = [{"SpotInstanceRequestId": "sir-2"}, {}, {"SpotInstanceRequestId": "sir-1"}, {"SpotInstanceRequestId": "sir-2"}]
    assert boxaws.instance_spot_request_ids(instances) == ["sir-1", "sir-2"]


def test_tag_value_reads_one_tag() -> None:
    instance = {"Tags": [{"Key": "devbox:box", "Value": "devbox"}, {"Key": "devbox:retired", "Value": "2024-01-01T00:00:00Z"}]}
    assert boxaws.tag_value(instance, "devbox:retired") == "2024-01-01T00:00:00Z"
    assert boxaws.tag_value({}, "devbox:box") is None


# --- removing them -------------------------------------------------------------------------------


def test_cancel_spot_requests_cancels_them(ec2: Any) -> None:
    request = spot_request(ec2, "devbox")
    assert boxaws.cancel_spot_requests(ec2, [request, request]) == [request]
    assert boxaws.find_spot_requests(ec2, "devbox") == []


def test_cancel_spot_requests_with_nothing_to_cancel_calls_nothing() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2):  # any call would fail
        assert boxaws.cancel_spot_requests(ec2, []) == []


def test_cancel_spot_requests_tolerates_one_ec2_no_longer_knows() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error("cancel_spot_instance_requests", "InvalidSpotInstanceRequestID.NotFound", "gone",
                              expected_params={"SpotInstanceRequestIds": ["sir-1", "sir-2"]})
        stub.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
            {"SpotInstanceRequestId": "sir-1", "State": "cancelled"}]}, {"SpotInstanceRequestIds": ["sir-1"]})
        stub.add_client_error("cancel_spot_instance_requests", "InvalidSpotInstanceRequestID.NotFound", "gone",
                              expected_params={"SpotInstanceRequestIds": ["sir-2"]})
        assert boxaws.cancel_spot_requests(ec2, ["sir-2", "sir-1"]) == ["sir-1"]
        stub.assert_no_pending_responses()


def test_cancel_spot_requests_lets_other_errors_through() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error("cancel_spot_instance_requests", "UnauthorizedOperation", "denied")
        with pytest.raises(ClientError, match="UnauthorizedOperation"):
            boxaws.cancel_spot_requests(ec2, ["sir-1"])


def test_terminate_instances_waits_until_all_are_terminated(ec2: Any) -> None:
    first, second = run(ec2, "devbox"), run(ec2, "devbox")
    assert boxaws.terminate_instances(ec2, [second, first]) == sorted([first, second])
    assert boxaws.find_instances(ec2, "devbox") == []


def test_snapshot_volume_is_tagged_with_the_box_and_completed(ec2: Any) -> None:
    volume_id = volume(ec2, **{"devbox:box": "devbox", "devbox:role": "data"})

    snapshot_id = boxaws.snapshot_volume(ec2, volume_id, "devbox")

    (snapshot,) = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    assert (snapshot["VolumeId"], snapshot["State"]) == (volume_id, "completed")
    assert boxaws.tag_value(snapshot, "devbox:box") == "devbox"
    assert boxaws.tag_value(snapshot, "devbox:role") == "data"


def test_delete_volume_deletes_it_and_tolerates_one_already_gone(ec2: Any) -> None:
    volume_id = volume(ec2, **{"devbox:box": "devbox", "devbox:role": "data"})
    assert boxaws.delete_volume(ec2, volume_id) is True
    assert boxaws.find_data_volumes(ec2, "devbox") == []
    assert boxaws.delete_volume(ec2, volume_id) is False


def test_delete_volume_still_detaching_waits_until_it_is_available() -> None:
    ec2 = boto3.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error("delete_volume", "VolumeInUse", "vol-1 is currently attached to i-1")
        stub.add_response("describe_volumes", {"Volumes": [{"VolumeId": "vol-1", "State": "available"}]}, {"VolumeIds": ["vol-1"]})
        stub.add_response("delete_volume", {}, {"VolumeId": "vol-1"})
        assert boxaws.delete_volume(ec2, "vol-1") is True
        stub.assert_no_pending_responses()


# --- the A record ----------------------------------------------------------------------------------


@pytest.fixture
def zone() -> Iterator[Any]:
    with mock_aws():
        route53 = boto3.client("route53")
        zone_id = route53.create_hosted_zone(Name="example.com", CallerReference="t")["HostedZone"]["Id"]
        records = [
            {"Name": "box.example.com", "Type": "A", "TTL": 300, "ResourceRecords": [{"Value": "198.51.100.7"}]},
            {"Name": "box.example.com", "Type": "TXT", "TTL": 60, "ResourceRecords": [{"Value": '"keep me"'}]},
            {"Name": "other.example.com", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.8"}]},
        ]
        route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
            {"Action": "UPSERT", "ResourceRecordSet": record} for record in records]})
        yield route53, zone_id


def records_of(route53: Any, zone_id: str) -> List[str]:
    found = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return sorted(f"{r['Name']} {r['Type']}" for r in found if r["Type"] not in ("NS", "SOA"))


def test_delete_address_record_deletes_only_that_names_a_record(zone: Any) -> None:
    route53, zone_id = zone
    # Route53 accepts the DELETE only if it repeats the record's TTL (300 here) and values.
    assert boxaws.delete_address_record(route53, zone_id, "Box.Example.com.") is True
    assert records_of(route53, zone_id) == ["box.example.com. TXT", "other.example.com. A"]


def test_delete_address_record_without_one_changes_nothing(zone: Any) -> None:
    route53, zone_id = zone
    assert boxaws.delete_address_record(route53, boxaws.bare_zone_id(zone_id), "none.example.com") is False
    assert len(records_of(route53, zone_id)) == 3


def test_bare_zone_id_strips_the_hostedzone_prefix() -> None:
    assert boxaws.bare_zone_id("/hostedzone/Z0123") == "Z0123"
    assert boxaws.bare_zone_id("Z0123") == "Z0123"
