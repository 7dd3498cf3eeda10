"""`devbox deploy --fleet` and `devbox destroy --box NAME`, against moto.

The fleet's boxes are made by the app itself (chalicelib's fleet service: claim, group,
instance, data volume, A record), so destroy is checked against the tags the app really writes.
"""
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import boto3
import pytest

from chalicelib import aws as app_aws
from chalicelib import fleet as app_fleet
from chalicelib import fleet_service
from chalicelib.config import Config
from chalicelib.errors import StateConflictError
from devbox import boxaws, fleet_teardown
from devbox.deploy import add_deploy_arguments, add_destroy_arguments, run_destroy
from tests.test_deploy import (  # noqa: F401  (aws, project_dir: fixtures)
    Runner,
    Terminal,
    aws,
    data_volume,
    deployed,
    launch,
    live_requests,
    moto_clients,
    parse,
    project_dir,
    snapshots_of,
    spot_request,
    stack_names,
    state_of,
    volumes_of,
)

DOMAIN = "devbox.example.com"
ALICE = "arn:aws:iam::123456789012:user/alice"
BOB = "arn:aws:iam::123456789012:user/bob"
READ_ONLY = ("Describe", "Get", "List", "Scan")


class Team:
    """A fleet deployed into moto (stack, zone, table), whose boxes the app starts."""

    def __init__(self, aws: Dict[str, Any], project_dir: Path) -> None:
        self.project_dir = project_dir
        route53 = boto3.client("route53")
        self.zone_id = route53.create_hosted_zone(Name="example.com", CallerReference="fleet")["HostedZone"]["Id"]
        self.zone_id = self.zone_id.rsplit("/", 1)[-1]
        self.env = deployed(aws, project_dir, "--fleet", "--domain-name", DOMAIN, "--hosted-zone-id", self.zone_id)
        self.config = Config.from_env(self.env)
        self.ec2 = boto3.client("ec2")
        self.ddb = boto3.client("dynamodb")

    def start(self, owner: str, ip: str) -> str:
        """The owner's first start through the app, its running event, a spot request and a stopped session's cost."""
        doc = fleet_service.start(app_aws.client("ec2"), app_aws.client("dynamodb"), self.config, owner, ip)
        fleet_service.on_running(app_aws.client, self.config, doc["instance_id"])
        slug = str(doc["box"])
        # moto opens no spot request for RunInstances: one as EC2 keeps it for a spot box.
        spot_request(self.tag(slug))
        # What the app records for a stopped session: the box's cost this month, in an item of its own.
        month = datetime.now(timezone.utc).strftime("cost:%Y-%m")
        self.ddb.put_item(TableName=self.env["BOXES_TABLE"], Item={
            "id": {"S": f"box:{slug}"}, month: {"N": "0.42"}, "last_session": {"S": "i-0@earlier"}})
        return slug

    def tag(self, slug: str) -> str:
        return f"devbox/{slug}"

    def instances(self, slug: str) -> Dict[str, str]:
        found = self.ec2.describe_instances(Filters=[{"Name": "tag:devbox:box", "Values": [self.tag(slug)]}])
        return {i["InstanceId"]: i["State"]["Name"] for r in found["Reservations"] for i in r["Instances"]}

    def groups(self, slug: str) -> List[str]:
        found = self.ec2.describe_security_groups(Filters=[{"Name": "tag:devbox:box", "Values": [self.tag(slug)]}])
        return [g["GroupName"] for g in found["SecurityGroups"]]

    def records(self) -> List[str]:
        sets = boto3.client("route53").list_resource_record_sets(HostedZoneId=self.zone_id)["ResourceRecordSets"]
        return sorted(r["Name"].rstrip(".") for r in sets if r["Type"] == "A")

    def claims(self) -> Dict[str, Any]:
        item = self.ddb.get_item(TableName=self.env["BOXES_TABLE"], Key={"id": {"S": "fleet"}})["Item"]
        return {"boxes": sorted(item.get("boxes", {}).get("SS", [])),
                "owners": {k[len("owner:"):]: v["S"] for k, v in item.items() if k.startswith("owner:")}}

    def cost_records(self) -> List[str]:
        items = self.ddb.scan(TableName=self.env["BOXES_TABLE"])["Items"]
        return sorted(i["id"]["S"] for i in items if i["id"]["S"].startswith("box:"))

    def volume_tags(self, slug: str) -> Dict[str, Dict[str, str]]:
        found = self.ec2.describe_volumes(Filters=[{"Name": "tag:devbox:box", "Values": [self.tag(slug)]},
                                                  {"Name": "tag-key", "Values": ["devbox:role"]}])["Volumes"]
        return {v["VolumeId"]: {t["Key"]: t["Value"] for t in v.get("Tags", [])} for v in found}

    def live_requests(self, slug: str) -> List[str]:
        found = self.ec2.describe_spot_instance_requests(Filters=[
            {"Name": "tag:devbox:box", "Values": [self.tag(slug)]},
            {"Name": "state", "Values": ["open", "active", "disabled"]}])["SpotInstanceRequests"]
        return [r["SpotInstanceRequestId"] for r in found]

    def world(self) -> Dict[str, Any]:
        """Everything a destroy could change, to compare before and after."""
        return {
            "instances": {s: self.instances(s) for s in ("alice", "bob")},
            "groups": {s: self.groups(s) for s in ("alice", "bob")},
            "requests": {s: self.live_requests(s) for s in ("alice", "bob")},
            "volumes": {s: self.volume_tags(s) for s in ("alice", "bob")},
            "snapshots": {s: snapshots_of(self.tag(s)) for s in ("alice", "bob")},
            "records": self.records(),
            "table": sorted(json.dumps(i, sort_keys=True) for i in self.ddb.scan(TableName=self.env["BOXES_TABLE"])["Items"]),
            "stacks": stack_names(),
        }


