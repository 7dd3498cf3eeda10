"""Network access: the security group rules that let callers in over SSH and ping.

Every rule the app adds carries a description of the form
``devbox-access for=<ip> at=<UTC time>``; that is how the app tells its own rules
(and whose they were, and since when) from rules a person added, which it never touches.
The format is matched exactly: a single-address rule whose description names that same
address and a time not in the future. Anything else (another text after the prefix, a
garbled or future stamp, a wider range) is a person's rule.

A group holds 60 inbound rules per address family (AWS's default quota). When a caller's
pair does not fit, whole callers are evicted, the oldest first by their stamps. Starts that
race for a full group each make their own room (``let_caller_in``): the revoke that finds a
caller's rules is the claim on that room, and an add AWS refuses as over the quota
(``RulesPerSecurityGroupLimitExceeded``, the whole call) is planned again.
"""
import hashlib
import ipaddress
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import deadline
from chalicelib.errors import DevboxError, InvalidRequestError, QuotaError, UpstreamError, aws_failure

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

DESCRIPTION_PREFIX = "devbox-access"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_PROTOCOL_NAMES = {"6": "tcp", "1": "icmp", "58": "icmpv6"}
_ICMP_ECHO = {"icmp": 8, "icmpv6": 128}
_APP_DESCRIPTION = re.compile(
    r"\Adevbox-access for=(?P<ip>[0-9a-fA-F.:]{2,45}) at=(?P<at>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)\Z")
# A stamp this far ahead of the app's clock was not written by the app.
_CLOCK_SKEW = timedelta(minutes=5)
_ECHO_LIMIT = 64
_GROUPS_PER_CALL = 100
# AWS's answer to an add that would take the group past its rule quota; AWS refuses the whole call.
GROUP_FULL = "RulesPerSecurityGroupLimitExceeded"
# Plans one start makes (each after a refused add or a fresh read of the group) before it gives up.
QUOTA_ATTEMPTS = 12
# Callers in a row a start finds already evicted by others before it reads the group again.
WALK_COLLISIONS = 3
# The most a start waits before reading the group again grows by this much each time.
PAUSE_SECONDS = 0.05


@dataclass(frozen=True)
class IngressRule:
    """One inbound rule of the group, as far as access decisions need it."""

    rule_id: str
    protocol: str
    from_port: int
    to_port: int
    cidr: str
    description: str

    @property
    def added_at(self) -> Optional[datetime]:
        """When the app added the rule; None unless the rule is exactly in the app's format."""
        match = _APP_DESCRIPTION.match(self.description)
        if match is None:
            return None
        try:
            named = ipaddress.ip_network(match.group("ip"))
            stamp = datetime.strptime(match.group("at"), _TIME_FORMAT).replace(tzinfo=timezone.utc)
            network = ipaddress.ip_network(self.cidr)
        except ValueError:
            return None
        if network.num_addresses != 1 or named != network:
            return None
        return stamp

    def added_by_app(self, now: Optional[datetime] = None) -> bool:
        """True only for a rule this app created: exact format, one address, a stamp not in the future."""
        stamp = self.added_at
        return stamp is not None and stamp <= (now or datetime.now(timezone.utc)) + _CLOCK_SKEW


def caller_network(source_ip: Optional[str]) -> "ipaddress.IPv4Network | ipaddress.IPv6Network":
    """The single-address network (/32 or /128) for the caller's source IP."""
    if not source_ip or not isinstance(source_ip, str):
        raise InvalidRequestError("the request carries no source IP, so there is no address to let in")
    try:
        address = ipaddress.ip_address(source_ip.strip())
    except ValueError:
        raise InvalidRequestError(
            f"the request's source IP {source_ip[:_ECHO_LIMIT]!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # A zone id (fe80::1%eth0) names an interface on some host, not a network a rule can hold.
        raise InvalidRequestError(f"the source IP {source_ip[:_ECHO_LIMIT]!r} carries a zone id and cannot be let in")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        raise InvalidRequestError(f"the source IP {address} cannot be let in")
    return ipaddress.ip_network(address)


def describe_rules(ec2: EC2Client, group_id: str) -> List[IngressRule]:
    """All inbound rules of the group."""
    return describe_groups_rules(ec2, [group_id]).get(group_id, [])


def describe_groups_rules(ec2: EC2Client, group_ids: Sequence[str]) -> Dict[str, List[IngressRule]]:
    """All inbound rules of each group, by group id (one call per 100 groups, paged)."""
    rules: Dict[str, List[IngressRule]] = {group_id: [] for group_id in group_ids}
    try:
        # EC2's API reference gives no limit on the values of one filter for this call (others have met
        # 200): 100 groups per call stays well inside it.
        for first in range(0, len(group_ids), _GROUPS_PER_CALL):
            chunk = list(group_ids[first:first + _GROUPS_PER_CALL])
            kwargs: Dict[str, Any] = {"Filters": [{"Name": "group-id", "Values": chunk}], "MaxResults": 1000}
            while True:
                page = ec2.describe_security_group_rules(**kwargs)
                for item in page.get("SecurityGroupRules", []):
                    if not item.get("IsEgress") and item.get("GroupId") in rules:
                        rules[item["GroupId"]].append(_rule(item))
                token = page.get("NextToken")
                if not token:
                    break
                kwargs["NextToken"] = token
        return rules
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "describe the security group's rules") from err


