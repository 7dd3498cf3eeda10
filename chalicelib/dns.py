"""DNS: the A record that gives the devbox a stable name."""
from typing import TYPE_CHECKING, Any, Optional

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import aws_failure

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client
else:
    Route53Client = Any


def upsert_record(route53: Route53Client, zone_id: str, name: str, ip: str, ttl: int) -> None:
    """Point the A record at the instance's address (creating or replacing it)."""
    change = {
        "Action": "UPSERT",
        "ResourceRecordSet": {"Name": name, "Type": "A", "TTL": ttl, "ResourceRecords": [{"Value": ip}]},
    }
    try:
        route53.change_resource_record_sets(
            HostedZoneId=zone_id, ChangeBatch={"Comment": "devbox running", "Changes": [change]}
        )
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, f"point {name} at {ip}") from err


def find_record(route53: Route53Client, zone_id: str, name: str) -> Optional[dict]:
    """The A record set for the name, exactly as Route53 holds it, or None."""
    try:
        page = route53.list_resource_record_sets(
            HostedZoneId=zone_id, StartRecordName=name, StartRecordType="A", MaxItems="1"
        )
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, f"read the record {name}") from err
    for record in page.get("ResourceRecordSets", []):
        if record["Type"] == "A" and record["Name"].rstrip(".").lower() == name.rstrip(".").lower():
            return dict(record)
    return None


def delete_record(route53: Route53Client, zone_id: str, name: str) -> bool:
    """Delete the A record if there is one; returns whether one was deleted."""
    record = find_record(route53, zone_id, name)
    if record is None:
        return False
    try:
        route53.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={"Comment": "devbox stopped", "Changes": [{"Action": "DELETE", "ResourceRecordSet": record}]},
        )
    except ClientError as err:
        # Deleted in between by a duplicate event: the goal is reached.
        if err.response["Error"]["Code"] == "InvalidChangeBatch" and find_record(route53, zone_id, name) is None:
            return False
        raise aws_failure(err, f"delete the record {name}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"delete the record {name}") from err
    return True
