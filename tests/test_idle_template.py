"""The template's part in the idle watcher: the instance role that may tag only its own instance
devbox:idle (least privilege), its instance profile in the launch template, the InstanceRoleArn
output, and the IdleLoadThreshold parameter the watcher reads as IDLE_LOAD_THRESHOLD."""
import ast
import json
import re
from typing import Any, Dict, List

import boto3
import pytest
import yaml
from moto import mock_aws

from devbox import userdata
from devbox.stack import TEMPLATE_PATH, render_template
from tests.test_idle_watch import watch

PARTITION, REGION, ACCOUNT = "aws", "us-east-1", "123456789012"
PSEUDO = {"AWS::Partition": PARTITION, "AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::StackName": "devbox"}


@pytest.fixture(scope="module")
def template() -> Dict[str, Any]:
    loaded: Dict[str, Any] = yaml.safe_load(TEMPLATE_PATH.read_text())
    return loaded


def resolve(value: Any) -> Any:
    """Fn::Sub, Fn::Join and Ref of pseudo parameters, as CloudFormation resolves them; the rest as it is."""
    if isinstance(value, list):
        return [resolve(item) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Sub"}:
        return re.sub(r"\$\{([^}!]+)\}", lambda m: PSEUDO[m.group(1)], value["Fn::Sub"])
    if set(value) == {"Fn::Join"}:
        separator, items = value["Fn::Join"]
        return separator.join(resolve(items))
    if set(value) == {"Ref"} and value["Ref"] in PSEUDO:
        return PSEUDO[value["Ref"]]
    return {key: resolve(item) for key, item in value.items()}


def statements(template: Dict[str, Any]) -> List[Dict[str, Any]]:
    role = template["Resources"]["InstanceRole"]["Properties"]
    return [statement for policy in role["Policies"] for statement in resolve(policy["PolicyDocument"])["Statement"]]


# --- the role: it may tag only the instance it runs on, and only devbox:idle -------------------------


def test_only_ec2_may_assume_the_instance_role(template: Dict[str, Any]) -> None:
    trust = template["Resources"]["InstanceRole"]["Properties"]["AssumeRolePolicyDocument"]
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                   "Action": "sts:AssumeRole"}]


def test_the_role_may_create_one_tag_key_on_the_calling_instance_and_nothing_else(template: Dict[str, Any]) -> None:
    (statement,) = statements(template)
    assert statement == {
        "Sid": "TagItselfDevboxIdleOnly",
        "Effect": "Allow",
        "Action": "ec2:CreateTags",
        "Resource": f"arn:{PARTITION}:ec2:{REGION}:{ACCOUNT}:instance/*",
        "Condition": {
            # The instance making the request must be the instance being tagged.
            "ArnEquals": {
                "ec2:SourceInstanceARN": f"arn:{PARTITION}:ec2:{REGION}:{ACCOUNT}:instance/${{ec2:InstanceID}}"},
            "ForAllValues:StringEquals": {"aws:TagKeys": [watch.TAG_KEY]},
        },
    }


def test_the_policy_variable_reaches_iam_unsubstituted(template: Dict[str, Any]) -> None:
    # Inside Fn::Sub, ${ec2:InstanceID} would be taken for a template parameter and fail the stack.
    condition = template["Resources"]["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][0][
        "Condition"]["ArnEquals"]["ec2:SourceInstanceARN"]
    assert "Fn::Join" in condition and "${ec2:InstanceID}" in json.dumps(condition)


def test_the_role_has_no_managed_policies_boundary_or_wildcards(template: Dict[str, Any]) -> None:
    role = template["Resources"]["InstanceRole"]["Properties"]
    assert "ManagedPolicyArns" not in role and "PermissionsBoundary" not in role
    for statement in statements(template):
        assert statement["Effect"] == "Allow"
        assert "*" not in json.dumps(statement["Action"])
        assert statement["Resource"] != "*"
        assert "NotAction" not in statement and "NotResource" not in statement


def test_the_role_is_unnamed_so_deploy_needs_only_capability_iam(template: Dict[str, Any]) -> None:
    assert "RoleName" not in template["Resources"]["InstanceRole"]["Properties"]
    assert "InstanceProfileName" not in template["Resources"]["InstanceProfile"]["Properties"]


def test_the_watcher_tags_with_the_key_the_policy_allows(template: Dict[str, Any]) -> None:
    (statement,) = statements(template)
    assert statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"] == [watch.TAG_KEY] == ["devbox:idle"]


# --- the launch template and the output --------------------------------------------------------------


