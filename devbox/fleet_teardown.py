"""`devbox destroy --box NAME`, and the fleet part of `devbox destroy`: a fleet's boxes, found by tag and removed.

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

deploy.py keeps the command line (run_destroy hands ``--box`` over to run_destroy_box) and the helpers both
share; it imports this module inside its functions, so this one may import it at the top.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Dict, List, Mapping, Optional, Sequence, Set, TextIO, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from devbox import boxaws
from devbox.boxaws import ClientFactory
from devbox.deploy import (_BOX_SLUG, _SNAPSHOT_PRICE, _VOLUME_PRICE, DeployError, Teardown, _confirm_delete_data,
                           _delete_record, _is_terminal, _recorded_env, _session_clients, _stage, _truthy,
                           CUT_OFF, cut_off, end_instances, plan_teardown)
from devbox.stack import StackError, describe_stack, stack_outputs

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
else:
    DynamoDBClient = EC2Client = Any

# The fleet's claims: one item of the boxes table; each box's costs: an item of its own.
FLEET_ITEM = "fleet"
OWNER_TAG = "devbox:owner"
# On what `destroy --box` keeps: when it was removed (snapshots, volume), and the volume's role
# once it is set aside (the app finds a box's data volume by devbox:role=data).
REMOVED_TAG = "devbox:removed"
KEPT_ROLE = "removed-data"
# On a box's group while `destroy --box` runs: the app refuses its owner's starts (chalicelib.fleet).
REMOVING_TAG = "devbox:removing"
# ... and on its claim in the fleet's item (the attribute "removing:<name>"), which goes with the claim.
REMOVING_ATTRIBUTE = "removing:"
# A terminated instance's network interface holds on to its group for a while after it is gone.
GROUP_DELETE_WAIT = {"Delay": 10, "MaxAttempts": 30}


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
class FleetFound:
    """The boxes of a fleet that `devbox destroy` (the whole deployment) removes, read before anything is removed."""

    boxes: Tuple[Tuple[BoxTeardown, BoxFound], ...]
    # Resources tagged under the fleet (<fleet>/...) with no box name after the "/": {tag value: resource ids}.
    strays: Mapping[str, Tuple[str, ...]]



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
    try:
        clients = clients or _session_clients(args)
        stack = describe_stack(clients("cloudformation"), args.stack_name)
        # A fresh checkout records no settings: the stack's claims table says a fleet may be there.
        if not _truthy(recorded.get("FLEET", "")) and "BoxesTable" not in (stack_outputs(stack) if stack else {}):
            why = "does not exist" if stack is None else "has no claims table (BoxesTable output)"
            print(
                f"devbox destroy: --box removes one box of a fleet, and stage {stage} in"
                f" {Path(args.project_dir) / '.chalice' / 'config.json'} records no FLEET=true while the stack"
                f" {args.stack_name} {why}. `devbox destroy` without --box removes the whole deployment."
                " Nothing was changed.",
                file=sys.stderr,
            )
            return 1
        plan = plan_box_teardown(args.stack_name, stack, recorded, slug)
        found = find_box(clients, plan)
        if not found.exists:
            hint = "" if _truthy(recorded.get("FLEET", "")) else f" (stage {stage} does not record FLEET=true.)"
            print(f"devbox destroy: {_no_such_box(plan, found)}{hint} Nothing was changed.", file=sys.stderr)
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
        # The app stays up: from here on it refuses its owner's starts, which would attach the data volume
        # being snapshotted and set aside (the full destroy deletes the app first instead). EC2's API is
        # eventually consistent ("Eventual consistency in the Amazon EC2 API"), and a start may have read the
        # group just before the mark: such a start may still go through; an instance it starts is ended next,
        # and one it launches after that keeps the group from being deleted, which cuts the run off for a
        # re-run to finish.
        _mark_removing(clients, plan, found)
        snapshots = remove_box(clients, plan, found.owner, delete_data=delete_data,
                               profile=getattr(args, "profile", None))
    except CUT_OFF as err:
        return cut_off(err, again)
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
        # A removal mark without its claim (a release by hand) still counts: the re-run's release clears it.
        claimed=bool(claimed_by) or plan.slug in fleet_boxes or f"{REMOVING_ATTRIBUTE}{plan.slug}" in claims,
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
    # The cost record before the claim: while the claim is there a re-run finds the box, and once it is
    # released nothing of the box is left to be mistaken for a new owner's box of the same name.
    try:
        if _delete_item(ddb, plan.table, f"box:{plan.slug}"):
            print(f"deleted the cost record of {plan.slug}")
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    released = _release_claim(ddb, plan.table, plan.slug, owner)
    if released is None:
        print(f"box {tag}: the claims table {plan.table} no longer exists; no claim to release")
        return snapshots
    if released:
        print(f"released the claim on {plan.slug}" + (f" (owner {owner})" if owner else ""))
    else:
        print(f"box {tag}: no claim of {owner or 'its owner'} to release")
    return snapshots



def _mark_removing(clients: ClientFactory, plan: BoxTeardown, found: BoxFound) -> None:
    """Mark the box's group and its owner's claim: the app refuses the owner's starts (and first starts) until the
    claim is released, so nothing of a new box appears for a re-run to take for this one's."""
    now = _now()
    marked: List[str] = []
    # A re-run marks again: CreateTags overwrites the value of a key the resource already has (EC2 API
    # reference, CreateTags).
    if found.group_ids:
        clients("ec2").create_tags(Resources=list(found.group_ids), Tags=[{"Key": REMOVING_TAG, "Value": now}])
        marked.append(f"its security group ({REMOVING_TAG})")
    if plan.table and found.owner:
        try:
            clients("dynamodb").update_item(
                TableName=plan.table, Key={"id": {"S": FLEET_ITEM}},
                UpdateExpression="SET #removing = :now",
                # Only on the owner's claim: the mark goes when the claim is released.
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames={"#removing": f"{REMOVING_ATTRIBUTE}{plan.slug}",
                                          "#owner": f"owner:{plan.slug}"},
                ExpressionAttributeValues={":now": {"S": now}, ":owner": {"S": found.owner}},
            )
            marked.append(f"its claim ({REMOVING_ATTRIBUTE}{plan.slug})")
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("ConditionalCheckFailedException", "ResourceNotFoundException"):
                raise
    if marked:
        print(f"box {plan.tag}: marked {' and '.join(marked)} as being removed; the app refuses its owner's starts"
              " until the removal has finished")


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
            # Only a snapshot begun after the box's last start is known to hold its latest data
            # (terminated instances drop out of DescribeInstances after a while: no start seen is no proof).
            and after is not None and isinstance(s.get("StartTime"), datetime) and s["StartTime"] >= after
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



