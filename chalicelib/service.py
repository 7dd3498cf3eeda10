"""The operations behind the routes, event handlers and scheduled job: the one place that orders their steps.

Every operation takes the box's name as an argument: the deployment's BOX_NAME today, the
caller's own box later.
"""
import contextvars
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import access, box, cost, deadline, dns, instance, notify, volume
from chalicelib.config import Config
from chalicelib.errors import ConfigError, DevboxError, InvalidRequestError, UpstreamError, aws_failure

log = logging.getLogger("devbox")
# Lazily built clients by service name, so an operation only creates what it uses.
Clients = Callable[[str], Any]
# How long the running handler waits for the data volume to come free (detaching from the
# instance it leaves, or still being created); the function's timeout is set above this.
VOLUME_WAIT_SECONDS = 90.0


A = TypeVar("A")
B = TypeVar("B")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _side_by_side(first: Callable[[], A], second: Callable[[], B]) -> Tuple[A, B]:
    """Run two independent reads at the same time: the answer takes the longer, not the sum.

    The second runs in a thread with a copy of this context (the request's deadline and log
    line); boto3 clients may be shared between threads. A failure of either is raised.
    """
    context = contextvars.copy_context()
    result: Dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = context.run(second)
        except BaseException as err:  # handed to the caller below
            result["error"] = err

    thread = threading.Thread(target=run, name="devbox-read", daemon=True)
    thread.start()
    try:
        value = first()
    finally:
        thread.join()
    if "error" in result:
        raise result["error"]
    return value, result["value"]


