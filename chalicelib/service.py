"""The operations behind the routes, event handlers and scheduled job."""
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Optional

from chalicelib import access, cost, dns, instance, notify
from chalicelib.config import Config
from chalicelib.errors import DevboxError, InvalidRequestError, StateConflictError

log = logging.getLogger("devbox")
# Lazily built clients by service name, so an operation only creates what it uses.
Clients = Callable[[str], Any]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _document(box: Dict[str, Any], config: Config, allowed: Any, state: Optional[str] = None) -> Dict[str, Any]:
    doc = instance.status_document(box, config, sorted(allowed), state=state)
    doc.update(cost.cost_fields(box, doc["state"]))
    return doc


def get_status(ec2: Any, config: Config) -> Dict[str, Any]:
    """Describe the instance and the access the app has granted (2 AWS calls)."""
    box = instance.describe_instance(ec2, config.instance_id)
    rules = access.describe_rules(ec2, config.security_group_id)
    return _document(box, config, access.allowed_cidrs(rules))


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


def start(
    ec2: Any, config: Config, source_ip: Optional[str], instance_type: Any = None, now: Optional[datetime] = None
) -> Dict[str, Any]:
    """Let the caller in (pruning expired access) and start the instance if it is stopped.

    Calls: describe instance, describe rules, then only what is needed: revoke (expired or
    over-quota rules), authorize (caller not yet allowed), refresh (caller's rule ageing),
    modify (resize) and start (instance stopped).
    """
    network = access.caller_network(source_ip)
    wanted_type = validate_instance_type(config, instance_type)
    now = now or _now()
    box = instance.describe_instance(ec2, config.instance_id)
    instance.ensure_startable(box)
    state = instance.state_of(box)
    resize = wanted_type is not None and wanted_type != box.get("InstanceType")
    if resize and state != "stopped":
        raise StateConflictError(
            f"the devbox is {state} as {box.get('InstanceType')}; stop it before starting it as {wanted_type}"
        )
    rules = access.describe_rules(ec2, config.security_group_id)
    # On a cold start the caller's surviving rules are re-stamped: a stopped event being
    # handled right now revokes only rules older than itself, so this session keeps access.
    plan = access.plan_access(
        rules, network, access.session_permissions(network, config.ssh_port, now), now,
        timedelta(hours=config.access_ttl_hours), config.rule_quota, restamp_caller=state == "stopped",
    )
    access.revoke_rules(ec2, config.security_group_id, plan.revoke)
    added = access.allow_caller(ec2, config.security_group_id, plan.add)
    try:
        access.refresh_rules(ec2, config.security_group_id, plan.refresh, network, now)
        if state == "stopped":
            state = _start_stopped(ec2, config, box, wanted_type if resize else None)
            log.info("started %s for %s", config.instance_id, network)
    except Exception:
        # Nothing half-done: the rule exists only for the session that failed to start.
        access.revoke_permissions(ec2, config.security_group_id, added)
        raise
    allowed = set(access.allowed_cidrs(rules)) - {r.cidr for r in plan.revoke}
    if added:
        allowed.add(str(network))
    if resize:
        box = {**box, "InstanceType": wanted_type}
    return _document(box, config, allowed, state=state)


def _start_stopped(ec2: Any, config: Config, box: Dict[str, Any], new_type: Optional[str]) -> str:
    if new_type is None:
        return instance.start_instance(ec2, config.instance_id)
    old_type = str(box.get("InstanceType"))
    instance.change_type(ec2, config.instance_id, new_type, spot=box.get("InstanceLifecycle") == "spot")
    try:
        return instance.start_instance(ec2, config.instance_id)
    except Exception:
        # The user asked for a bigger box now, not for a stopped box of another type.
        instance.change_type(ec2, config.instance_id, old_type)
        raise


def stop(ec2: Any, config: Config) -> Dict[str, Any]:
    """Stop the instance; stopping a stopped (or stopping) instance changes nothing."""
    box = instance.describe_instance(ec2, config.instance_id)
    state = instance.state_of(box)
    if state in ("pending", "running"):
        state = instance.stop_instance(ec2, config.instance_id)
        log.info("stopping %s", config.instance_id)
    rules = access.describe_rules(ec2, config.security_group_id)
    return _document(box, config, access.allowed_cidrs(rules), state=state)