def _release_claim(ddb: DynamoDBClient, table: str, slug: str, owner: str = "") -> Optional[bool]:
    """Take the name out of the fleet's claims (only the owner's claim, when the owner is known);
    False when there was none to release, None when the table is gone."""
    condition = "(contains(boxes, :slug) OR attribute_exists(#owner) OR attribute_exists(#removing))"
    values: Dict[str, Any] = {":slugs": {"SS": [slug]}, ":slug": {"S": slug}}
    if owner:
        # A name claimed again by someone else since (the app stays up under --box) is theirs.
        condition += " AND (attribute_not_exists(#owner) OR #owner = :owner)"
        values[":owner"] = {"S": owner}
    try:
        ddb.update_item(
            TableName=table, Key={"id": {"S": FLEET_ITEM}},
            UpdateExpression="DELETE boxes :slugs REMOVE #owner, #removing",
            # Only when there is a claim: an update of a missing item would create it.
            ConditionExpression=condition,
            ExpressionAttributeNames={"#owner": f"owner:{slug}", "#removing": f"{REMOVING_ATTRIBUTE}{slug}"},
            ExpressionAttributeValues=values,
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
    kept = found.snapshot_ids + found.kept_volume_ids
    if kept:
        # A finished removal (the name claimed again since) and a cut-off one leave the same traces.
        text += (f"\nan earlier {command or f'`devbox destroy --box {plan.slug}`'} kept {', '.join(kept)}: they stay;"
                 " what a cut-off run left is removed now")
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
