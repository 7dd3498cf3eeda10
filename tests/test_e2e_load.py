"""End to end: a burst of more concurrent callers than the group holds, against the real local server and moto server.

The app keeps its own rule quota (60 inbound rules, which moto holds a group to, as AWS does):
30 callers fit, 40 come. The check of the final rules is tested on its own first.
"""
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from benchmarks.load import check_access, run_load, start_calls
from devbox.local import LocalStack

T = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def rule(ip, protocol="tcp", at=T, description=None, cidr=None):
    return {"IpProtocol": protocol, "FromPort": 22 if protocol == "tcp" else 8, "CidrIpv4": cidr or f"{ip}/32",
            "Description": description or f"devbox-access for={ip} at={at.strftime('%Y-%m-%dT%H:%M:%SZ')}"}


def pairs(ips, at=T):
    return [rule(ip, protocol, at) for ip in ips for protocol in ("tcp", "icmp")]


IPS = [f"127.0.1.{n}" for n in range(1, 6)]


def test_check_passes_the_newest_callers_that_fit_each_with_a_whole_pair():
    seen = {ip: T - timedelta(seconds=10) for ip in IPS[:2]}
    report = check_access(pairs(IPS[2:]), IPS, fit=3, seen=seen)
    assert report["final_rules_as_expected"] and report["final_callers"] == 3


def test_check_fails_a_half_pair_a_strangers_rule_or_too_few_callers():
    half = pairs(IPS[2:])[:-1]
    assert check_access(half, IPS, fit=3, seen={})["half_or_odd_pairs"] == ["127.0.1.5"]
    stranger = pairs(IPS[2:]) + [rule("10.0.0.1", description="office")]
    assert check_access(stranger, IPS, fit=3, seen={})["unexpected_rules"]
    assert not check_access(pairs(IPS[3:]), IPS, fit=3, seen={})["final_rules_as_expected"]


def test_check_fails_a_caller_left_out_that_was_seen_newer_than_one_kept():
    report = check_access(pairs(IPS[2:]), IPS, fit=3, seen={"127.0.1.1": T + timedelta(seconds=1)})
    assert report["left_out_newer_than_kept"] == ["127.0.1.1"] and not report["final_rules_as_expected"]
    # Stamps have whole seconds: a caller left out in the same second as the oldest kept is as new.
    assert check_access(pairs(IPS[2:]), IPS, fit=3, seen={"127.0.1.1": T})["final_rules_as_expected"]


def test_start_calls_counts_the_rule_reads_of_starts_that_answered():
    lines = ['devbox - INFO - {"operation": "start", "status": 200, "calls": ["DescribeSecurityGroupRules", '
             '"DescribeInstances", "RevokeSecurityGroupIngress", "AuthorizeSecurityGroupIngress"]}',
             'devbox - INFO - {"operation": "start", "status": 200, "calls": ["DescribeInstances", '
             '"DescribeSecurityGroupRules", "DescribeSecurityGroupRules", "AuthorizeSecurityGroupIngress"]}',
             'devbox - INFO - {"operation": "status", "status": 200, "calls": ["DescribeInstances"]}',
             "not a log line"]
    found = start_calls(lines)
    assert found["rule_reads_per_start"] == {"1": 1, "2": 1}
    assert found["revokes_per_start"]["max"] == 1


@pytest.mark.e2e
def test_burst_of_more_callers_than_fit_ends_with_exactly_the_newest_that_fit():
    with tempfile.TemporaryDirectory(prefix="devbox-load-test-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None) as stack:
            report = run_load(stack, callers=40, requests=160, concurrency=16)
    assert report["errors"] == 0, report["error_samples"]
    assert report["statuses"] == {"200": 160}
    assert report["final_rules_as_expected"], {k: report[k] for k in (
        "final_rules", "final_callers", "half_or_odd_pairs", "unexpected_rules", "left_out_newer_than_kept")}
    assert (report["rule_quota"], report["final_rules"], report["final_callers"]) == (60, 60, 30)
    assert report["box"]["as_expected"], report["box"]
