"""Recording a stack into .chalice/: env vars from outputs and the least-privilege policy."""
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from devbox import stack
from devbox.stack import (DEFAULT_IMAGE_PARAMETER, POLICY_ACTIONS, TEMPLATE_PATH, StackError, build_policy,
                          outputs_to_env, record_stack)

REPO = Path(__file__).resolve().parent.parent
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/0b0e6c5e-1c1d-4d6a-9f3e-2a6b1f9c0d11"
BASE = dict(partition="aws", region="us-east-1", account_id="123456789012", box_name="devbox",
            launch_template_id="lt-0123456789abcdef0", security_group_id="sg-0123456789abcdef0")


@pytest.fixture
def aws() -> Iterator[None]:
    """moto (fake credentials: conftest)."""
    with mock_aws():
        yield


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    (tmp_path / ".chalice").mkdir()
    shutil.copy(REPO / ".chalice" / "config.json", tmp_path / ".chalice" / "config.json")
    return tmp_path


def create_stack(name: str, **parameters: str) -> Dict[str, Any]:
    cfn = boto3.client("cloudformation")
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE_PATH.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    described = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert described["StackStatus"] == "CREATE_COMPLETE"
    return {o["OutputKey"]: o.get("OutputValue", "") for o in described["Outputs"]}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def actions(policy: Dict[str, Any]) -> List[str]:
    return sorted(a for s in policy["Statement"] for a in s["Action"])


def test_outputs_map_to_upper_snake_env_vars() -> None:
    env = outputs_to_env({"BoxName": "devbox", "LaunchTemplateId": "lt-1", "SecurityGroupId": "sg-1",
                          "SubnetIds": "", "HostedZoneId": "", "DomainName": "box.example.com"})
    assert env == {"BOX_NAME": "devbox", "LAUNCH_TEMPLATE_ID": "lt-1", "SECURITY_GROUP_ID": "sg-1", "SUBNET_IDS": "",
                   "HOSTED_ZONE_ID": "", "DOMAIN_NAME": "box.example.com"}


def test_recording_a_stack_without_zone_fills_env_and_keeps_other_keys(aws: None, project_dir: Path) -> None:
    outputs = create_stack("devbox")
    env = record_stack(boto3.client("cloudformation"), "devbox", project_dir)

    config = read_json(project_dir / ".chalice" / "config.json")
    stage = config["stages"]["dev"]
    assert stage["environment_variables"] == {
        "BOX_NAME": "devbox",
        "LAUNCH_TEMPLATE_ID": outputs["LaunchTemplateId"],
        "SECURITY_GROUP_ID": outputs["SecurityGroupId"],
        "SUBNET_IDS": "",
        "KMS_KEY_ID": "",
        "HOSTED_ZONE_ID": "",
        "DOMAIN_NAME": "",
        "INSTANCE_ROLE_ARN": outputs["InstanceRoleArn"],
        "BOXES_TABLE": outputs["BoxesTable"],
        "DNS_TTL": "60",
        "SSH_PORT": "22",
        "DATA_VOLUME_GIB": "50",
        "ON_DEMAND_FALLBACK": "false",
    }
    assert env["LAUNCH_TEMPLATE_ID"] == outputs["LaunchTemplateId"]
    # Deploying starts nothing: the first `devbox start` launches the first instance.
    assert boto3.client("ec2").describe_instances()["Reservations"] == []
    assert config["app_name"] == "devbox"
    assert stage["api_gateway_stage"] == "api"
    assert stage["autogen_policy"] is False
    assert stage["iam_policy_file"] == "policy-dev.json"


def test_policy_without_zone_scopes_ec2_to_the_box_and_grants_no_route53(aws: None, project_dir: Path) -> None:
    outputs = create_stack("devbox")
    record_stack(boto3.client("cloudformation"), "devbox", project_dir)

    policy = read_json(project_dir / ".chalice" / "policy-dev.json")
    resources = {s["Sid"]: s["Resource"] for s in policy["Statement"]}
    conditions = {s["Sid"]: s.get("Condition") for s in policy["Statement"]}
    assert resources["ControlBoxInstances"] == "arn:aws:ec2:us-east-1:123456789012:instance/*"
    assert conditions["ControlBoxInstances"] == {"StringEquals": {"ec2:ResourceTag/devbox:box": "devbox"}}
    template_arn = f"arn:aws:ec2:us-east-1:123456789012:launch-template/{outputs['LaunchTemplateId']}"
    assert conditions["LaunchBoxInstance"]["StringEquals"] == {
        "aws:RequestTag/devbox:box": "devbox", "ec2:LaunchTemplate": template_arn}
    assert resources["ResolveImage"] == f"arn:aws:ssm:us-east-1::parameter{DEFAULT_IMAGE_PARAMETER}"
    assert resources["ManageCallerAccess"] == f"arn:aws:ec2:us-east-1:123456789012:security-group/{outputs['SecurityGroupId']}"
    assert resources["DescribeDevbox"] == "*"
    assert resources["WriteOwnLogsGroups"][0] == "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/devbox-dev"
    assert resources["WriteOwnLogsStreams"][0].endswith(":log-group:/aws/lambda/devbox-dev:log-stream:*")
    assert not [a for a in actions(policy) if a.startswith("route53:")]