@pytest.fixture
def team(aws: Dict[str, Any], project_dir: Path) -> Team:
    """A fleet with two running boxes, alice's and bob's."""
    team = Team(aws, project_dir)
    assert team.start(ALICE, "203.0.113.10") == "alice"
    assert team.start(BOB, "198.51.100.20") == "bob"
    return team


def destroy_box(aws: Dict[str, Any], project_dir: Path, *argv: str, log: Optional[List[str]] = None,
                stdin: Optional[io.StringIO] = None) -> int:
    runner = Runner()
    args = parse(add_destroy_arguments, "--project-dir", str(project_dir), *argv)
    code = run_destroy(args, clients=moto_clients(aws if log is None else {}, log), runner=runner, stdin=stdin)
    # One box goes: the app stays, so chalice is never run.
    assert runner.commands == []
    return code


def fail(client: Any, operation: str, code: str, times: Optional[int] = None, after: int = 0) -> None:
    """Make an operation of a moto-backed client answer with an AWS error (every time, or the first times),
    once it has succeeded ``after`` times."""
    left = [times]
    passes = [after]

    def answer(**_: Any) -> Any:
        if passes[0] > 0:
            passes[0] -= 1
            return None
        if left[0] is not None:
            if left[0] <= 0:
                return None
            left[0] -= 1
        return (type("Http", (), {"status_code": 400, "headers": {}})(),
                {"Error": {"Code": code, "Message": f"injected {code}"}, "ResponseMetadata": {"HTTPStatusCode": 400}})

    service_id = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"before-call.{service_id}.{operation}", answer)


@pytest.fixture
def quick_group_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_teardown, "GROUP_DELETE_WAIT", {"Delay": 0, "MaxAttempts": 3})


# --- destroy --box ------------------------------------------------------------------------------


