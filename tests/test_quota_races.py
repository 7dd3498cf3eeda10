"""Starts racing for a full security group: each decision on its own, each step with Stubber, the races in moto.

AWS refuses an add past the group's 60 inbound rules whole; moto applies the permissions one
by one and keeps those before the refusal. The threaded races run with AWS's behaviour put in
front of moto (one lock per call, the whole add refused); the half pair moto leaves is tested
on its own.
"""
import threading
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

from chalicelib import access, aws, service
from chalicelib.config import Config
from chalicelib.errors import UpstreamError

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
TTL = timedelta(hours=12)
GROUP = "sg-0123456789abcdef0"
CALLER = "203.0.113.7"


def stamp(at):
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def pair(n, ip, at):
    """A caller's SSH and ping rules as the app adds them; rule ids sgr-t<n> and sgr-i<n>."""
    description = f"devbox-access for={ip} at={stamp(at)}"
    return [access.IngressRule(f"sgr-t{n}", "tcp", 22, 22, f"{ip}/32", description),
            access.IngressRule(f"sgr-i{n}", "icmp", 8, -1, f"{ip}/32", description)]


def full_group(callers=30, newest=NOW - timedelta(minutes=5)):
    """A group at the quota: callers 1..n, caller n the newest, one second apart."""
    rules = []
    for n in range(1, callers + 1):
        rules += pair(n, f"198.51.100.{n}", newest - timedelta(seconds=callers - n))
    return rules


def plan(rules, ip=CALLER, quota=60, restamp=False, now=NOW):
    network = access.caller_network(ip)
    return access.plan_access(rules, network, access.session_permissions(network, 22, now), now, TTL, quota, restamp)


def cidrs(rules):
    return sorted({r.cidr for r in rules})


# The decisions.

def test_full_group_plans_to_evict_the_oldest_caller_and_lines_up_the_others_oldest_first():
    result = plan(full_group())
    assert result.room == 2 and cidrs(result.evict) == ["198.51.100.1/32"]
    assert [group[0].cidr for group in result.next_in_line] == [f"198.51.100.{n}/32" for n in range(2, 31)]
    assert len(result.add) == 2 and result.prune == []


def test_callers_stamped_in_the_same_second_are_equally_old_and_each_evictor_tries_them_in_its_own_order():
    older = pair(99, "198.51.100.99", NOW - timedelta(minutes=10))
    same_second = [r for n in range(1, 30) for r in pair(n, f"198.51.100.{n}", NOW - timedelta(minutes=5))]
    plans = [plan(older + same_second, ip) for ip in ("203.0.113.7", "203.0.113.8", "203.0.113.9")]
    orders = {tuple(group[0].cidr for group in [p.evict] + p.next_in_line) for p in plans}
    assert all(order[0] == "198.51.100.99/32" for order in orders)
    assert len({order[1:] for order in orders}) == 3
    assert all(sorted(order) == sorted(next(iter(orders))) for order in orders)


def test_half_a_pair_left_by_an_earlier_try_is_completed_not_added_again():
    mine = pair(0, CALLER, NOW)[:1]
    result = plan(full_group()[:-1] + mine)
    assert [p["IpProtocol"] for p in result.add] == ["icmp"]
    assert result.room == 1 and cidrs(result.evict) == ["198.51.100.1/32"]


def test_a_rule_already_stamped_now_is_not_stamped_again():
    result = plan(pair(0, CALLER, NOW), restamp=True)
    assert result.add == [] and result.refresh == []
    assert len(plan(pair(0, CALLER, NOW - timedelta(seconds=1)), restamp=True).refresh) == 2


def test_only_permissions_carrying_this_starts_stamp_count_as_landed():
    network = access.caller_network(CALLER)
    permissions = access.session_permissions(network, 22, NOW)
    ours, earlier = pair(0, CALLER, NOW)[:1], pair(1, CALLER, NOW - timedelta(seconds=1))[1:]
    assert access.landed_permissions(ours + earlier, permissions) == permissions[:1]


def test_group_full_of_manual_rules_still_refuses_with_clear_error():
    manual = [access.IngressRule(f"m{n}", "tcp", 22, 22, f"192.0.2.{n}/32", "office") for n in range(60)]
    with pytest.raises(access.QuotaError, match="manual"):
        plan(manual)


