"""`devbox deploy` and `devbox destroy`: the CloudFormation stack, then the Chalice app.

Deploy creates (or updates) the stack from ``infra/devbox.yaml``, records its outputs
into ``.chalice/`` and runs ``chalice deploy``. The stack holds no instance: the service
launches the box's instances from the stack's launch template, so a stack update never
touches a running box, and a new image or user data reaches the box at its next rebuild
(``devbox start --rebuild``).

Destroy finds the box's resources by their ``devbox:box`` tag, so it also cleans up after
a failed create or once the stack is gone. It deletes the app first, then cancels the
box's spot requests before it terminates the instances (terminating first would let a
persistent request launch a replacement nobody knows about), deletes the box's A record,
snapshots and keeps the data volume (or deletes it with ``--delete-data``), and deletes
the stack last.

A fleet's boxes (``--fleet``: tagged ``devbox:box=<stack>/<name>``) are removed by devbox/fleet_teardown.py:
one with ``devbox destroy --box NAME``, all of them with plain ``devbox destroy``, before the stack.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, TextIO,
                    Tuple)

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from devbox import boxaws
from devbox.boxaws import ClientFactory
from devbox.stack import StackError, describe_stack, record_stack, render_template, stack_outputs
from devbox.userdata import cloud_config

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_route53 import Route53Client
else:
    CloudFormationClient = EC2Client = Route53Client = Any

Runner = Callable[[Sequence[str], str, Mapping[str, str]], int]

# (argparse dest, template parameter). None on the command line means "leave as is":
# the template default on create, the stack's current value on update.
TEMPLATE_OPTIONS: Tuple[Tuple[str, str], ...] = (
    ("instance_type", "InstanceType"),
    ("key_name", "KeyName"),
    ("image_parameter", "ImageParameter"),
    ("root_volume_size", "RootVolumeSize"),
    ("subnet_id", "SubnetId"),
    ("vpc_id", "VpcId"),
    ("domain_name", "DomainName"),
    ("hosted_zone_id", "HostedZoneId"),
    ("create_hosted_zone", "CreateHostedZone"),
    ("idle_minutes", "IdleMinutes"),
    ("idle_load_threshold", "IdleLoadThreshold"),
    ("kms_key_id", "KmsKeyId"),
)

# (argparse dest, stage setting): the user's own settings in the stage's environment_variables,
# which record_stack keeps (and builds the policy from). None means "leave as is".
STAGE_OPTIONS: Tuple[Tuple[str, str], ...] = (
    ("fleet", "FLEET"),
    ("admin_owners", "ADMIN_OWNERS"),
    ("allowed_owners", "ALLOWED_OWNERS"),
    ("max_boxes", "MAX_BOXES"),
)
# What the app accepts (chalicelib/config.py and fleet.py, which devbox/ does not import).
_OWNER_PATTERN = re.compile(r"^[A-Za-z0-9:/_+=.,@*?\[\]!-]{1,512}$")
_BOX_SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# What CloudFormation takes as a stack name: no wildcard (* ?), escape (\) or "/" can reach a tag filter.
_STACK_NAME = re.compile(r"^[A-Za-z][-A-Za-z0-9]{0,127}$")
MAX_BOXES_LIMIT = 1000

DEFAULT_NEGATIVE_TTL = 60
DEFAULT_STAGE = "dev"
# Long enough for a hosted zone, or a stack deletion that waits on a slow resource.
_WAIT = {"Delay": 10, "MaxAttempts": 360}
_SETTLED = ("CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE")
# USD per GiB-month at us-east-1 list prices, to tell the user what keeping the data costs.
_VOLUME_PRICE = {"gp3": 0.08, "gp2": 0.10, "io1": 0.125, "io2": 0.125, "st1": 0.045, "sc1": 0.015, "standard": 0.05}
_SNAPSHOT_PRICE = 0.05


class DeployError(Exception):
    """A deploy or destroy step failed; the message says what to do."""


@dataclass(frozen=True)
class Teardown:
    """What `devbox destroy` removes, read from the stack (or what is left of it) before anything is removed."""

    box_name: str
    # The stack to delete last; None when there is no stack any more.
    stack_id: Optional[str]
    zone_id: str
    domain_name: str
    # A stack deployed by an earlier devbox (one instance in the stack, not tagged with the box).
    legacy_instance_id: str


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options deploy and destroy share."""
    parser.add_argument("--stack-name", default="devbox", type=_stack_name,
                        help="CloudFormation stack name, and the box's name (default: devbox)")
    parser.add_argument("--project-dir", default=".", help="Chalice project folder (default: .)")
    # SUPPRESS: when the top-level parser also has these, an option left out after the
    # sub-command must not overwrite the value given before it (`devbox --stage prod deploy`).
    parser.add_argument("--stage", default=argparse.SUPPRESS, help=f"Chalice stage (default: {DEFAULT_STAGE})")
    parser.add_argument("--profile", default=argparse.SUPPRESS, help="AWS profile to use")
    parser.add_argument("--region", default=argparse.SUPPRESS, help="AWS region to deploy to")


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `devbox deploy` options: the shared ones plus the template's parameters."""
    add_common_arguments(parser)
    group = parser.add_argument_group(
        "stack parameters (unset: template default on create, current value on update; a running box"
        " gets launch template changes at its next `devbox start --rebuild`)"
    )
    group.add_argument("--instance-type", help="the launch template's instance type (template default: t3.large)")
    group.add_argument("--key-name", help='EC2 key pair name for SSH ("" for none)')
    group.add_argument(
        "--image-parameter", help="SSM parameter path naming the AMI, read at each launch (default: Ubuntu 24.04 amd64)"
    )
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
    group.add_argument("--idle-load-threshold", metavar="LOAD",
                       help="a 5-minute load average above this keeps the box up, 0 for never (default: 1.0)")
    group.add_argument("--kms-key-id", metavar="ARN",
                       help='customer managed KMS key for the box\'s volumes ("" for the account\'s EBS default)')
    fleet = parser.add_argument_group(
        "fleet settings (the stage's environment_variables in .chalice/config.json; unset: left as they are)"
    )
    fleet.add_argument(
        "--fleet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a box per IAM identity (FLEET=true), or one box for the deployment (--no-fleet)",
    )
    fleet.add_argument("--admin-owners", metavar="PATTERNS", type=_owner_patterns,
                       help='IAM identity patterns, comma-separated, that may list and stop every box'
                            ' (ADMIN_OWNERS; "" for none)')
    fleet.add_argument("--allowed-owners", metavar="PATTERNS", type=_owner_patterns,
                       help='IAM identity patterns, comma-separated, that may have a box (ALLOWED_OWNERS;'
                            ' "" for any identity the API lets in)')
    fleet.add_argument("--max-boxes", metavar="N", type=_max_boxes,
                       help=f"the most boxes the fleet holds (MAX_BOXES, 1 to {MAX_BOXES_LIMIT}; the app's default: 20)")
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
    parser.add_argument(
        "--box",
        metavar="NAME",
        type=_box_slug,
        help="remove only this box of a fleet (FLEET=true): its instances, security group, A record and claim;"
             " its data volume is snapshotted and kept; the stack, the app and the other boxes stay",
    )
    parser.add_argument(
        "--delete-data",
        action="store_true",
        help="delete the box's data volume (/home) without a snapshot, instead of snapshotting and keeping it"
             " (a fleet's boxes, with --box or without: delete each once it is snapshotted)",
    )
    parser.add_argument("--yes", action="store_true", help="do not ask before deleting the data volume")


