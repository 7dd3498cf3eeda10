"""The operations behind the routes and event handlers, built from the other modules."""
import logging
from datetime import datetime, timezone
from typing import Any, Dict, Optional

from chalicelib import access, dns, instance
from chalicelib.config import Config

log = logging.getLogger("devbox")


def get_status(ec2: Any, config: Config) -> Dict[str, Any]:
    """Describe the instance and the access the app has granted (2 AWS calls)."""
    box = instance.describe_instance(ec2, config.instance_id)
    rules = access.describe_rules(ec2, config.security_group_id)
    return instance.status_document(box, config, access.allowed_cidrs(rules))


def start(ec2: Any, config: Config, source_ip: Optional[str], now: Optional[datetime] = None) -> Dict[str, Any]:
    """Let the caller in and start the instance if it is stopped.

    Calls: describe instance, describe rules, then only what is missing:
    authorize (caller not yet allowed) and start (instance stopped).
    """
    network = access.caller_network(source_ip)
    now = now or datetime.now(timezone.utc)
    box = instance.describe_instance(ec2, config.instance_id)
    instance.ensure_startable(box)
    rules = access.describe_rules(ec2, config.security_group_id)
    wanted = access.session_permissions(network, config.ssh_port, now)
    added = access.allow_caller(ec2, config.security_group_id, access.missing_permissions(rules, wanted))
    allowed = sorted(set(access.allowed_cidrs(rules)) | ({str(network)} if added else set()))
    state = instance.state_of(box)
    if state == "stopped":
        try:
            state = instance.start_instance(ec2, config.instance_id)
        except Exception:
            # Nothing half-done: the rule exists only for the session that failed to start.
            access.revoke_permissions(ec2, config.security_group_id, added)
            raise
        log.info("started %s for %s", config.instance_id, network)
    return instance.status_document(box, config, allowed, state=state)


def stop(ec2: Any, config: Config) -> Dict[str, Any]:
    """Stop the instance; stopping a stopped (or stopping) instance changes nothing."""
    box = instance.describe_instance(ec2, config.instance_id)
    state = instance.state_of(box)
    if state in ("pending", "running"):
        state = instance.stop_instance(ec2, config.instance_id)
        log.info("stopping %s", config.instance_id)
    rules = access.describe_rules(ec2, config.security_group_id)
    return instance.status_document(box, config, access.allowed_cidrs(rules), state=state)


def on_running(ec2: Any, route53: Any, config: Config, instance_id: str) -> str:
    """Point the DNS name at the running instance. Returns what was done."""
    if instance_id != config.instance_id:
        return "ignored: another instance"
    if not config.dns_managed:
        return "ignored: DNS is not managed"
    box = instance.describe_instance(ec2, instance_id)
    if instance.state_of(box) != "running":
        return f"ignored: the instance is {instance.state_of(box)} now"
    ip = box.get("PublicIpAddress")
    if not ip:
        log.warning("%s runs without a public IP; %s left unchanged", instance_id, config.domain_name)
        return "ignored: no public IP"
    assert config.hosted_zone_id and config.domain_name
    dns.upsert_record(route53, config.hosted_zone_id, config.domain_name, ip, config.dns_ttl)
    log.info("%s -> %s", config.domain_name, ip)
    return f"upserted {config.domain_name} -> {ip}"


def on_stopped(ec2: Any, route53: Any, config: Config, instance_id: str, event_time: Optional[datetime]) -> str:
    """Revoke the app's access rules and remove the DNS record, unless a new session began."""
    if instance_id != config.instance_id:
        return "ignored: another instance"
    box = instance.describe_instance(ec2, instance_id)
    state = instance.state_of(box)
    if state not in ("stopped", "terminated"):
        # A start came in after the stop: that session's access and record stay.
        return f"ignored: the instance is {state} now"
    # Rules added after the event belong to a start that is under way right now.
    cutoff = event_time or datetime.now(timezone.utc)
    rules = access.app_rules(access.describe_rules(ec2, config.security_group_id))
    stale = [rule for rule in rules if rule.added_at is None or rule.added_at <= cutoff]
    revoked = access.revoke_rules(ec2, config.security_group_id, stale)
    deleted = False
    if config.dns_managed:
        assert config.hosted_zone_id and config.domain_name
        deleted = dns.delete_record(route53, config.hosted_zone_id, config.domain_name)
    log.info("%s %s: revoked %d rules, record deleted: %s", instance_id, state, len(revoked), deleted)
    return f"revoked {len(revoked)} rules; record deleted: {deleted}"