def test_stack_that_creates_a_zone_is_recorded_with_it(aws: None, project_dir: Path) -> None:
    outputs = create_stack("devbox", DomainName="box.example.com", CreateHostedZone="true")
    zones = boto3.client("route53").list_hosted_zones()["HostedZones"]
    assert outputs["HostedZoneId"] and zones[0]["Id"].endswith(outputs["HostedZoneId"])

    record_stack(boto3.client("cloudformation"), "devbox", project_dir)

    env = read_json(project_dir / ".chalice" / "config.json")["stages"]["dev"]["environment_variables"]
    assert env["HOSTED_ZONE_ID"] == outputs["HostedZoneId"]
    assert env["DOMAIN_NAME"] == "box.example.com"
    policy = read_json(project_dir / ".chalice" / "policy-dev.json")
    (zone_statement,) = [s for s in policy["Statement"] if s["Sid"] == "ManageDevboxRecord"]
    assert zone_statement["Resource"] == f"arn:aws:route53:::hostedzone/{outputs['HostedZoneId']}"
    assert zone_statement["Action"] == ["route53:ChangeResourceRecordSets"]
    only = zone_statement["Condition"]["ForAllValues:StringEquals"]
    assert only["route53:ChangeResourceRecordSetsNormalizedRecordNames"] == ["box.example.com"]
    assert only["route53:ChangeResourceRecordSetsRecordTypes"] == ["A"]


def test_stack_given_an_existing_zone_is_recorded_with_that_zone(aws: None, project_dir: Path) -> None:
    zone = boto3.client("route53").create_hosted_zone(Name="example.com", CallerReference="test")["HostedZone"]
    zone_id = zone["Id"].rsplit("/", 1)[-1]
    create_stack("devbox", DomainName="box.example.com", HostedZoneId=zone_id)

    record_stack(boto3.client("cloudformation"), "devbox", project_dir)

    env = read_json(project_dir / ".chalice" / "config.json")["stages"]["dev"]["environment_variables"]
    assert env["HOSTED_ZONE_ID"] == zone_id
    assert len(boto3.client("route53").list_hosted_zones()["HostedZones"]) == 1
    policy = read_json(project_dir / ".chalice" / "policy-dev.json")
    assert f"arn:aws:route53:::hostedzone/{zone_id}" in [s["Resource"] for s in policy["Statement"]]


PLACEHOLDER_ROLE = "arn:aws:iam::123456789012:role/devbox-InstanceRole-EXAMPLE"
PLACEHOLDER_TOPIC = "arn:aws:sns:us-east-1:123456789012:devbox-alerts"


def test_resize_permission_only_with_allowed_types_and_only_to_them() -> None:
    assert "ec2:ModifyInstanceAttribute" not in actions(build_policy(**BASE))
    policy = build_policy(**BASE, allowed_instance_types=["t3.large", "m6i.xlarge"])
    (resize,) = [s for s in policy["Statement"] if "ec2:ModifyInstanceAttribute" in s["Action"]]
    assert resize["Condition"] == {"StringEquals": {"ec2:ResourceTag/devbox:box": "devbox",
                                                    "ec2:Attribute/InstanceType": ["t3.large", "m6i.xlarge"]}}


