"""Network access: the security group rules that let callers in over SSH and ping.

Every rule the app adds carries a description of the form
``devbox-access for=<ip> at=<UTC time>``; that is how the app tells its own rules
(and whose they were, and since when) from rules a person added, which it never touches.
The format is matched exactly: a single-address rule whose description names that same
address and a time not in the future. Anything else (another text after the prefix, a
garbled or future stamp, a wider range) is a person's rule.
"""
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import InvalidRequestError, QuotaError, aws_failure

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
    rules: List[IngressRule] = []
    kwargs: Dict[str, Any] = {"Filters": [{"Name": "group-id", "Values": [group_id]}], "MaxResults": 1000}
    try:
        while True:
            page = ec2.describe_security_group_rules(**kwargs)
            rules.extend(_rule(item) for item in page.get("SecurityGroupRules", []) if not item.get("IsEgress"))
            token = page.get("NextToken")
            if not token:
                return rules
            kwargs["NextToken"] = token
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
    """What one start changes in the group: at most one call for each field that is not empty."""

    revoke: List[IngressRule]
    add: List[Dict[str, Any]]
    refresh: List[IngressRule]


def plan_access(
    rules: Sequence[IngressRule],
    network: Any,
    permissions: Sequence[Dict[str, Any]],
    now: datetime,
    ttl: timedelta,
    quota: int,
    restamp_caller: bool = False,
) -> AccessPlan:
    """Decide which rules to prune, add and refresh so the caller gets in.

    Prunes the app's rules older than ``ttl`` (other callers' only: the caller's own are
    refreshed instead), then, if adding the caller's rules would reach the group's rule
    quota (counted per address family, as AWS does), the oldest app rules of other
    callers. Rules a person added are never touched. The caller's rules are refreshed
    when they age past a quarter of the TTL, or always with ``restamp_caller``.
    """
    caller = str(network)
    stale = [r for r in expired_rules(rules, now, ttl) if r.cidr != caller]
    kept = [r for r in rules if r not in stale]
    add = missing_permissions(kept, permissions)
    family = network.version
    in_family = [r for r in kept if _family(r.cidr) == family]
    excess = len(in_family) + len(add) - quota
    if excess > 0:
        # Evict whole callers (their SSH and ping rules together), oldest first: half a
        # pair would leave an address listed as allowed that cannot reach SSH.
        by_caller: Dict[str, List[IngressRule]] = {}
        for r in app_rules(in_family, now):
            if r.cidr != caller:
                by_caller.setdefault(r.cidr, []).append(r)
        oldest_first = sorted(by_caller.values(), key=lambda group: min(_age_key(r) for r in group))
        for group in oldest_first:
            if excess <= 0:
                break
            stale += group
            excess -= len(group)
        if excess > 0:
            raise QuotaError(
                f"the security group holds {len(in_family)} IPv{family} rules, too many of them added by hand, "
                f"to add {len(add)} more within the quota of {quota}; remove some manual rules"
            )
    # Pruning and eviction spare the caller's rules, so these are all still in place.
    mine = [r for r in app_rules(rules, now) if r.cidr == caller]
    refresh = mine if restamp_caller else [r for r in mine if _older(r, now - ttl / 4)]
    return AccessPlan(revoke=stale, add=add, refresh=refresh)


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
    ranges = permission.get("IpRanges") or permission["Ipv6Ranges"]
    cidr = ranges[0].get("CidrIp") or ranges[0]["CidrIpv6"]
    return (permission["IpProtocol"], permission["FromPort"], permission["ToPort"], cidr)


def _without_descriptions(permission: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(permission)
    for key, cidr_key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
        if key in out:
            out[key] = [{cidr_key: r[cidr_key]} for r in out[key]]
    return out


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))