def app_rules(rules: Iterable[IngressRule], now: Optional[datetime] = None) -> List[IngressRule]:
    """The rules this app added (by the exact format; see the module docstring)."""
    now = now or datetime.now(timezone.utc)
    return [rule for rule in rules if rule.added_by_app(now)]


def allowed_cidrs(rules: Iterable[IngressRule], now: Optional[datetime] = None) -> List[str]:
    """The distinct single addresses the app has let in, sorted."""
    return sorted({rule.cidr for rule in app_rules(rules, now)})


def session_permissions(network: Any, port: int, now: datetime) -> List[Dict[str, Any]]:
    """The SSH and ping permissions for one caller, described as the app's own."""
    description = _description(network, now)
    if network.version == 4:
        ranges = {"IpRanges": [{"CidrIp": str(network), "Description": description}]}
        icmp = "icmp"
    else:
        ranges = {"Ipv6Ranges": [{"CidrIpv6": str(network), "Description": description}]}
        icmp = "icmpv6"
    return [
        {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges},
        {"IpProtocol": icmp, "FromPort": _ICMP_ECHO[icmp], "ToPort": -1, **ranges},
    ]


def missing_permissions(
    rules: Sequence[IngressRule], permissions: Sequence[Dict[str, Any]]
) -> List[Dict[str, Any]]:
    """The permissions no existing rule (the app's or a person's) already grants."""
    have = {(r.protocol, r.from_port, r.to_port, r.cidr) for r in rules}
    return [p for p in permissions if _key(p) not in have]


