"""The operations of a fleet (FLEET=true): each caller's own box, and the admins' view of all of them.

Each operation finds the box (by its owner, or by name for admins), scopes the deployment's
config to it (its own security group, its own record) and hands over to ``service``, which
does for one fleet box exactly what it does for a single box.
"""
import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

from chalicelib import access, box, cost, fleet, instance, service
from chalicelib.config import Config
from chalicelib.errors import DevboxError, ForbiddenError

log = logging.getLogger("devbox")
Clients = Callable[[str], Any]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _labelled(doc: Dict[str, Any], item: fleet.FleetBox) -> Dict[str, Any]:
    doc.update(box=item.slug, owner=item.owner)
    if item.removing:
        doc["removing"] = item.removing
    return doc


def status(ec2: Any, config: Config, owner: str) -> Dict[str, Any]:
    """The caller's box: its group and its instances, both found by the owner tag, read side by side (2 calls)."""
    fleet.check_allowed(config, owner)
    groups, view = service._side_by_side(
        lambda: fleet.find_groups(ec2, config, owner=owner),
        lambda: box.describe_box(ec2, fleet.fleet_filter(config), owner=fleet.literal(owner)))
    item = fleet.one_box(config, groups)
    if item is None:
        # No box yet: what the first start will create.
        doc = service._document(fleet.slug_of(owner), None, config, [])
        doc["owner"] = owner
        return doc
    group = next(g for g in groups if g["GroupId"] == item.group_id)
    mine = box.BoxView(item.tag, tuple(i for i in view.instances if fleet.instance_box(config, i) == item.slug
                                       and instance.tag_value(i, fleet.OWNER_TAG) == owner))
    return _labelled(service.status_of(ec2, item.config, item.tag, mine, fleet.rules_of(group)), item)


def start(ec2: Any, ddb: Any, config: Config, owner: str, source_ip: Optional[str], instance_type: Any = None,
          rebuild: Any = None) -> Dict[str, Any]:
    """The caller's box running with the caller let in; the first start claims the box and creates its group."""
    fleet.check_allowed(config, owner)
    # Bad input is refused before anything is claimed or created.
    access.caller_network(source_ip)
    service.validate_instance_type(config, instance_type)
    service.validate_rebuild(rebuild)
    item = fleet.one_box(config, fleet.find_groups(ec2, config, owner=owner))
    if item is None:
        item = fleet.claim_box(ec2, ddb, config, owner)
        log.info("%s: claimed box %s for %s", config.box_name, item.slug, owner)
    elif item.removing:
        # A start now would attach the data volume the removal is snapshotting and setting aside.
        raise fleet.being_removed(item.slug, item.removing)
    # The owner goes on the instances it launches (reads find the caller's box by that tag).
    owned = replace(item.config, box_owner=item.owner)
    return _labelled(service.start(ec2, owned, item.tag, source_ip, instance_type, rebuild), item)


def stop(ec2: Any, config: Config, owner: str) -> Dict[str, Any]:
    """Stop the caller's box; a caller without a box gets its "none" status (nothing to stop)."""
    fleet.check_allowed(config, owner)
    item = fleet.one_box(config, fleet.find_groups(ec2, config, owner=owner))
    if item is None:
        return status(ec2, config, owner)
    return _labelled(service.stop(ec2, item.config, item.tag), item)


def _named(ec2: Any, config: Config, caller: str, slug: str) -> fleet.FleetBox:
    """The box by name for its owner or an admin; 404 for anyone else (its existence is not confirmed)."""
    fleet.check_slug(slug)
    item = fleet.one_box(config, fleet.find_groups(ec2, config, slug=slug))
    if item is None or (item.owner != caller and not fleet.is_admin(config, caller)):
        raise fleet.not_found(slug)
    return item


def _as_seen_by(doc: Dict[str, Any], item: fleet.FleetBox, caller: str) -> Dict[str, Any]:
    """An admin sees another's box without its owner's addresses."""
    if item.owner != caller:
        doc["allowed_ips"] = []
    return doc


def box_status(ec2: Any, config: Config, caller: str, slug: str) -> Dict[str, Any]:
    item = _named(ec2, config, caller, slug)
    return _as_seen_by(_labelled(service.get_status(ec2, item.config, item.tag), item), item, caller)


def box_stop(ec2: Any, config: Config, caller: str, slug: str) -> Dict[str, Any]:
    """Stop a box by name (its owner, or an admin); an admin's stop lets nobody in."""
    item = _named(ec2, config, caller, slug)
    doc = _labelled(service.stop(ec2, item.config, item.tag), item)
    if item.owner != caller:
        log.info("%s: admin %s stopped the box of %s", item.slug, caller, item.owner)
    return _as_seen_by(doc, item, caller)