# Each step against Stubber: the exact calls and AWS's answers.

def described(rules):
    return {"SecurityGroupRules": [
        {"SecurityGroupRuleId": r.rule_id, "GroupId": GROUP, "IsEgress": False, "IpProtocol": r.protocol,
         "FromPort": r.from_port, "ToPort": r.to_port, "CidrIpv4": r.cidr, "Description": r.description}
        for r in rules]}


READ = {"Filters": [{"Name": "group-id", "Values": [GROUP]}], "MaxResults": 1000}


def ids(rules):
    return {"GroupId": GROUP, "SecurityGroupRuleIds": [r.rule_id for r in rules]}


def left_in(granted):
    """Other callers still let in, as the start's answer lists them."""
    return sorted(set(access.allowed_cidrs(granted.rules, NOW)) - {r.cidr for r in granted.gone} - {f"{CALLER}/32"})


def let_in(ec2, rules, attempts=access.QUOTA_ATTEMPTS):
    return access.let_caller_in(ec2, GROUP, rules, access.caller_network(CALLER), 22, NOW, TTL, 60,
                                attempts=attempts, pause=lambda _: None, clock=lambda: 0.0)


@pytest.fixture
def stubbed():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    with Stubber(ec2) as stub:
        yield ec2, stub
        stub.assert_no_pending_responses()


def test_refused_add_reads_the_group_again_and_evicts_the_next_oldest(stubbed):
    ec2, stub = stubbed
    group = full_group()
    other = pair(77, "203.0.113.77", NOW)  # another new caller added into the room this start freed
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[0:2]))
    stub.add_client_error("authorize_security_group_ingress", "RulesPerSecurityGroupLimitExceeded",
                          "The maximum number of rules per security group has been reached.")
    stub.add_response("describe_security_group_rules", described(group[2:] + other), READ)
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[2:4]))
    stub.add_response("authorize_security_group_ingress", {"Return": True}, {"GroupId": GROUP, "IpPermissions": ANY})
    granted = let_in(ec2, group)
    assert len(granted.added) == 2 and granted.attempts == 2
    assert left_in(granted) == sorted(["203.0.113.77/32"] + [f"198.51.100.{n}/32" for n in range(3, 31)])


def test_eviction_that_finds_the_caller_gone_takes_the_next_oldest_never_one_further(stubbed):
    ec2, stub = stubbed
    group = full_group()
    stub.add_client_error("revoke_security_group_ingress", "InvalidSecurityGroupRuleId.NotFound",
                          expected_params=ids(group[0:2]))
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[2:4]))
    stub.add_response("authorize_security_group_ingress", {"Return": True}, {"GroupId": GROUP, "IpPermissions": ANY})
    granted = let_in(ec2, group)
    assert left_in(granted) == sorted(f"198.51.100.{n}/32" for n in range(3, 31))


def test_among_callers_stamped_in_the_same_second_a_start_that_finds_one_gone_skips_ahead(stubbed):
    ec2, stub = stubbed
    group = [r for n in range(1, 31) for r in pair(n, f"198.51.100.{n}", NOW - timedelta(minutes=5))]
    result = plan(group)
    order = [result.evict] + result.next_in_line  # this caller's own order of the equally old
    stub.add_client_error("revoke_security_group_ingress", "InvalidSecurityGroupRuleId.NotFound",
                          expected_params=ids(order[0]))
    # One taken: the others at once likely took the next ones too; skip one ahead.
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(order[2]))
    stub.add_response("authorize_security_group_ingress", {"Return": True}, {"GroupId": GROUP, "IpPermissions": ANY})
    granted = let_in(ec2, group)
    assert sorted(r.cidr for r in granted.gone) == sorted([order[0][0].cidr] * 2 + [order[2][0].cidr] * 2)


def test_rules_are_stamped_when_they_are_added_not_when_the_start_began(stubbed):
    ec2, stub = stubbed
    group = full_group()
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[0:2]))
    seven_seconds_on = stamp(NOW + timedelta(seconds=7))
    later = [{"CidrIp": f"{CALLER}/32", "Description": f"devbox-access for={CALLER} at={seven_seconds_on}"}]
    stub.add_response("authorize_security_group_ingress", {"Return": True}, {"GroupId": GROUP, "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": later},
        {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": later},
    ]})
    ticks = iter([0.0, 0.0, 7.0])  # began, planned, added: the evictions took seven seconds
    access.let_caller_in(ec2, GROUP, group, access.caller_network(CALLER), 22, NOW, TTL, 60,
                         pause=lambda _: None, clock=lambda: next(ticks))


