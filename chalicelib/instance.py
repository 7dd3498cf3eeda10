"""One instance of the box: start, stop, change type, tags, and the status document."""
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.config import Config
from chalicelib.errors import CapacityError, StateConflictError, aws_failure

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

# The state reason EC2 records when the spot service stopped the instance; only
# EC2 may start it again, when capacity returns (persistent request).
SPOT_SHUTDOWN = "Server.SpotInstanceShutdown"
INTERRUPTION_TAG = "devbox:last-interruption"
# The box's data volume, recorded on each of its instances (read back by every describe).
VOLUME_TAG = "devbox:volume"
# Written by the max-runtime job just before it stops the box (EC2 records its stop as a user's).
STOPPED_BY_TAG = "devbox:stopped-by"
# Written by the idle watcher on its own instance when its state changes.
IDLE_TAG = "devbox:idle"
# EC2's state reason for each way a box stops ("StateReason" in the EC2 API reference).
_STOPPED_BY = {"Client.InstanceInitiatedShutdown": "idle", "Client.UserInitiatedShutdown": "user",
               SPOT_SHUTDOWN: "spot"}
# StateTransitionReason of a stop: "User initiated (2026-11-29 12:00:00 GMT)"; it may be empty.
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")
_STOPS_AT = re.compile(r"stops at (\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)")
_CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity"}
_STATE_CODES = {"IncorrectInstanceState", "IncorrectSpotRequestState", "UnsupportedOperation", "IncorrectState"}


def state_of(instance: Dict[str, Any]) -> str:
    """The instance's state name (pending, running, stopping, stopped, ...)."""
    return str(instance["State"]["Name"])


def start_instance(ec2: EC2Client, instance_id: str) -> str:
    """Start the instance; returns its new state."""
    try:
        answer = ec2.start_instances(InstanceIds=[instance_id])
    except ClientError as err:
        code = err.response["Error"]["Code"]
        message = err.response["Error"].get("Message", "")
        if code in _CAPACITY_CODES:
            raise CapacityError(
                f"AWS has no spare capacity for this instance type in its zone right now ({code}); "
                "try again in a few minutes or choose another instance type"
            ) from err
        if code in _STATE_CODES:
            raise StateConflictError(f"EC2 refused to start the devbox {instance_id}: {message or code}") from err
        raise aws_failure(err, "start the instance") from err
    except BotoCoreError as err:
        raise aws_failure(err, "start the instance") from err
    return str(answer["StartingInstances"][0]["CurrentState"]["Name"])


def stop_instance(ec2: EC2Client, instance_id: str) -> str:
    """Stop the instance; returns its new state."""
    try:
        answer = ec2.stop_instances(InstanceIds=[instance_id])
    except ClientError as err:
        if err.response["Error"]["Code"] in _STATE_CODES:
            raise StateConflictError(
                f"EC2 cannot stop the devbox {instance_id} now ({err.response['Error'].get('Message', '')}); "
                "if it is still starting, try again in a minute"
            ) from err
        raise aws_failure(err, "stop the instance") from err
    except BotoCoreError as err:
        raise aws_failure(err, "stop the instance") from err
    return str(answer["StoppingInstances"][0]["CurrentState"]["Name"])