def template_parameters(args: argparse.Namespace) -> Dict[str, str]:
    """The template parameters given on the command line, as CloudFormation strings."""
    return _given(args, TEMPLATE_OPTIONS)


def stage_settings(args: argparse.Namespace) -> Dict[str, str]:
    """The stage settings given on the command line (FLEET, ADMIN_OWNERS, ...), as environment strings."""
    return _given(args, STAGE_OPTIONS)


def write_stage_settings(project_dir: str, stage: str, settings: Mapping[str, str]) -> Dict[str, str]:
    """Set settings in the stage's environment_variables in .chalice/config.json; returns their earlier values."""
    from devbox.sshconfig import write_temporary

    config_path = Path(project_dir) / ".chalice" / "config.json"
    try:
        config: Any = json.loads(config_path.read_text()) if config_path.exists() else {"version": "2.0", "app_name": "devbox"}
    except ValueError as err:
        raise DeployError(f"{config_path} is not valid JSON ({err}); fix it, then deploy again") from err
    try:
        variables = config.setdefault("stages", {}).setdefault(stage, {}).setdefault("environment_variables", {})
        before = {key: str(variables.get(key, "")) for key in settings}
        variables.update(settings)
    except AttributeError as err:
        raise DeployError(f"{config_path} does not hold a Chalice config (stages.{stage}.environment_variables)") from err
    config_path.parent.mkdir(parents=True, exist_ok=True)
    mode = config_path.stat().st_mode & 0o777 if config_path.exists() else 0o644
    # Written next to the file then renamed: an interrupted deploy never leaves half a config.
    temporary = write_temporary(config_path, (json.dumps(config, indent=2) + "\n").encode(), mode)
    try:
        os.replace(temporary, config_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return before


CAPABILITIES = ["CAPABILITY_IAM"]


def deploy_stack(
    cfn: CloudFormationClient, stack_name: str, template_body: str, parameters: Mapping[str, str]
) -> str:
    """Create or update the stack and wait; returns "created", "updated" or "unchanged"."""
    stack = describe_stack(cfn, stack_name)
    if stack is None:
        print(f"creating stack {stack_name} ...")
        cfn.create_stack(
            StackName=stack_name,
            TemplateBody=template_body,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Tags=[{"Key": "devbox:stack", "Value": stack_name}],
            # The template holds the instance role (unnamed): CloudFormation asks for this acknowledgement.
            Capabilities=CAPABILITIES,
        )
        _wait(cfn, "stack_create_complete", stack_name)
        return "created"
    status = stack["StackStatus"]
    if status == "ROLLBACK_COMPLETE":
        raise DeployError(f"the stack {stack_name} failed to create earlier; run `devbox destroy` first, then deploy again")
    if status not in _SETTLED:
        raise DeployError(f"the stack {stack_name} is {status}; wait until it settles, then deploy again")
    legacy_instance = stack_outputs(stack).get("InstanceId")
    if legacy_instance:
        # That stack's instance keeps the user's files on its root disk, and this template
        # has no instance: the update would terminate it.
        raise DeployError(
            f"the stack {stack_name} was deployed by an earlier devbox, whose instance {legacy_instance} keeps your"
            " files on its root disk, and this update would delete it; copy what you need off it, run"
            " `devbox destroy`, then deploy again"
        )
    current = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    if _same_template(cfn, stack_name, template_body) and all(current.get(k) == v for k, v in parameters.items()):
        # CloudFormation refuses an update that changes nothing; no need to ask it.
        return "unchanged"
    keys = list(current) + [k for k in parameters if k not in current]
    update_parameters: List[Dict[str, Any]] = [
        {"ParameterKey": k, "ParameterValue": parameters[k]} if k in parameters else {"ParameterKey": k, "UsePreviousValue": True}
        for k in keys
    ]
    print(f"updating stack {stack_name} ...")
    try:
        cfn.update_stack(StackName=stack_name, TemplateBody=template_body, Parameters=update_parameters,
                         Capabilities=CAPABILITIES)
    except ClientError as err:
        if err.response["Error"]["Code"] == "ValidationError" and "No updates are to be performed" in err.response["Error"].get("Message", ""):
            return "unchanged"
        raise
    _wait(cfn, "stack_update_complete", stack_name)
    return "updated"


def set_negative_caching_ttl(route53: Route53Client, zone_id: str, ttl: int) -> str:
    """UPSERT the zone's SOA with its last field (negative-caching TTL) and record TTL set to ttl; returns the new value."""
    zone_id = boxaws.bare_zone_id(zone_id)
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
        clients = clients or _session_clients(args)
        cfn = clients("cloudformation")
        body = render_template(cloud_config()) if template_body is None else template_body
        outcome = deploy_stack(cfn, args.stack_name, body, template_parameters(args))
        print(f"stack {args.stack_name}: {outcome}")
        if outcome == "updated":
            print("a running box keeps its instance; it gets the new launch template at `devbox start --rebuild`")
        # Before record_stack: it builds the policy from these (a fleet's policy covers every box).
        apply_stage_settings(args.project_dir, _stage(args), stage_settings(args))
        env = record_stack(cfn, args.stack_name, args.project_dir, stage=_stage(args), ec2_client=clients("ec2"))
        print(f"recorded {args.stack_name} into {Path(args.project_dir) / '.chalice'} (stage {_stage(args)})")
        if _truthy(_recorded_env(args.project_dir, _stage(args)).get("FLEET", "")):
            if not env.get("BOXES_TABLE"):
                raise DeployError(f"FLEET=true needs the stack's BoxesTable output, and the stack {args.stack_name}"
                                  " has none; deploy it with this devbox's template, or deploy with --no-fleet")
            print(f"fleet: a box per IAM identity, claims in the table {env['BOXES_TABLE']}, each box's group in"
                  f" {env.get('VPC_ID', '?')}; remove one with `devbox destroy --box NAME`")
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


def apply_stage_settings(project_dir: str, stage: str, settings: Mapping[str, str]) -> None:
    """Write the settings given on the command line into the stage, and say what changed."""
    if not settings:
        return
    before = write_stage_settings(project_dir, stage, settings)
    print(f"stage {stage}: " + ", ".join(f"{key}={value!r}" if value == "" else f"{key}={value}"
                                         for key, value in settings.items()))
    if _truthy(before.get("FLEET", "")) and settings.get("FLEET") == "false":
        print("FLEET was true: the fleet's boxes (tagged devbox:box=<stack>/<name>) stay as they are, and the app"
              " no longer manages them; to remove them, deploy with --fleet again and run"
              " `devbox destroy --box NAME` for each")


# What stops a teardown halfway: a re-run finishes it.
CUT_OFF = (DeployError, StackError, WaiterError, ClientError, BotoCoreError)


def cut_off(err: Exception, again: str) -> int:
    """Say in one line why a teardown stopped halfway, and that running `again` finishes it; returns 1."""
    if isinstance(err, WaiterError):
        reason = f"gave up waiting: {err}"
    elif isinstance(err, (ClientError, BotoCoreError)):
        reason = f"AWS refused: {err}"
    else:
        reason = str(err)
    print(f"devbox destroy: {reason}; run {again} again to finish", file=sys.stderr)
    return 1


def run_destroy(
    args: argparse.Namespace,
    *,
    clients: Optional[ClientFactory] = None,
    runner: Optional[Runner] = None,
    stdin: Optional[TextIO] = None,
) -> int:
    """Delete the app, every box of a fleet, the box's spot requests, instances and A record, keep (or delete) its data,
    then the stack.

    With ``--box NAME`` only that box of a fleet goes (see run_destroy_box).
    """
    from devbox.fleet_teardown import (_boxes_table, _confirm_delete_fleet_data, _may_have_fleet, find_fleet,
                                       remove_fleet, run_destroy_box)

    if getattr(args, "box", None) is not None:
        return run_destroy_box(args, clients=clients, stdin=stdin)
    delete_data = bool(getattr(args, "delete_data", False))
    ask = delete_data and not getattr(args, "yes", False)
    stdin = stdin or sys.stdin
    if ask and not _is_terminal(stdin):
        print(
            "devbox destroy: --delete-data deletes the box's data volume for good (a fleet's boxes' once they are"
            " snapshotted) and there is no terminal to confirm it on; pass --yes as well. Nothing was changed.",
            file=sys.stderr,
        )
        return 1
    # With --delete-data asked at the terminal: the boxes whose data the user agreed to delete (None: every box's).
    confirmed: Optional[Collection[str]] = None
    try:
        clients = clients or _session_clients(args)
        cfn = clients("cloudformation")
        stack = describe_stack(cfn, args.stack_name)
        recorded = _recorded_env(args.project_dir, _stage(args))
        teardown = plan_teardown(args.stack_name, stack, recorded)
        table = _boxes_table(stack, recorded, teardown.box_name)
        fleet = _may_have_fleet(stack, recorded, teardown.box_name)
        if ask:
            volumes = boxaws.find_data_volumes(clients("ec2"), teardown.box_name)
            boxes = find_fleet(clients, teardown, table).boxes if fleet else ()
            confirmed = [plan.slug for plan, _ in boxes]
            if boxes:
                agreed = _confirm_delete_fleet_data(teardown.box_name, volumes, boxes, stdin)
            else:
                agreed = _confirm_delete_data(teardown.box_name, volumes, stdin)
            if not agreed:
                print("devbox destroy: not confirmed. Nothing was changed.", file=sys.stderr)
                return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox destroy: AWS refused: {err}", file=sys.stderr)
        return 1
    print(f"running chalice delete --stage {_stage(args)} ...")
    code = (runner or run_command)(
        chalice_command("delete", _stage(args), getattr(args, "profile", None)), args.project_dir, _chalice_env(cfn)
    )
    if code != 0:
        # With the app still there, it could launch or relaunch an instance during the teardown below.
        print(f"devbox destroy: chalice delete failed (exit {code}); nothing else was removed", file=sys.stderr)
        return code
    try:
        # The fleet's boxes before the stack: its claims table (and the boxes' launch template) go with it.
        if fleet:
            remove_fleet(clients, teardown, table, delete_data=delete_data, confirmed=confirmed,
                         profile=getattr(args, "profile", None))
        tear_down(clients, teardown, delete_data=delete_data, profile=getattr(args, "profile", None))
        if teardown.stack_id is None:
            print(f"stack {args.stack_name} does not exist; nothing more to delete")
            return 0
        print(f"deleting stack {args.stack_name} ...")
        cfn.delete_stack(StackName=teardown.stack_id)
        _wait(cfn, "stack_delete_complete", teardown.stack_id)
    except CUT_OFF as err:
        return cut_off(err, "destroy")
    print(f"stack {args.stack_name} deleted")
    return 0


def plan_teardown(stack_name: str, stack: Optional[Mapping[str, Any]], recorded: Mapping[str, str]) -> Teardown:
    """What destroy removes: from the stack's outputs, else a failed stack's parameters, else what deploy recorded."""
    outputs = stack_outputs(stack) if stack else {}
    box_name = outputs.get("BoxName") or stack_name
    if stack and outputs:
        zone_id, domain = outputs.get("HostedZoneId", ""), outputs.get("DomainName", "")
    elif stack:
        # A failed create has no outputs; a zone it was given is still there (one it created was rolled back).
        zone_id, domain = _parameter(stack, "HostedZoneId") or "", _parameter(stack, "DomainName") or ""
    elif recorded.get("BOX_NAME") == box_name:
        zone_id, domain = recorded.get("HOSTED_ZONE_ID", ""), recorded.get("DOMAIN_NAME", "")
    else:
        zone_id = domain = ""
    return Teardown(
        box_name=box_name,
        stack_id=str(stack["StackId"]) if stack else None,
        zone_id=zone_id if domain else "",
        domain_name=domain if zone_id else "",
        legacy_instance_id=outputs.get("InstanceId", ""),
    )


def tear_down(clients: ClientFactory, teardown: Teardown, *, delete_data: bool, profile: Optional[str] = None) -> None:
    """Remove the box's tagged resources, in the order a persistent spot request needs; the stack stays."""
    ec2: EC2Client = clients("ec2")
    box = teardown.box_name
    legacy = boxaws.describe_instance(ec2, teardown.legacy_instance_id) if teardown.legacy_instance_id else None
    end_instances(ec2, box, legacy)

    if teardown.zone_id and teardown.domain_name:
        # A record left in a zone the stack created would make deleting the zone fail.
        if _delete_record(clients("route53"), teardown.zone_id, teardown.domain_name, comment=f"devbox {box} destroyed"):
            print(f"deleted the A record {teardown.domain_name}")

    volumes = boxaws.find_data_volumes(ec2, box)
    if not volumes:
        print(f"box {box}: no data volume")
    for volume in volumes:
        volume_id = str(volume["VolumeId"])
        if delete_data:
            print(f"deleting the data volume {volume_id} ...")
            boxaws.delete_volume(ec2, volume_id)
            print(f"deleted the data volume {volume_id}")
            continue
        print(f"snapshotting the data volume {volume_id} ({volume.get('Size', '?')} GiB; a first snapshot takes a while) ...")
        snapshot_id = boxaws.snapshot_volume(ec2, volume_id, box, description=f"devbox {box}: /home at destroy")
        print(f"snapshot {snapshot_id} completed")
        print(_kept_volume_note(volume, snapshot_id, box, ec2.meta.region_name, profile))


def end_instances(ec2: EC2Client, box: str, legacy: Optional[Mapping[str, Any]] = None, *,
                  label: Optional[str] = None) -> List[str]:
    """Cancel the box's spot requests, then terminate its instances and wait; returns the ids terminated.

    box is a devbox:box filter value: boxaws.fleet_filter(fleet) ends every box of a fleet at once (label names
    them in what is printed).
    """
    name = label or f"box {box}"
    # A terminated instance still names its request, which may have reopened.
    known = boxaws.find_instances(ec2, box, include_terminated=True) + ([dict(legacy)] if legacy else [])
    request_ids = {str(r["SpotInstanceRequestId"]) for r in boxaws.find_spot_requests(ec2, box)}
    cancelled = boxaws.cancel_spot_requests(ec2, request_ids | set(boxaws.instance_spot_request_ids(known)))
    print(f"cancelled spot requests: {', '.join(cancelled)}" if cancelled else f"{name}: no spot request to cancel")

    # Asked again: a request could have launched an instance up to the moment it was cancelled.
    live = boxaws.find_instances(ec2, box)
    if legacy and legacy["State"]["Name"] != "terminated":
        live.append(dict(legacy))
    instance_ids = sorted({str(i["InstanceId"]) for i in live})
    if instance_ids:
        print(f"terminating {', '.join(instance_ids)} ...")
        boxaws.terminate_instances(ec2, instance_ids)
        print(f"terminated {', '.join(instance_ids)}")
    else:
        print(f"{name}: no instance to terminate")
    return instance_ids


def _delete_record(route53: Route53Client, zone_id: str, name: str, *, comment: str) -> bool:
    try:
        return boxaws.delete_address_record(route53, zone_id, name, comment=comment)
    except ClientError as err:
        # A zone the stack created is gone once the stack is.
        if err.response["Error"]["Code"] != "NoSuchHostedZone":
            raise
        return False


def _wait(cfn: CloudFormationClient, waiter: str, stack_name: str) -> None:
    try:
        cfn.get_waiter(waiter).wait(StackName=stack_name, WaiterConfig=_WAIT)  # type: ignore[call-overload]
    except WaiterError as err:
        reasons = _failure_reasons(cfn, stack_name)
        message = f"the stack {stack_name} did not finish: {err}"
        if reasons:
            message += " (" + "; ".join(reasons) + ")"
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


def _parameter(stack: Mapping[str, Any], key: str) -> Optional[str]:
    for parameter in stack.get("Parameters", []):
        if parameter["ParameterKey"] == key:
            return str(parameter.get("ParameterValue", ""))
    return None


def _session_clients(args: argparse.Namespace) -> ClientFactory:
    return boxaws.session_clients(
        getattr(args, "profile", None), getattr(args, "region", None), user_agent_extra="devbox-deploy"
    )


def _recorded_env(project_dir: str, stage: str) -> Dict[str, str]:
    # What the last deploy recorded: where the box's A record is once the stack is gone.
    try:
        config = json.loads((Path(project_dir) / ".chalice" / "config.json").read_text())
        variables = config["stages"][stage]["environment_variables"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in variables.items()} if isinstance(variables, dict) else {}


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _confirm_delete_data(box_name: str, volumes: Sequence[Mapping[str, Any]], stdin: TextIO,
                         snapshot: bool = False) -> bool:
    found = ", ".join(f"{v['VolumeId']} ({v.get('Size', '?')} GiB)" for v in volumes) or "none found yet"
    how = "once it is snapshotted (the snapshot is kept)" if snapshot else "for good, with no snapshot"
    print(f"--delete-data deletes the data volume of box {box_name} (its /home) {how}: {found}.")
    print(f"Type the box name ({box_name}) to go on: ", end="", flush=True)
    return stdin.readline().strip() == box_name


def _kept_volume_note(
    volume: Mapping[str, Any], snapshot_id: str, box_name: str, region: str, profile: Optional[str]
) -> str:
    volume_id, size = str(volume["VolumeId"]), int(volume.get("Size", 0))
    volume_type = str(volume.get("VolumeType", "gp3"))
    monthly = size * _VOLUME_PRICE.get(volume_type, _VOLUME_PRICE["gp3"])
    # A snapshot is billed for the blocks in use, so a full-size one is the most it costs.
    snapshot_monthly = size * _SNAPSHOT_PRICE
    options = f" --region {region}" + (f" --profile {profile}" if profile else "")
    return (
        f"kept the data volume {volume_id}: deploying box {box_name} again finds it, and /home comes back.\n"
        f"  keeping it costs about ${monthly:.2f} a month ({size} GiB {volume_type}), the snapshot up to"
        f" ${snapshot_monthly:.2f} a month more (us-east-1 list prices).\n"
        f"  to delete them: aws ec2 delete-volume --volume-id {volume_id}{options}\n"
        f"                  aws ec2 delete-snapshot --snapshot-id {snapshot_id}{options}"
    )


def _given(args: argparse.Namespace, options: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    given: Dict[str, str] = {}
    for dest, key in options:
        value = getattr(args, dest, None)
        if value is None:
            continue
        given[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return given


def _truthy(value: str) -> bool:
    # As the app reads a boolean setting.
    return value.strip().lower() in ("true", "yes", "1", "on")


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


def _max_boxes(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_BOXES_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is not between 1 and {MAX_BOXES_LIMIT}")
    return value


def _owner_patterns(text: str) -> str:
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in patterns if not _OWNER_PATTERN.match(p)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not an IAM identity pattern such as"
                                         " arn:aws:iam::123456789012:user/*")
    return ",".join(patterns)


def _stack_name(text: str) -> str:
    if not _STACK_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a CloudFormation stack name (a letter, then letters, digits"
                                         " and hyphens, at most 128 characters)")
    return text


def _box_slug(text: str) -> str:
    if not _BOX_SLUG.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a box name (a DNS label: lower-case letters, digits and"
                                         " hyphens, at most 40 characters)")
    return text