def test_room_a_start_did_not_need_is_given_back_to_the_caller_it_evicted(stubbed):
    ec2, stub = stubbed
    group = full_group()
    stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[0:2]))
    # A concurrent start of the same caller added the pair first.
    stub.add_client_error("authorize_security_group_ingress", "InvalidPermission.Duplicate")
    stub.add_client_error("authorize_security_group_ingress", "InvalidPermission.Duplicate")
    stub.add_client_error("authorize_security_group_ingress", "InvalidPermission.Duplicate")
    restored = [{"IpProtocol": r.protocol, "FromPort": r.from_port, "ToPort": r.to_port,
                 "IpRanges": [{"CidrIp": r.cidr, "Description": r.description}]} for r in group[0:2]]
    stub.add_response("authorize_security_group_ingress", {"Return": True},
                      {"GroupId": GROUP, "IpPermissions": restored})
    granted = let_in(ec2, group)
    assert granted.added == [] and left_in(granted) == sorted(f"198.51.100.{n}/32" for n in range(1, 31))


def test_group_that_stays_full_gives_up_with_a_503_and_adds_nothing(stubbed):
    ec2, stub = stubbed
    group = full_group()
    for n in range(2):
        stub.add_response("revoke_security_group_ingress", {"Return": True}, ids(group[2 * n:2 * n + 2]))
        stub.add_client_error("authorize_security_group_ingress", "RulesPerSecurityGroupLimitExceeded")
        stub.add_response("describe_security_group_rules", described(group[2 * n + 2:]), READ)
    with pytest.raises(UpstreamError) as caught:
        let_in(ec2, group, attempts=2)
    assert caught.value.status_code == 503 and caught.value.aws_code == "RulesPerSecurityGroupLimitExceeded"
    assert "try again" in caught.value.message


# moto: its own refusal keeps half a pair.

@pytest.fixture
def group(moto):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc_id = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    return ec2, ec2.create_security_group(GroupName="quota", Description="quota", VpcId=vpc_id)["GroupId"]


def add_pairs(ec2, group_id, count, newest=None):
    newest = newest or datetime.now(timezone.utc) - timedelta(minutes=5)
    for n in range(1, count + 1):
        description = f"devbox-access for=198.51.100.{n} at={stamp(newest - timedelta(seconds=count - n))}"
        ranges = [{"CidrIp": f"198.51.100.{n}/32", "Description": description}]
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": ranges},
            {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": ranges}])


def pairs_in(ec2, group_id):
    found = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [group_id]}])
    by_cidr = {}
    for rule in found["SecurityGroupRules"]:
        if not rule["IsEgress"]:
            by_cidr.setdefault(rule["CidrIpv4"], []).append(rule["IpProtocol"])
    return {cidr: sorted(protocols) for cidr, protocols in by_cidr.items()}


def test_moto_keeps_half_a_refused_pair_and_a_start_that_gives_up_removes_it(group):
    ec2, group_id = group
    add_pairs(ec2, group_id, 29)
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 2222, "ToPort": 2222, "IpRanges": [{"CidrIp": "192.0.2.0/24"}]}])
    rules = access.describe_rules(ec2, group_id)
    # RULE_QUOTA says 61, the group holds 60: no eviction is planned, moto keeps the SSH rule.
    with pytest.raises(UpstreamError, match="below RULE_QUOTA=61"):
        access.let_caller_in(ec2, group_id, rules, access.caller_network(CALLER), 22, datetime.now(timezone.utc),
                             TTL, 61, attempts=1, pause=lambda _: None)
    assert f"{CALLER}/32" not in pairs_in(ec2, group_id) and len(pairs_in(ec2, group_id)) == 30


