"""Access hygiene: expired rules pruned, the group kept under its rule quota, manual rules untouched."""
from datetime import datetime, timedelta, timezone

import pytest

from chalicelib import access
from chalicelib.errors import InvalidRequestError
from tests.conftest import add_app_rule, scheduled_event

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def rule(rule_id, cidr, at=None, protocol="tcp", port=22, manual=False):
    ip = cidr.split("/")[0]
    description = "office" if manual else f"devbox-access for={ip} at={(at or NOW).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return access.IngressRule(rule_id, protocol, port, port, cidr, description)


def plan(rules, ip="203.0.113.7", quota=60, ttl_hours=12):
    network = access.caller_network(ip)
    return access.plan_access(rules, network, access.session_permissions(network, 22, NOW), NOW,
                              timedelta(hours=ttl_hours), quota)


def test_rule_description_records_who_and_when():
    network = access.caller_network("203.0.113.7")
    permissions = access.session_permissions(network, 22, NOW)
    description = permissions[0]["IpRanges"][0]["Description"]
    assert description == "devbox-access for=203.0.113.7 at=2026-11-28T12:00:00Z"
    parsed = rule("r", "203.0.113.7/32", at=NOW)
    assert parsed.added_by_app(NOW) and parsed.added_at == NOW


def test_expired_rules_of_other_callers_are_pruned():
    old = rule("old", "198.51.100.1/32", at=NOW - timedelta(hours=13))
    fresh = rule("fresh", "198.51.100.2/32", at=NOW - timedelta(hours=1))
    result = plan([old, fresh])
    assert result.revoke == [old]
    assert len(result.add) == 2


def test_manual_rules_are_never_pruned_however_old():
    manual = rule("m", "198.51.100.0/24", manual=True)
    assert plan([manual]).revoke == []


def test_callers_own_ageing_rule_is_refreshed_not_pruned():
    mine = [rule("t", "203.0.113.7/32", at=NOW - timedelta(hours=13)),
            rule("i", "203.0.113.7/32", at=NOW - timedelta(hours=13), protocol="icmp", port=8)]
    mine[1] = access.IngressRule("i", "icmp", 8, -1, "203.0.113.7/32", mine[1].description)
    result = plan(mine)
    assert result.revoke == [] and result.add == []
    assert {r.rule_id for r in result.refresh} == {"t", "i"}


def test_recent_rule_of_caller_needs_no_call():
    mine = [rule("t", "203.0.113.7/32", at=NOW - timedelta(minutes=5)),
            access.IngressRule("i", "icmp", 8, -1, "203.0.113.7/32",
                               f"devbox-access for=203.0.113.7 at={NOW.strftime('%Y-%m-%dT%H:%M:%SZ')}")]
    result = plan(mine)
    assert result.revoke == [] and result.add == [] and result.refresh == []


def test_full_group_evicts_oldest_app_rules_first():
    rules = [rule(f"r{i}", f"198.51.100.{i}/32", at=NOW - timedelta(hours=i)) for i in range(1, 6)]
    result = plan(rules, quota=6)
    # 5 rules + 2 new = 7 > 6: the single oldest app rule goes.
    assert [r.rule_id for r in result.revoke] == ["r5"]


def test_quota_counts_address_families_separately():
    rules = [rule(f"r{i}", f"2001:db8::{i}/128", at=NOW - timedelta(hours=i)) for i in range(1, 6)]
    assert plan(rules, quota=6).revoke == []


def test_group_full_of_manual_rules_refuses_with_clear_error():
    rules = [rule(f"m{i}", f"198.51.100.{i}/32", manual=True) for i in range(6)]
    with pytest.raises(access.QuotaError, match="manual"):
        plan(rules, quota=6)


def test_start_prunes_expired_rules_in_aws(devbox, api, caller_ip):
    add_app_rule(devbox, "198.51.100.1", datetime.now(timezone.utc) - timedelta(hours=13))
    add_app_rule(devbox, "198.51.100.2", datetime.now(timezone.utc) - timedelta(hours=1))
    devbox.add_manual_rule("192.0.2.0/24")
    caller_ip("203.0.113.7")
    response = api.http.post("/start")
    assert response.status_code == 200
    assert devbox.rule_cidrs() == ["192.0.2.0/24", "198.51.100.2/32", "203.0.113.7/32", "203.0.113.7/32"]
    assert response.json_body["allowed_ips"] == ["198.51.100.2/32", "203.0.113.7/32"]