def _document(box_name: str, current: Optional[Dict[str, Any]], config: Config, allowed: Any,
              state: Optional[str] = None, data_volume: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    doc = instance.status_document(box_name, current, config, sorted(allowed), state=state, data_volume=data_volume)
    doc.update(cost.cost_fields(current or {}, doc["state"]))
    return doc


def get_status(ec2: Any, config: Config, box_name: str) -> Dict[str, Any]:
    """The box's current instance and the access the app has granted.

    2 AWS calls, made side by side; 3 when the box has no instance (the data volume is then looked up by tag).
    """
    view, rules = _side_by_side(lambda: box.describe_box(ec2, box_name),
                                lambda: access.describe_rules(ec2, config.security_group_id))
    return status_of(ec2, config, box_name, view, rules)


def status_of(ec2: Any, config: Config, box_name: str, view: box.BoxView,
              rules: Sequence[access.IngressRule]) -> Dict[str, Any]:
    """The status document from the two reads; the data volume is looked up only when the box has no instance."""
    current = view.current
    data_volume = volume.find_data_volume(ec2, box_name) if current is None else None
    return _document(box_name, current, config, access.allowed_cidrs(rules), data_volume=data_volume)


def validate_instance_type(config: Config, instance_type: Any) -> Optional[str]:
    """The requested type if it is allowed; None when no type was asked for."""
    if instance_type is None:
        return None
    if not isinstance(instance_type, str) or not instance_type:
        raise InvalidRequestError("instance_type must be a string such as \"t3.large\"")
    if not config.allowed_instance_types:
        raise InvalidRequestError("resizing is turned off: the deployment sets no ALLOWED_INSTANCE_TYPES")
    if instance_type not in config.allowed_instance_types:
        raise InvalidRequestError(
            f"instance type {instance_type!r} is not allowed; choose one of {', '.join(config.allowed_instance_types)}"
        )
    return instance_type


def validate_rebuild(rebuild: Any) -> bool:
    """The rebuild flag: absent means false; anything but a JSON boolean is refused."""
    if rebuild is None:
        return False
    if not isinstance(rebuild, bool):
        raise InvalidRequestError("rebuild must be true or false")
    return rebuild


def start(
    ec2: Any, config: Config, box_name: str, source_ip: Optional[str], instance_type: Any = None,
    rebuild: Any = None, now: Optional[datetime] = None,
) -> Dict[str, Any]:
    """Let the caller in (pruning expired access) and get the box running.

    Calls: describe the box's instances, describe rules, then only what is needed: revoke,
    authorize, refresh (access; more reads and evictions when other starts race for a full
    group); start, resize in place, or launch and retire (instances); find, create, attach
    (data volume).
    """
    network = access.caller_network(source_ip)
    wanted_type = validate_instance_type(config, instance_type)
    wants_rebuild = validate_rebuild(rebuild)
    view, rules = _side_by_side(lambda: box.describe_box(ec2, box_name),
                                lambda: access.describe_rules(ec2, config.security_group_id))
    # Taken after the reads: the caller's rules are stamped from it, and a full group evicts by
    # those stamps, so they should be as late as they can be.
    now = now or _now()
    plan = box.plan_start(view, wanted_type, wants_rebuild, config.allowed_instance_types)
    # On a cold start the caller's surviving rules are re-stamped: a stopped event being
    # handled right now revokes only rules older than itself, so this session keeps access.
    granted = access.let_caller_in(
        ec2, config.security_group_id, rules, network, config.ssh_port, now, timedelta(hours=config.access_ttl_hours),
        config.rule_quota, restamp_caller=plan.action != "none",
    )
    if granted.attempts > 1:
        log.info("%s: the group was full while other callers were let in; let %s in at plan %d",
                 box_name, network, granted.attempts)
    try:
        current, state, extra = _carry_out(ec2, config, box_name, view, plan, now)
    except Exception:
        # Nothing half-done: the rule exists only for the session that failed to start.
        with deadline.cleanup():
            access.revoke_permissions(ec2, config.security_group_id, granted.added)
        raise
    allowed = set(access.allowed_cidrs(granted.rules)) - {r.cidr for r in granted.gone}
    if granted.added:
        allowed.add(str(network))
    doc = _document(box_name, current, config, allowed, state=state)
    doc.update({"action": plan.action, "reason": plan.reason, **extra})
    return doc


def _carry_out(ec2: Any, config: Config, box_name: str, view: box.BoxView, plan: box.StartPlan,
               now: datetime) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """Do what the plan says; returns the current instance, its state, and fields for the answer."""
    current = view.current
    _finish_retirements(ec2, view, now)
    if plan.action in ("launch", "relaunch"):
        launched, volume_id = _launch(ec2, config, box_name, view, plan)
        if current is not None:
            # Only now that a replacement exists: an interrupted one may still be restarted by EC2.
            box.retire(ec2, current, volume_id, now)
            log.info("%s: retired %s (%s)", box_name, current["InstanceId"], plan.reason)
        new = launched.instance
        log.info("%s: launched %s as %s (%s)", box_name, new["InstanceId"], launched.attempt.describe(), plan.reason)
        return new, instance.state_of(new), {"tried": list(launched.tried)}
    assert current is not None, "plan_start launches when there is no current instance"
    volume_id = _ensure_data_volume(ec2, config, box_name, current)
    if not instance.tag_value(current, instance.VOLUME_TAG):
        current = {**current, "Tags": current.get("Tags", []) + [{"Key": instance.VOLUME_TAG, "Value": volume_id}]}
    state = instance.state_of(current)
    if plan.action == "none":
        if state == "running" and volume_id not in box.attached_volume_ids(current):
            # The running handler has not attached it (yet, or it failed): try once, never fail the start.
            try:
                _attach_data_volume(ec2, box_name, view, current, volume_id, timeout=0.0)
            except DevboxError as err:
                log.warning("%s: data volume not attached yet: %s", box_name, err.message)
        return current, state, {}
    if volume_id not in box.attached_volume_ids(current):
        # A stopped instance takes the volume now, so it is there from the first second of boot.
        _attach_data_volume(ec2, box_name, view, current, volume_id, timeout=0.0)
    if plan.action == "resize":
        assert plan.new_type is not None
        state = _resize_and_start(ec2, current, plan.new_type)
        current = {**current, "InstanceType": plan.new_type}
    else:
        state = instance.start_instance(ec2, current["InstanceId"])
    log.info("%s: started %s (%s)", box_name, current["InstanceId"], plan.reason)
    return current, state, {}


def _launch(ec2: Any, config: Config, box_name: str, view: box.BoxView,
            plan: box.StartPlan) -> Tuple[box.Launched, Optional[str]]:
    """Launch the box's next instance: in the data volume's zone when it has one; creates it otherwise."""
    current = view.current
    data = None
    if current is not None and instance.tag_value(current, instance.VOLUME_TAG):
        zone = current.get("Placement", {}).get("AvailabilityZone")
        data = {"VolumeId": instance.tag_value(current, instance.VOLUME_TAG), "AvailabilityZone": zone}
    else:
        data = volume.find_data_volume(ec2, box_name)
    predecessor = current or view.newest
    basis = predecessor["InstanceId"] if predecessor else "first"
    if data is not None:
        hint = predecessor.get("SubnetId") if predecessor else None
        hint_zone = predecessor.get("Placement", {}).get("AvailabilityZone") if predecessor else None
        subnets = _zone_subnets(ec2, config, str(data["AvailabilityZone"]),
                                hint if hint_zone == data["AvailabilityZone"] else None)
    else:
        subnets = list(config.subnet_ids) or _default_subnets(ec2)
    spec = box.LaunchSpec(box_name, config.launch_template_id, config.security_group_id,
                          data["VolumeId"] if data else None, config.box_owner)
    launched = box.launch(ec2, spec, basis, box.launch_attempts(plan.types, subnets, config.on_demand_fallback))
    if data is None:
        new = launched.instance
        zone = new.get("Placement", {}).get("AvailabilityZone")
        created = volume.create_data_volume(ec2, box_name, str(zone), config.data_volume_gib, new["InstanceId"],
                                            config.kms_key_id)
        instance.set_tags(ec2, new["InstanceId"], {instance.VOLUME_TAG: created["VolumeId"]})
        launched = box.Launched({**new, "Tags": new.get("Tags", []) + [
            {"Key": instance.VOLUME_TAG, "Value": created["VolumeId"]}]}, launched.attempt, launched.tried)
        log.info("%s: created data volume %s (%d GiB) in %s", box_name, created["VolumeId"], config.data_volume_gib, zone)
        return launched, str(created["VolumeId"])
    return launched, str(data["VolumeId"])


def _ensure_data_volume(ec2: Any, config: Config, box_name: str, current: Dict[str, Any]) -> str:
    """The current instance's data volume id, finishing a first start cut off before the volume existed."""
    recorded = instance.tag_value(current, instance.VOLUME_TAG)
    if recorded:
        return recorded
    found = volume.find_data_volume(ec2, box_name)
    if found is None:
        zone = str(current.get("Placement", {}).get("AvailabilityZone"))
        found = volume.create_data_volume(ec2, box_name, zone, config.data_volume_gib, current["InstanceId"],
                                          config.kms_key_id)
    instance.set_tags(ec2, current["InstanceId"], {instance.VOLUME_TAG: found["VolumeId"]})
    return str(found["VolumeId"])


def _finish_retirements(ec2: Any, view: box.BoxView, now: datetime) -> None:
    """Retire what a cut-off relaunch (or two relaunches at once) left: retired-but-live and stray instances."""
    current = view.current
    volume_id = instance.tag_value(current, instance.VOLUME_TAG) if current else None
    for leftover in view.retiring + view.strays:
        done = box.retire(ec2, leftover, volume_id or instance.tag_value(leftover, instance.VOLUME_TAG), now)
        log.info("%s: finished retiring %s: %s", view.name, leftover["InstanceId"], ", ".join(done) or "nothing left")


def _zone_subnets(ec2: Any, config: Config, zone: str, hint: Optional[str]) -> List[Optional[str]]:
    """Subnets in the zone, in SUBNET_IDS order (or the hint, or the zone's default subnet)."""
    if config.subnet_ids:
        described = _describe_subnets(ec2, SubnetIds=list(config.subnet_ids))
        zones = {s["SubnetId"]: s.get("AvailabilityZone") for s in described}
        found: List[Optional[str]] = [s for s in config.subnet_ids if zones.get(s) == zone]
        if not found:
            raise ConfigError(f"none of SUBNET_IDS is in {zone}, the zone of the box's data volume; add one")
        return found
    if hint:
        return [hint]
    described = _describe_subnets(ec2, Filters=[{"Name": "default-for-az", "Values": ["true"]},
                                                {"Name": "availability-zone", "Values": [zone]}])
    if not described:
        raise ConfigError(f"the default VPC has no default subnet in {zone}, the zone of the box's data volume; "
                          "set SUBNET_IDS")
    return [described[0]["SubnetId"]]


def _default_subnets(ec2: Any) -> List[Optional[str]]:
    described = _describe_subnets(ec2, Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    if not described:
        raise ConfigError("the region has no default VPC with default subnets; set SUBNET_IDS")
    return [s["SubnetId"] for s in sorted(described, key=lambda s: (s.get("AvailabilityZone", ""), s["SubnetId"]))]


def _describe_subnets(ec2: Any, **kwargs: Any) -> List[Dict[str, Any]]:
    try:
        return list(ec2.describe_subnets(**kwargs)["Subnets"])
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "describe the subnets to launch into") from err


def _resize_and_start(ec2: Any, current: Dict[str, Any], new_type: str) -> str:
    old_type = str(current.get("InstanceType"))
    instance_id = current["InstanceId"]
    instance.change_type(ec2, instance_id, new_type, spot=box.market_of(current) == box.SPOT)
    try:
        return instance.start_instance(ec2, instance_id)
    except Exception:
        # The user asked for a bigger box now, not for a stopped box of another type.
        instance.change_type(ec2, instance_id, old_type)
        raise


def _attach_data_volume(ec2: Any, box_name: str, view: box.BoxView, current: Dict[str, Any], volume_id: str,
                        timeout: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """Move the data volume to the current instance: detach it from one it left, wait until free, attach."""
    if volume_id in box.attached_volume_ids(current):
        return f"data volume {volume_id} attached"
    data = volume.describe_volume(ec2, volume_id)
    if data is None:
        log.error("%s: the data volume %s recorded on %s does not exist", box_name, volume_id, current["InstanceId"])
        return f"data volume {volume_id} missing"
    zone = current.get("Placement", {}).get("AvailabilityZone")
    if data.get("AvailabilityZone") != zone:
        log.error("%s: the data volume %s is in %s, the instance in %s", box_name, volume_id,
                  data.get("AvailabilityZone"), zone)
        return f"data volume {volume_id} is in another zone"
    holders = volume.attached_to(data)
    if current["InstanceId"] in holders:
        return f"data volume {volume_id} attached"
    for holder in holders:
        if view.find(holder) is None:
            raise UpstreamError(f"the data volume {volume_id} is attached to {holder}, which is not one of the box's")
        box.detach_volume(ec2, volume_id, holder)
    if data.get("State") != "available":
        volume.wait_until_available(ec2, volume_id, timeout, sleep)
    volume.attach(ec2, volume_id, current["InstanceId"])
    log.info("%s: attached %s to %s", box_name, volume_id, current["InstanceId"])
    return f"attached {volume_id}"


def stop(ec2: Any, config: Config, box_name: str) -> Dict[str, Any]:
    """Stop the current instance; stopping a stopped (or stopping) box, or one with no instance, changes nothing."""
    view = box.describe_box(ec2, box_name)
    current = view.current
    state = instance.state_of(current) if current else "none"
    if current is not None and state in ("pending", "running"):
        state = instance.stop_instance(ec2, current["InstanceId"])
        log.info("%s: stopping %s", box_name, current["InstanceId"])
    rules = access.describe_rules(ec2, config.security_group_id)
    return _document(box_name, current, config, access.allowed_cidrs(rules), state=state)


def _event_instance(view: box.BoxView, instance_id: Optional[str]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The event's instance when it is the box's current one; else None and why the event is ignored."""
    found = view.find(instance_id)
    if found is None:
        return None, "ignored: not one of the box's instances"
    if box.is_retired(found):
        return None, "ignored: a retired instance (access and DNS belong to the box)"
    current = view.current
    if current is not None and current["InstanceId"] != instance_id:
        return None, f"ignored: the box's current instance is {current['InstanceId']}"
    return found, ""


def on_running(clients: Clients, config: Config, box_name: str, instance_id: Optional[str],
               sleep: Callable[[float], None] = time.sleep) -> str:
    """Finish a relaunch, point DNS at the instance, move the data volume to it, record the spot price."""
    ec2 = clients("ec2")
    view = box.describe_box(ec2, box_name)
    current, why = _event_instance(view, instance_id)
    if current is None:
        return why
    if instance.state_of(current) != "running":
        return f"ignored: the instance is {instance.state_of(current)} now"
    done = []
    try:
        _finish_retirements(ec2, view, _now())
    except DevboxError as err:
        # The /start that launched this instance may be retiring the old one right now; whatever
        # is left is finished by the next start or the housekeeping job. DNS and the volume come first.
        log.warning("%s: retiring the replaced instance(s) left for later: %s", box_name, err.message)
    ip = current.get("PublicIpAddress")
    if not config.dns_managed:
        done.append("DNS is not managed")
    elif not ip:
        log.warning("%s runs without a public IP; %s left unchanged", instance_id, config.domain_name)
        done.append("no public IP")
    else:
        assert config.hosted_zone_id and config.domain_name
        dns.upsert_record(clients("route53"), config.hosted_zone_id, config.domain_name, ip, config.dns_ttl)
        log.info("%s -> %s", config.domain_name, ip)
        done.append(f"upserted {config.domain_name} -> {ip}")
    volume_id = instance.tag_value(current, instance.VOLUME_TAG) or _wait_for_volume_tag(ec2, box_name, current, sleep)
    done.append(_attach_data_volume(ec2, box_name, view, current, volume_id, VOLUME_WAIT_SECONDS, sleep))
    if current.get("InstanceLifecycle") == "spot":
        done.append(_record_price(ec2, current))
    return "; ".join(done)


def _wait_for_volume_tag(ec2: Any, box_name: str, current: Dict[str, Any], sleep: Callable[[float], None]) -> str:
    # A first start tags the instance with its new volume a moment after launching it; a
    # running event that comes first finds the volume by its own tags, or waits for it.
    waited = 0.0
    while True:
        found = volume.find_data_volume(ec2, box_name)
        if found is not None:
            if found.get("AvailabilityZone") == current.get("Placement", {}).get("AvailabilityZone"):
                instance.set_tags(ec2, current["InstanceId"], {instance.VOLUME_TAG: found["VolumeId"]})
            return str(found["VolumeId"])
        if waited >= 30:
            # Raising makes Lambda retry the event later; /start also finishes this.
            raise UpstreamError(f"{current['InstanceId']} runs but the box has no data volume yet")
        sleep(2.0)
        waited += 2.0


def _record_price(ec2: Any, current: Dict[str, Any]) -> str:
    # The price only feeds the cost shown in /status: a failure must not fail the handler
    # (a retry would redo the DNS change for nothing), so it is logged and skipped.
    kind, zone = str(current.get("InstanceType")), str(current.get("Placement", {}).get("AvailabilityZone", ""))
    try:
        price = cost.current_spot_price(ec2, kind, zone, _now()) if zone else None
        if price is None:
            return "no spot price"
        instance.set_tags(ec2, current["InstanceId"], cost.price_tag(price, kind, zone))
    except DevboxError as err:
        log.warning("spot price for %s in %s not recorded: %s", kind, zone, err.message)
        return "spot price not recorded"
    return f"price {price}/h"


def on_stopped(clients: Clients, config: Config, box_name: str, instance_id: Optional[str],
               event_time: Optional[datetime]) -> str:
    """Revoke the app's access rules and remove the DNS record, unless a new session began."""
    ec2 = clients("ec2")
    view = box.describe_box(ec2, box_name)
    found, why = _event_instance(view, instance_id)
    if found is None:
        return why
    state = instance.state_of(found)
    if state not in ("stopped", "terminated"):
        # A start came in after the stop: that session's access and record stay.
        return f"ignored: the instance is {state} now"
    # Rules added after the event belong to a start that is under way right now.
    cutoff = event_time or _now()
    stale = access.added_by_app_before(access.describe_rules(ec2, config.security_group_id), cutoff)
    revoked = access.revoke_rules(ec2, config.security_group_id, stale)
    deleted = False
    if config.dns_managed:
        assert config.hosted_zone_id and config.domain_name
        deleted = dns.delete_record(clients("route53"), config.hosted_zone_id, config.domain_name)
    log.info("%s %s: revoked %d rules, record deleted: %s", instance_id, state, len(revoked), deleted)
    return f"revoked {len(revoked)} rules; record deleted: {deleted}"


def on_interruption(clients: Clients, config: Config, box_name: str, instance_id: Optional[str], kind: str,
                    detail: Dict[str, Any], event_time: Optional[datetime]) -> str:
    """Record a spot interruption warning (or rebalance recommendation) and tell the user."""
    ec2 = clients("ec2")
    found, why = _event_instance(box.describe_box(ec2, box_name), instance_id)
    if found is None:
        return why
    when = (event_time or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")
    action = detail.get("instance-action")
    value = f"{when} {kind}" + (f" {action}" if action else "")
    instance.set_tags(ec2, found["InstanceId"], {instance.INTERRUPTION_TAG: value})
    if config.notify_topic_arn:
        notify.publish(
            clients("sns"), config.notify_topic_arn, f"devbox {box_name}: {kind}",
            {"box": box_name, "instance_id": instance_id, "event": kind, "time": when, "instance_action": action,
             "what_happens": "EC2 stops the devbox in about two minutes; `devbox start` then launches a new "
             "instance with the same data volume (the same type, or the next allowed type with capacity)"
             if kind.endswith("Interruption Warning") else "EC2 may interrupt the devbox soon"},
        )
    return f"recorded {value}"


def housekeeping(clients: Clients, config: Config, box_name: str, now: Optional[datetime] = None,
                 view: Optional[box.BoxView] = None, rules: Optional[List[access.IngressRule]] = None) -> str:
    """Scheduled: stop a box that ran too long, finish cut-off relaunches, prune expired access.

    ``view`` and ``rules`` may be given already read (a fleet reads every box's at once).
    """
    now = now or _now()
    ec2 = clients("ec2")
    done: List[str] = []
    view = view if view is not None else box.describe_box(ec2, box_name)
    current = view.current
    # The stop comes first: it saves money, and must not wait on a pruning failure.
    if config.max_runtime_hours is not None and current is not None:
        launched = current.get("LaunchTime")
        if instance.state_of(current) == "running" and isinstance(launched, datetime):
            hours = (now - launched).total_seconds() / 3600
            if hours > config.max_runtime_hours:
                # EC2 records an API stop as the user's: the tag tells /status it was this job.
                instance.set_tags(ec2, current["InstanceId"],
                                  {instance.STOPPED_BY_TAG: f"max-runtime {now.strftime('%Y-%m-%dT%H:%M:%SZ')}"})
                instance.stop_instance(ec2, current["InstanceId"])
                log.warning("stopped %s after %.1f h (MAX_RUNTIME_HOURS=%s)", current["InstanceId"], hours,
                            config.max_runtime_hours)
                done.append(f"stopped after {hours:.1f} h")
                if config.notify_topic_arn:
                    notify.publish(clients("sns"), config.notify_topic_arn, f"devbox {box_name} stopped",
                                   {"box": box_name, "instance_id": current["InstanceId"], "reason": "MAX_RUNTIME_HOURS",
                                    "max_runtime_hours": config.max_runtime_hours, "ran_hours": round(hours, 2)})
    leftovers: Sequence[Dict[str, Any]] = view.retiring + view.strays
    if leftovers:
        # A retired instance left running by a cut-off relaunch costs money until it is terminated.
        _finish_retirements(ec2, view, now)
        done.append(f"retired {len(leftovers)} leftover instance(s)")
    if rules is None:
        rules = access.describe_rules(ec2, config.security_group_id)
    expired = access.expired_rules(rules, now, timedelta(hours=config.access_ttl_hours))
    revoked = access.revoke_rules(ec2, config.security_group_id, expired)
    done.append(f"pruned {len(revoked)} expired rules")
    return "; ".join(done)
