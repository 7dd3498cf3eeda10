"""The box's data volume: the EBS volume mounted at /home, which outlives every instance.

Created by the first /start in the zone of the instance it launched, tagged with the box,
and attached by the running handler (EC2 attaches an existing volume only to a running or
stopped instance in the same zone, never at launch). The app never deletes it.
"""
import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.box import BOX_TAG
from chalicelib.errors import UpstreamError, aws_failure

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

ROLE_TAG = "devbox:role"
DATA_ROLE = "data"
# The boot script finds the device by the volume id (NVMe serial), whatever name it gets;
# this name is what Xen types see.
DEVICE = "/dev/sdf"


def find_data_volume(ec2: EC2Client, box_name: str) -> Optional[Dict[str, Any]]:
    """The box's data volume (by its tags), or None before the first start."""
    try:
        volumes = ec2.describe_volumes(Filters=[
            {"Name": f"tag:{BOX_TAG}", "Values": [box_name]},
            {"Name": f"tag:{ROLE_TAG}", "Values": [DATA_ROLE]},
        ])["Volumes"]
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "find the box's data volume") from err
    # More than one only if someone copied the tags by hand: the oldest holds the user's work.
    if not volumes:
        return None
    oldest: Dict[str, Any] = dict(min(volumes, key=_age))
    return oldest


def _age(found: Any) -> Tuple[str, str]:
    return str(found.get("CreateTime")), str(found["VolumeId"])


def describe_volume(ec2: EC2Client, volume_id: str) -> Optional[Dict[str, Any]]:
    """One volume's description, or None when it no longer exists."""
    try:
        volumes = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "InvalidVolume.NotFound":
            return None
        raise aws_failure(err, f"describe the data volume {volume_id}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"describe the data volume {volume_id}") from err
    return dict(volumes[0]) if volumes else None


def create_data_volume(ec2: EC2Client, box_name: str, zone: str, size_gib: int, for_instance: str,
                       kms_key_id: Optional[str] = None) -> Dict[str, Any]:
    """Create the data volume (gp3, encrypted) in the zone; idempotent per instance it is created for."""
    # Concurrent first starts that launched the same instance create the same volume.
    token = "devbox-data-" + hashlib.sha256(f"{box_name}\x1f{for_instance}".encode()).hexdigest()[:40]
    key = {"KmsKeyId": kms_key_id} if kms_key_id else {}
    try:
        return dict(ec2.create_volume(
            AvailabilityZone=zone, Size=size_gib, VolumeType="gp3", Encrypted=True, ClientToken=token, **key,
            TagSpecifications=[{"ResourceType": "volume", "Tags": [
                {"Key": BOX_TAG, "Value": box_name}, {"Key": ROLE_TAG, "Value": DATA_ROLE},
                {"Key": "Name", "Value": f"{box_name} /home"},
            ]}],
        ))
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, f"create the data volume in {zone}") from err


def attachment_of(volume: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The volume's current attachment (instance, state), or None when it is free."""
    for attachment in volume.get("Attachments", []):
        if attachment.get("State") in ("attaching", "attached", "detaching"):
            return dict(attachment)
    return None


def wait_until_available(ec2: EC2Client, volume_id: str, timeout: float,
                         sleep: Callable[[float], None] = time.sleep, interval: float = 2.0) -> Dict[str, Any]:
    """Poll until the volume is available (created, or detached from the instance it left)."""
    waited = 0.0
    while True:
        volume = describe_volume(ec2, volume_id)
        if volume is None:
            raise UpstreamError(f"the data volume {volume_id} no longer exists")
        if volume.get("State") == "available":
            return volume
        if waited >= timeout:
            raise UpstreamError(
                f"the data volume {volume_id} is still {volume.get('State')} after {timeout:.0f} s; "
                "it is attached at the next running event or /start"
            )
        sleep(interval)
        waited += interval


def attach(ec2: EC2Client, volume_id: str, instance_id: str) -> str:
    """Attach the volume to the instance; returns the attachment state."""
    try:
        answer = ec2.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=DEVICE)
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, f"attach the data volume {volume_id} to {instance_id}") from err
    return str(answer.get("State", "attaching"))


def attached_to(volume: Dict[str, Any]) -> List[str]:
    """Instance ids the volume is attached (or attaching, detaching) to."""
    return [a["InstanceId"] for a in volume.get("Attachments", [])
            if a.get("State") in ("attaching", "attached", "detaching")]
