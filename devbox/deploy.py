"""`devbox deploy` and `devbox destroy`: the CloudFormation stack, then the Chalice app.

Deploy creates (or updates) the stack from ``infra/devbox.yaml``, records its outputs
into ``.chalice/`` and runs ``chalice deploy``. Destroy undoes it in the order a
persistent spot request needs: delete the app, cancel the spot request, terminate the
instance, then delete the stack. Terminating first would reopen the request, and EC2
would launch a new instance that no stack knows about.

The stack carries a stack policy that forbids replacing (or deleting) the instance on
an update: almost every instance setting lives in the launch template, whose changes
replace the instance and its disk, and the AMI parameter is re-read from SSM on every
update. To rebuild the instance on purpose, destroy and deploy again.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from devbox.userdata import cloud_config
from devbox.stack import StackError, describe_stack, record_stack, render_template, stack_outputs

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_route53 import Route53Client
else:
    CloudFormationClient = EC2Client = Route53Client = Any

Runner = Callable[[Sequence[str], str, Mapping[str, str]], int]
ClientFactory = Callable[[str], Any]

# (argparse dest, template parameter). None on the command line means "leave as is":
# the template default on create, the stack's current value on update.
TEMPLATE_OPTIONS: Tuple[Tuple[str, str], ...] = (
    ("instance_type", "InstanceType"),
    ("key_name", "KeyName"),
    ("image_parameter", "ImageId"),
    ("root_volume_size", "RootVolumeSize"),
    ("subnet_id", "SubnetId"),
    ("vpc_id", "VpcId"),
    ("domain_name", "DomainName"),
    ("hosted_zone_id", "HostedZoneId"),
    ("create_hosted_zone", "CreateHostedZone"),
    ("idle_minutes", "IdleMinutes"),
)

STACK_POLICY: Dict[str, Any] = {
    "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "Update:*", "Resource": "*"},
        {
            "Effect": "Deny",
            "Principal": "*",
            "Action": ["Update:Replace", "Update:Delete"],
            "Resource": "LogicalResourceId/Instance",
        },
    ]
}
DEFAULT_NEGATIVE_TTL = 60
DEFAULT_STAGE = "dev"
# Long enough for a spot request that waits for capacity or a zone that takes its time.
_WAIT = {"Delay": 10, "MaxAttempts": 360}
_SETTLED = ("CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE")


class DeployError(Exception):
    """A deploy or destroy step failed; the message says what to do."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options deploy and destroy share."""
    parser.add_argument("--stack-name", default="devbox", help="CloudFormation stack name (default: devbox)")
    parser.add_argument("--project-dir", default=".", help="Chalice project folder (default: .)")
    # SUPPRESS: when the top-level parser also has these, an option left out after the
    # sub-command must not overwrite the value given before it (`devbox --stage prod deploy`).
    parser.add_argument("--stage", default=argparse.SUPPRESS, help=f"Chalice stage (default: {DEFAULT_STAGE})")
    parser.add_argument("--profile", default=argparse.SUPPRESS, help="AWS profile to use")
    parser.add_argument("--region", default=argparse.SUPPRESS, help="AWS region to deploy to")


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `devbox deploy` options: the shared ones plus the template's parameters."""
    add_common_arguments(parser)
    group = parser.add_argument_group("stack parameters (unset: template default on create, current value on update)")
    group.add_argument("--instance-type", help="EC2 instance type (template default: t3.large)")
    group.add_argument("--key-name", help='EC2 key pair name for SSH ("" for none)')
    group.add_argument("--image-parameter", help="SSM parameter naming the AMI (default: Ubuntu 24.04 amd64)")
    group.add_argument("--root-volume-size", type=_positive_int, help="root volume size in GiB (default: 30)")
    group.add_argument("--subnet-id", help='subnet to launch into ("" for the default VPC); give --vpc-id with it')
    group.add_argument("--vpc-id", help="VPC of --subnet-id")
    group.add_argument("--domain-name", help='DNS name of the devbox, e.g. devbox.example.com ("" for none)')
    group.add_argument("--hosted-zone-id", help="existing Route53 zone that holds --domain-name")
    group.add_argument(
        "--create-hosted-zone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create a hosted zone named --domain-name",
    )
    group.add_argument(
        "--idle-minutes", type=_non_negative_int, help="power off after this many idle minutes, 0 for never (default: 30)"
    )
    parser.add_argument(
        "--fix-soa",
        action="store_true",
        help="also shorten negative caching in a zone you brought (done anyway for a zone the stack created)",
    )
    parser.add_argument(
        "--negative-ttl",
        type=_non_negative_int,
        default=DEFAULT_NEGATIVE_TTL,
        help=f"seconds resolvers may cache 'no such name' for the devbox's zone (default: {DEFAULT_NEGATIVE_TTL})",
    )


