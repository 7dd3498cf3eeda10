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

A fleet (``--fleet``: FLEET=true in the stage's settings, a box per IAM identity) keeps each
box's resources under the tag ``devbox:box=<stack>/<name>``. ``devbox destroy --box NAME``
removes one of them the same way (spot requests, instances, A record ``NAME.<domain>``, data
volume snapshotted), then its own security group and its claim in the fleet's table, and
leaves the stack, the app and the other boxes as they are. A kept volume is set aside
(``devbox:role=removed-data``) so that whoever claims the name next does not get it.

Destroying a whole fleet (plain ``devbox destroy``) removes every box of it that way before the
deployment's own resources and the stack: the boxes are found by the wildcard tag ``<stack>/*``
and the fleet's claims (not by the stage's FLEET setting, which may be gone), every box's spot
requests are cancelled and its instances terminated at once after the app is deleted, then each
box's record, data, group and claim go. The claims table goes with the stack, last, so a cut-off
run finds what is left and a re-run finishes it.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Set, TextIO,
                    Tuple)

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from devbox import boxaws
from devbox.boxaws import ClientFactory
from devbox.stack import StackError, describe_stack, record_stack, render_template, stack_outputs
from devbox.userdata import cloud_config

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_route53 import Route53Client
else:
    CloudFormationClient = DynamoDBClient = EC2Client = Route53Client = Any

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
# The fleet's claims: one item of the boxes table; each box's costs: an item of its own.
FLEET_ITEM = "fleet"
OWNER_TAG = "devbox:owner"
# On what `destroy --box` keeps: when it was removed (snapshots, volume), and the volume's role
# once it is set aside (the app finds a box's data volume by devbox:role=data).
REMOVED_TAG = "devbox:removed"
KEPT_ROLE = "removed-data"
# A terminated instance's network interface holds on to its group for a while after it is gone.
GROUP_DELETE_WAIT = {"Delay": 10, "MaxAttempts": 30}

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
class BoxTeardown:
    """What `devbox destroy --box NAME` removes: one box of a fleet, found by its tag."""

    # The fleet (the stack's BoxName) and the box's name in it.
    fleet: str
    slug: str
    zone_id: str
    # NAME.<domain>, or "" when the deployment keeps no records.
    record_name: str
    # The claims table, or "" when none is known.
    table: str

    @property
    def tag(self) -> str:
        return f"{self.fleet}/{self.slug}"


@dataclass(frozen=True)
class BoxFound:
    """What is left of one box of a fleet, read before anything is removed."""

    owner: str
    instance_ids: Tuple[str, ...]
    spot_request_ids: Tuple[str, ...]
    group_ids: Tuple[str, ...]
    volumes: Tuple[Dict[str, Any], ...]
    record: bool
    claimed: bool
    costs: bool
    # What an earlier `destroy --box` left on purpose: set-aside volumes, snapshots.
    kept_volume_ids: Tuple[str, ...]
    snapshot_ids: Tuple[str, ...]
    # The names the fleet's table holds (this one included, if claimed).
    fleet_boxes: Tuple[str, ...]

    @property
    def exists(self) -> bool:
        return bool(self.instance_ids or self.spot_request_ids or self.group_ids or self.volumes or self.record
                    or self.claimed or self.costs)


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