def test_destroy_box_removes_only_that_box_and_keeps_its_data(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice_volumes = list(team.volume_tags("alice"))
    (alice_group,) = team.groups("alice")
    bob_before = {k: v["bob"] for k, v in team.world().items() if isinstance(v, dict)}
    capsys.readouterr()

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    out = capsys.readouterr().out
    # Every instance of the box is gone, its spot request cancelled first, its group and record deleted.
    assert set(team.instances("alice").values()) == {"terminated"}
    assert team.live_requests("alice") == []
    assert team.groups("alice") == []
    assert team.records() == [f"bob.{DOMAIN}"]
    # The claim and the box's costs are released: the name is free again.
    assert team.claims() == {"boxes": ["bob"], "owners": {"bob": BOB}}
    assert team.cost_records() == ["box:bob"]
    # The data: one completed snapshot, and the volume kept but set aside from whoever claims "alice" next.
    (snapshot,) = snapshots_of("devbox/alice")
    assert (snapshot["VolumeId"], snapshot["State"]) == (alice_volumes[0], "completed")
    assert list(team.volume_tags("alice")) == alice_volumes
    kept = team.volume_tags("alice")[alice_volumes[0]]
    assert (kept["devbox:role"], kept["devbox:owner"]) == ("removed-data", ALICE)
    assert app_fleet.one_box(team.config, app_fleet.find_groups(app_aws.client("ec2"), team.config, owner=ALICE)) is None
    # Bob's box, the stack and the app are as they were.
    assert {k: v["bob"] for k, v in team.world().items() if isinstance(v, dict)} == bob_before
    assert stack_names() == ["devbox"]
    # What the user reads: what went, the snapshot, and how to give the data back.
    assert f"deleted the A record alice.{DOMAIN}" in out
    assert "deleted the security group" in out and f"({alice_group})" in out
    assert f"released the claim on alice (owner {ALICE})" in out
    assert f"snapshot {snapshot['SnapshotId']} completed" in out
    assert (f"aws ec2 create-tags --resources {alice_volumes[0]} --tags Key=devbox:role,Value=data"
            " Key=devbox:box,Value=devbox/alice --region us-east-1") in out
    assert f"removed box alice from the fleet devbox; its data is in {snapshot['SnapshotId']}" in out


def test_destroy_box_with_delete_data_deletes_the_volume_after_its_snapshot(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (volume_id,) = team.volume_tags("alice")
    capsys.readouterr()

    assert destroy_box(aws, project_dir, "--box", "alice", "--delete-data", "--yes") == 0

    assert team.volume_tags("alice") == {}
    assert volumes_of("devbox/alice") == []  # the root volumes went with their instances
    (snapshot,) = snapshots_of("devbox/alice")
    assert (snapshot["VolumeId"], snapshot["State"]) == (volume_id, "completed")
    out = capsys.readouterr().out
    assert out.index(f"snapshot {snapshot['SnapshotId']} completed") < out.index(f"deleted the data volume {volume_id}")
    assert f"aws ec2 create-volume --snapshot-id {snapshot['SnapshotId']}" in out
    assert len(team.volume_tags("bob")) == 1


def test_destroy_box_with_delete_data_asks_first(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = team.world()

    # No terminal to ask on and no --yes: refused before anything is read or changed.
    log: List[str] = []
    assert destroy_box(aws, project_dir, "--box", "alice", "--delete-data", log=log, stdin=io.StringIO("alice\n")) == 1
    assert "--yes" in capsys.readouterr().err
    assert log == []
    # Asked at a terminal, and not confirmed.
    assert destroy_box(aws, project_dir, "--box", "alice", "--delete-data", stdin=Terminal("y\n")) == 1
    captured = capsys.readouterr()
    assert "once it is snapshotted" in captured.out and "not confirmed" in captured.err
    assert team.world() == before

    # Confirmed with the box's name.
    assert destroy_box(aws, project_dir, "--box", "alice", "--delete-data", stdin=Terminal("alice\n")) == 0
    assert team.volume_tags("alice") == {} and len(snapshots_of("devbox/alice")) == 1


def test_unknown_box_is_an_error_and_changes_nothing(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = team.world()
    capsys.readouterr()
    log: List[str] = []

    assert destroy_box(aws, project_dir, "--box", "carol", log=log) == 1

    err = capsys.readouterr().err
    assert err.startswith("devbox destroy: the fleet devbox has no box named carol")
    assert "Its boxes: alice, bob." in err and "Nothing was changed." in err
    assert log and all(call.split(".", 1)[1].startswith(READ_ONLY) for call in log), log
    assert team.world() == before


def test_box_names_that_are_not_dns_labels_are_refused_before_anything_runs() -> None:
    # A wildcard would match other boxes in EC2's tag filters.
    for name in ("*", "al*", "Alice", "a/b", "-a", "a" * 41):
        with pytest.raises(SystemExit):
            parse(add_destroy_arguments, "--box", name)


def test_box_of_a_single_box_deployment_is_not_found_and_nothing_changes(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deployed(aws, project_dir)
    instance = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    capsys.readouterr()
    log: List[str] = []

    assert destroy_box(aws, project_dir, "--box", "devbox", log=log) == 1

    err = capsys.readouterr().err
    assert "the fleet devbox has no box named devbox" in err and "Nothing was changed." in err
    assert "stage dev does not record FLEET=true" in err
    assert log and all(call.split(".", 1)[1].startswith(READ_ONLY) for call in log), log
    assert state_of(instance["InstanceId"]) == "running"
    assert stack_names() == ["devbox"]


def test_box_without_a_fleet_in_the_settings_or_the_stack_is_refused(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed(aws, project_dir)
    capsys.readouterr()
    log: List[str] = []

    assert destroy_box(aws, project_dir, "--box", "alice", "--stack-name", "gone", log=log) == 1

    err = capsys.readouterr().err
    assert "--box removes one box of a fleet" in err and "the stack gone does not exist" in err
    assert "Nothing was changed." in err
    assert log == ["cloudformation.DescribeStacks"]


def test_box_of_a_fleet_is_removed_from_a_checkout_without_its_settings(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A teammate's fresh checkout: the stage records nothing; the stack's claims table tells a fleet.
    (project_dir / ".chalice" / "config.json").unlink()

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    assert "removed box alice from the fleet devbox" in capsys.readouterr().out
    assert team.groups("alice") == [] and team.claims()["boxes"] == ["bob"]
    assert team.groups("bob") != []


def test_box_of_another_deployment_than_the_recorded_one_is_refused(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = team.world()
    capsys.readouterr()

    assert destroy_box(aws, project_dir, "--box", "alice", "--stack-name", "other") == 1

    assert "records the deployment devbox, not other" in capsys.readouterr().err
    assert team.world() == before


def test_an_owners_start_during_the_removal_of_their_box_is_refused(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Cut off at the snapshot: the group is marked and the instances are ended, the data is not kept yet.
    fail(moto_clients(aws)("ec2"), "CreateSnapshot", "IncorrectState", times=1)
    assert destroy_box(aws, project_dir, "--box", "alice") == 1
    assert ("box devbox/alice: marked its security group (devbox:removing) and its claim (removing:alice) as being"
            " removed") in capsys.readouterr().out
    volume = [v for v, tags in team.volume_tags("alice").items() if tags["devbox:role"] == "data"]

    with pytest.raises(StateConflictError, match="the box alice is being removed by an admin"):
        team.start(ALICE, "203.0.113.10")

    assert set(team.instances("alice").values()) == {"terminated"}
    assert team.volume_tags("alice")[volume[0]]["devbox:role"] == "data"
    # devbox/ never imports chalicelib: the two sides spell the marks alike.
    assert (fleet_teardown.REMOVING_TAG, fleet_teardown.REMOVING_ATTRIBUTE) == (app_fleet.REMOVING_TAG,
                                                                               app_fleet.REMOVING_ATTRIBUTE)
    # Once the removal has finished, her next start is a new box.
    assert destroy_box(aws, project_dir, "--box", "alice") == 0
    assert team.start(ALICE, "203.0.113.10") == "alice"
    assert team.volume_tags("alice")[volume[0]]["devbox:role"] == "removed-data"


def test_a_removal_mark_left_without_its_claim_is_cleared_by_a_rerun(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fail(moto_clients(aws)("ec2"), "CreateSnapshot", "IncorrectState", times=1)
    assert destroy_box(aws, project_dir, "--box", "alice") == 1
    # Someone releases the claim by hand (or an older CLI does), leaving the mark.
    team.ddb.update_item(TableName=team.env["BOXES_TABLE"], Key={"id": {"S": "fleet"}},
                         UpdateExpression="DELETE boxes :a REMOVE #o",
                         ExpressionAttributeNames={"#o": "owner:alice"},
                         ExpressionAttributeValues={":a": {"SS": ["alice"]}})
    with pytest.raises(StateConflictError, match="the box alice is being removed by an admin"):
        team.start(ALICE, "203.0.113.10")
    capsys.readouterr()

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    assert "released the claim on alice" in capsys.readouterr().out
    item = team.ddb.get_item(TableName=team.env["BOXES_TABLE"], Key={"id": {"S": "fleet"}})["Item"]
    assert "removing:alice" not in item
    assert team.start(ALICE, "203.0.113.10") == "alice"


def test_rerun_after_a_cut_off_run_finishes_what_is_left(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Cut off when the claim is released (after the claim's removal mark): instances, record, data and group are done.
    fail(moto_clients(aws)("dynamodb"), "UpdateItem", "AccessDeniedException", times=1, after=1)
    assert destroy_box(aws, project_dir, "--box", "alice") == 1
    assert "run `devbox destroy --box alice` again to finish" in capsys.readouterr().err
    assert team.groups("alice") == [] and team.claims()["boxes"] == ["alice", "bob"]
    snapshots = snapshots_of("devbox/alice")
    # Her claim is marked: a start now makes no new box for the re-run to take for this one.
    with pytest.raises(StateConflictError, match="the box alice is being removed by an admin"):
        team.start(ALICE, "203.0.113.10")
    assert team.groups("alice") == [] and team.instances("alice") == {
        i: "terminated" for i in team.instances("alice")}

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    out = capsys.readouterr().out
    assert "an earlier `devbox destroy --box alice` kept snap-" in out and "they stay" in out
    assert "box devbox/alice: no instance to terminate" in out
    assert "box devbox/alice: no security group" in out
    assert "released the claim on alice" in out
    assert team.claims() == {"boxes": ["bob"], "owners": {"bob": BOB}}
    assert not [k for k in team.ddb.get_item(TableName=team.env["BOXES_TABLE"], Key={"id": {"S": "fleet"}})["Item"]
                if k.startswith("removing:")]
    assert snapshots_of("devbox/alice") == snapshots

    # Once all is done, the box is gone: a third run says so, and where its data is.
    before = team.world()
    assert destroy_box(aws, project_dir, "--box", "alice") == 1
    err = capsys.readouterr().err
    assert "has no box named alice" in err and f"its data is kept in {list(team.volume_tags('alice'))[0]}" in err
    assert team.world() == before
    # Her next start is a new box.
    assert team.start(ALICE, "203.0.113.10") == "alice"


def test_rerun_after_a_cut_off_snapshot_uses_that_snapshot(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Cut off once the snapshot is taken, before the volume is set aside (after the group's removal mark).
    fail(moto_clients(aws)("ec2"), "CreateTags", "UnauthorizedOperation", times=1, after=1)
    assert destroy_box(aws, project_dir, "--box", "alice") == 1
    ((volume_id, tags),) = team.volume_tags("alice").items()
    assert tags["devbox:role"] == "data"
    (snapshot,) = snapshots_of("devbox/alice")
    capsys.readouterr()

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    assert f"snapshot {snapshot['SnapshotId']} of {volume_id} (taken by an earlier run) completed" in capsys.readouterr().out
    assert [s["SnapshotId"] for s in snapshots_of("devbox/alice")] == [snapshot["SnapshotId"]]
    assert team.volume_tags("alice")[volume_id]["devbox:role"] == "removed-data"
    assert team.groups("alice") == [] and team.claims()["boxes"] == ["bob"]


def test_group_held_by_a_terminated_instance_is_deleted_once_it_is_free(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str], quick_group_retry: None
) -> None:
    fail(moto_clients(aws)("ec2"), "DeleteSecurityGroup", "DependencyViolation", times=2)

    assert destroy_box(aws, project_dir, "--box", "alice") == 0

    assert "waiting for the security group" in capsys.readouterr().out
    assert team.groups("alice") == []


def test_group_that_stays_in_use_stops_the_run_before_the_claim_is_released(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str], quick_group_retry: None
) -> None:
    fail(moto_clients(aws)("ec2"), "DeleteSecurityGroup", "DependencyViolation")
    group_names = team.groups("alice")

    assert destroy_box(aws, project_dir, "--box", "alice") == 1

    err = capsys.readouterr().err
    assert "is still in use" in err and "run `devbox destroy --box alice` again to finish" in err
    assert team.groups("alice") == group_names != []
    # The claim stays, so the re-run finds the box.
    assert team.claims()["boxes"] == ["alice", "bob"]


# --- destroy (the whole deployment) of a fleet ---------------------------------------------------


def destroy_all(aws: Dict[str, Any], project_dir: Path, *argv: str, log: Optional[List[str]] = None,
                stdin: Optional[io.StringIO] = None) -> Tuple[int, Runner]:
    runner = Runner(log)
    args = parse(add_destroy_arguments, "--project-dir", str(project_dir), *argv)
    return run_destroy(args, clients=moto_clients(aws if log is None else {}, log), runner=runner, stdin=stdin), runner


def kept_data(team: Team, slug: str) -> Tuple[str, str]:
    """The box's one set-aside volume and its one snapshot."""
    ((volume_id, tags),) = team.volume_tags(slug).items()
    assert (tags["devbox:role"], tags["devbox:owner"]) == ("removed-data", {"alice": ALICE, "bob": BOB}[slug])
    (snapshot,) = snapshots_of(team.tag(slug))
    assert (snapshot["VolumeId"], snapshot["State"]) == (volume_id, "completed")
    return volume_id, snapshot["SnapshotId"]


def test_destroy_of_a_fleet_removes_every_box_keeps_their_data_then_deletes_the_stack(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    log: List[str] = []

    code, runner = destroy_all(aws, project_dir, log=log)

    assert code == 0
    assert [c[0][1] for c in runner.commands] == ["delete"]
    for slug in ("alice", "bob"):
        assert set(team.instances(slug).values()) == {"terminated"}
        assert team.live_requests(slug) == []
        assert team.groups(slug) == []
    assert team.records() == []
    assert stack_names() == []
    # The app first (nothing starts a box meanwhile), every box's spot requests before any instance is
    # terminated, the groups once the instances are gone, the stack (and its claims table) last.
    assert (log.index("chalice delete") < log.index("ec2.CancelSpotInstanceRequests")
            < log.index("ec2.TerminateInstances"))
    assert log.count("ec2.TerminateInstances") == 1  # every box's instances at once
    assert log.index("ec2.TerminateInstances") < log.index("ec2.DeleteSecurityGroup")
    assert max(i for i, call in enumerate(log) if call != "cloudformation.DescribeStacks") == log.index(
        "cloudformation.DeleteStack")
    # Each box's data: snapshotted, and the volume kept aside; the summary names them.
    out = capsys.readouterr().out
    alice_volume, alice_snapshot = kept_data(team, "alice")
    bob_volume, bob_snapshot = kept_data(team, "bob")
    assert "the fleet devbox: 2 boxes to remove (alice, bob)" in out
    assert (f"the fleet devbox: removed 2 boxes\n"
            f"  alice (owner {ALICE}): snapshot {alice_snapshot}; data volume {alice_volume} kept, set aside"
            " (devbox:role=removed-data)\n"
            f"  bob (owner {BOB}): snapshot {bob_snapshot}; data volume {bob_volume} kept, set aside"
            " (devbox:role=removed-data)\n") in out
    assert out.index("the fleet devbox: removed 2 boxes") < out.index("deleting stack devbox")
    assert "removed earlier" not in out


def test_destroy_of_a_fleet_with_delete_data_deletes_each_volume_once_it_is_snapshotted(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volumes = {slug: list(team.volume_tags(slug)) for slug in ("alice", "bob")}
    capsys.readouterr()

    assert destroy_all(aws, project_dir, "--delete-data", "--yes")[0] == 0

    out = capsys.readouterr().out
    for slug in ("alice", "bob"):
        assert team.volume_tags(slug) == {} and volumes_of(team.tag(slug)) == []
        (snapshot,) = snapshots_of(team.tag(slug))
        assert (snapshot["VolumeId"], snapshot["State"]) == (volumes[slug][0], "completed")
        assert f"snapshot {snapshot['SnapshotId']}; data volume {volumes[slug][0]} deleted" in out
        assert set(team.instances(slug).values()) == {"terminated"} and team.groups(slug) == []
    assert stack_names() == []


def test_destroy_of_a_fleet_with_delete_data_asks_once_listing_every_box(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = team.world()
    volumes = {slug: list(team.volume_tags(slug))[0] for slug in ("alice", "bob")}
    capsys.readouterr()

    # No terminal and no --yes: refused before anything is read.
    log: List[str] = []
    assert destroy_all(aws, project_dir, "--delete-data", log=log, stdin=io.StringIO("devbox\n"))[0] == 1
    assert log == [] and "--yes" in capsys.readouterr().err
    # Asked at a terminal, and not confirmed: nothing changed, not even the app.
    code, runner = destroy_all(aws, project_dir, "--delete-data", stdin=Terminal("alice\n"))
    assert (code, runner.commands) == (1, [])
    captured = capsys.readouterr()
    assert captured.out.count("Type the deployment's name (devbox) to go on") == 1
    assert f"  alice (owner {ALICE}): {volumes['alice']} (50 GiB)" in captured.out
    assert f"  bob (owner {BOB}): {volumes['bob']} (50 GiB)" in captured.out
    assert "not confirmed" in captured.err
    assert team.world() == before

    # Confirmed once, for every box.
    assert destroy_all(aws, project_dir, "--delete-data", stdin=Terminal("devbox\n"))[0] == 0
    for slug in ("alice", "bob"):
        assert team.volume_tags(slug) == {} and len(snapshots_of(team.tag(slug))) == 1
    assert stack_names() == []


def test_destroy_finds_the_fleets_boxes_when_the_stage_no_longer_says_fleet(
    team: Team, aws: Dict[str, Any], project_dir: Path
) -> None:
    # The stage's settings are gone (a fresh checkout): the boxes are found by their tags, the claims by the stack.
    config_path = project_dir / ".chalice" / "config.json"
    config = json.loads(config_path.read_text())
    config["stages"]["dev"]["environment_variables"] = {}
    config_path.write_text(json.dumps(config))

    assert destroy_all(aws, project_dir)[0] == 0

    for slug in ("alice", "bob"):
        assert set(team.instances(slug).values()) == {"terminated"} and team.groups(slug) == []
        kept_data(team, slug)
    assert stack_names() == []


def test_destroy_of_a_fleet_leaves_other_deployments_boxes_alone(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another deployment's fleet and box, whose names start like this one's.
    theirs = [launch(tag) for tag in ("devbox-2/alice", "devbox2/bob", "devbox-2")]
    their_volume = data_volume("devbox-2/alice", theirs[0])
    their_request = spot_request("devbox-2/alice")

    assert destroy_all(aws, project_dir)[0] == 0

    assert [state_of(i["InstanceId"]) for i in theirs] == ["running"] * 3
    assert live_requests("devbox-2/alice") == [their_request]
    assert volumes_of("devbox-2/alice") == [their_volume] and snapshots_of("devbox-2/alice") == []
    assert set(team.instances("bob").values()) == {"terminated"}


def test_resources_under_the_fleet_that_name_no_box_are_reported_and_their_instances_ended(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under the fleet's tag (the app's policy covers <fleet>/*), but no box name the app makes.
    odd = launch("devbox/Odd.Name")
    odd_volume = data_volume("devbox/Odd.Name", odd)
    capsys.readouterr()

    assert destroy_all(aws, project_dir)[0] == 0

    out = capsys.readouterr().out
    assert "the fleet devbox: 2 boxes to remove (alice, bob)" in out
    assert state_of(odd["InstanceId"]) == "terminated"
    assert volumes_of("devbox/Odd.Name") == [odd_volume] and snapshots_of("devbox/Odd.Name") == []
    assert (f"tagged devbox:box=devbox/Odd.Name, which names no box of the fleet: ended with the fleet's:"
            f" {odd['InstanceId']}; left as they are: {odd_volume}\n") in out
    assert stack_names() == []


def test_fleet_filter_escapes_the_fleets_name_and_box_names_are_checked() -> None:
    assert boxaws.fleet_filter("devbox") == "devbox/*"
    assert boxaws.fleet_filter("a*b?c\\d") == "a\\*b\\?c\\\\d/*"
    assert boxaws.fleet_box_name("devbox", "devbox/alice") == "alice"
    assert boxaws.fleet_box_name("devbox", "devbox/") == ""
    for tag in ("devbox", "devbox-2/alice", "devbox2/a", "dev/alice"):
        assert boxaws.fleet_box_name("devbox", tag) is None
    # A stack name holds no wildcard: what reaches a tag filter is the deployment's name, and only it.
    for name in ("dev*", "dev?", "a/b", "1devbox", ""):
        with pytest.raises(SystemExit):
            parse(add_destroy_arguments, "--stack-name", name)


def test_destroy_of_a_deployment_without_boxes_prints_nothing_of_a_fleet(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deployed(aws, project_dir)
    instance = launch("devbox", env["LAUNCH_TEMPLATE_ID"])

    assert destroy_all(aws, project_dir)[0] == 0

    assert state_of(instance["InstanceId"]) == "terminated"
    assert "fleet" not in capsys.readouterr().out
    assert stack_names() == []


def test_rerun_of_a_fleet_destroy_cut_off_at_a_group_finishes_it(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str], quick_group_retry: None
) -> None:
    # Cut off at alice's group (still held): every instance is gone, alice's record and data are done.
    fail(moto_clients(aws)("ec2"), "DeleteSecurityGroup", "DependencyViolation", times=3)
    assert destroy_all(aws, project_dir)[0] == 1
    assert "run destroy again to finish" in capsys.readouterr().err
    for slug in ("alice", "bob"):
        assert set(team.instances(slug).values()) == {"terminated"} and team.live_requests(slug) == []
    assert team.groups("alice") != [] and team.groups("bob") != []
    assert team.records() == [f"bob.{DOMAIN}"]
    alice_volume, alice_snapshot = kept_data(team, "alice")
    assert team.claims()["boxes"] == ["alice", "bob"]
    assert stack_names() == ["devbox"]

    code, runner = destroy_all(aws, project_dir)

    assert (code, [c[0][1] for c in runner.commands]) == (0, ["delete"])
    out = capsys.readouterr().out
    assert "the fleet devbox: 2 boxes to remove (alice, bob)" in out
    assert "box alice of the fleet devbox" in out and "an earlier `devbox destroy` kept" in out
    assert team.groups("alice") == [] and team.groups("bob") == [] and team.records() == []
    # alice's data as the first run left it, bob's snapshotted now; the summary names both.
    assert kept_data(team, "alice") == (alice_volume, alice_snapshot)
    bob_volume, bob_snapshot = kept_data(team, "bob")
    assert f"  alice (owner {ALICE}): no data volume" in out
    assert f"  bob (owner {BOB}): snapshot {bob_snapshot}; data volume {bob_volume} kept" in out
    assert (f"kept from the fleet's boxes removed earlier (billed until you delete them):\n"
            f"  alice: snapshot {alice_snapshot}, data volume {alice_volume} (set aside)") in out
    assert stack_names() == []

    # A third run finds nothing of the fleet left, and says where its data is.
    capsys.readouterr()
    assert destroy_all(aws, project_dir)[0] == 0
    out = capsys.readouterr().out
    assert "boxes to remove" not in out and f"  bob: snapshot {bob_snapshot}, data volume {bob_volume}" in out


def test_rerun_of_a_fleet_destroy_cut_off_before_any_instance_ended_finishes_it(
    team: Team, aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fail(moto_clients(aws)("ec2"), "TerminateInstances", "UnauthorizedOperation", times=1)
    assert destroy_all(aws, project_dir)[0] == 1
    assert team.live_requests("alice") == [] and "running" in team.instances("alice").values()

    assert destroy_all(aws, project_dir)[0] == 0

    for slug in ("alice", "bob"):
        assert set(team.instances(slug).values()) == {"terminated"} and team.groups(slug) == []
        kept_data(team, slug)
    assert stack_names() == []


# --- deploy --fleet -----------------------------------------------------------------------------


def policy_of(project_dir: Path) -> Dict[str, Any]:
    return dict(json.loads((project_dir / ".chalice" / "policy-dev.json").read_text()))


def actions_of(policy: Dict[str, Any]) -> List[str]:
    return sorted({a for s in policy["Statement"] for a in s["Action"]})


def test_deploy_fleet_records_fleet_true_and_a_policy_for_every_box(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deployed(aws, project_dir, "--fleet")

    assert (env["FLEET"], env["BOX_NAME"]) == ("true", "devbox")
    assert env["BOXES_TABLE"] and env["VPC_ID"].startswith("vpc-")
    policy = policy_of(project_dir)
    assert {"dynamodb:GetItem", "dynamodb:Scan", "dynamodb:UpdateItem", "ec2:CreateSecurityGroup"} <= set(actions_of(policy))
    (claims,) = [s for s in policy["Statement"] if s["Sid"] == "FleetClaimsAndCosts"]
    assert claims["Resource"].endswith(f":table/{env['BOXES_TABLE']}")
    (control,) = [s for s in policy["Statement"] if s["Sid"] == "ControlBoxInstances"]
    assert control["Condition"] == {"StringLike": {"ec2:ResourceTag/devbox:box": "devbox/*"}}
    out = capsys.readouterr().out
    assert "stage dev: FLEET=true" in out
    assert f"fleet: a box per IAM identity, claims in the table {env['BOXES_TABLE']}" in out
    # The app takes the recorded stage as a fleet.
    assert Config.from_env(env).fleet


def test_deploy_without_fleet_options_leaves_the_setting_and_no_fleet_turns_it_off(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed(aws, project_dir, "--fleet")
    assert deployed(aws, project_dir)["FLEET"] == "true"
    assert "dynamodb:UpdateItem" in actions_of(policy_of(project_dir))
    capsys.readouterr()

    env = deployed(aws, project_dir, "--no-fleet")

    assert env["FLEET"] == "false"
    assert not any(a.startswith("dynamodb:") for a in actions_of(policy_of(project_dir)))
    out = capsys.readouterr().out
    assert "stage dev: FLEET=false" in out
    assert "FLEET was true: the fleet's boxes" in out and "`devbox destroy --box NAME`" in out


def test_deploy_sets_the_fleets_owners_and_limit_and_keeps_the_other_settings(
    aws: Dict[str, Any], project_dir: Path
) -> None:
    config_path = project_dir / ".chalice" / "config.json"
    config = json.loads(config_path.read_text())
    config["stages"]["dev"]["environment_variables"]["ALLOWED_INSTANCE_TYPES"] = "t3.large,t3.xlarge"
    config_path.write_text(json.dumps(config))

    env = deployed(aws, project_dir, "--fleet", "--admin-owners", "arn:aws:iam::123456789012:user/ops/*",
                   "--allowed-owners", " arn:aws:iam::123456789012:user/* , arn:aws:sts::123456789012:assumed-role/dev/*",
                   "--max-boxes", "5")

    assert env["ADMIN_OWNERS"] == "arn:aws:iam::123456789012:user/ops/*"
    assert env["ALLOWED_OWNERS"] == "arn:aws:iam::123456789012:user/*,arn:aws:sts::123456789012:assumed-role/dev/*"
    assert env["MAX_BOXES"] == "5"
    assert env["ALLOWED_INSTANCE_TYPES"] == "t3.large,t3.xlarge"
    config = Config.from_env(env)
    assert (config.max_boxes, config.admin_owners) == (5, ("arn:aws:iam::123456789012:user/ops/*",))
    # "" clears a setting.
    assert deployed(aws, project_dir, "--admin-owners", "")["ADMIN_OWNERS"] == ""


def test_deploy_refuses_fleet_settings_the_app_would_refuse() -> None:
    for argv in (["--max-boxes", "0"], ["--max-boxes", "1001"], ["--admin-owners", "arn:aws:iam::1:user/a b"]):
        with pytest.raises(SystemExit):
            parse(add_deploy_arguments, *argv)


def test_a_name_claimed_by_another_owner_since_is_not_released(team: Team) -> None:
    table = team.env["BOXES_TABLE"]
    assert fleet_teardown._release_claim(team.ddb, table, "alice", "arn:aws:iam::123456789012:user/someone") is False
    assert "alice" in team.claims()["boxes"]
    assert fleet_teardown._release_claim(team.ddb, table, "alice", ALICE) is True
    assert "alice" not in team.claims().get("boxes", [])


def test_a_snapshot_is_reused_only_when_it_began_after_the_boxs_last_start(team: Team) -> None:
    slug = "alice"
    (volume,) = boxaws.find_data_volumes(team.ec2, team.tag(slug))
    first = fleet_teardown._snapshot_box_data(team.ec2, volume, team.tag(slug), reuse=True, after=None)
    # No start seen (terminated instances drop out of EC2's listing) proves nothing: a new snapshot.
    second = fleet_teardown._snapshot_box_data(team.ec2, volume, team.tag(slug), reuse=True, after=None)
    assert first != second
    began = datetime(2000, 1, 1, tzinfo=timezone.utc)
    assert fleet_teardown._snapshot_box_data(team.ec2, volume, team.tag(slug), reuse=True, after=began) == second