def test_instances_launch_with_the_instance_profile_of_that_role(template: Dict[str, Any]) -> None:
    data = template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": ["InstanceProfile", "Arn"]}}
    assert template["Resources"]["InstanceProfile"]["Properties"]["Roles"] == [{"Ref": "InstanceRole"}]


def test_the_role_arn_is_an_output_for_the_services_pass_role(template: Dict[str, Any]) -> None:
    assert template["Outputs"]["InstanceRoleArn"]["Value"] == {"Fn::GetAtt": ["InstanceRole", "Arn"]}


def test_the_stack_makes_the_role_and_profile_and_outputs_the_arn() -> None:
    with mock_aws():
        cfn = boto3.client("cloudformation", region_name=REGION)
        cfn.create_stack(StackName="devbox", TemplateBody=render_template(userdata.cloud_config()))
        stack = cfn.describe_stacks(StackName="devbox")["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE"
        outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in stack["Outputs"]}
        iam = boto3.client("iam", region_name=REGION)
        role_name = outputs["InstanceRoleArn"].rsplit("/", 1)[1]
        (policy_name,) = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
        document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
        # moto keeps a CloudFormation role's inline policy as the text of a Python dict.
        document = ast.literal_eval(document) if isinstance(document, str) else document
        (statement,) = document["Statement"]
        assert statement["Action"] == "ec2:CreateTags"
        assert statement["Condition"]["ArnEquals"]["ec2:SourceInstanceARN"].endswith(":instance/${ec2:InstanceID}")
        profiles = iam.list_instance_profiles_for_role(RoleName=role_name)["InstanceProfiles"]
        assert len(profiles) == 1
        ec2 = boto3.client("ec2", region_name=REGION)
        data = ec2.describe_launch_template_versions(LaunchTemplateId=outputs["LaunchTemplateId"])[
            "LaunchTemplateVersions"][0]["LaunchTemplateData"]
        assert data["IamInstanceProfile"]["Arn"] == profiles[0]["Arn"]


# --- IdleLoadThreshold -----------------------------------------------------------------------------------


def allows(template: Dict[str, Any], value: str) -> bool:
    # CloudFormation matches AllowedPattern against the whole value (Java regex; this one reads the same in Python).
    return re.fullmatch(template["Parameters"]["IdleLoadThreshold"]["AllowedPattern"], value) is not None


def test_load_threshold_defaults_to_one(template: Dict[str, Any]) -> None:
    parameter = template["Parameters"]["IdleLoadThreshold"]
    assert parameter["Type"] == "String" and parameter["Default"] == "1.0"
    assert watch.load_config({"IDLE_LOAD_THRESHOLD": parameter["Default"]}) == (watch.Config(), ())


def candidates() -> List[str]:
    numbers = [str(n) for n in range(0, 1200)]
    fractions = ["", ".", ".0", ".5", ".05", ".25", ".99", ".123", ".00"]
    odd = ["", " 1", "1 ", "+1", "-1", "01", "00", "1e2", "1,5", "²", "١", "nan", "inf", ".5", "0x1", "1.0.0"]
    return [n + f for n in numbers[:130] + numbers[990:] for f in fractions] + odd


def test_every_load_threshold_the_template_allows_the_watcher_takes_as_is(template: Dict[str, Any]) -> None:
    for value in candidates():
        config, problems = watch.load_config({"IDLE_LOAD_THRESHOLD": value})
        if allows(template, value.strip()):  # the watcher trims blanks, as for every setting
            assert problems == () and config.load_threshold == float(value), value
        elif value.strip():
            assert problems and config.load_threshold == 1.0, value


@pytest.mark.parametrize("value", ["1000", "-1", "1e3", "01.5", "1.", ".5", "1.234", "", " 1.0"])
def test_template_refuses_load_thresholds_the_watcher_cannot_use(template: Dict[str, Any], value: str) -> None:
    assert not allows(template, value)
    assert "from 0 to 999.99" in template["Parameters"]["IdleLoadThreshold"]["ConstraintDescription"]


def test_the_threshold_reaches_the_watcher_through_the_user_data(template: Dict[str, Any]) -> None:
    rendered = json.loads(render_template(userdata.cloud_config()))
    data = rendered["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    sub = data["UserData"]["Fn::Base64"]["Fn::Sub"]
    # Every ${...} Fn::Sub meets in the user data is a parameter of the template.
    found = set(re.findall(r"\$\{([^}!]+)\}", sub))
    assert found == {"IdleMinutes", "IdleLoadThreshold"} and found <= set(template["Parameters"])
    env_file = next(entry for entry in yaml.safe_load(sub)["write_files"] if entry["path"] == userdata.ENV_FILE)
    assert "IDLE_LOAD_THRESHOLD=${IdleLoadThreshold}\n" in env_file["content"]