def add_destroy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `devbox destroy` options."""
    add_common_arguments(parser)


def template_parameters(args: argparse.Namespace) -> Dict[str, str]:
    """The template parameters given on the command line, as CloudFormation strings."""
    given: Dict[str, str] = {}
    for dest, key in TEMPLATE_OPTIONS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        given[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return given


def deploy_stack(
    cfn: CloudFormationClient, stack_name: str, template_body: str, parameters: Mapping[str, str]
) -> str:
    """Create or update the stack and wait; returns "created", "updated" or "unchanged"."""
    stack = describe_stack(cfn, stack_name)
    policy = json.dumps(STACK_POLICY)
    if stack is None:
        print(f"creating stack {stack_name} (a spot request can take a few minutes) ...")
        cfn.create_stack(
            StackName=stack_name,
            TemplateBody=template_body,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            StackPolicyBody=policy,
            Tags=[{"Key": "devbox:stack", "Value": stack_name}],
        )
        _wait(cfn, "stack_create_complete", stack_name)
        return "created"
    status = stack["StackStatus"]
    if status == "ROLLBACK_COMPLETE":
        raise DeployError(f"the stack {stack_name} failed to create earlier; run `devbox destroy` first, then deploy again")
    if status not in _SETTLED:
        raise DeployError(f"the stack {stack_name} is {status}; wait until it settles, then deploy again")
    current = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    if _same_template(cfn, stack_name, template_body) and all(current.get(k) == v for k, v in parameters.items()):
        # Calling update anyway would make CloudFormation re-read the AMI parameter, and a
        # newer AMI means replacing the instance.
        return "unchanged"
    keys = list(current) + [k for k in parameters if k not in current]
    update_parameters: List[Dict[str, Any]] = [
        {"ParameterKey": k, "ParameterValue": parameters[k]} if k in parameters else {"ParameterKey": k, "UsePreviousValue": True}
        for k in keys
    ]
    print(f"updating stack {stack_name} ...")
    try:
        cfn.update_stack(
            StackName=stack_name, TemplateBody=template_body, Parameters=update_parameters, StackPolicyBody=policy
        )
    except ClientError as err:
        if err.response["Error"]["Code"] == "ValidationError" and "No updates are to be performed" in err.response["Error"].get("Message", ""):
            return "unchanged"
        raise
    _wait(cfn, "stack_update_complete", stack_name)
    return "updated"


def set_negative_caching_ttl(route53: Route53Client, zone_id: str, ttl: int) -> str:
    """UPSERT the zone's SOA with its last field (negative-caching TTL) and record TTL set to ttl; returns the new value."""
    zone_id = zone_id.rsplit("/", 1)[-1]
    zone_name = route53.get_hosted_zone(Id=zone_id)["HostedZone"]["Name"]
    page = route53.list_resource_record_sets(
        HostedZoneId=zone_id, StartRecordName=zone_name, StartRecordType="SOA", MaxItems="1"
    )
    soa = next(
        (
            r
            for r in page.get("ResourceRecordSets", [])
            if r["Type"] == "SOA" and r["Name"].rstrip(".").lower() == zone_name.rstrip(".").lower()
        ),
        None,
    )
    if soa is None:
        raise DeployError(f"the hosted zone {zone_id} has no SOA record")
    fields = soa["ResourceRecords"][0]["Value"].split()
    # mname rname serial refresh retry expire minimum: resolvers cache NXDOMAIN for
    # min(record TTL, minimum) (RFC 2308), so both must come down.
    if len(fields) != 7:
        raise DeployError(f"the SOA record of {zone_name} is not in the expected form: {soa['ResourceRecords'][0]['Value']!r}")
    fields[6] = str(ttl)
    value = " ".join(fields)
    route53.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Comment": "devbox: short negative caching so the name resolves soon after the devbox starts",
            "Changes": [
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {"Name": soa["Name"], "Type": "SOA", "TTL": ttl, "ResourceRecords": [{"Value": value}]},
                }
            ],
        },
    )
    return value