def allow_caller(ec2: EC2Client, group_id: str, permissions: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add the permissions in one call; returns those this call added.

    A rule that already exists is not an error: a concurrent request from the
    same address may have added it between our describe and this call.
    """
    if not permissions:
        return []
    try:
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=list(permissions))
        return list(permissions)
    except BotoCoreError as err:
        raise aws_failure(err, "let the caller in") from err
    except ClientError as err:
        if _code(err) != "InvalidPermission.Duplicate":
            raise aws_failure(err, "let the caller in") from err
    # AWS rejects the whole call when any permission exists; add the rest one by one.
    added = []
    for permission in permissions:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[permission])
            added.append(permission)
        except BotoCoreError as err:
            revoke_permissions(ec2, group_id, added)
            raise aws_failure(err, "let the caller in") from err
        except ClientError as err:
            if _code(err) != "InvalidPermission.Duplicate":
                revoke_permissions(ec2, group_id, added)
                raise aws_failure(err, "let the caller in") from err
    return added


@dataclass(frozen=True)
class AccessPlan:
    """What one start changes in the group: revoke (prune, then evict), add, refresh."""

    prune: List[IngressRule]
    evict: List[IngressRule]
    add: List[Dict[str, Any]]
    refresh: List[IngressRule]
    # How many rules the evictions must free for ``add`` to fit; and the other callers, oldest
    # first: when a caller to evict is already gone (a concurrent start took it, and its room),
    # the next in line goes instead.
    room: int = 0
    next_in_line: List[List[IngressRule]] = field(default_factory=list)

    @property
    def revoke(self) -> List[IngressRule]:
        """The rules to revoke in one call: other callers' expired rules, then those evicted."""
        return self.prune + self.evict


def plan_access(
    rules: Sequence[IngressRule],
    network: Any,
    permissions: Sequence[Dict[str, Any]],
    now: datetime,
    ttl: timedelta,
    quota: int,
    restamp_caller: bool = False,
) -> AccessPlan:
    """Decide which rules to prune, evict, add and refresh so the caller gets in.

    Prunes the app's rules older than ``ttl`` (other callers' only: the caller's own are
    refreshed instead), then, if adding the caller's rules would pass the group's rule
    quota (counted per address family, as AWS does), evicts other callers whole, the
    oldest first: a caller is as old as its newest stamp (callers stamped in the same second
    are equally old, and each caller's start orders them its own way). ``room`` is how many
    rules the evictions must free; ``next_in_line`` holds the other callers, oldest first.
    Rules a person added are never touched. Of the caller's pair only what is missing is
    added (half a pair left by an earlier try is completed). The caller's rules are
    refreshed when they age past a quarter of the TTL, or always with ``restamp_caller``;
    a rule already stamped ``now`` needs no call.
    """
    caller = str(network)
    stale = [r for r in expired_rules(rules, now, ttl) if r.cidr != caller]
    kept = [r for r in rules if r not in stale]
    add = missing_permissions(kept, permissions)
    family = network.version
    in_family = [r for r in kept if _family(r.cidr) == family]
    room = max(0, len(in_family) + len(add) - quota)
    evict: List[IngressRule] = []
    next_in_line: List[List[IngressRule]] = []
    if room > 0:
        # Evict whole callers (their SSH and ping rules together), oldest first: half a
        # pair would leave an address listed as allowed that cannot reach SSH.
        by_caller: Dict[str, List[IngressRule]] = {}
        for r in app_rules(in_family, now):
            if r.cidr != caller:
                by_caller.setdefault(r.cidr, []).append(r)
        for _, group in sorted(by_caller.items(), key=lambda item: _caller_age(item, caller)):
            if len(evict) < room:
                evict += group
            else:
                next_in_line.append(group)
        if len(evict) < room:
            raise QuotaError(
                f"the security group holds {len(in_family)} IPv{family} rules, too many of them added by hand, "
                f"to add {len(add)} more within the quota of {quota}; remove some manual rules"
            )
    # Pruning and eviction spare the caller's rules, so these are all still in place.
    mine = [r for r in app_rules(rules, now) if r.cidr == caller]
    refresh = mine if restamp_caller else [r for r in mine if _older(r, now - ttl / 4)]
    stamped_now = _description(network, now)
    refresh = [r for r in refresh if r.description != stamped_now]
    return AccessPlan(prune=stale, evict=evict, add=add, refresh=refresh, room=room, next_in_line=next_in_line)


@dataclass(frozen=True)
class Granted:
    """What letting one caller in did: the plan carried out, the view it was made from, what this start added."""

    plan: AccessPlan
    rules: List[IngressRule]
    # Rules of ``rules`` this start revoked or found revoked: ``rules`` less these is the group now.
    gone: List[IngressRule]
    added: List[Dict[str, Any]]
    attempts: int


def landed_permissions(rules: Sequence[IngressRule], permissions: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The permissions present in the group with exactly their description (this start's stamp)."""
    have = {(r.protocol, r.from_port, r.to_port, r.cidr, r.description) for r in rules}
    return [p for p in permissions if (*_key(p), _first_range(p).get("Description", "")) in have]


def let_caller_in(
    ec2: EC2Client,
    group_id: str,
    rules: Sequence[IngressRule],
    network: Any,
    port: int,
    now: datetime,
    ttl: timedelta,
    quota: int,
    restamp_caller: bool = False,
    attempts: int = QUOTA_ATTEMPTS,
    pause: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Granted:
    """Plan, then revoke, add and refresh; when other starts race for a full group, each makes its own room.

    Starts at once plan from views of a full group that are old by the time they act. The
    claim on room is the revoke: only one start's revoke finds a given caller's rules, and
    that room is its own. A start whose eviction finds the rules gone (another start took
    that caller) tries the next in line; among callers stamped in the same second (equally
    old) it skips 1, then 3 ahead, so starts at once spread over them, but it never passes a
    caller older than the one it evicts. After WALK_COLLISIONS taken in a row it reads the
    group again. From its first collision a start counts only room it freed itself: free
    slots in its view are other starts' evictions with their adds under way. A start that
    still adds into such a slot makes the other's add fail whole, as AWS refuses an add over
    the quota (``RulesPerSecurityGroupLimitExceeded``); that start reads the group and makes
    room again. Rules are stamped at the add, so a start that waited is as new as its add.
    Room freed but not used (a concurrent start of the same caller added its rules first) is
    given back: the callers evicted for it are put back as they were. At most ``attempts``
    plans; any failure removes what this start added, so a caller is never left with half
    a pair.
    """
    view = list(rules)
    gone: List[IngressRule] = []           # of the view: revoked by this start, or found revoked
    added: List[Dict[str, Any]] = []
    victims: List[List[IngressRule]] = []  # callers this start evicted
    freed = 0                              # rules this start evicted since its last refused add
    contended = False                      # met another start: count only room this start freed
    began = clock()
    try:
        for plans in range(1, attempts + 1):
            stamp = now + timedelta(seconds=clock() - began)
            permissions = session_permissions(network, port, stamp)
            gone_ids = {r.rule_id for r in gone}
            current = [r for r in view if r.rule_id not in gone_ids]
            plan = _plan_room(current, network, permissions, stamp, ttl, quota, restamp_caller,
                              freed if contended else None)
            revoke_rules(ec2, group_id, plan.prune)
            gone += plan.prune
            line = _by_caller(plan.evict) + plan.next_in_line
            newly = skip = 0
            while newly < plan.room and line and skip < 2 ** WALK_COLLISIONS - 1:
                # Skip ahead only among callers as old as the oldest left (stamped in the same second):
                # skipping one that is older would evict a newer caller before it.
                target = line.pop(min(skip, _equally_old(line) - 1))
                removed = evict_caller(ec2, group_id, target)
                gone += target
                if removed:
                    victims.append(target)
                    newly, freed, skip = newly + removed, freed + removed, 0
                else:
                    contended, skip = True, 2 * skip + 1
            if newly < plan.room:
                # WALK_COLLISIONS callers in a row were taken, or none is left in line: the view is
                # old, read the group again. A little jitter keeps the starts that collided from
                # reading in lockstep.
                pause(random.uniform(0.0, PAUSE_SECONDS * plans))
                view, gone = describe_rules(ec2, group_id), []
                continue
            # The stamp is the moment of the add: a start that waited on others is as new as its add.
            stamp = now + timedelta(seconds=clock() - began)
            adding = _stamped(plan.add, network, stamp)
            try:
                now_added = allow_caller(ec2, group_id, adding)
            except DevboxError as err:
                if err.aws_code != GROUP_FULL:
                    raise
                # Another start added into room this one freed: read the group, make room again.
                freed, contended = 0, True
                view, gone = describe_rules(ec2, group_id), []
                # AWS adds nothing from a refused call; moto applies the permissions one by one and
                # keeps those before the refusal. What landed carries this start's stamp.
                added += landed_permissions(view, adding)
                continue
            added += now_added
            refresh_rules(ec2, group_id, plan.refresh, network, stamp)
            unused = freed - len(now_added) if contended else min(freed, len(plan.add) - len(now_added))
            gone = _give_back(ec2, group_id, victims, gone, unused)
            return Granted(plan=plan, rules=current, gone=gone, added=added, attempts=plans)
        raise _stayed_full(attempts, quota)
    except Exception:
        with deadline.cleanup():
            revoke_permissions(ec2, group_id, added)
        raise


def _give_back(ec2: EC2Client, group_id: str, victims: List[List[IngressRule]], gone: List[IngressRule],
               unused: int) -> List[IngressRule]:
    """Put back, newest first, callers this start evicted for room its add did not take.

    That happens when a concurrent start of the same caller added its rules first. Returns
    ``gone`` without the callers put back.
    """
    restored: List[str] = []
    for victim in reversed(victims):
        if unused >= len(victim) and _restore(ec2, group_id, victim):
            unused -= len(victim)
            restored.append(victim[0].cidr)
    return [r for r in gone if r.cidr not in restored]


def _equally_old(line: Sequence[List[IngressRule]]) -> int:
    """How many callers at the head of the line are stamped in the same second as the first."""
    first = max(_age_key(r) for r in line[0])
    return next((n for n, group in enumerate(line) if max(_age_key(r) for r in group) != first), len(line))


def _stamped(permissions: Sequence[Dict[str, Any]], network: Any, now: datetime) -> List[Dict[str, Any]]:
    """The permissions with their description stamped ``now``."""
    description = _description(network, now)
    stamped = []
    for permission in permissions:
        ranges_key = "Ipv6Ranges" if "Ipv6Ranges" in permission else "IpRanges"
        stamped.append({**permission, ranges_key: [{**r, "Description": description} for r in permission[ranges_key]]})
    return stamped


def _restore(ec2: EC2Client, group_id: str, rules: Sequence[IngressRule]) -> bool:
    """Put an evicted caller's rules back as they were (same stamp); False when the group has no room now."""
    permissions = []
    for rule in rules:
        ranges_key, cidr_key = ("Ipv6Ranges", "CidrIpv6") if _family(rule.cidr) == 6 else ("IpRanges", "CidrIp")
        permissions.append({"IpProtocol": rule.protocol, "FromPort": rule.from_port, "ToPort": rule.to_port,
                            ranges_key: [{cidr_key: rule.cidr, "Description": rule.description}]})
    try:
        allow_caller(ec2, group_id, permissions)
    except DevboxError as err:
        if err.aws_code != GROUP_FULL:
            raise
        # A newer caller took the room: this one stays evicted, as the oldest it was.
        return False
    return True


def _plan_room(rules: Sequence[IngressRule], network: Any, permissions: Sequence[Dict[str, Any]], now: datetime,
               ttl: timedelta, quota: int, restamp_caller: bool, freed: Optional[int]) -> AccessPlan:
    """The plan; with ``freed`` (contention seen), as if the group were full but for the room this start freed."""
    if freed is not None:
        in_family = sum(1 for r in rules if _family(r.cidr) == network.version)
        try:
            return plan_access(rules, network, permissions, now, ttl, min(quota, in_family + freed), restamp_caller)
        except QuotaError:
            pass  # too few other callers left to evict: the group emptied meanwhile, so plan by the quota
    return plan_access(rules, network, permissions, now, ttl, quota, restamp_caller)


def evict_caller(ec2: EC2Client, group_id: str, rules: Sequence[IngressRule]) -> int:
    """Revoke one caller's rules in one call; returns how many this call removed (0: already gone).

    AWS revokes none of the ids when one is unknown. Rules already gone mean a concurrent start
    evicted the caller first and took the room; unlike ``revoke_rules``, no rule is then tried
    alone, as a start walking down the line of callers would pay that for each one taken.
    """
    try:
        ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=[r.rule_id for r in rules])
    except BotoCoreError as err:
        raise aws_failure(err, "evict the oldest caller's access rules") from err
    except ClientError as err:
        if not _code(err).endswith(".NotFound"):
            raise aws_failure(err, "evict the oldest caller's access rules") from err
        return 0
    return len(rules)


def _by_caller(rules: Sequence[IngressRule]) -> List[List[IngressRule]]:
    groups: Dict[str, List[IngressRule]] = {}
    for rule in rules:
        groups.setdefault(rule.cidr, []).append(rule)
    return list(groups.values())


def _stayed_full(attempts: int, quota: int) -> DevboxError:
    failure = UpstreamError(
        f"the security group stayed full through {attempts} plans to make room: other callers were let in at "
        f"the same moment (try again), or the group's quota is below RULE_QUOTA={quota}"
    )
    # Retryable: the next start plans from a fresh view of the group.
    failure.status_code = 503
    failure.aws_code = GROUP_FULL
    return failure


def added_by_app_before(rules: Sequence[IngressRule], cutoff: datetime) -> List[IngressRule]:
    """The app's rules stamped no later than the cutoff (same second counts: event times are whole seconds)."""
    return [r for r in app_rules(rules, cutoff) if r.added_at is not None and r.added_at <= cutoff]


def refresh_rules(ec2: EC2Client, group_id: str, rules: Sequence[IngressRule], network: Any, now: datetime) -> None:
    """Stamp the caller's existing rules with the current time, so pruning spares an active caller."""
    if not rules:
        return
    description = _description(network, now)
    # The IpPermissions form (not SecurityGroupRuleDescriptions) works in AWS and in moto alike.
    permissions = []
    for rule in rules:
        ranges_key, cidr_key = ("Ipv6Ranges", "CidrIpv6") if _family(rule.cidr) == 6 else ("IpRanges", "CidrIp")
        permissions.append({"IpProtocol": rule.protocol, "FromPort": rule.from_port, "ToPort": rule.to_port,
                            ranges_key: [{cidr_key: rule.cidr, "Description": description}]})
    try:
        ec2.update_security_group_rule_descriptions_ingress(GroupId=group_id, IpPermissions=permissions)
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "refresh the caller's access rule") from err


def expired_rules(rules: Sequence[IngressRule], now: datetime, ttl: timedelta) -> List[IngressRule]:
    """The app's rules older than the access TTL."""
    return [r for r in app_rules(rules, now) if _older(r, now - ttl)]


def revoke_permissions(ec2: EC2Client, group_id: str, permissions: Sequence[Dict[str, Any]]) -> None:
    """Remove permissions this request added (undo after a failed start)."""
    if not permissions:
        return
    stripped = [_without_descriptions(p) for p in permissions]
    try:
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=stripped)
    except BotoCoreError as err:
        raise aws_failure(err, "remove the access rule it had just added") from err
    except ClientError as err:
        if _code(err) != "InvalidPermission.NotFound":
            raise aws_failure(err, "remove the access rule it had just added") from err


def revoke_rules(ec2: EC2Client, group_id: str, rules: Sequence[IngressRule]) -> List[str]:
    """Revoke rules by id; rules already gone are skipped. Returns the ids revoked."""
    ids = [rule.rule_id for rule in rules]
    if not ids:
        return []
    try:
        ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=ids)
        return ids
    except BotoCoreError as err:
        raise aws_failure(err, "revoke access rules") from err
    except ClientError as err:
        if not _code(err).endswith(".NotFound"):
            raise aws_failure(err, "revoke access rules") from err
        if len(ids) == 1:
            return []
    # One id was already gone (a duplicate event revoked it): revoke the rest singly.
    revoked = []
    for rule_id in ids:
        try:
            ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=[rule_id])
            revoked.append(rule_id)
        except BotoCoreError as err:
            raise aws_failure(err, "revoke access rules") from err
        except ClientError as err:
            if not _code(err).endswith(".NotFound"):
                raise aws_failure(err, "revoke access rules") from err
    return revoked