def status_document(
    box_name: str,
    instance: Optional[Dict[str, Any]],
    config: Config,
    allowed_ips: List[str],
    state: Optional[str] = None,
    data_volume: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The JSON document every route answers with; ``instance`` is the box's current one (None: none)."""
    instance = instance or {}
    state = state or (state_of(instance) if instance else "none")
    running = state == "running"
    public_ip = instance.get("PublicIpAddress") if running else None
    if not running:
        dns_name = None
    elif config.dns_managed:
        dns_name = config.domain_name
    else:
        dns_name = instance.get("PublicDnsName") or public_ip or None
    launch_time = instance.get("LaunchTime")
    if isinstance(launch_time, datetime):
        launch_time = launch_time.isoformat()
    market = None
    if instance:
        market = "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"
    volume_id = tag_value(instance, VOLUME_TAG) if instance else None
    zone = instance.get("Placement", {}).get("AvailabilityZone") if instance else None
    if data_volume is not None:
        volume_id = volume_id or data_volume.get("VolumeId")
        zone = zone or data_volume.get("AvailabilityZone")
    return {
        "box": box_name,
        "instance_id": instance.get("InstanceId"),
        "state": state,
        "instance_type": instance.get("InstanceType"),
        "market": market,
        # Kept for clients written before "market" existed.
        "lifecycle": market,
        "availability_zone": zone,
        "data_volume_id": volume_id,
        "interrupted": state == "stopped" and instance.get("StateReason", {}).get("Code") == SPOT_SHUTDOWN,
        "public_ip": public_ip,
        "dns_name": dns_name,
        "launch_time": launch_time if state in ("pending", "running") else None,
        "allowed_ips": allowed_ips,
        "last_interruption": tag_value(instance, INTERRUPTION_TAG) if instance else None,
        # Why EC2 last stopped it (e.g. a KMS key it may not use makes a start fall back to stopped).
        "state_reason": instance.get("StateReason", {}).get("Message") if state == "stopped" else None,
        **stop_fields(instance, state),
        "idle": tag_value(instance, IDLE_TAG) if instance and state == "running" else None,
    }


def stop_fields(instance: Dict[str, Any], state: str) -> Dict[str, Any]:
    """stopped_by (idle, user, max-runtime, spot, or null) and stopped_at, from what DescribeInstances says."""
    if state != "stopped":
        return {"stopped_by": None, "stopped_at": None}
    by = _STOPPED_BY.get(instance.get("StateReason", {}).get("Code", ""))
    match = _TRANSITION_TIME.search(str(instance.get("StateTransitionReason") or ""))
    at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc) if match else None
    if by == "user" and _stopped_for_max_runtime(instance):
        by = "max-runtime"
    if at is None and by == "idle":
        # The watcher's last word before it powered off: "idle since ..., stops at ...".
        stops = _STOPS_AT.search(tag_value(instance, IDLE_TAG) or "")
        at = datetime.strptime(stops.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) if stops else None
    return {"stopped_by": by, "stopped_at": at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else None}


def _stopped_for_max_runtime(instance: Dict[str, Any]) -> bool:
    # The job's tag counts only for the session it ended: written after the instance's last start.
    marked = tag_value(instance, STOPPED_BY_TAG) or ""
    launched = instance.get("LaunchTime")
    try:
        when = datetime.strptime(marked.split()[-1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (ValueError, IndexError):
        return False
    if isinstance(launched, datetime) and launched.tzinfo is None:
        launched = launched.replace(tzinfo=timezone.utc)
    return marked.startswith("max-runtime") and (not isinstance(launched, datetime) or when >= launched)


def tag_value(instance: Dict[str, Any], key: str) -> Optional[str]:
    """The value of one of the instance's tags, or None."""
    for tag in instance.get("Tags", []):
        if tag["Key"] == key:
            return str(tag["Value"])
    return None


def set_tags(ec2: EC2Client, instance_id: str, tags: Dict[str, str]) -> None:
    """Record values on the instance itself (read back for free by every describe)."""
    try:
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "tag the instance") from err


def change_type(ec2: EC2Client, instance_id: str, instance_type: str, spot: bool = False) -> None:
    """Change a stopped instance's type."""
    try:
        ec2.modify_instance_attribute(InstanceId=instance_id, InstanceType={"Value": instance_type})
    except ClientError as err:
        code = err.response["Error"]["Code"]
        reason = err.response["Error"].get("Message") or code
        if spot and code not in ("RequestLimitExceeded", "InternalError", "Unavailable", "UnauthorizedOperation"):
            # AWS documents that a stopped spot instance's type cannot be changed.
            raise StateConflictError(
                f"EC2 refused to change the spot devbox to {instance_type} ({reason}); a spot instance keeps "
                "the type it was launched with"
            ) from err
        if code in _STATE_CODES or code in ("InvalidParameterValue", "InvalidInstanceAttributeValue"):
            raise StateConflictError(f"EC2 refused to change the devbox to {instance_type}: {reason}") from err
        raise aws_failure(err, f"change the instance type to {instance_type}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"change the instance type to {instance_type}") from err