def test_tag_permission_names_only_the_apps_tags_on_the_boxs_instances() -> None:
    from chalicelib import box, cost, instance

    policy = build_policy(**BASE)
    (tags,) = [s for s in policy["Statement"] if s["Sid"] == "TagBoxInstances"]
    keys = tags["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]
    assert sorted(keys) == sorted([cost.PRICE_TAG, instance.INTERRUPTION_TAG, instance.VOLUME_TAG, box.RETIRED_TAG,
                                   instance.STOPPED_BY_TAG])
    assert tags["Condition"]["StringEquals"] == {"ec2:ResourceTag/devbox:box": "devbox"}
    (on_create,) = [s for s in policy["Statement"] if s["Sid"] == "TagOnCreate"]
    assert on_create["Condition"]["StringEquals"]["ec2:CreateAction"] == ["RunInstances", "CreateVolume"]


def test_every_mutating_ec2_statement_is_scoped_to_the_box_or_its_template() -> None:
    policy = build_policy(**BASE, allowed_instance_types=["t3.large"])
    for statement in policy["Statement"]:
        mutating = [a for a in statement["Action"] if a.startswith("ec2:") and not a.startswith("ec2:Describe")]
        if not mutating or statement["Sid"] == "ManageCallerAccess":
            continue
        condition = json.dumps(statement.get("Condition", {}))
        assert "devbox:box" in condition or "ec2:LaunchTemplate" in condition, statement["Sid"]
    assert "ec2:DeleteVolume" not in actions(policy)


def test_policy_grants_exactly_the_listed_actions() -> None:
    policy = build_policy(
        **BASE, hosted_zone_id="Z1",
        notify_topic_arn="arn:aws:sns:us-east-1:123456789012:devbox-alerts", allowed_instance_types=["t3.large"],
        kms_key_id=KMS_KEY, instance_role_arn="arn:aws:iam::123456789012:role/devbox-InstanceRole-ABC",
    )
    fleet_only = {a for key in FLEET_GROUPS for a in POLICY_ACTIONS[key]}
    assert set(actions(policy)) == {a for group in POLICY_ACTIONS.values() for a in group} - fleet_only
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    # Only describe calls (which EC2 cannot scope) get "*".
    wide = {a for s in policy["Statement"] if s["Resource"] == "*" for a in s["Action"]}
    assert wide == set(POLICY_ACTIONS["any"])


FLEET_GROUPS = ("fleet_any", "create_group", "fleet_table")


def test_a_fleet_policy_adds_only_the_groups_and_the_table_and_scopes_to_the_fleets_boxes() -> None:
    policy = build_policy(**BASE, hosted_zone_id="Z1", domain_name="devbox.example.com", boxes_table="devbox-Boxes-X",
                          vpc_id="vpc-0123456789abcdef0")
    single = build_policy(**BASE, hosted_zone_id="Z1", domain_name="devbox.example.com")
    fleet_only = {a for key in FLEET_GROUPS for a in POLICY_ACTIONS[key]}
    assert set(actions(policy)) - set(actions(single)) == fleet_only
    table = next(s for s in policy["Statement"] if s["Sid"] == "FleetClaimsAndCosts")
    assert table["Resource"] == "arn:aws:dynamodb:us-east-1:123456789012:table/devbox-Boxes-X"
    for statement in policy["Statement"]:
        condition = json.dumps(statement.get("Condition", {}))
        # Every box condition names this fleet's boxes (<name>/*), never a bare box name.
        if "devbox:box" in condition:
            assert '"devbox/*"' in condition and '"devbox"' not in condition, statement["Sid"]
    access = next(s for s in policy["Statement"] if s["Sid"] == "ManageCallerAccess")
    assert access["Resource"] == "arn:aws:ec2:us-east-1:123456789012:security-group/*"
    assert access["Condition"] == {"StringLike": {"ec2:ResourceTag/devbox:box": "devbox/*"}}
    create = next(s for s in policy["Statement"] if s["Sid"] == "CreateBoxGroups")
    assert create["Condition"] == {"StringLike": {"aws:RequestTag/devbox:box": "devbox/*"}}
    record = next(s for s in policy["Statement"] if s["Sid"] == "ManageDevboxRecord")
    assert record["Condition"]["ForAllValues:StringLike"] == {
        "route53:ChangeResourceRecordSetsNormalizedRecordNames": ["*.devbox.example.com"]}


def test_a_volume_key_is_usable_only_through_ec2_and_grants_only_for_aws_resources() -> None:
    policy = build_policy(**BASE, kms_key_id=KMS_KEY)
    kms = {s["Sid"]: s for s in policy["Statement"] if s["Action"][0].startswith("kms:")}
    assert {s["Resource"] for s in kms.values()} == {KMS_KEY}
    assert kms["LetEc2UseTheVolumeKey"]["Condition"]["Bool"] == {"kms:GrantIsForAWSResource": "true"}
    for statement in kms.values():
        assert statement["Condition"]["StringEquals"] == {"kms:ViaService": "ec2.us-east-1.amazonaws.com"}
    assert not [a for a in actions(build_policy(**BASE)) if a.startswith("kms:")]


def test_account_and_region_come_from_the_stack_arn(project_dir: Path) -> None:
    cfn = boto3.client("cloudformation", region_name="us-east-1")
    stub = Stubber(cfn)
    stub.add_response(
        "describe_stacks",
        {
            "Stacks": [
                {
                    "StackName": "devbox",
                    "StackId": "arn:aws:cloudformation:eu-west-3:210987654321:stack/devbox/0f0e0d0c",
                    "CreationTime": "2024-01-01T00:00:00Z",
                    "StackStatus": "UPDATE_COMPLETE",
                    "Outputs": [
                        {"OutputKey": "BoxName", "OutputValue": "devbox"},
                        {"OutputKey": "LaunchTemplateId", "OutputValue": "lt-0aaaaaaaaaaaaaaaa"},
                        {"OutputKey": "SecurityGroupId", "OutputValue": "sg-0bbbbbbbbbbbbbbbb"},
                        {"OutputKey": "HostedZoneId", "OutputValue": "Z0CCCCCCCCCCCC"},
                        {"OutputKey": "DomainName", "OutputValue": "box.example.com"},
                    ],
                }
            ]
        },
        {"StackName": "devbox"},
    )
    with stub:
        record_stack(cfn, "devbox", project_dir)
    resources = [s["Resource"] for s in read_json(project_dir / ".chalice" / "policy-dev.json")["Statement"]]
    assert "arn:aws:ec2:eu-west-3:210987654321:launch-template/lt-0aaaaaaaaaaaaaaaa" in json.dumps(resources)
    assert "arn:aws:ssm:eu-west-3::parameter/aws/service/canonical/" in json.dumps(resources)
    assert "arn:aws:ec2:eu-west-3:210987654321:security-group/sg-0bbbbbbbbbbbbbbbb" in resources
    assert "arn:aws:route53:::hostedzone/Z0CCCCCCCCCCCC" in resources


def test_recording_a_new_stage_points_it_at_its_own_policy(aws: None, project_dir: Path) -> None:
    create_stack("devbox-prod")
    record_stack(boto3.client("cloudformation"), "devbox-prod", project_dir, stage="prod")

    config = read_json(project_dir / ".chalice" / "config.json")
    assert config["stages"]["prod"]["iam_policy_file"] == "policy-prod.json"
    assert config["stages"]["prod"]["autogen_policy"] is False
    assert config["stages"]["dev"]["environment_variables"]["LAUNCH_TEMPLATE_ID"] == ""
    assert (project_dir / ".chalice" / "policy-prod.json").exists()
    assert not (project_dir / ".chalice" / "policy-dev.json").exists()


def test_missing_stack_is_an_error_and_writes_nothing(aws: None, project_dir: Path) -> None:
    before = (project_dir / ".chalice" / "config.json").read_text()
    with pytest.raises(StackError, match="does not exist"):
        record_stack(boto3.client("cloudformation"), "nope", project_dir)
    assert (project_dir / ".chalice" / "config.json").read_text() == before
    assert not (project_dir / ".chalice" / "policy-dev.json").exists()


def test_committed_placeholder_policy_is_what_build_policy_makes() -> None:
    committed = read_json(REPO / ".chalice" / "policy-dev.json")
    assert committed == build_policy(
        **BASE, hosted_zone_id="Z0123456789ABCDEFGHIJ", notify_topic_arn=PLACEHOLDER_TOPIC,
        domain_name="devbox.example.com", allowed_instance_types=["t3.large", "m6i.xlarge"],
        instance_role_arn=PLACEHOLDER_ROLE,
    )


def test_command_line_records_the_stack(aws: None, project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = create_stack("devbox")
    assert stack.main(["--stack-name", "devbox", "--project-dir", str(project_dir)]) == 0
    env = read_json(project_dir / ".chalice" / "config.json")["stages"]["dev"]["environment_variables"]
    assert env["LAUNCH_TEMPLATE_ID"] == outputs["LaunchTemplateId"]
    assert f"LAUNCH_TEMPLATE_ID={outputs['LaunchTemplateId']}" in capsys.readouterr().out


def test_command_line_reports_a_missing_stack_on_stderr(aws: None, project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stack.main(["--stack-name", "nope", "--project-dir", str(project_dir)]) == 1
    assert "nope does not exist" in capsys.readouterr().err


def test_recording_drops_a_leftover_instance_id(aws: None, project_dir: Path) -> None:
    config_path = project_dir / ".chalice" / "config.json"
    config = read_json(config_path)
    config["stages"]["dev"]["environment_variables"]["INSTANCE_ID"] = "i-0123456789abcdef0"
    config_path.write_text(json.dumps(config))
    create_stack("devbox")
    record_stack(boto3.client("cloudformation"), "devbox", project_dir)
    assert "INSTANCE_ID" not in read_json(config_path)["stages"]["dev"]["environment_variables"]


def test_launching_with_the_instance_profile_may_pass_only_its_role_only_to_ec2() -> None:
    role = "arn:aws:iam::123456789012:role/devbox-InstanceRole-ABC"
    (passing,) = [s for s in build_policy(**BASE, instance_role_arn=role)["Statement"] if s["Action"] == ["iam:PassRole"]]
    assert passing["Resource"] == role
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
