"""Least privilege: the policy the deploy step writes grants exactly what the code calls."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import botocore.session
import pytest

from devbox.stack import LOG_ACTIONS, POLICY_ACTIONS, build_policy

ROOT = Path(__file__).resolve().parent.parent
IAM_PREFIX = {"ec2": "ec2", "route53": "route53", "sns": "sns", "ddb": "dynamodb"}
SERVICE_MODEL = {"ec2": "ec2", "route53": "route53", "sns": "sns", "ddb": "dynamodb"}
# Calls made only with FLEET=true: the single-box policy must not grant them.
FLEET_SOURCES = ("fleet.py", "fleet_service.py")
# Reads that EC2 evaluates on "*" only; everything else must name its resource.
READ_ONLY = re.compile(r"^[a-z0-9]+:(Describe|List|Get)")
# Actions IAM also checks when the code makes a call (the Service Authorization Reference's
# "dependent actions"): tags given at creation need ec2:CreateTags, and a launch template
# whose image is "resolve:ssm:<parameter>" needs ssm:GetParameters on that parameter.
# With a customer managed key for the volumes, EC2 uses the key on the caller's behalf at launch,
# volume creation, start and attach ("Requirements for Amazon EBS encryption", permissions for users).
KMS_FOR_EBS = {"kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
               "kms:ReEncryptFrom", "kms:ReEncryptTo"}
# A launch template naming an instance profile passes its role to EC2 at each launch.
DEPENDENT = {"ec2:RunInstances": {"ec2:CreateTags", "ssm:GetParameters", "iam:PassRole"} | KMS_FOR_EBS,
             "ec2:CreateVolume": {"ec2:CreateTags"} | KMS_FOR_EBS, "ec2:StartInstances": KMS_FOR_EBS,
             "ec2:AttachVolume": KMS_FOR_EBS}
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/0b0e6c5e-1c1d-4d6a-9f3e-2a6b1f9c0d11"


def code_actions(fleet=False):
    """IAM actions for every AWS call in chalicelib/ (without the fleet's unless ``fleet``), found by reading the code."""
    session = botocore.session.get_session()
    found = set()
    pattern = re.compile(r"\b(ec2|route53|sns|ddb)\.([a-z_]+)\(")
    for source in (ROOT / "chalicelib").glob("*.py"):
        if source.name in FLEET_SOURCES and not fleet:
            continue
        for service, method in pattern.findall(source.read_text()):
            model = session.get_service_model(SERVICE_MODEL[service])
            names = {botocore.xform_name(op): op for op in model.operation_names}
            assert method in names, f"{source.name}: {service}.{method} is not an AWS operation"
            found.add(f"{IAM_PREFIX[service]}:{names[method]}")
    return found | {dependent for action in found for dependent in DEPENDENT.get(action, ())}


def policy_actions(policy):
    return {action for statement in policy["Statement"] for action in statement["Action"]}


def full_policy(fleet=False):
    return build_policy(partition="aws", region="us-east-1", account_id="123456789012", box_name="devbox",
                        launch_template_id="lt-0123456789abcdef0", security_group_id="sg-0123456789abcdef0",
                        hosted_zone_id="Z1", notify_topic_arn="arn:aws:sns:us-east-1:123456789012:devbox",
                        domain_name="devbox.example.com", allowed_instance_types=["t3.large"], kms_key_id=KMS_KEY,
                        instance_role_arn="arn:aws:iam::123456789012:role/devbox-InstanceRole-ABC",
                        boxes_table="devbox-BoxesTable-ABC" if fleet else None, vpc_id="vpc-0123456789abcdef0")


def test_code_calls_are_found():
    actions = code_actions()
    assert {"ec2:StartInstances", "route53:ChangeResourceRecordSets", "sns:Publish"} <= actions


@pytest.mark.parametrize("fleet", [False, True], ids=["single box", "fleet"])
def test_policy_grants_every_action_the_code_calls(fleet):
    missing = code_actions(fleet) - policy_actions(full_policy(fleet))
    assert not missing, f"the code calls actions the policy lacks: {sorted(missing)}"


@pytest.mark.parametrize("fleet", [False, True], ids=["single box", "fleet"])
def test_policy_grants_nothing_the_code_never_calls(fleet):
    granted = policy_actions(full_policy(fleet)) - set(LOG_ACTIONS)
    unused = granted - code_actions(fleet)
    assert not unused, f"the policy grants actions the code never calls: {sorted(unused)}"


def test_the_fleet_calls_dynamodb_and_creates_groups_the_single_box_does_not():
    assert code_actions(fleet=True) - code_actions() == {
        "dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem", "ec2:CreateSecurityGroup",
        "ec2:DescribeSecurityGroups"}


def resources(statement):
    found = statement["Resource"]
    return [found] if isinstance(found, str) else list(found)


@pytest.mark.parametrize("fleet", [False, True], ids=["single box", "fleet"])
def test_no_mutating_action_on_every_resource(fleet):
    for statement in full_policy(fleet)["Statement"]:
        if statement["Resource"] == "*" or statement["Resource"] == ["*"]:
            mutating = [a for a in statement["Action"] if not READ_ONLY.match(a)]
            assert not mutating, f"{statement['Sid']} grants {mutating} on *"


@pytest.mark.parametrize("fleet", [False, True], ids=["single box", "fleet"])
def test_no_arn_is_wild_in_its_partition_service_region_or_account(fleet):
    for statement in full_policy(fleet)["Statement"]:
        for arn in resources(statement):
            if arn == "*":
                continue
            fields = arn.split(":", 5)
            assert "*" not in "".join(fields[:5]), f"{statement['Sid']}: {arn} is a wildcard ARN"


@pytest.mark.parametrize("fleet", [False, True], ids=["single box", "fleet"])
def test_every_resource_wildcard_on_a_mutating_action_is_narrowed_by_a_condition(fleet):
    for statement in full_policy(fleet)["Statement"]:
        mutating = [a for a in statement["Action"] if not READ_ONLY.match(a)]
        wild = [arn for arn in resources(statement) if arn != "*" and arn.split(":", 5)[5].split("/")[-1] == "*"]
        if mutating and wild and not statement["Sid"].startswith("WriteOwnLogs"):
            assert statement.get("Condition"), f"{statement['Sid']} grants {mutating} on {wild} without a condition"


def test_the_functions_write_only_to_their_own_log_groups():
    logs = [s for s in full_policy()["Statement"] if s["Sid"].startswith("WriteOwnLogs")]
    assert {a for s in logs for a in s["Action"]} == set(LOG_ACTIONS)
    assert all(arn.startswith("arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/devbox-dev")
               for s in logs for arn in resources(s))


def test_committed_policy_file_has_no_mutating_wildcards():
    policy = json.loads((ROOT / ".chalice" / "policy-dev.json").read_text())
    # The placeholder deployment uses the account's default EBS key: no KMS statement.
    assert policy_actions(policy) - set(LOG_ACTIONS) == code_actions() - KMS_FOR_EBS
    for statement in policy["Statement"]:
        if statement["Resource"] == "*":
            assert all(READ_ONLY.match(a) for a in statement["Action"])
        for arn in resources(statement):
            assert arn == "*" or "*" not in "".join(arn.split(":", 5)[:5]), arn


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The SAM template `chalice package` emits for the dev stage."""
    out = tmp_path_factory.mktemp("package")
    chalice = Path(sys.executable).parent / "chalice"
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([str(chalice), "package", "--stage", "dev", str(out)], cwd=str(ROOT), env=env, check=True,
                   capture_output=True)
    return json.loads((out / "sam.json").read_text())


def test_packaged_template_carries_the_policy_file(packaged):
    committed = json.loads((ROOT / ".chalice" / "policy-dev.json").read_text())
    roles = [r for r in packaged["Resources"].values() if r["Type"] == "AWS::IAM::Role"]
    assert roles, "chalice package made no role"
    for role in roles:
        documents = [p["PolicyDocument"] for p in role["Properties"]["Policies"]]
        assert committed in documents


def test_packaged_template_has_every_route_iam_authorized(packaged):
    api = next(r for r in packaged["Resources"].values() if r["Type"] == "AWS::Serverless::Api")
    paths = api["Properties"]["DefinitionBody"]["paths"]
    for path, methods in paths.items():
        for method, operation in methods.items():
            assert operation.get("security") == [{"sigv4": []}], f"{method.upper()} {path} is not IAM-authorized"


def test_packaged_lambda_bundles_no_boto3(tmp_path):
    chalice = Path(sys.executable).parent / "chalice"
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([str(chalice), "package", "--stage", "dev", str(tmp_path)], cwd=str(ROOT), env=env, check=True,
                   capture_output=True)
    import zipfile

    names = zipfile.ZipFile(tmp_path / "deployment.zip").namelist()
    assert not any(n.startswith(("boto3/", "botocore/")) for n in names)