def list_boxes(ec2: Any, ddb: Any, config: Config, caller: str, now: Optional[datetime] = None) -> Dict[str, Any]:
    """Every box of the fleet (admins only): owner, state, type, uptime, estimated cost this month (3 reads at once)."""
    if not fleet.is_admin(config, caller):
        raise ForbiddenError("only the deployment's admins (ADMIN_OWNERS) may list the fleet's boxes")
    now = now or _now()
    (groups, instances), ledger = service._side_by_side(
        lambda: service._side_by_side(lambda: fleet.find_groups(ec2, config),
                                      lambda: fleet.fleet_instances(ec2, config)),
        lambda: fleet.read_ledger(ddb, config, now))
    by_slug = fleet.groups_by_slug(config, groups)
    boxes: List[Dict[str, Any]] = []
    # Every claimed name counts against MAX_BOXES, with or without a group (a first start cut off
    # before it created one), so every claim is listed.
    for slug in sorted(set(by_slug) | set(ledger.claims)):
        item = by_slug.get(slug)
        scoped = item.config if item else fleet.scoped(config, slug, config.security_group_id)
        current = box.BoxView(fleet.box_tag(config, slug), instances.get(slug, ())).current
        state = instance.state_of(current) if current else "none"
        doc = instance.status_document(fleet.box_tag(config, slug), current, scoped, [], state=state)
        session = cost.cost_fields(current or {}, state, now)
        month = ledger.costs.get(slug)
        price, launched = session["spot_price_per_hour"], (current or {}).get("LaunchTime")
        if price is not None and isinstance(launched, datetime) and session["uptime_seconds"] is not None:
            # Only the part of the running session that fell in this month.
            month = (month or 0.0) + fleet.split_by_month(launched, now, price).get(fleet.month_key(now), 0.0)
        entry = {
            "box": slug, "owner": item.owner if item else ledger.claims.get(slug, ""), "state": state,
            "instance_type": doc["instance_type"], "market": doc["market"], "launch_time": doc["launch_time"],
            "uptime_seconds": session["uptime_seconds"], "dns_name": doc["dns_name"],
            "cost_this_month_usd": round(month, 4) if month is not None else None,
        }
        removing = (item.removing if item else "") or ledger.removing.get(slug, "")
        if removing:
            entry["removing"] = removing
        boxes.append(entry)
    return {"boxes": boxes, "count": len(boxes), "max_boxes": config.max_boxes}


def _event_box(clients: Clients, config: Config, instance_id: Optional[str]) -> "tuple[Optional[fleet.FleetBox], Optional[Dict[str, Any]], str]":
    ec2 = clients("ec2")
    found = fleet.describe_instance(ec2, instance_id)
    slug = fleet.instance_box(config, found) if found else None
    if found is None or slug is None:
        return None, None, "ignored: not an instance of this fleet's boxes"
    item = fleet.one_box(config, fleet.find_groups(ec2, config, slug=slug))
    if item is None:
        return None, None, f"ignored: the box {slug} has no security group (removed?)"
    return item, found, ""


def on_running(clients: Clients, config: Config, instance_id: Optional[str]) -> str:
    item, _, why = _event_box(clients, config, instance_id)
    if item is None:
        return why
    return f"{item.slug}: " + service.on_running(clients, item.config, item.tag, instance_id)


def on_stopped(clients: Clients, config: Config, instance_id: Optional[str], event_time: Optional[datetime]) -> str:
    """As for a single box (its own rules and record only), then the session's cost is added to the box's month."""
    item, found, why = _event_box(clients, config, instance_id)
    if item is None or found is None:
        return why
    done = service.on_stopped(clients, item.config, item.tag, instance_id, event_time)
    when = event_time or _now()
    price = cost.cost_fields(found, "running", when)["spot_price_per_hour"]
    launched = found.get("LaunchTime")
    if price is not None and isinstance(launched, datetime) and not done.startswith("ignored"):
        # Each month gets the part of the session that ran in it.
        costs = fleet.split_by_month(launched, when, price)
        session = f"{instance_id}@{launched.isoformat()}"
        try:
            if fleet.add_session_cost(clients("dynamodb"), config, item.slug, session, costs):
                done += f"; session cost {round(sum(costs.values()), 4)} recorded"
        except DevboxError as err:
            # The cost only feeds /boxes: access and DNS are done, the event must not be retried for it.
            log.warning("%s: session cost not recorded: %s", item.slug, err.message)
    return f"{item.slug}: {done}"


def on_interruption(clients: Clients, config: Config, instance_id: Optional[str], kind: str,
                    detail: Dict[str, Any], event_time: Optional[datetime]) -> str:
    item, _, why = _event_box(clients, config, instance_id)
    if item is None:
        return why
    return f"{item.slug}: " + service.on_interruption(clients, item.config, item.tag, instance_id, kind, detail,
                                                      event_time)


def housekeeping(clients: Clients, config: Config, now: Optional[datetime] = None) -> str:
    """Each box in turn, as for a single box, from three reads of the whole fleet (groups, instances, rules);
    one box's failure does not hold up the others."""
    ec2 = clients("ec2")
    done: List[str] = []
    failed: List[str] = []
    groups, instances = service._side_by_side(lambda: fleet.find_groups(ec2, config),
                                              lambda: fleet.fleet_instances(ec2, config))
    by_slug = fleet.groups_by_slug(config, groups)
    rules = access.describe_groups_rules(ec2, [item.group_id for item in by_slug.values()]) if by_slug else {}
    for slug, item in sorted(by_slug.items()):
        try:
            view = box.BoxView(item.tag, instances.get(slug, ()))
            outcome = service.housekeeping(clients, item.config, item.tag, now, view=view, rules=rules[item.group_id])
            done.append(f"{slug}: {outcome}")
        except DevboxError as err:
            log.error("%s: housekeeping failed: %s", slug, err.message)
            failed.append(slug)
    if failed:
        done.append(f"failed: {', '.join(failed)}")
    return "; ".join(done) or "no boxes"