def cancel_spot_request(ec2: EC2Client, instance: Mapping[str, Any]) -> Optional[str]:
    """Cancel the persistent spot request behind a described instance; returns its id (None if none)."""
    # Even a terminated instance still names its request, which may have reopened.
    request_id = instance.get("SpotInstanceRequestId")
    if not request_id:
        return None
    try:
        ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    except ClientError as err:
        if err.response["Error"]["Code"] != "InvalidSpotInstanceRequestID.NotFound":
            raise
    return str(request_id)


def delete_address_record(route53: Route53Client, zone_id: str, name: str) -> bool:
    """Delete the devbox's A record (nothing updates it once the app is gone); returns whether one existed."""
    zone_id = zone_id.rsplit("/", 1)[-1]
    page = route53.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=name, StartRecordType="A", MaxItems="1")
    for record in page.get("ResourceRecordSets", []):
        if record["Type"] == "A" and record["Name"].rstrip(".").lower() == name.rstrip(".").lower():
            # DELETE must repeat the record exactly as Route53 holds it.
            route53.change_resource_record_sets(
                HostedZoneId=zone_id,
                ChangeBatch={"Comment": "devbox destroyed", "Changes": [{"Action": "DELETE", "ResourceRecordSet": record}]},
            )
            return True
    return False


