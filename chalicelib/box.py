"""The box: a name, a data volume, and its instances (one current, the rest being retired).

Everything the app creates carries the tag ``devbox:box=<name>``. The *current* instance is
the newest instance with that tag that is neither terminated (nor shutting down) nor tagged
``devbox:retired``; one DescribeInstances with a tag filter finds it. Any other live instance
without the retired tag is a *stray* (left by a relaunch cut off halfway, or by two relaunches
at once): the next /start or running event retires it.

A launch or relaunch is planned here as a pure decision (``plan_start``, ``launch_attempts``)
and carried out by ``launch``/``retire``, each step skipping what is already done, so the next
/start finishes whatever a cut-off one left.
"""
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import CapacityError, StateConflictError, aws_failure
from chalicelib.instance import SPOT_SHUTDOWN, VOLUME_TAG, set_tags, state_of, tag_value

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

BOX_TAG = "devbox:box"
# The IAM identity a fleet box belongs to (FLEET=true); absent on a single box.
OWNER_TAG = "devbox:owner"
# When the app launched the instance (microseconds): the order of launches even within a second.
LAUNCHED_TAG = "devbox:launched"
RETIRED_TAG = "devbox:retired"
GONE = ("shutting-down", "terminated")
SPOT = "spot"
ON_DEMAND = "on-demand"
# A persistent request with "stop" is what lets a spot instance be stopped and started, and
# keeps its root disk when the spot service reclaims the capacity. The app passes the market
# in each RunInstances call (not in the launch template): RunInstances cannot turn a
# template's spot market back into on-demand, and the fallback needs exactly that.
SPOT_MARKET = {
    "MarketType": "spot",
    "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
}
# Errors that say "not here, not now" for one type in one subnet: the next attempt may work.
# InsufficientInstanceCapacity is EC2's answer when a pool has no capacity; the spot ones
# mean this market cannot be had at all right now.
_TRY_NEXT = {
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientFreeAddressesInSubnet", "Unsupported", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
}
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class BoxView:
    """What one DescribeInstances says about the box's instances (terminated ones included)."""

    name: str
    instances: Tuple[Dict[str, Any], ...]

    @property
    def live(self) -> List[Dict[str, Any]]:
        """Instances not terminated nor shutting down, retired or not."""
        return [i for i in self.instances if state_of(i) not in GONE]

    @property
    def current(self) -> Optional[Dict[str, Any]]:
        """The newest live instance that is not retired, or None."""
        candidates = [i for i in self.live if not is_retired(i)]
        return max(candidates, key=_launch_order) if candidates else None

    @property
    def strays(self) -> List[Dict[str, Any]]:
        """Live instances, not retired, that are not the current one."""
        current = self.current
        return [i for i in self.live if not is_retired(i) and i is not current]

    @property
    def retiring(self) -> List[Dict[str, Any]]:
        """Retired instances that are not yet terminated (a relaunch cut off halfway)."""
        return [i for i in self.live if is_retired(i)]

    @property
    def newest(self) -> Optional[Dict[str, Any]]:
        """The newest instance the box ever had that EC2 still lists, whatever its state."""
        return max(self.instances, key=_launch_order) if self.instances else None

    def find(self, instance_id: Optional[str]) -> Optional[Dict[str, Any]]:
        """One of the box's instances by id, or None."""
        return next((i for i in self.instances if i["InstanceId"] == instance_id), None)


def describe_box(ec2: EC2Client, name: str, owner: Optional[str] = None) -> BoxView:
    """The box's instances, found by tag (one DescribeInstances call, paged).

    ``name`` may hold EC2's filter wildcard (``fleet/*``: every box of a fleet); with ``owner``,
    only instances tagged with that owner (``devbox:owner``).
    """
    found: List[Dict[str, Any]] = []
    filters = [{"Name": f"tag:{BOX_TAG}", "Values": [name]}]
    if owner is not None:
        filters.append({"Name": f"tag:{OWNER_TAG}", "Values": [owner]})
    kwargs: Dict[str, Any] = {"Filters": filters}
    try:
        while True:
            page = ec2.describe_instances(**kwargs)
            for reservation in page.get("Reservations", []):
                found.extend(reservation.get("Instances", []))
            token = page.get("NextToken")
            if not token:
                return BoxView(name, tuple(found))
            kwargs["NextToken"] = token
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "describe the box's instances") from err


