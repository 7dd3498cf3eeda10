"""The laptop side's AWS helpers: a box's resources found by tag, and the calls that remove them.

Deploy, destroy and the local stack share these. Everything the service creates for a box
carries the tag ``devbox:box=<box name>`` (instances, their spot requests, the data volume,
snapshots), so a box can be found, and cleaned up, without its stack. A fleet's boxes are tagged
``devbox:box=<fleet>/<name>``; ``fleet_filter`` finds all of them at once. Each helper takes the
boto3 client it needs, so tests hand in a moto-backed or stubbed one.
"""
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    import boto3
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_route53 import Route53Client
else:
    EC2Client = Route53Client = Any

ClientFactory = Callable[[str], Any]

BOX_TAG = "devbox:box"
ROLE_TAG = "devbox:role"
DATA_ROLE = "data"
RETIRED_TAG = "devbox:retired"
# Every state but terminated: shutting-down is listed so a teardown waits for it too.
LIVE_INSTANCE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
# A spot request in any of these can still launch an instance (disabled: its instance is
# stopped, and a start brings it back); closed, cancelled and failed ones never do.
LIVE_SPOT_REQUEST_STATES = ("open", "active", "disabled")
# Terminating takes a minute or two; a first snapshot of a large volume can take an hour.
TERMINATE_WAIT = {"Delay": 5, "MaxAttempts": 120}
SNAPSHOT_WAIT = {"Delay": 15, "MaxAttempts": 240}
VOLUME_WAIT = {"Delay": 5, "MaxAttempts": 60}


def session_clients(
    profile: Optional[str] = None,
    region: Optional[str] = None,
    *,
    endpoint_url: Optional[str] = None,
    user_agent_extra: str = "devbox",
) -> ClientFactory:
    """A cached factory of boto3 clients for a profile and region (None: boto3's own defaults)."""
    import boto3

    session = boto3.session.Session(profile_name=profile, region_name=region)
    return session_client_factory(session, endpoint_url=endpoint_url, user_agent_extra=user_agent_extra)


def session_client_factory(
    session: "boto3.session.Session", *, endpoint_url: Optional[str] = None, user_agent_extra: str = "devbox"
) -> ClientFactory:
    """A cached factory of clients of one boto3 session, all sharing one config (standard retries)."""
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 8}, user_agent_extra=user_agent_extra)
    made: Dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in made:
            made[service] = session.client(service, config=config, endpoint_url=endpoint_url)  # type: ignore[call-overload]
        return made[service]

    return client


def tag_value(resource: Mapping[str, Any], key: str) -> Optional[str]:
    """The value of one tag of a described EC2 resource, or None when it has no such tag."""
    for tag in resource.get("Tags", []):
        if tag.get("Key") == key:
            return str(tag.get("Value", ""))
    return None


def box_tags(box_name: str, **more: str) -> List[Dict[str, str]]:
    """The tags that mark a resource as the box's (plus any given), in EC2's Key/Value form."""
    tags = {BOX_TAG: box_name, **more}
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def filter_literal(value: str) -> str:
    """A filter value that matches exactly this text: EC2 reads * and ? in filter values as wildcards and \\ as
    their escape ("Filter your resources", EC2 User Guide)."""
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def fleet_filter(fleet: str) -> str:
    """The devbox:box filter value of every box of a fleet (tagged <fleet>/<name>): the fleet's name, escaped, then
    the wildcard. The finders below take it as their box_name; what they find is the fleet's namespace, so a caller
    that wants box names checks each tag value (fleet_box_name)."""
    return f"{filter_literal(fleet)}/*"


def fleet_box_name(fleet: str, tag: str) -> Optional[str]:
    """What follows <fleet>/ in a box tag (a box name, if the app wrote it); None when the tag is not the fleet's."""
    prefix = f"{fleet}/"
    return tag[len(prefix):] if tag.startswith(prefix) else None


def find_instances(ec2: EC2Client, box_name: str, *, include_terminated: bool = False) -> List[Dict[str, Any]]:
    """The box's instances (retired ones included), oldest launch first; terminated ones only if asked."""
    filters: List[Dict[str, Any]] = [{"Name": f"tag:{BOX_TAG}", "Values": [box_name]}]
    if not include_terminated:
        filters.append({"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)})
    found = [
        dict(instance)
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters)
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]
    return sorted(found, key=lambda instance: str(instance.get("LaunchTime", "")))


def describe_instance(ec2: EC2Client, instance_id: str) -> Optional[Dict[str, Any]]:
    """One instance by id, or None when EC2 no longer knows it."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as err:
        if err.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
            return None
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            return dict(instance)
    return None


def find_spot_requests(ec2: EC2Client, box_name: str) -> List[Dict[str, Any]]:
    """The box's spot requests that can still launch an instance (open, active or disabled)."""
    filters = [
        {"Name": f"tag:{BOX_TAG}", "Values": [box_name]},
        {"Name": "state", "Values": list(LIVE_SPOT_REQUEST_STATES)},
    ]
    return [
        dict(request)
        for page in ec2.get_paginator("describe_spot_instance_requests").paginate(Filters=filters)
        for request in page["SpotInstanceRequests"]
    ]


def find_data_volumes(ec2: EC2Client, box_name: str) -> List[Dict[str, Any]]:
    """The box's data volumes (tagged with the box and devbox:role=data), oldest first."""
    filters = [
        {"Name": f"tag:{BOX_TAG}", "Values": [box_name]},
        {"Name": f"tag:{ROLE_TAG}", "Values": [DATA_ROLE]},
    ]
    found = [
        dict(volume)
        for page in ec2.get_paginator("describe_volumes").paginate(Filters=filters)
        for volume in page["Volumes"]
    ]
    return sorted(found, key=lambda volume: str(volume.get("CreateTime", "")))


def cancel_spot_requests(ec2: EC2Client, request_ids: Iterable[str]) -> List[str]:
    """Cancel spot requests, tolerating ones EC2 no longer knows; returns the ids it cancelled."""
    ids = sorted(set(request_ids))
    if not ids:
        return []
    try:
        answer = ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=ids)
    except ClientError as err:
        if err.response["Error"]["Code"] != "InvalidSpotInstanceRequestID.NotFound":
            raise
        if len(ids) == 1:
            return []
        # One unknown id fails the whole call: cancel the rest one by one.
        return [cancelled for request_id in ids for cancelled in cancel_spot_requests(ec2, [request_id])]
    return [str(item["SpotInstanceRequestId"]) for item in answer.get("CancelledSpotInstanceRequests", [])]