def run_command(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> int:
    """Run a command in a folder with the given environment; returns its exit code."""
    return subprocess.run(list(argv), cwd=cwd, env=dict(env), check=False).returncode


def chalice_command(action: str, stage: str, profile: Optional[str]) -> List[str]:
    """The chalice command line for a stage, using the chalice next to this Python if there is one."""
    beside = Path(sys.executable).parent / "chalice"
    argv = [str(beside) if beside.exists() else "chalice", action, "--stage", stage]
    if profile:
        argv += ["--profile", profile]
    return argv


def run_deploy(
    args: argparse.Namespace,
    *,
    clients: Optional[ClientFactory] = None,
    runner: Optional[Runner] = None,
    template_body: Optional[str] = None,
) -> int:
    """Deploy the stack, record it into .chalice/, fix the zone's SOA if needed, then `chalice deploy`."""
    try:
        clients = clients or session_clients(args)
        cfn = clients("cloudformation")
        body = render_template(cloud_config()) if template_body is None else template_body
        outcome = deploy_stack(cfn, args.stack_name, body, template_parameters(args))
        print(f"stack {args.stack_name}: {outcome}")
        env = record_stack(cfn, args.stack_name, args.project_dir, stage=_stage(args))
        print(f"recorded {args.stack_name} into {Path(args.project_dir) / '.chalice'} (stage {_stage(args)})")
        stack = describe_stack(cfn, args.stack_name) or {}
        created_zone = _parameter(stack, "CreateHostedZone") == "true" and bool(env["HOSTED_ZONE_ID"])
        if env["HOSTED_ZONE_ID"] and (created_zone or args.fix_soa):
            route53 = clients("route53")
            set_negative_caching_ttl(route53, env["HOSTED_ZONE_ID"], args.negative_ttl)
            print(f"hosted zone {env['HOSTED_ZONE_ID']}: negative caching TTL set to {args.negative_ttl} s")
            if created_zone:
                servers = route53.get_hosted_zone(Id=env["HOSTED_ZONE_ID"]).get("DelegationSet", {}).get("NameServers", [])
                print(f"delegate {env['DOMAIN_NAME']} to these name servers at its parent zone: {', '.join(servers)}")
    except (DeployError, StackError) as err:
        print(f"devbox deploy: {err}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox deploy: AWS refused: {err}", file=sys.stderr)
        return 1
    print(f"running chalice deploy --stage {_stage(args)} ...")
    code = (runner or run_command)(
        chalice_command("deploy", _stage(args), getattr(args, "profile", None)), args.project_dir, _chalice_env(cfn)
    )
    if code != 0:
        print(f"devbox deploy: chalice deploy failed (exit {code}); the stack is in place, run deploy again", file=sys.stderr)
    return code


def run_destroy(
    args: argparse.Namespace, *, clients: Optional[ClientFactory] = None, runner: Optional[Runner] = None
) -> int:
    """Delete the app, cancel the spot request, terminate the instance, then delete the stack."""
    try:
        clients = clients or session_clients(args)
        cfn = clients("cloudformation")
    except BotoCoreError as err:
        print(f"devbox destroy: {err}", file=sys.stderr)
        return 1
    print(f"running chalice delete --stage {_stage(args)} ...")
    code = (runner or run_command)(
        chalice_command("delete", _stage(args), getattr(args, "profile", None)), args.project_dir, _chalice_env(cfn)
    )
    if code != 0:
        # With the app still there, its stop handler would race the teardown below.
        print(f"devbox destroy: chalice delete failed (exit {code}); nothing else was removed", file=sys.stderr)
        return code
    try:
        stack = describe_stack(cfn, args.stack_name)
        if stack is None:
            print(f"stack {args.stack_name} does not exist; nothing more to delete")
            return 0
        outputs = stack_outputs(stack)
        instance_id = outputs.get("InstanceId", "")
        if instance_id:
            ec2 = clients("ec2")
            instance = _describe_instance(ec2, instance_id)
            request_id = cancel_spot_request(ec2, instance) if instance else None
            if request_id:
                print(f"cancelled spot request {request_id}")
            if instance is not None and instance["State"]["Name"] != "terminated":
                print(f"terminating {instance_id} ...")
                ec2.terminate_instances(InstanceIds=[instance_id])
                ec2.get_waiter("instance_terminated").wait(InstanceIds=[instance_id], WaiterConfig=_WAIT)
        if outputs.get("HostedZoneId") and outputs.get("DomainName"):
            # A record left in a zone the stack created would make deleting the zone fail.
            if delete_address_record(clients("route53"), outputs["HostedZoneId"], outputs["DomainName"]):
                print(f"deleted the A record {outputs['DomainName']}")
        print(f"deleting stack {args.stack_name} ...")
        cfn.delete_stack(StackName=stack["StackId"])
        _wait(cfn, "stack_delete_complete", stack["StackId"])
    except (DeployError, StackError) as err:
        print(f"devbox destroy: {err}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox destroy: AWS refused: {err}", file=sys.stderr)
        return 1
    print(f"stack {args.stack_name} deleted")
    return 0


def session_clients(args: argparse.Namespace) -> ClientFactory:
    """A factory of boto3 clients for the profile and region the arguments name."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=getattr(args, "profile", None), region_name=getattr(args, "region", None))
    config = Config(retries={"mode": "standard", "max_attempts": 8}, user_agent_extra="devbox-deploy")
    made: Dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in made:
            made[service] = session.client(service, config=config)  # type: ignore[call-overload]
        return made[service]

    return client


def _wait(cfn: CloudFormationClient, waiter: str, stack_name: str) -> None:
    try:
        cfn.get_waiter(waiter).wait(StackName=stack_name, WaiterConfig=_WAIT)  # type: ignore[call-overload]
    except WaiterError as err:
        reasons = _failure_reasons(cfn, stack_name)
        message = f"the stack {stack_name} did not finish: {err}"
        if reasons:
            message += "\n  " + "\n  ".join(reasons)
        if any("stack policy" in reason.lower() for reason in reasons):
            message += (
                "\nThe change would replace the instance and its disk (AMI, instance type, key, volume, network"
                " and user data all do). To rebuild it on purpose, run `devbox destroy`, then `devbox deploy`."
            )
        raise DeployError(message) from err


def _failure_reasons(cfn: CloudFormationClient, stack_name: str) -> List[str]:
    try:
        events = cfn.describe_stack_events(StackName=stack_name)["StackEvents"]
    except (ClientError, BotoCoreError):
        return []
    reasons = [
        f"{e['LogicalResourceId']}: {e['ResourceStatus']}: {e['ResourceStatusReason']}"
        for e in events
        if e.get("ResourceStatus", "").endswith("FAILED") and e.get("ResourceStatusReason")
    ]
    return reasons[:5]


def _same_template(cfn: CloudFormationClient, stack_name: str, template_body: str) -> bool:
    deployed = cfn.get_template(StackName=stack_name, TemplateStage="Original")["TemplateBody"]
    if isinstance(deployed, str):
        return deployed == template_body
    # botocore hands JSON templates back already parsed.
    try:
        return bool(deployed == json.loads(template_body))
    except ValueError:
        return False


def _describe_instance(ec2: EC2Client, instance_id: str) -> Optional[Dict[str, Any]]:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as err:
        if err.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
            return None
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            return dict(instance)
    return None


def _parameter(stack: Mapping[str, Any], key: str) -> Optional[str]:
    for parameter in stack.get("Parameters", []):
        if parameter["ParameterKey"] == key:
            return str(parameter.get("ParameterValue", ""))
    return None


def _stage(args: argparse.Namespace) -> str:
    return str(getattr(args, "stage", None) or DEFAULT_STAGE)


def _chalice_env(cfn: CloudFormationClient) -> Dict[str, str]:
    # chalice must deploy to the region the stack lives in, whatever the profile says.
    return {**os.environ, "AWS_DEFAULT_REGION": cfn.meta.region_name}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value
