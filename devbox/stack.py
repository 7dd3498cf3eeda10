"""The devbox stack as the Chalice app sees it.

After a deploy, ``record_stack`` copies the stack's outputs into the stage's
``environment_variables`` in ``.chalice/config.json`` (CamelCase output -> UPPER_SNAKE
variable, one rule: botocore's ``xform_name``) and writes ``.chalice/policy-<stage>.json``,
the Lambda's least-privilege policy for exactly that box, launch template, group and zone.
``render_template`` is where the CloudFormation template to deploy comes from.

    python -m devbox.stack --stack-name devbox [--stage dev]
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
else:
    CloudFormationClient = Any

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "infra" / "devbox.yaml"
OUTPUT_KEYS = ("BoxName", "LaunchTemplateId", "SecurityGroupId", "SubnetIds", "KmsKeyId", "HostedZoneId", "DomainName",
               "BoxesTable", "InstanceRoleArn")
REQUIRED_OUTPUTS = ("BoxName", "LaunchTemplateId", "SecurityGroupId")
DEFAULT_IMAGE_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
BOX_TAG = "devbox:box"
OWNER_TAG = "devbox:owner"

# Every AWS action the Lambda (app.py and chalicelib/) calls, grouped by the resource the
# policy lets it act on. Tests compare this with the calls the code makes; keep them in step.
POLICY_ACTIONS: Dict[str, Tuple[str, ...]] = {
    # Describe calls cannot be narrowed to one resource (EC2 evaluates them on "*").
    "any": ("ec2:DescribeInstances", "ec2:DescribeSecurityGroupRules", "ec2:DescribeSpotPriceHistory",
            "ec2:DescribeSubnets", "ec2:DescribeVolumes"),
    # RunInstances from the box's launch template only, and only with the box tag in the request.
    "launch": ("ec2:RunInstances",),
    # Tags written by RunInstances/CreateVolume themselves (tag-on-create needs CreateTags).
    "tag_on_create": ("ec2:CreateTags",),
    # Start, stop, terminate: only instances tagged with the box.
    "instance": ("ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"),
    # Only the tags the app writes, only on the box's instances.
    "instance_tags": ("ec2:CreateTags",),
    # Only the instance type, only to the allowed types; absent when resizing is off.
    "instance_type": ("ec2:ModifyInstanceAttribute",),
    # The data volume: created with the box tag, moved between the box's instances; never deleted.
    "create_volume": ("ec2:CreateVolume",),
    "move_volume": ("ec2:AttachVolume", "ec2:DetachVolume"),
    # The spot request of an instance being replaced.
    "spot_request": ("ec2:CancelSpotInstanceRequests",),
    # resolve:ssm: in the launch template is resolved with the launching role's permissions.
    "image_parameter": ("ssm:GetParameters",),
    # The launch template names the instance profile (the idle watcher tags its own instance):
    # launching with it passes the role to EC2.
    "pass_role": ("iam:PassRole",),
    "security_group": (
        "ec2:AuthorizeSecurityGroupIngress",
        "ec2:RevokeSecurityGroupIngress",
        "ec2:UpdateSecurityGroupRuleDescriptionsIngress",
    ),
    "hosted_zone_read": ("route53:ListResourceRecordSets",),
    # Only the devbox's own A record, even in a zone the user brings with other records in it.
    "hosted_zone": ("route53:ChangeResourceRecordSets",),
    "topic": ("sns:Publish",),
    # What EC2 needs from the caller to use a customer managed key for the box's volumes (the code
    # calls no KMS API: RunInstances, CreateVolume, StartInstances and AttachVolume use the key).
    "kms_grant": ("kms:CreateGrant",),
    "kms_use": ("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
                "kms:ReEncryptFrom", "kms:ReEncryptTo"),
    # FLEET=true only: each box's own group, found by tag and created by the app.
    "fleet_any": ("ec2:DescribeSecurityGroups",),
    "create_group": ("ec2:CreateSecurityGroup",),
    # FLEET=true only: the claims (one conditional UpdateItem), their read, the month's costs.
    "fleet_table": ("dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem"),
    "log_groups": ("logs:CreateLogGroup",),
    "log_streams": ("logs:CreateLogStream", "logs:PutLogEvents"),
}
LOG_ACTIONS = POLICY_ACTIONS["log_groups"] + POLICY_ACTIONS["log_streams"]


# Must match the tags chalicelib writes on an existing instance (box.VOLUME_TAG,
# box.RETIRED_TAG, cost.PRICE_TAG, instance.INTERRUPTION_TAG, instance.STOPPED_BY_TAG).
APP_TAG_KEYS = ("devbox:volume", "devbox:retired", "devbox:spot-price", "devbox:last-interruption",
                "devbox:stopped-by")


class StackError(Exception):
    """The stack cannot be recorded (missing, unfinished, or without the outputs)."""


def outputs_to_env(outputs: Mapping[str, Any]) -> Dict[str, str]:
    """Map CamelCase stack outputs to UPPER_SNAKE environment variables (LaunchTemplateId -> LAUNCH_TEMPLATE_ID)."""
    return {xform_name(key).upper(): "" if value is None else str(value) for key, value in outputs.items()}


def parse_stack_arn(stack_id: str) -> Tuple[str, str, str]:
    """The partition, region and account id of a CloudFormation stack ARN."""
    parts = stack_id.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "cloudformation" or not parts[3] or not parts[4]:
        raise StackError(f"{stack_id!r} is not a CloudFormation stack ARN")
    return parts[1], parts[3], parts[4]


def build_policy(
    *,
    partition: str,
    region: str,
    account_id: str,
    box_name: str,
    launch_template_id: str,
    security_group_id: str,
    image_parameter: str = DEFAULT_IMAGE_PARAMETER,
    hosted_zone_id: Optional[str] = None,
    notify_topic_arn: Optional[str] = None,
    domain_name: Optional[str] = None,
    allowed_instance_types: Sequence[str] = (),
    kms_key_id: Optional[str] = None,
    function_name: str = "devbox-dev",
    instance_role_arn: Optional[str] = None,
    boxes_table: Optional[str] = None,
    vpc_id: Optional[str] = None,
) -> Dict[str, Any]:
    """The Lambda's IAM policy document, scoped to one box, launch template, group and (optional) zone.

    ``function_name`` is the app's Lambda name (Chalice: ``<app>-<stage>``; its event handlers
    are ``<app>-<stage>-<handler>``): the functions may write only to their own log groups.
    With ``boxes_table`` (FLEET=true) the scope is every box of the fleet: resources tagged
    ``devbox:box`` = ``<box_name>/*`` (a single box's name has no ``/``), each box's own group,
    records ``*.<domain_name>``, and the claims table.
    """
    ec2_arn = f"arn:{partition}:ec2:{region}:{account_id}"
    template_arn = f"{ec2_arn}:launch-template/{launch_template_id}"
    fleet = boxes_table is not None
    if fleet and not vpc_id:
        raise ValueError("a fleet's policy needs the VPC its boxes' groups are created in (the stack's VpcId)")
    match, box_value = ("StringLike", f"{box_name}/*") if fleet else ("StringEquals", box_name)
    own = {match: {f"ec2:ResourceTag/{BOX_TAG}": box_value}}
    requested = {match: {f"aws:RequestTag/{BOX_TAG}": box_value}}
    statements: List[Dict[str, Any]] = [
        _allow("DescribeDevbox", POLICY_ACTIONS["any"] + (POLICY_ACTIONS["fleet_any"] if fleet else ()), "*"),
        # What RunInstances creates must carry the box tag, and come from the box's template.
        _allow("LaunchBoxInstance", POLICY_ACTIONS["launch"], [f"{ec2_arn}:instance/*", f"{ec2_arn}:volume/*"],
               _and_equals(requested, {"ec2:LaunchTemplate": template_arn})),
        # The other resources RunInstances touches, only through the box's template.
        _allow("LaunchFromBoxTemplate", POLICY_ACTIONS["launch"], [
            template_arn, f"{ec2_arn}:security-group/{security_group_id}", f"{ec2_arn}:subnet/*",
            f"{ec2_arn}:network-interface/*", f"{ec2_arn}:spot-instances-request/*", f"{ec2_arn}:key-pair/*",
            f"arn:{partition}:ec2:{region}::image/*",
        ], {"StringEquals": {"ec2:LaunchTemplate": template_arn}}),
        _allow("TagOnCreate", POLICY_ACTIONS["tag_on_create"], [
            f"{ec2_arn}:instance/*", f"{ec2_arn}:volume/*", f"{ec2_arn}:spot-instances-request/*",
        ] + ([f"{ec2_arn}:security-group/*"] if fleet else []), _and_equals(requested, {"ec2:CreateAction": [
            "RunInstances", "CreateVolume"] + (["CreateSecurityGroup"] if fleet else [])})),
        _allow("CreateDataVolume", POLICY_ACTIONS["create_volume"], f"{ec2_arn}:volume/*", requested),
        _allow("ControlBoxInstances", POLICY_ACTIONS["instance"], f"{ec2_arn}:instance/*", own),
        _allow("TagBoxInstances", POLICY_ACTIONS["instance_tags"], f"{ec2_arn}:instance/*",
               {**own, "ForAllValues:StringEquals": {"aws:TagKeys": list(APP_TAG_KEYS)}}),
        _allow("MoveDataVolume", POLICY_ACTIONS["move_volume"], [f"{ec2_arn}:instance/*", f"{ec2_arn}:volume/*"],
               own),
        _allow("CancelReplacedSpotRequest", POLICY_ACTIONS["spot_request"], f"{ec2_arn}:spot-instances-request/*",
               own),
        _allow("ResolveImage", POLICY_ACTIONS["image_parameter"],
               f"arn:{partition}:ssm:{region}::parameter{image_parameter}"
               if image_parameter.startswith("/aws/") else
               f"arn:{partition}:ssm:{region}:{account_id}:parameter{image_parameter}"),
    ]
    if fleet:
        # Each box launches into its own group, the app's creation (tagged with the box at creation).
        statements.append(_allow("LaunchIntoBoxGroups", POLICY_ACTIONS["launch"], f"{ec2_arn}:security-group/*",
                                 _and_equals(own, {"ec2:LaunchTemplate": template_arn})))
        # CreateSecurityGroup takes the new group (which must carry the box tag) and the VPC it goes in; its
        # tags need CreateTags with ec2:CreateAction=CreateSecurityGroup (EC2 User Guide, "Grant permission to
        # tag resources during creation").
        statements.append(_allow("CreateBoxGroups", POLICY_ACTIONS["create_group"], f"{ec2_arn}:security-group/*",
                                 requested))
        statements.append(_allow("CreateBoxGroupsInTheVpc", POLICY_ACTIONS["create_group"],
                                 f"{ec2_arn}:vpc/{vpc_id}"))
        statements.append(_allow("ManageCallerAccess", POLICY_ACTIONS["security_group"], f"{ec2_arn}:security-group/*",
                                 own))
        statements.append(_allow("FleetClaimsAndCosts", POLICY_ACTIONS["fleet_table"],
                                 f"arn:{partition}:dynamodb:{region}:{account_id}:table/{boxes_table}"))
    else:
        statements.append(_allow("ManageCallerAccess", POLICY_ACTIONS["security_group"],
                                 f"{ec2_arn}:security-group/{security_group_id}"))
    if allowed_instance_types:
        statements.append(_allow(
            "ResizeDevbox", POLICY_ACTIONS["instance_type"], f"{ec2_arn}:instance/*",
            _and_equals(own, {"ec2:Attribute/InstanceType": list(allowed_instance_types)})))
    if hosted_zone_id:
        # Route53 is global: zone ARNs carry neither region nor account.
        zone_arn = f"arn:{partition}:route53:::hostedzone/{hosted_zone_id.rsplit('/', 1)[-1]}"
        statements.append(_allow("ReadDevboxRecord", POLICY_ACTIONS["hosted_zone_read"], zone_arn))
        record_only: Dict[str, Any] = {
            "route53:ChangeResourceRecordSetsRecordTypes": ["A"],
            "route53:ChangeResourceRecordSetsActions": ["UPSERT", "DELETE"],
        }
        names_key = "route53:ChangeResourceRecordSetsNormalizedRecordNames"
        names: Dict[str, Any] = {}
        if domain_name and fleet:
            # One record per box: <slug>.<domain>, and nothing else in the zone (Route 53 Developer Guide,
            # "Using IAM policy conditions for fine-grained access control": NormalizedRecordNames with StringLike).
            names = {"ForAllValues:StringLike": {names_key: [f"*.{domain_name.rstrip('.').lower()}"]}}
        elif domain_name:
            record_only[names_key] = [domain_name.rstrip(".").lower()]
        statements.append(_allow("ManageDevboxRecord", POLICY_ACTIONS["hosted_zone"], zone_arn,
                                 {"ForAllValues:StringEquals": record_only, **names}))
    if notify_topic_arn:
        statements.append(_allow("NotifyUser", POLICY_ACTIONS["topic"], notify_topic_arn))
    if instance_role_arn:
        statements.append(_allow("PassInstanceRoleToEc2", POLICY_ACTIONS["pass_role"], instance_role_arn,
                                 {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}))
    if kms_key_id:
        # "Permissions for users" of EBS encryption: CreateGrant only for an AWS service (EC2),
        # and every use only through EC2 in this region.
        via_ec2 = {"StringEquals": {"kms:ViaService": f"ec2.{region}.amazonaws.com"}}
        statements.append(_allow("LetEc2UseTheVolumeKey", POLICY_ACTIONS["kms_grant"], kms_key_id,
                                 {**via_ec2, "Bool": {"kms:GrantIsForAWSResource": "true"}}))
        statements.append(_allow("EncryptVolumesWithTheKey", POLICY_ACTIONS["kms_use"], kms_key_id, via_ec2))
    # CreateLogGroup takes log-group ARNs, CreateLogStream and PutLogEvents log-stream ARNs.
    groups = f"arn:{partition}:logs:{region}:{account_id}:log-group:/aws/lambda/{function_name}"
    statements.append(_allow("WriteOwnLogsGroups", POLICY_ACTIONS["log_groups"], [groups, f"{groups}-*"]))
    statements.append(_allow("WriteOwnLogsStreams", POLICY_ACTIONS["log_streams"],
                             [f"{groups}:log-stream:*", f"{groups}-*:log-stream:*"]))
    return {"Version": "2012-10-17", "Statement": statements}


def describe_stack(cfn_client: CloudFormationClient, stack_name: str) -> Optional[Dict[str, Any]]:
    """The stack's description, or None when no such stack exists."""
    try:
        stacks = cfn_client.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as err:
        # CloudFormation has no NotFound code: a missing stack is a ValidationError.
        if err.response["Error"]["Code"] == "ValidationError" and "does not exist" in err.response["Error"].get("Message", ""):
            return None
        raise
    return dict(stacks[0]) if stacks else None


def stack_outputs(stack: Mapping[str, Any]) -> Dict[str, str]:
    """The stack's outputs as {OutputKey: OutputValue}; an output without a value reads as ""."""
    return {item["OutputKey"]: item.get("OutputValue", "") for item in stack.get("Outputs", [])}


def record_stack(
    cfn_client: CloudFormationClient,
    stack_name: str,
    project_dir: "str | os.PathLike[str]",
    stage: str = "dev",
    region: Optional[str] = None,
    ec2_client: Any = None,
) -> Dict[str, str]:
    """Write the stack's outputs into the stage's env vars and its policy file; returns the env vars.

    ``ec2_client`` (same session as ``cfn_client``) is asked for the group's VPC when the stage is a fleet.
    """
    stack = describe_stack(cfn_client, stack_name)
    if stack is None:
        raise StackError(f"the stack {stack_name} does not exist in this region; deploy it first")
    status = stack.get("StackStatus", "")
    if status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE"):
        raise StackError(f"the stack {stack_name} is {status}; its outputs are not usable")
    outputs = stack_outputs(stack)
    missing = [key for key in REQUIRED_OUTPUTS if not outputs.get(key)]
    if missing:
        raise StackError(f"the stack {stack_name} has no {', '.join(missing)} output; is it a devbox stack?")
    partition, arn_region, account_id = parse_stack_arn(stack["StackId"])
    env = outputs_to_env({key: outputs.get(key, "") for key in OUTPUT_KEYS})
    chalice_dir = Path(project_dir) / ".chalice"
    config_path = chalice_dir / "config.json"
    config: Dict[str, Any] = (
        json.loads(config_path.read_text()) if config_path.exists() else {"version": "2.0", "app_name": "devbox"}
    )
    stage_config = config.setdefault("stages", {}).setdefault(stage, {})
    # The topic and the allowed types are the user's own settings (not stack outputs); the policy follows them.
    settings = stage_config.get("environment_variables", {})
    topic = settings.get("NOTIFY_TOPIC_ARN") or None
    types = [t.strip() for t in settings.get("ALLOWED_INSTANCE_TYPES", "").split(",") if t.strip()]
    fleet = _truthy(settings.get("FLEET", ""))
    if fleet:
        # The fleet's per-box groups go in the VPC of the stack's group; the policy names that VPC.
        env["VPC_ID"] = group_vpc(ec2_client or _ec2_like(cfn_client), env["SECURITY_GROUP_ID"])
    policy = build_policy(
        partition=partition,
        region=region or arn_region,
        account_id=account_id,
        box_name=env["BOX_NAME"],
        launch_template_id=env["LAUNCH_TEMPLATE_ID"],
        security_group_id=env["SECURITY_GROUP_ID"],
        image_parameter=_stack_parameter(stack, "ImageParameter") or DEFAULT_IMAGE_PARAMETER,
        hosted_zone_id=env["HOSTED_ZONE_ID"] or None,
        notify_topic_arn=topic,
        domain_name=env.get("DOMAIN_NAME") or None,
        allowed_instance_types=types,
        kms_key_id=env.get("KMS_KEY_ID") or None,
        instance_role_arn=env.get("INSTANCE_ROLE_ARN") or None,
        boxes_table=(env.get("BOXES_TABLE") or None) if fleet else None,
        vpc_id=env.get("VPC_ID") or None,
        function_name=f"{config.get('app_name', 'devbox')}-{stage}",
    )
    # The generated policy only takes effect with these two; a stage that set them keeps its values.
    stage_config.setdefault("autogen_policy", False)
    stage_config.setdefault("iam_policy_file", f"policy-{stage}.json")
    variables = stage_config.setdefault("environment_variables", {})
    # INSTANCE_ID belonged to the one-instance model; the app refuses to run while it is set.
    variables.pop("INSTANCE_ID", None)
    variables.update(env)
    _write_json(config_path, config)
    _write_json(chalice_dir / f"policy-{stage}.json", policy)
    return env


def render_template(user_data: Optional[str] = None, template_path: Path = TEMPLATE_PATH) -> str:
    """The template text to deploy; with user data, the launch template runs it (``${IdleMinutes}`` is substituted)."""
    text = template_path.read_text()
    if user_data is None:
        return text
    import yaml  # only needed to rewrite the template; the file is plain YAML (no short tags)

    template = yaml.safe_load(text)
    data = template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    data["UserData"] = {"Fn::Base64": {"Fn::Sub": user_data}}
    return json.dumps(template, indent=1) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Record a deployed stack into .chalice/ (``python -m devbox.stack``)."""
    parser = argparse.ArgumentParser(prog="python -m devbox.stack", description=main.__doc__)
    parser.add_argument("--stack-name", required=True, help="CloudFormation stack to record")
    parser.add_argument("--stage", default="dev", help="Chalice stage to write (default: dev)")
    parser.add_argument("--project-dir", default=".", help="Chalice project folder (default: .)")
    parser.add_argument("--profile", help="AWS profile to use")
    parser.add_argument("--region", help="AWS region of the stack")
    args = parser.parse_args(argv)
    import boto3

    try:
        session = boto3.session.Session(profile_name=args.profile, region_name=args.region)
        env = record_stack(session.client("cloudformation"), args.stack_name, args.project_dir, stage=args.stage,
                           ec2_client=session.client("ec2"))
    except (StackError, ClientError, BotoCoreError, OSError, ValueError) as err:
        print(f"devbox: cannot record the stack {args.stack_name}: {err}", file=sys.stderr)
        return 1
    for name, value in env.items():
        print(f"{name}={value}")
    print(f"wrote {Path(args.project_dir) / '.chalice'}: config.json (stage {args.stage}), policy-{args.stage}.json")
    return 0


def group_vpc(ec2: Any, group_id: str) -> str:
    """The VPC of a security group."""
    groups = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    vpc = groups[0].get("VpcId") if groups else None
    if not vpc:
        raise StackError(f"the security group {group_id} is in no VPC; a fleet needs one")
    return str(vpc)


def _ec2_like(cfn_client: CloudFormationClient) -> Any:
    """An EC2 client in the CloudFormation client's region (default credentials: pass ec2_client for a profile)."""
    import boto3

    return boto3.client("ec2", region_name=cfn_client.meta.region_name)


def _and_equals(condition: Dict[str, Any], equals: Dict[str, Any]) -> Dict[str, Any]:
    """The condition with more StringEquals keys (all must hold)."""
    return {**condition, "StringEquals": {**condition.get("StringEquals", {}), **equals}}


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "yes", "1", "on")


def _stack_parameter(stack: Mapping[str, Any], key: str) -> Optional[str]:
    for parameter in stack.get("Parameters", []):
        if parameter.get("ParameterKey") == key:
            return str(parameter.get("ParameterValue") or "") or None
    return None


def _allow(sid: str, actions: Sequence[str], resource: "str | List[str]",
           condition: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    statement: Dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": resource}
    if condition:
        statement["Condition"] = condition
    return statement


def _write_json(path: Path, document: Any) -> None:
    # Write then rename, so an interrupted run never leaves a truncated config behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