def terminate_instances(
    ec2: EC2Client, instance_ids: Iterable[str], *, wait: bool = True, waiter_config: Optional[Mapping[str, int]] = None
) -> List[str]:
    """Terminate instances and (by default) wait until all are terminated; returns the ids."""
    ids = sorted(set(instance_ids))
    if not ids:
        return []
    ec2.terminate_instances(InstanceIds=ids)
    if wait:
        ec2.get_waiter("instance_terminated").wait(
            InstanceIds=ids, WaiterConfig=_waiter_config(waiter_config, TERMINATE_WAIT)
        )
    return ids


def snapshot_volume(
    ec2: EC2Client,
    volume_id: str,
    box_name: str,
    *,
    description: Optional[str] = None,
    wait: bool = True,
    waiter_config: Optional[Mapping[str, int]] = None,
    tags: Optional[Mapping[str, str]] = None,
) -> str:
    """Snapshot a volume, tagged with the box (and devbox:role=data, plus any tags given), and wait until it completes; returns its id."""
    snapshot = ec2.create_snapshot(
        VolumeId=volume_id,
        Description=description or f"devbox {box_name}: data volume {volume_id}",
        TagSpecifications=[{
            "ResourceType": "snapshot",
            "Tags": box_tags(box_name, **{ROLE_TAG: DATA_ROLE, "Name": box_name, **(tags or {})}),
        }],
    )
    snapshot_id = str(snapshot["SnapshotId"])
    if wait:
        ec2.get_waiter("snapshot_completed").wait(
            SnapshotIds=[snapshot_id], WaiterConfig=_waiter_config(waiter_config, SNAPSHOT_WAIT)
        )
    return snapshot_id


def delete_volume(ec2: EC2Client, volume_id: str, *, waiter_config: Optional[Mapping[str, int]] = None) -> bool:
    """Delete a volume (once it is detached); returns False when it no longer existed."""
    try:
        ec2.delete_volume(VolumeId=volume_id)
    except ClientError as err:
        code = err.response["Error"]["Code"]
        if code == "InvalidVolume.NotFound":
            return False
        if code not in ("VolumeInUse", "IncorrectState"):
            raise
        # Right after its instance terminates a volume is still detaching, and EC2 refuses to
        # delete a volume in use: wait until it is available, then delete it.
        ec2.get_waiter("volume_available").wait(VolumeIds=[volume_id], WaiterConfig=_waiter_config(waiter_config, VOLUME_WAIT))
        ec2.delete_volume(VolumeId=volume_id)
    return True


def bare_zone_id(zone_id: str) -> str:
    """A hosted zone id without the "/hostedzone/" prefix Route53 sometimes returns."""
    return zone_id.rsplit("/", 1)[-1]


def find_address_records(route53: Route53Client, zone_id: str, name: str) -> List[Dict[str, Any]]:
    """The A record(s) of a name in a zone, exactly as Route53 holds them."""
    wanted = _normal_name(name)
    # Record sets come sorted by name then type, so the page starting at (name, A) holds them.
    page = route53.list_resource_record_sets(
        HostedZoneId=bare_zone_id(zone_id), StartRecordName=name, StartRecordType="A", MaxItems="10"
    )
    return [
        dict(record)
        for record in page.get("ResourceRecordSets", [])
        if record["Type"] == "A" and _normal_name(record["Name"]) == wanted
    ]


def delete_address_record(route53: Route53Client, zone_id: str, name: str, *, comment: str = "devbox") -> bool:
    """Delete the A record(s) of a name in a zone, exactly as Route53 holds them; returns whether one existed."""
    zone_id = bare_zone_id(zone_id)
    records = find_address_records(route53, zone_id, name)
    if not records:
        return False
    # DELETE must repeat the record exactly as Route53 holds it (TTL, values, any routing fields).
    route53.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={"Comment": comment, "Changes": [{"Action": "DELETE", "ResourceRecordSet": r} for r in records]},
    )
    return True


def instance_spot_request_ids(instances: Sequence[Mapping[str, Any]]) -> List[str]:
    """The spot requests named by described instances (moto's and on-demand instances name none)."""
    return sorted({str(i["SpotInstanceRequestId"]) for i in instances if i.get("SpotInstanceRequestId")})


def _waiter_config(given: Optional[Mapping[str, int]], default: Mapping[str, int]) -> Dict[str, int]:
    config = given or default
    return {"Delay": config["Delay"], "MaxAttempts": config["MaxAttempts"]}


def _normal_name(name: str) -> str:
    return name.rstrip(".").lower()