def is_retired(instance: Dict[str, Any]) -> bool:
    """True for an instance a relaunch replaced."""
    return tag_value(instance, RETIRED_TAG) is not None


def is_interrupted(instance: Dict[str, Any]) -> bool:
    """True when the spot service stopped the instance (only EC2 may start it again)."""
    return state_of(instance) == "stopped" and instance.get("StateReason", {}).get("Code") == SPOT_SHUTDOWN


def market_of(instance: Dict[str, Any]) -> str:
    """spot or on-demand."""
    return SPOT if instance.get("InstanceLifecycle") == "spot" else ON_DEMAND


def attached_volume_ids(instance: Dict[str, Any]) -> List[str]:
    """The EBS volumes attached (or attaching) to the instance, from its description."""
    return [m["Ebs"]["VolumeId"] for m in instance.get("BlockDeviceMappings", [])
            if "Ebs" in m and m["Ebs"].get("Status") in ("attaching", "attached")]


def _launch_order(instance: Dict[str, Any]) -> Tuple[datetime, str]:
    # The app's own launch stamp first; else the root volume's attach time, which is set once at
    # launch (LaunchTime moves on every start).
    stamp = tag_value(instance, LAUNCHED_TAG)
    try:
        when: Any = datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=timezone.utc) if stamp else None
    except ValueError:
        when = None
    root = instance.get("RootDeviceName")
    when = when or next((m["Ebs"].get("AttachTime") for m in instance.get("BlockDeviceMappings", [])
                         if m.get("DeviceName") == root and "Ebs" in m), None) or instance.get("LaunchTime")
    if not isinstance(when, datetime):
        when = datetime.min.replace(tzinfo=timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when, str(instance["InstanceId"])


@dataclass(frozen=True)
class StartPlan:
    """What /start does to the box's instances.

    action: "none" (pending or running already), "start" (StartInstances), "resize" (change
    the type of a stopped on-demand instance in place, then start), "relaunch" (launch a
    replacement, then retire the current one), "launch" (no current instance).
    """

    action: str
    reason: str
    types: Tuple[Optional[str], ...] = ()
    new_type: Optional[str] = None


def plan_start(view: BoxView, wanted_type: Optional[str], rebuild: bool,
               allowed_types: Sequence[str]) -> StartPlan:
    """Decide what /start does, or raise a conflict that changes nothing."""
    current = view.current
    if current is None:
        newest = view.newest
        kind = wanted_type or (newest.get("InstanceType") if newest else None)
        reason = "first start" if newest is None else "the box has no instance"
        return StartPlan("launch", reason, _with_others(kind, allowed_types))
    state, kind = state_of(current), current.get("InstanceType")
    if state == "stopping":
        raise StateConflictError("the devbox is stopping; wait until it has stopped, then start it again")
    if state in ("pending", "running"):
        if rebuild:
            raise StateConflictError(f"the devbox is {state}; stop it before rebuilding it")
        if wanted_type is not None and wanted_type != kind:
            raise StateConflictError(f"the devbox is {state} as {kind}; stop it before starting it as {wanted_type}")
        return StartPlan("none", f"already {state}")
    if is_interrupted(current):
        # Only EC2 may restart it, whenever capacity returns: a new instance is the way back now.
        return StartPlan("relaunch", "interrupted by the spot service", _with_others(wanted_type or kind, allowed_types))
    if rebuild:
        return StartPlan("relaunch", "rebuild", (wanted_type or kind,))
    if wanted_type is not None and wanted_type != kind:
        if market_of(current) == SPOT:
            # A stopped spot instance cannot change type: the resize is a relaunch.
            return StartPlan("relaunch", f"resize to {wanted_type}", (wanted_type,))
        return StartPlan("resize", f"resize to {wanted_type}", new_type=wanted_type)
    return StartPlan("start", "stopped")


def _with_others(first: Optional[str], allowed: Sequence[str]) -> Tuple[Optional[str], ...]:
    return (first,) + tuple(t for t in allowed if t != first)


@dataclass(frozen=True)
class Attempt:
    """One RunInstances try: a type (None: the template's), a market and a subnet (None: EC2's choice)."""

    instance_type: Optional[str]
    market: str
    subnet_id: Optional[str]

    def describe(self, zone: Optional[str] = None) -> str:
        """A phrase naming the attempt for messages."""
        where = f" in {zone or self.subnet_id}" if (zone or self.subnet_id) else ""
        return f"{self.instance_type or 'the template type'} {self.market}{where}"


def launch_attempts(types: Sequence[Optional[str]], subnets: Sequence[Optional[str]],
                    on_demand_fallback: bool) -> List[Attempt]:
    """Spot for each type in each subnet, in order; then on-demand of the first type, if allowed."""
    subnets = list(subnets) or [None]
    attempts = [Attempt(kind, SPOT, subnet) for kind in types for subnet in subnets]
    if on_demand_fallback and types:
        attempts += [Attempt(types[0], ON_DEMAND, subnet) for subnet in subnets]
    return attempts


def client_token(box_name: str, basis: str, attempt: Attempt, salt: str = "") -> str:
    """RunInstances' idempotency token for this box, predecessor and attempt.

    EC2 answers a repeated token with the instance the first call launched, so concurrent or
    repeated /start calls for the same relaunch launch one instance.
    """
    text = "\x1f".join([box_name, basis, attempt.instance_type or "-", attempt.market, attempt.subnet_id or "-", salt])
    return "devbox-" + hashlib.sha256(text.encode()).hexdigest()[:48]


@dataclass(frozen=True)
class LaunchSpec:
    """What every instance of the box is launched with, besides the attempt's own settings."""

    box_name: str
    launch_template_id: str
    security_group_id: str
    volume_id: Optional[str] = None
    owner: Optional[str] = None


def run_instance(ec2: EC2Client, spec: LaunchSpec, attempt: Attempt, token: str) -> Dict[str, Any]:
    """One RunInstances call from the launch template; returns the instance described."""
    instance_tags = [{"Key": BOX_TAG, "Value": spec.box_name}, {"Key": "Name", "Value": spec.box_name},
                     {"Key": LAUNCHED_TAG, "Value": datetime.now(timezone.utc).strftime(_STAMP_FORMAT)}]
    if spec.owner:
        instance_tags.append({"Key": OWNER_TAG, "Value": spec.owner})
    if spec.volume_id:
        # The boot script reads this tag (instance metadata) to find the data volume.
        instance_tags.append({"Key": VOLUME_TAG, "Value": spec.volume_id})
    tags = [{"ResourceType": "instance", "Tags": instance_tags},
            {"ResourceType": "volume", "Tags": [{"Key": BOX_TAG, "Value": spec.box_name}]}]
    kwargs: Dict[str, Any] = {
        "LaunchTemplate": {"LaunchTemplateId": spec.launch_template_id, "Version": "$Latest"},
        "MinCount": 1, "MaxCount": 1, "ClientToken": token,
    }
    if attempt.instance_type:
        kwargs["InstanceType"] = attempt.instance_type
    if attempt.market == SPOT:
        kwargs["InstanceMarketOptions"] = SPOT_MARKET
        tags.append({"ResourceType": "spot-instances-request", "Tags": [{"Key": BOX_TAG, "Value": spec.box_name}]})
    if attempt.subnet_id:
        # Network interfaces given in the request replace the template's; a public address is
        # asked for explicitly, as the template does, since a subnet may not map one on launch.
        kwargs["NetworkInterfaces"] = [{
            "DeviceIndex": 0, "SubnetId": attempt.subnet_id, "Groups": [spec.security_group_id],
            "AssociatePublicIpAddress": True, "DeleteOnTermination": True,
        }]
    kwargs["TagSpecifications"] = tags
    answer = ec2.run_instances(**kwargs)
    return dict(answer["Instances"][0])


@dataclass(frozen=True)
class Launched:
    """The instance a launch got, and what was tried before it."""

    instance: Dict[str, Any]
    attempt: Attempt
    tried: Tuple[str, ...]


def launch(ec2: EC2Client, spec: LaunchSpec, basis: str, attempts: Sequence[Attempt]) -> Launched:
    """Try the attempts in order until one launches; on none, raise a 503 naming each try.

    A failed attempt creates nothing (EC2 launches no instance and opens no spot request for
    a RunInstances call it refuses), so nothing is left behind when all of them fail.
    """
    tried: List[str] = []
    for attempt in attempts:
        salt = ""
        for _ in range(3):
            try:
                instance = run_instance(ec2, spec, attempt, client_token(spec.box_name, basis, attempt, salt))
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code not in _TRY_NEXT:
                    raise aws_failure(err, f"launch the box as {attempt.describe()}") from err
                tried.append(f"{attempt.describe()}: {code}")
                break
            except BotoCoreError as err:
                raise aws_failure(err, f"launch the box as {attempt.describe()}") from err
            if state_of(instance) in GONE:
                # The token was used before, for an instance since terminated: EC2 hands that one
                # back. A salt derived from it gives a fresh token every concurrent caller agrees on.
                salt = instance["InstanceId"]
                continue
            return Launched(instance, attempt, tuple(tried))
    raise CapacityError(
        "AWS has no capacity for the box right now; tried " + "; ".join(tried)
        + ". Nothing was changed: try again in a few minutes"
        + ("" if any(a.market == ON_DEMAND for a in attempts) else " (or set ON_DEMAND_FALLBACK=true)")
    )


def retire(ec2: EC2Client, instance: Dict[str, Any], volume_id: Optional[str], now: datetime) -> List[str]:
    """Retire an instance the box no longer uses: tag it, free the volume, cancel its spot request, terminate.

    Each step is skipped when already done, so a retire cut off halfway is finished by the next one.
    """
    instance_id = instance["InstanceId"]
    done: List[str] = []
    if not is_retired(instance):
        set_tags(ec2, instance_id, {RETIRED_TAG: now.strftime(_TIME_FORMAT)})
        done.append("tagged retired")
    if volume_id and volume_id in attached_volume_ids(instance) and state_of(instance) == "stopped":
        # Detaching from a stopped instance is quick (termination would free it too, later), and it
        # must come before the cancel: cancelling terminates a stopped instance of the request.
        detach_volume(ec2, volume_id, instance_id)
        done.append(f"detached {volume_id}")
    request_id = instance.get("SpotInstanceRequestId")
    if request_id:
        # Terminating an instance of a persistent request reopens the request and EC2 launches
        # a replacement: cancel it first (cancelling terminates a stopped instance of the request itself).
        try:
            ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
            done.append(f"cancelled {request_id}")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "InvalidSpotInstanceRequestID.NotFound":
                raise aws_failure(err, "cancel the replaced instance's spot request") from err
        except BotoCoreError as err:
            raise aws_failure(err, "cancel the replaced instance's spot request") from err
    if state_of(instance) not in GONE:
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
            done.append("terminated")
        except (ClientError, BotoCoreError) as err:
            raise aws_failure(err, f"terminate the replaced instance {instance_id}") from err
    return done


def detach_volume(ec2: EC2Client, volume_id: str, instance_id: str) -> None:
    """Detach the volume from the instance; a volume already detached or detaching is fine."""
    try:
        # InstanceId is optional for AWS; moto needs it, and it guards against detaching elsewhere.
        ec2.detach_volume(VolumeId=volume_id, InstanceId=instance_id)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("IncorrectState", "InvalidAttachment.NotFound"):
            raise aws_failure(err, f"detach the data volume {volume_id} from {instance_id}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"detach the data volume {volume_id} from {instance_id}") from err