def test_group_whose_quota_is_below_rule_quota_still_lets_the_caller_in_with_a_whole_pair(group):
    ec2, group_id = group
    add_pairs(ec2, group_id, 29)
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 2222, "ToPort": 2222, "IpRanges": [{"CidrIp": "192.0.2.0/24"}]}])
    rules = access.describe_rules(ec2, group_id)
    granted = access.let_caller_in(ec2, group_id, rules, access.caller_network(CALLER), 22,
                                   datetime.now(timezone.utc), TTL, 61, pause=lambda _: None)
    found = pairs_in(ec2, group_id)
    assert found[f"{CALLER}/32"] == ["icmp", "tcp"] and len(granted.added) == 2
    assert "198.51.100.1/32" not in found
    assert all(protocols == ["icmp", "tcp"] for cidr, protocols in found.items() if cidr != "192.0.2.0/24")


# Races: starts in threads against moto, each call applied whole as AWS applies it.

@pytest.fixture
def aws_like(devbox, monkeypatch, one_request_at_a_time):
    """The app's EC2 client with AWS's behaviour: one group call at a time, an add past 60 rules refused whole."""
    ec2 = aws.client("ec2")
    lock = threading.Lock()
    authorize, revoke = ec2.authorize_security_group_ingress, ec2.revoke_security_group_ingress

    def whole_authorize(**kwargs):
        with lock:
            if len(devbox.rules()) + len(kwargs["IpPermissions"]) > 60:
                raise ClientError({"Error": {"Code": "RulesPerSecurityGroupLimitExceeded",
                                             "Message": "The maximum number of rules per security group has "
                                                        "been reached."}}, "AuthorizeSecurityGroupIngress")
            return authorize(**kwargs)

    def whole_revoke(**kwargs):
        with lock:
            return revoke(**kwargs)

    monkeypatch.setattr(ec2, "authorize_security_group_ingress", whole_authorize)
    monkeypatch.setattr(ec2, "revoke_security_group_ingress", whole_revoke)
    return ec2


def start_at_once(ec2, config, ips):
    barrier = threading.Barrier(len(ips))
    errors = []

    def start(ip):
        barrier.wait()
        try:
            service.start(ec2, config, config.box_name, ip)
        except Exception as err:  # collected so the test shows it
            errors.append(f"{ip}: {err!r}")

    threads = [threading.Thread(target=start, args=(ip,)) for ip in ips]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_eight_new_callers_at_once_on_a_full_group_evict_exactly_the_eight_oldest(devbox, aws_like):
    add_pairs(devbox.ec2, devbox.group_id, 30)
    new = [f"203.0.113.{n}" for n in range(1, 9)]
    errors = start_at_once(aws_like, Config.from_env(devbox.env()), new)
    assert errors == []
    found = pairs_in(devbox.ec2, devbox.group_id)
    assert sorted(found) == sorted([f"{ip}/32" for ip in new] + [f"198.51.100.{n}/32" for n in range(9, 31)])
    assert all(protocols == ["icmp", "tcp"] for protocols in found.values())


def test_eight_new_callers_at_once_on_a_group_with_room_for_one_let_one_in_and_evict_the_seven_oldest(
        devbox, aws_like):
    add_pairs(devbox.ec2, devbox.group_id, 29)
    new = [f"203.0.113.{n}" for n in range(1, 9)]
    # All eight see room and add; AWS takes one add and refuses seven whole: those make room.
    errors = start_at_once(aws_like, Config.from_env(devbox.env()), new)
    assert errors == []
    found = pairs_in(devbox.ec2, devbox.group_id)
    assert sorted(found) == sorted([f"{ip}/32" for ip in new] + [f"198.51.100.{n}/32" for n in range(8, 30)])
    assert all(protocols == ["icmp", "tcp"] for protocols in found.values())


def test_one_new_caller_twice_at_once_on_a_full_group_evicts_only_the_oldest(devbox, aws_like):
    add_pairs(devbox.ec2, devbox.group_id, 30)
    errors = start_at_once(aws_like, Config.from_env(devbox.env()), [CALLER, CALLER, CALLER])
    assert errors == []
    found = pairs_in(devbox.ec2, devbox.group_id)
    assert sorted(found) == sorted([f"{CALLER}/32"] + [f"198.51.100.{n}/32" for n in range(2, 31)])
    assert all(protocols == ["icmp", "tcp"] for protocols in found.values())