@dataclass(frozen=True)
class FleetFound:
    """The boxes of a fleet that `devbox destroy` (the whole deployment) removes, read before anything is removed."""

    boxes: Tuple[Tuple[BoxTeardown, BoxFound], ...]
    # Resources tagged under the fleet (<fleet>/...) with no box name after the "/": {tag value: resource ids}.
    strays: Mapping[str, Tuple[str, ...]]


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
    if getattr(args, "box", None) is not None:
        return run_destroy_box(args, clients=clients, stdin=stdin)
    delete_data = bool(getattr(args, "delete_data", False))
    ask = delete_data and not getattr(args, "yes", False)
    stdin = stdin or sys.stdin
    if ask and not _is_terminal(stdin):
        print(
            "devbox destroy: --delete-data deletes the box's data volume for good and there is no terminal to"
            " confirm it on; pass --yes as well. Nothing was changed.",
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
    except (DeployError, StackError) as err:
        print(f"devbox destroy: {err}; run destroy again to finish", file=sys.stderr)
        return 1
    except WaiterError as err:
        print(f"devbox destroy: gave up waiting: {err}; run destroy again to finish", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox destroy: AWS refused: {err}; run destroy again to finish", file=sys.stderr)
        return 1
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


def run_destroy_box(
    args: argparse.Namespace,
    *,
    clients: Optional[ClientFactory] = None,
    stdin: Optional[TextIO] = None,
) -> int:
    """Remove one box of a fleet (``--box NAME``) and keep a snapshot of its data; the stack and the other boxes stay."""
    slug = str(args.box)
    again = f"`devbox destroy --box {slug}`"
    if not _BOX_SLUG.match(slug):
        print(f"devbox destroy: {slug!r} is not a box name (a DNS label: lower-case letters, digits and hyphens)."
              " Nothing was changed.", file=sys.stderr)
        return 1
    delete_data = bool(getattr(args, "delete_data", False))
    ask = delete_data and not getattr(args, "yes", False)
    stdin = stdin or sys.stdin
    if ask and not _is_terminal(stdin):
        print(
            f"devbox destroy: --delete-data deletes the data volume of box {slug} once it is snapshotted, and there"
            " is no terminal to confirm it on; pass --yes as well. Nothing was changed.",
            file=sys.stderr,
        )
        return 1
    stage = _stage(args)
    recorded = _recorded_env(args.project_dir, stage)
    if not _truthy(recorded.get("FLEET", "")):
        print(
            f"devbox destroy: --box removes one box of a fleet, and stage {stage} in"
            f" {Path(args.project_dir) / '.chalice' / 'config.json'} is not a fleet (no FLEET=true; `devbox deploy"
            " --fleet` makes it one). `devbox destroy` without --box removes the whole deployment. Nothing was changed.",
            file=sys.stderr,
        )
        return 1
    try:
        clients = clients or _session_clients(args)
        plan = plan_box_teardown(args.stack_name, describe_stack(clients("cloudformation"), args.stack_name),
                                 recorded, slug)
        found = find_box(clients, plan)
        if not found.exists:
            print(f"devbox destroy: {_no_such_box(plan, found)} Nothing was changed.", file=sys.stderr)
            return 1
        print(_found_text(plan, found))
        if ask and not _confirm_delete_data(slug, found.volumes, stdin, snapshot=True):
            print("devbox destroy: not confirmed. Nothing was changed.", file=sys.stderr)
            return 1
    except (DeployError, StackError) as err:
        print(f"devbox destroy: {err} Nothing was changed.", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox destroy: AWS refused: {err}", file=sys.stderr)
        return 1
    try:
        snapshots = remove_box(clients, plan, found.owner, delete_data=delete_data,
                               profile=getattr(args, "profile", None))
    except DeployError as err:
        print(f"devbox destroy: {err}; run {again} again to finish", file=sys.stderr)
        return 1
    except WaiterError as err:
        print(f"devbox destroy: gave up waiting: {err}; run {again} again to finish", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as err:
        print(f"devbox destroy: AWS refused: {err}; run {again} again to finish", file=sys.stderr)
        return 1
    print(f"removed box {slug} from the fleet {plan.fleet}" + (f"; its data is in {', '.join(snapshots)}" if snapshots else "")
          + "; the stack, the app and the other boxes are as they were")
    return 0


def plan_box_teardown(stack_name: str, stack: Optional[Mapping[str, Any]], recorded: Mapping[str, str],
                      slug: str) -> BoxTeardown:
    """Where one box of the fleet is: its tag, its record NAME.<domain>, the claims table."""
    deployment = plan_teardown(stack_name, stack, recorded)
    fleet = deployment.box_name
    if recorded.get("BOX_NAME") and recorded["BOX_NAME"] != fleet:
        raise DeployError(f"this stage records the deployment {recorded['BOX_NAME']}, not {fleet}: give"
                          f" --stack-name {recorded['BOX_NAME']}, or the --project-dir and --stage of {fleet}.")
    return _box_plan(deployment, _boxes_table(stack, recorded, fleet), slug)


def _box_plan(deployment: Teardown, table: str, slug: str) -> BoxTeardown:
    domain = deployment.domain_name.rstrip(".")
    return BoxTeardown(
        fleet=deployment.box_name,
        slug=slug,
        zone_id=deployment.zone_id if domain else "",
        record_name=f"{slug}.{domain}" if deployment.zone_id and domain else "",
        table=table,
    )


def _boxes_table(stack: Optional[Mapping[str, Any]], recorded: Mapping[str, str], box_name: str) -> str:
    """The fleet's claims table: the stack's output, else what deploy recorded for this deployment."""
    table = (stack_outputs(stack) if stack else {}).get("BoxesTable")
    if table:
        return table
    return recorded.get("BOXES_TABLE", "") if (recorded.get("BOX_NAME") or box_name) == box_name else ""


def _may_have_fleet(stack: Optional[Mapping[str, Any]], recorded: Mapping[str, str], box_name: str) -> bool:
    """Whether destroy looks for fleet boxes: FLEET=true is recorded, or the stack has a BoxesTable (any deployment
    of this template may have been a fleet; the stage's settings may be gone), or there is no stack to tell.

    Only a stack of an older template, which has no claims table, cannot have had a fleet.
    """
    outputs = stack_outputs(stack) if stack else {}
    if not outputs or "BoxesTable" in outputs:
        return True
    return (recorded.get("BOX_NAME") or box_name) == box_name and _truthy(recorded.get("FLEET", ""))


def find_fleet(clients: ClientFactory, deployment: Teardown, table: str) -> FleetFound:
    """Every box of the fleet that is left: tagged devbox:box=<fleet>/<name>, or claimed in the fleet's table."""
    ec2: EC2Client = clients("ec2")
    fleet = deployment.box_name
    pattern = boxaws.fleet_filter(fleet)
    slugs = set()
    strays: Dict[str, List[str]] = {}
    sources = (
        (boxaws.find_instances(ec2, pattern), "InstanceId"),
        (boxaws.find_spot_requests(ec2, pattern), "SpotInstanceRequestId"),
        (_find_groups(ec2, pattern), "GroupId"),
        (boxaws.find_data_volumes(ec2, pattern), "VolumeId"),
    )
    for found, id_key in sources:
        for item in found:
            tag = boxaws.tag_value(item, boxaws.BOX_TAG) or ""
            # EC2 matched a wildcard: only <fleet>/<box name> is one of the fleet's boxes.
            slug = boxaws.fleet_box_name(fleet, tag)
            if slug is not None and _BOX_SLUG.match(slug):
                slugs.add(slug)
            elif slug is not None:
                strays.setdefault(tag, []).append(str(item[id_key]))
    if table:
        claims = _read_item(clients("dynamodb"), table, FLEET_ITEM)
        named = [str(s) for s in claims.get("boxes", {}).get("SS", [])]
        named += [key[len("owner:"):] for key in claims if key.startswith("owner:")]
        slugs.update(s for s in named if _BOX_SLUG.match(s))
    boxes = []
    for slug in sorted(slugs):
        plan = _box_plan(deployment, table, slug)
        box = find_box(clients, plan)
        if box.exists:
            boxes.append((plan, box))
    return FleetFound(boxes=tuple(boxes), strays={tag: tuple(ids) for tag, ids in sorted(strays.items())})


def remove_fleet(clients: ClientFactory, deployment: Teardown, table: str, *, delete_data: bool,
                 confirmed: Optional[Collection[str]] = None,
                 profile: Optional[str] = None) -> List[Tuple[BoxTeardown, List[str]]]:
    """Remove every box of the fleet as `destroy --box` does; returns each box removed with its snapshots.

    Every box's spot requests are cancelled and its instances terminated at once (their waits overlap), then each
    box's record, data (snapshotted, then kept aside, or deleted with delete_data when confirmed is None or names
    the box), group and claim go. The app must be gone already: nothing may start a box meanwhile. The stack and
    the deployment's own box (tagged <fleet>) stay.
    """
    ec2: EC2Client = clients("ec2")
    fleet = deployment.box_name
    found = find_fleet(clients, deployment, table)
    if found.boxes or found.strays:
        names = ", ".join(plan.slug for plan, _ in found.boxes)
        print(f"the fleet {fleet}: {_count(len(found.boxes), 'box', 'boxes') or 'no box'} to remove"
              + (f" ({names})" if names else ""))
        end_instances(ec2, boxaws.fleet_filter(fleet), label=f"the fleet {fleet}")
    removed: List[Tuple[BoxTeardown, List[str]]] = []
    lines: List[str] = []
    listed: Set[str] = set()
    for plan, box in found.boxes:
        print(_found_text(plan, box, "`devbox destroy`"))
        deleted = delete_data and (confirmed is None or plan.slug in confirmed)
        # As `--box` does: a box with an instance until now gets a new snapshot, one without may reuse a run's.
        snapshots = remove_box(clients, plan, box.owner, delete_data=deleted, reuse_snapshot=not box.instance_ids,
                               profile=profile)
        print(f"removed box {plan.slug} from the fleet {fleet}"
              + (f"; its data is in {', '.join(snapshots)}" if snapshots else ""))
        removed.append((plan, snapshots))
        listed.update(snapshots, (str(v["VolumeId"]) for v in box.volumes))
        volumes = ", ".join(str(v["VolumeId"]) for v in box.volumes)
        data = (f"snapshot {', '.join(snapshots)}" if snapshots else "no data volume") + (
            f"; data volume {volumes} " + ("deleted" if deleted else f"kept, set aside ({boxaws.ROLE_TAG}={KEPT_ROLE})")
            if volumes else "")
        lines.append(f"  {plan.slug}" + (f" (owner {box.owner})" if box.owner else "") + f": {data}")
    if removed:
        print(f"the fleet {fleet}: removed {_count(len(removed), 'box', 'boxes')}\n" + "\n".join(lines))
    for tag, ids in found.strays.items():
        ended = [i for i in ids if i.startswith(("i-", "sir-"))]
        left = [i for i in ids if i not in ended]
        print(f"tagged {boxaws.BOX_TAG}={tag}, which names no box of the fleet: "
              + "; ".join(part for part in (f"ended with the fleet's: {', '.join(ended)}" if ended else "",
                                            f"left as they are: {', '.join(left)}" if left else "") if part))
    earlier = _kept_elsewhere(ec2, fleet, listed)
    if earlier:
        print("kept from the fleet's boxes removed earlier (billed until you delete them):\n" + "\n".join(earlier))
    return removed


def _kept_elsewhere(ec2: EC2Client, fleet: str, listed: Collection[str]) -> List[str]:
    """What earlier removals of the fleet's boxes kept (snapshots, set-aside volumes), one line a box."""
    pattern = boxaws.fleet_filter(fleet)
    kept: Dict[str, List[str]] = {}
    for snapshot in _removal_snapshots(ec2, pattern):
        if snapshot["SnapshotId"] not in listed:
            kept.setdefault(boxaws.tag_value(snapshot, boxaws.BOX_TAG) or "", []).append(
                f"snapshot {snapshot['SnapshotId']}")
    for volume in _kept_volumes(ec2, pattern):
        if volume["VolumeId"] in listed:
            continue
        kept.setdefault(boxaws.tag_value(volume, boxaws.BOX_TAG) or "", []).append(
            f"data volume {volume['VolumeId']} (set aside)")
    return [f"  {boxaws.fleet_box_name(fleet, tag)}: {', '.join(items)}" for tag, items in sorted(kept.items())
            if boxaws.fleet_box_name(fleet, tag)]


def find_box(clients: ClientFactory, plan: BoxTeardown) -> BoxFound:
    """Read what is left of the box: by its tag in EC2, its record in Route53, its claim in the table."""
    ec2: EC2Client = clients("ec2")
    tag = plan.tag
    instances = boxaws.find_instances(ec2, tag)
    groups = _find_groups(ec2, tag)
    claims = _read_item(clients("dynamodb"), plan.table, FLEET_ITEM) if plan.table else {}
    costs = _read_item(clients("dynamodb"), plan.table, f"box:{plan.slug}") if plan.table else {}
    claimed_by = str(claims.get(f"owner:{plan.slug}", {}).get("S", ""))
    fleet_boxes = tuple(sorted(str(name) for name in claims.get("boxes", {}).get("SS", [])))
    owners = [claimed_by] + [boxaws.tag_value(item, OWNER_TAG) or "" for item in groups + instances]
    return BoxFound(
        owner=next((owner for owner in owners if owner), ""),
        instance_ids=tuple(str(i["InstanceId"]) for i in instances),
        spot_request_ids=tuple(str(r["SpotInstanceRequestId"]) for r in boxaws.find_spot_requests(ec2, tag)),
        group_ids=tuple(str(g["GroupId"]) for g in groups),
        volumes=tuple(boxaws.find_data_volumes(ec2, tag)),
        record=bool(plan.record_name and _address_records(clients, plan.zone_id, plan.record_name)),
        claimed=bool(claimed_by) or plan.slug in fleet_boxes,
        costs=bool(costs),
        kept_volume_ids=tuple(str(v["VolumeId"]) for v in _kept_volumes(ec2, tag)),
        snapshot_ids=tuple(str(s["SnapshotId"]) for s in _removal_snapshots(ec2, tag)),
        fleet_boxes=fleet_boxes,
    )


def remove_box(clients: ClientFactory, plan: BoxTeardown, owner: str, *, delete_data: bool,
               reuse_snapshot: Optional[bool] = None, profile: Optional[str] = None) -> List[str]:
    """Remove the box's instances, record, data (snapshot first), group and claim, in that order; returns the snapshots.

    The claim goes last: while it is there, a re-run finds the box and finishes what is left. A snapshot an earlier
    run took (after the box's last start) is reused when reuse_snapshot says so, by default when no instance was
    left to terminate.
    """
    ec2: EC2Client = clients("ec2")
    tag = plan.tag
    terminated = end_instances(ec2, tag)

    if plan.record_name:
        if _delete_record(clients("route53"), plan.zone_id, plan.record_name, comment=f"devbox {tag} removed"):
            print(f"deleted the A record {plan.record_name}")
        else:
            print(f"box {tag}: no A record {plan.record_name}")

    volumes = boxaws.find_data_volumes(ec2, tag)
    if not volumes:
        print(f"box {tag}: no data volume")
    # The data cannot have changed since an earlier run's snapshot if no instance was started after
    # it began (EC2 gives whole seconds; a volume is attached well after its instance starts).
    last_start = max((i["LaunchTime"] for i in boxaws.find_instances(ec2, tag, include_terminated=True)
                      if isinstance(i.get("LaunchTime"), datetime)), default=None)
    snapshots: List[str] = []
    for volume in volumes:
        volume_id = str(volume["VolumeId"])
        reuse = not terminated if reuse_snapshot is None else reuse_snapshot
        snapshot_id = _snapshot_box_data(ec2, volume, tag, reuse=reuse, after=last_start)
        snapshots.append(snapshot_id)
        if delete_data:
            print(f"deleting the data volume {volume_id} ...")
            boxaws.delete_volume(ec2, volume_id)
            print(f"deleted the data volume {volume_id}")
            print(_restore_from_snapshot_note(volume, snapshot_id, plan, ec2.meta.region_name, profile))
            continue
        _set_aside(ec2, volume_id, owner)
        print(_set_aside_note(volume, snapshot_id, plan, ec2.meta.region_name, profile))

    groups = _find_groups(ec2, tag)
    if not groups:
        print(f"box {tag}: no security group")
    for group in groups:
        group_id = str(group["GroupId"])
        if _delete_group(ec2, group_id):
            print(f"deleted the security group {group_id} ({group.get('GroupName', '')})")

    if not plan.table:
        print(f"box {tag}: no claims table recorded (BOXES_TABLE); no claim to release")
        return snapshots
    ddb: DynamoDBClient = clients("dynamodb")
    released = _release_claim(ddb, plan.table, plan.slug)
    if released is None:
        print(f"box {tag}: the claims table {plan.table} no longer exists; no claim to release")
        return snapshots
    if released:
        print(f"released the claim on {plan.slug}" + (f" (owner {owner})" if owner else ""))
    else:
        print(f"box {tag}: no claim to release")
    if _delete_item(ddb, plan.table, f"box:{plan.slug}"):
        print(f"deleted the cost record of {plan.slug}")
    return snapshots


def _find_groups(ec2: EC2Client, tag: str) -> List[Dict[str, Any]]:
    filters = [{"Name": f"tag:{boxaws.BOX_TAG}", "Values": [tag]}]
    return [
        dict(group)
        for page in ec2.get_paginator("describe_security_groups").paginate(Filters=filters)
        for group in page["SecurityGroups"]
    ]


def _kept_volumes(ec2: EC2Client, tag: str) -> List[Dict[str, Any]]:
    filters = [{"Name": f"tag:{boxaws.BOX_TAG}", "Values": [tag]}, {"Name": f"tag:{boxaws.ROLE_TAG}", "Values": [KEPT_ROLE]}]
    return [dict(v) for v in ec2.describe_volumes(Filters=filters)["Volumes"]]


def _removal_snapshots(ec2: EC2Client, tag: str) -> List[Dict[str, Any]]:
    """Snapshots `destroy --box` took of the box's data, oldest first."""
    filters = [{"Name": f"tag:{boxaws.BOX_TAG}", "Values": [tag]}, {"Name": "tag-key", "Values": [REMOVED_TAG]}]
    found = ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
    return sorted((dict(s) for s in found), key=lambda s: str(s.get("StartTime", "")))


def _snapshot_box_data(ec2: EC2Client, volume: Mapping[str, Any], tag: str, *, reuse: bool,
                       after: Optional[datetime]) -> str:
    volume_id = str(volume["VolumeId"])
    if reuse:
        earlier = [
            s for s in _removal_snapshots(ec2, tag)
            if s.get("VolumeId") == volume_id and s.get("State") in ("pending", "completed")
            and (after is None or (isinstance(s.get("StartTime"), datetime) and s["StartTime"] >= after))
        ]
        if earlier:
            snapshot_id = str(earlier[-1]["SnapshotId"])
            if earlier[-1].get("State") != "completed":
                print(f"waiting for the snapshot {snapshot_id} of {volume_id}, begun by an earlier run ...")
                ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snapshot_id], WaiterConfig=boxaws.SNAPSHOT_WAIT)
            print(f"snapshot {snapshot_id} of {volume_id} (taken by an earlier run) completed")
            return snapshot_id
    print(f"snapshotting the data volume {volume_id} ({volume.get('Size', '?')} GiB; a first snapshot takes a while) ...")
    snapshot_id = boxaws.snapshot_volume(ec2, volume_id, tag, description=f"devbox {tag}: /home at destroy --box",
                                         tags={REMOVED_TAG: _now()})
    print(f"snapshot {snapshot_id} completed")
    return snapshot_id


def _set_aside(ec2: EC2Client, volume_id: str, owner: str) -> None:
    # The app attaches the volume tagged devbox:role=data to whoever holds the box's name:
    # once the claim is released that may be someone else.
    tags = {boxaws.ROLE_TAG: KEPT_ROLE, REMOVED_TAG: _now(), **({OWNER_TAG: owner} if owner else {})}
    ec2.create_tags(Resources=[volume_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def _delete_group(ec2: EC2Client, group_id: str, wait: Optional[Mapping[str, int]] = None) -> bool:
    """Delete a security group, waiting while its instances' network interfaces still hold it; False if it was gone."""
    config = wait or GROUP_DELETE_WAIT
    for attempt in range(config["MaxAttempts"]):
        try:
            ec2.delete_security_group(GroupId=group_id)
            return True
        except ClientError as err:
            code = err.response["Error"]["Code"]
            if code == "InvalidGroup.NotFound":
                return False
            if code != "DependencyViolation":
                raise
        if attempt == 0:
            print(f"waiting for the security group {group_id} to be free (a terminated instance's network"
                  " interface holds it for a while) ...")
        if attempt < config["MaxAttempts"] - 1:
            time.sleep(config["Delay"])
    raise DeployError(f"the security group {group_id} is still in use after {config['Delay'] * config['MaxAttempts']} s"
                      " (DependencyViolation: has the box been started again?)")


def _read_item(ddb: DynamoDBClient, table: str, item_id: str) -> Dict[str, Any]:
    """One item of the boxes table (strongly consistent); {} when it, or the table, is not there."""
    try:
        answer = ddb.get_item(TableName=table, Key={"id": {"S": item_id}}, ConsistentRead=True)
    except ClientError as err:
        if err.response["Error"]["Code"] == "ResourceNotFoundException":
            return {}
        raise
    return dict(answer.get("Item") or {})


def _release_claim(ddb: DynamoDBClient, table: str, slug: str) -> Optional[bool]:
    """Take the name out of the fleet's claims; False when it held none, None when the table is gone."""
    try:
        ddb.update_item(
            TableName=table, Key={"id": {"S": FLEET_ITEM}},
            UpdateExpression="DELETE boxes :slugs REMOVE #owner",
            # Only when there is a claim: an update of a missing item would create it.
            ConditionExpression="contains(boxes, :slug) OR attribute_exists(#owner)",
            ExpressionAttributeNames={"#owner": f"owner:{slug}"},
            ExpressionAttributeValues={":slugs": {"SS": [slug]}, ":slug": {"S": slug}},
        )
    except ClientError as err:
        code = err.response["Error"]["Code"]
        if code == "ConditionalCheckFailedException":
            return False
        if code == "ResourceNotFoundException":
            return None
        raise
    return True


def _delete_item(ddb: DynamoDBClient, table: str, item_id: str) -> bool:
    answer = ddb.delete_item(TableName=table, Key={"id": {"S": item_id}}, ReturnValues="ALL_OLD")
    return bool(answer.get("Attributes"))


def _address_records(clients: ClientFactory, zone_id: str, name: str) -> List[Dict[str, Any]]:
    try:
        return boxaws.find_address_records(clients("route53"), zone_id, name)
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchHostedZone":
            raise
        return []


def _delete_record(route53: Route53Client, zone_id: str, name: str, *, comment: str) -> bool:
    try:
        return boxaws.delete_address_record(route53, zone_id, name, comment=comment)
    except ClientError as err:
        # A zone the stack created is gone once the stack is.
        if err.response["Error"]["Code"] != "NoSuchHostedZone":
            raise
        return False


def _found_text(plan: BoxTeardown, found: BoxFound, command: str = "") -> str:
    parts = [
        _count(len(found.instance_ids), "instance"),
        _count(len(found.spot_request_ids), "spot request"),
        *(f"security group {g}" for g in found.group_ids),
        *(f"data volume {v['VolumeId']} ({v.get('Size', '?')} GiB)" for v in found.volumes),
        f"A record {plan.record_name}" if found.record else "",
        "a claim" if found.claimed else "",
        "a cost record" if found.costs else "",
    ]
    text = f"box {plan.slug} of the fleet {plan.fleet}" + (f" (owner {found.owner})" if found.owner else "")
    text += ": " + ", ".join(p for p in parts if p)
    if found.snapshot_ids or found.kept_volume_ids:
        text += f"\nan earlier {command or f'`devbox destroy --box {plan.slug}`'} did not finish; removing what it left"
    return text


def _no_such_box(plan: BoxTeardown, found: BoxFound) -> str:
    text = (f"the fleet {plan.fleet} has no box named {plan.slug} (no claim, security group, instance or data"
            f" volume tagged devbox:box={plan.tag}).")
    kept = found.kept_volume_ids + found.snapshot_ids
    if kept:
        text += f" It was removed earlier; its data is kept in {', '.join(kept)}."
    elif found.fleet_boxes:
        text += f" Its boxes: {', '.join(found.fleet_boxes)}."
    return text


def _count(number: int, what: str, plural: str = "") -> str:
    return "" if number == 0 else f"{number} " + (what if number == 1 else plural or f"{what}s")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _confirm_delete_fleet_data(fleet: str, volumes: Sequence[Mapping[str, Any]],
                               boxes: Sequence[Tuple[BoxTeardown, BoxFound]], stdin: TextIO) -> bool:
    """One question for every box of the fleet, listing them, before anything is changed."""
    print(f"--delete-data deletes the data volume (/home) of each box of the fleet {fleet} once it is snapshotted"
          " (the snapshots are kept):")
    for plan, box in boxes:
        found = ", ".join(f"{v['VolumeId']} ({v.get('Size', '?')} GiB)" for v in box.volumes) or "no data volume"
        print(f"  {plan.slug}" + (f" (owner {box.owner})" if box.owner else "") + f": {found}")
    if volumes:
        print(f"and the data volume of the deployment's own box {fleet} for good, with no snapshot: "
              + ", ".join(f"{v['VolumeId']} ({v.get('Size', '?')} GiB)" for v in volumes) + ".")
    print(f"Type the deployment's name ({fleet}) to go on: ", end="", flush=True)
    return stdin.readline().strip() == fleet


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


def _set_aside_note(volume: Mapping[str, Any], snapshot_id: str, plan: BoxTeardown, region: str,
                    profile: Optional[str]) -> str:
    volume_id, size = str(volume["VolumeId"]), int(volume.get("Size", 0))
    volume_type = str(volume.get("VolumeType", "gp3"))
    monthly = size * _VOLUME_PRICE.get(volume_type, _VOLUME_PRICE["gp3"])
    options = f" --region {region}" + (f" --profile {profile}" if profile else "")
    return (
        f"kept the data volume {volume_id}, set aside ({boxaws.ROLE_TAG}={KEPT_ROLE}) so that no box that gets the"
        f" name {plan.slug} next attaches it; the snapshot {snapshot_id} holds the same data.\n"
        f"  to give it back to its owner, before their next `devbox start` (their box is {plan.slug} again unless"
        " someone has taken that name since):\n"
        f"    aws ec2 create-tags --resources {volume_id} --tags Key={boxaws.ROLE_TAG},Value={boxaws.DATA_ROLE}"
        f" Key={boxaws.BOX_TAG},Value={plan.tag}{options}\n"
        f"  keeping it costs about ${monthly:.2f} a month ({size} GiB {volume_type}), the snapshot up to"
        f" ${size * _SNAPSHOT_PRICE:.2f} a month more (us-east-1 list prices); to delete them:\n"
        f"    aws ec2 delete-volume --volume-id {volume_id}{options}\n"
        f"    aws ec2 delete-snapshot --snapshot-id {snapshot_id}{options}"
    )


def _restore_from_snapshot_note(volume: Mapping[str, Any], snapshot_id: str, plan: BoxTeardown, region: str,
                                profile: Optional[str]) -> str:
    size = int(volume.get("Size", 0))
    zone = str(volume.get("AvailabilityZone", "ZONE"))
    options = f" --region {region}" + (f" --profile {profile}" if profile else "")
    tags = (f"ResourceType=volume,Tags=[{{Key={boxaws.BOX_TAG},Value={plan.tag}}},"
            f"{{Key={boxaws.ROLE_TAG},Value={boxaws.DATA_ROLE}}}]")
    return (
        f"the snapshot {snapshot_id} keeps its /home (up to ${size * _SNAPSHOT_PRICE:.2f} a month, us-east-1 list"
        " prices).\n"
        "  to give it back to its owner, before their next `devbox start` (their box is"
        f" {plan.slug} again unless someone has taken that name since):\n"
        f"    aws ec2 create-volume --snapshot-id {snapshot_id} --availability-zone {zone} --volume-type gp3"
        f" --tag-specifications '{tags}'{options}\n"
        f"  to delete it: aws ec2 delete-snapshot --snapshot-id {snapshot_id}{options}"
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