def on_running(clients: Clients, config: Config, instance_id: str) -> str:
    """Point the DNS name at the running instance and record the session's spot price."""
    if instance_id != config.instance_id:
        return "ignored: another instance"
    ec2 = clients("ec2")
    box = instance.describe_instance(ec2, instance_id)
    if instance.state_of(box) != "running":
        return f"ignored: the instance is {instance.state_of(box)} now"
    done = []
    ip = box.get("PublicIpAddress")
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
    if box.get("InstanceLifecycle") == "spot":
        done.append(_record_price(ec2, box))
    return "; ".join(done)


def _record_price(ec2: Any, box: Dict[str, Any]) -> str:
    # The price only feeds the cost shown in /status: a failure must not fail the handler
    # (a retry would redo the DNS change for nothing), so it is logged and skipped.
    kind, zone = str(box.get("InstanceType")), str(box.get("Placement", {}).get("AvailabilityZone", ""))
    try:
        price = cost.current_spot_price(ec2, kind, zone, _now()) if zone else None
        if price is None:
            return "no spot price"
        instance.set_tags(ec2, box["InstanceId"], cost.price_tag(price, kind, zone))
    except DevboxError as err:
        log.warning("spot price for %s in %s not recorded: %s", kind, zone, err.message)
        return "spot price not recorded"
    return f"price {price}/h"


def on_stopped(clients: Clients, config: Config, instance_id: str, event_time: Optional[datetime]) -> str:
    """Revoke the app's access rules and remove the DNS record, unless a new session began."""
    if instance_id != config.instance_id:
        return "ignored: another instance"
    ec2 = clients("ec2")
    box = instance.describe_instance(ec2, instance_id)
    state = instance.state_of(box)
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


def on_interruption(clients: Clients, config: Config, instance_id: str, kind: str, detail: Dict[str, Any],
                    event_time: Optional[datetime]) -> str:
    """Record a spot interruption warning (or rebalance recommendation) and tell the user."""
    if instance_id != config.instance_id:
        return "ignored: another instance"
    when = (event_time or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")
    action = detail.get("instance-action")
    value = f"{when} {kind}" + (f" {action}" if action else "")
    instance.set_tags(clients("ec2"), instance_id, {instance.INTERRUPTION_TAG: value})
    if config.notify_topic_arn:
        notify.publish(
            clients("sns"), config.notify_topic_arn, f"devbox {instance_id}: {kind}",
            {"instance_id": instance_id, "event": kind, "time": when, "instance_action": action,
             "what_happens": "EC2 stops the devbox in about two minutes and restarts it when capacity returns"
             if kind.endswith("Interruption Warning") else "EC2 may interrupt the devbox soon"},
        )
    return f"recorded {value}"


def housekeeping(clients: Clients, config: Config, now: Optional[datetime] = None) -> str:
    """Scheduled: prune expired access, and stop a box that has run longer than allowed."""
    now = now or _now()
    ec2 = clients("ec2")
    done = []
    # The stop comes first: it saves money, and must not wait on a pruning failure.
    if config.max_runtime_hours is not None:
        box = instance.describe_instance(ec2, config.instance_id)
        launched = box.get("LaunchTime")
        if instance.state_of(box) == "running" and isinstance(launched, datetime):
            hours = (now - launched).total_seconds() / 3600
            if hours > config.max_runtime_hours:
                instance.stop_instance(ec2, config.instance_id)
                log.warning("stopped %s after %.1f h (MAX_RUNTIME_HOURS=%s)", config.instance_id, hours,
                            config.max_runtime_hours)
                done.append(f"stopped after {hours:.1f} h")
                if config.notify_topic_arn:
                    notify.publish(clients("sns"), config.notify_topic_arn, f"devbox {config.instance_id} stopped",
                                   {"instance_id": config.instance_id, "reason": "MAX_RUNTIME_HOURS",
                                    "max_runtime_hours": config.max_runtime_hours, "ran_hours": round(hours, 2)})
    rules = access.describe_rules(ec2, config.security_group_id)
    expired = access.expired_rules(rules, now, timedelta(hours=config.access_ttl_hours))
    revoked = access.revoke_rules(ec2, config.security_group_id, expired)
    done.append(f"pruned {len(revoked)} expired rules")
    return "; ".join(done)