def test_start_refreshes_an_active_callers_old_rule(devbox, api, caller_ip):
    add_app_rule(devbox, "203.0.113.7", datetime.now(timezone.utc) - timedelta(hours=5))
    caller_ip("203.0.113.7")
    api.http.post("/start")
    stamps = [access.IngressRule("", "tcp", 0, 0, r["CidrIpv4"], r["Description"]).added_at for r in devbox.rules()]
    assert all(s is not None and s > datetime.now(timezone.utc) - timedelta(minutes=1) for s in stamps)


def test_full_group_never_reaches_quota(devbox, make_client, caller_ip):
    api = make_client(devbox.env(RULE_QUOTA="6"))
    for i in range(1, 6):
        caller_ip(f"198.51.100.{i}")
        assert api.http.post("/start").status_code == 200
        assert len(devbox.rules()) <= 6
    assert "198.51.100.5/32" in devbox.rule_cidrs()
    assert "198.51.100.1/32" not in devbox.rule_cidrs()


def test_scheduled_job_prunes_expired_rules(devbox, api):
    add_app_rule(devbox, "198.51.100.1", datetime.now(timezone.utc) - timedelta(hours=13))
    add_app_rule(devbox, "198.51.100.2", datetime.now(timezone.utc) - timedelta(hours=1))
    devbox.add_manual_rule("192.0.2.0/24")
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.rule_cidrs() == ["192.0.2.0/24", "198.51.100.2/32"]


def test_access_ttl_is_configurable(devbox, make_client):
    add_app_rule(devbox, "198.51.100.2", datetime.now(timezone.utc) - timedelta(hours=2))
    api = make_client(devbox.env(ACCESS_TTL_HOURS="1"))
    api.lambda_.invoke("housekeeping", scheduled_event(api))
    assert devbox.rules() == []


def test_eviction_takes_whole_callers_never_half_a_pair():
    manual = rule("m", "192.0.2.0/24", manual=True)
    pairs = []
    for i in range(1, 3):
        at = NOW - timedelta(hours=i)
        pairs += [rule(f"t{i}", f"198.51.100.{i}/32", at=at),
                  access.IngressRule(f"i{i}", "icmp", 8, -1, f"198.51.100.{i}/32",
                                     f"devbox-access for=198.51.100.{i} at={at.strftime('%Y-%m-%dT%H:%M:%SZ')}")]
    # 1 manual + 4 app + 2 new = 7 > 6: one rule too many, so one whole caller (the oldest) goes.
    result = plan([manual] + pairs, quota=6)
    assert sorted(r.rule_id for r in result.revoke) == ["i2", "t2"]


@pytest.mark.parametrize("cidr,description", [
    ("198.51.100.9/32", "devbox-access office VPN (do not remove)"),
    ("198.51.100.9/32", "devbox-access for=198.51.100.9 at=yesterday"),
    ("198.51.100.9/32", "devbox-access for=198.51.100.9 at=2026-11-28T12:00:00Z (kept)"),
    ("198.51.100.9/32", "devbox-access for=203.0.113.1 at=2026-11-28T00:00:00Z"),
    ("198.51.100.0/24", "devbox-access for=198.51.100.0 at=2026-11-28T00:00:00Z"),
    ("0.0.0.0/0", "devbox-access for=0.0.0.0 at=2099-01-01T00:00:00Z"),
    ("198.51.100.9/32", "devbox-access for=198.51.100.9 at=2099-01-01T00:00:00Z"),
])
def test_rules_not_exactly_in_the_apps_format_are_a_persons_and_never_touched(cidr, description):
    person = access.IngressRule("p", "tcp", 22, 22, cidr, description)
    assert not person.added_by_app(NOW)
    expired = access.expired_rules([person], NOW + timedelta(days=400), timedelta(hours=12))
    assert expired == [] and access.allowed_cidrs([person], NOW) == []
    assert access.added_by_app_before([person], NOW + timedelta(days=400)) == []
    assert plan([person]).revoke == []


def test_a_persons_rule_stamped_like_the_apps_is_never_evicted_for_quota():
    forged = access.IngressRule("f", "tcp", 22, 22, "0.0.0.0/0", "devbox-access for=0.0.0.0 at=2026-11-01T00:00:00Z")
    others = [rule(f"o{n}", f"198.51.100.{n}/32", at=NOW - timedelta(hours=1)) for n in range(1, 4)]
    result = plan([forged] + others, quota=4)
    assert forged not in result.revoke and result.revoke


@pytest.mark.parametrize("source", ["fe80::1%eth0", "fe80::1%x ..."])
def test_source_ip_with_a_zone_id_is_refused(source):
    with pytest.raises(InvalidRequestError, match="zone id|not an IP"):
        access.caller_network(source)


def test_a_long_bad_source_ip_is_echoed_only_in_part():
    with pytest.raises(InvalidRequestError) as caught:
        access.caller_network("x" * 5000)
    assert len(caught.value.message) < 200
