"""What the devbox costs: the spot price of its type and zone, and the current session's cost.

The price is looked up once per session by the running handler and kept in a tag on the
instance, so /status reads it from the describe call it makes anyway (no extra AWS call).
"""
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, Optional

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import aws_failure
from chalicelib.instance import tag_value

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

PRICE_TAG = "devbox:spot-price"


def current_spot_price(ec2: EC2Client, instance_type: str, zone: str, now: datetime) -> Optional[float]:
    """The latest Linux spot price (USD per hour) for the type in the zone, or None if unknown."""
    try:
        history = ec2.describe_spot_price_history(
            InstanceTypes=[instance_type],
            AvailabilityZone=zone,
            ProductDescriptions=["Linux/UNIX"],
            StartTime=now,
            MaxResults=1,
        )["SpotPriceHistory"]
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "read the spot price") from err
    for entry in history:
        return float(entry["SpotPrice"])
    return None


def price_tag(price: float, instance_type: str, zone: str) -> Dict[str, str]:
    """The tag that records the session's price (with what it was for)."""
    return {PRICE_TAG: f"{price:.6f} {instance_type} {zone}"}


def cost_fields(instance: Dict[str, Any], state: str, now: Optional[datetime] = None) -> Dict[str, Any]:
    """spot_price_per_hour, uptime_seconds and estimated_cost for the status document."""
    now = now or datetime.now(timezone.utc)
    price = _recorded_price(instance)
    launch = instance.get("LaunchTime")
    uptime = None
    if state == "running" and isinstance(launch, datetime):
        uptime = max(0, int((now - launch).total_seconds()))
    cost = round(price * uptime / 3600, 4) if price is not None and uptime is not None else None
    return {"spot_price_per_hour": price, "uptime_seconds": uptime, "estimated_cost": cost}


def _recorded_price(instance: Dict[str, Any]) -> Optional[float]:
    value = tag_value(instance, PRICE_TAG)
    if not value:
        return None
    parts = value.split()
    # A price recorded for another type (the box was resized since) would mislead.
    if len(parts) >= 2 and parts[1] != instance.get("InstanceType"):
        return None
    try:
        return float(parts[0])
    except ValueError:
        return None