def _description(network: Any, now: datetime) -> str:
    return f"{DESCRIPTION_PREFIX} for={network.network_address} at={now.strftime(_TIME_FORMAT)}"


def _older(rule: IngressRule, cutoff: datetime) -> bool:
    return rule.added_at is not None and rule.added_at < cutoff


def _age_key(rule: IngressRule) -> datetime:
    return rule.added_at or datetime.min.replace(tzinfo=timezone.utc)


def _caller_age(item: Tuple[str, List[IngressRule]], evictor: str) -> Tuple[datetime, str]:
    cidr, rules = item
    # Callers stamped in the same second are equally old; each evictor orders them its own way,
    # so starts at once try different ones first.
    return max(_age_key(r) for r in rules), hashlib.sha256(f"{evictor} {cidr}".encode()).hexdigest()


def _family(cidr: str) -> int:
    return 6 if ":" in cidr else 4


def _rule(item: Dict[str, Any]) -> IngressRule:
    protocol = str(item.get("IpProtocol", ""))
    return IngressRule(
        rule_id=item["SecurityGroupRuleId"],
        protocol=_PROTOCOL_NAMES.get(protocol, protocol),
        from_port=int(item.get("FromPort", -1)),
        to_port=int(item.get("ToPort", -1)),
        cidr=item.get("CidrIpv4") or item.get("CidrIpv6") or item.get("ReferencedGroupInfo", {}).get("GroupId", ""),
        description=item.get("Description", "") or "",
    )


def _key(permission: Dict[str, Any]) -> Tuple[str, int, int, str]:
    first = _first_range(permission)
    cidr = first.get("CidrIp") or first["CidrIpv6"]
    return (permission["IpProtocol"], permission["FromPort"], permission["ToPort"], cidr)


def _first_range(permission: Dict[str, Any]) -> Dict[str, Any]:
    ranges = permission.get("IpRanges") or permission["Ipv6Ranges"]
    return dict(ranges[0])


def _without_descriptions(permission: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(permission)
    for key, cidr_key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
        if key in out:
            out[key] = [{cidr_key: r[cidr_key]} for r in out[key]]
    return out


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))
