"""A box per caller (FLEET=true), through the app's routes and events against moto."""
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import pytest
from botocore.exceptions import ClientError
from chalice.test import Client

from chalicelib import aws, fleet, fleet_service
from chalicelib.config import Config
from tests.conftest import (ADMIN, ALICE, BOB, DOMAIN, TABLE, CallLog, Devbox, Fleet, at_once, count_calls, signed_as,
                            state_event)



@pytest.fixture
def team(moto: None) -> Fleet:
    return Fleet()


@pytest.fixture
def caller() -> Iterator[Callable[..., None]]:
    """Make the next requests come as an IAM identity from an address, as API Gateway's context reports them."""
    who = {"arn": ALICE, "ip": "203.0.113.10"}

    def use(arn: str, ip: str = "203.0.113.10") -> None:
        who.update(arn=arn, ip=ip)

    with signed_as(who):
        yield use


@pytest.fixture
def app_client(team: Fleet, make_client: Callable[..., Client]) -> Client:
    return make_client(team.env())


def running(client: Client, team: Fleet, slug: str) -> str:
    """Deliver the running event of the box's instance (moto starts instances at once)."""
    instance_id = team.box_instances(slug)[0]["InstanceId"]
    client.lambda_.invoke("on_running", state_event(client, instance_id, "running"))
    return str(instance_id)


# --- who owns what ---------------------------------------------------------------------------


def test_each_owner_gets_their_own_box_group_and_record(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE, "203.0.113.10")
    alice = app_client.http.post("/start")
    caller(BOB, "198.51.100.20")
    bob = app_client.http.post("/start")
    assert (alice.status_code, bob.status_code) == (200, 200)
    assert (alice.json_body["box"], alice.json_body["owner"]) == ("alice", ALICE)
    assert (bob.json_body["box"], bob.json_body["owner"]) == ("bob", BOB)
    running(app_client, team, "alice")
    running(app_client, team, "bob")
    assert team.box_rules("alice") == ["203.0.113.10/32", "203.0.113.10/32"]
    assert team.box_rules("bob") == ["198.51.100.20/32", "198.51.100.20/32"]
    # The deployment's shared group lets nobody in.
    assert team.rules() == []
    assert team.record_names() == [f"alice.{DOMAIN}", f"bob.{DOMAIN}"]
    tags = {t["Key"]: t["Value"] for t in team.group("alice")["Tags"]}
    assert tags["devbox:owner"] == ALICE
    alice_instance = team.box_instances("alice")[0]
    interface_groups = [g["GroupId"] for n in alice_instance["NetworkInterfaces"] for g in n["Groups"]]
    assert interface_groups == [team.group("alice")["GroupId"]]
    caller(ALICE, "203.0.113.10")
    status = app_client.http.get("/status").json_body
    assert (status["box"], status["state"], status["dns_name"]) == ("alice", "running", f"alice.{DOMAIN}")
    assert status["allowed_ips"] == ["203.0.113.10/32"]


def test_a_box_being_removed_refuses_its_owners_start_with_409_and_launches_nothing(
        team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE)
    app_client.http.post("/start")
    app_client.http.post("/stop")
    # What `devbox destroy --box alice` puts on the box's group before it ends anything.
    team.ec2.create_tags(Resources=[team.group("alice")["GroupId"]],
                         Tags=[{"Key": fleet.REMOVING_TAG, "Value": "2026-11-29T20:00:00Z"}])
    before = [(i["InstanceId"], i["State"]["Name"]) for i in team.box_instances("alice")]
    rules = team.box_rules("alice")

    answer = app_client.http.post("/start")

    assert answer.status_code == 409
    assert "the box alice is being removed by an admin" in answer.json_body["Message"]
    assert [(i["InstanceId"], i["State"]["Name"]) for i in team.box_instances("alice")] == before
    assert team.box_rules("alice") == rules
    status = app_client.http.get("/status").json_body
    assert (status["state"], status["removing"]) == ("stopped", "2026-11-29T20:00:00Z")
    # Bob's box is not being removed.
    caller(BOB, "198.51.100.20")
    assert app_client.http.post("/start").status_code == 200


def test_a_claim_being_removed_refuses_its_owners_first_start_with_409_and_creates_nothing(
        team: Fleet, app_client: Client, caller: Callable[..., None]):
    # What a cut-off `devbox destroy --box bob` leaves: its group deleted, its claim still there and marked.
    team.ddb.put_item(TableName=TABLE, Item={"id": {"S": "fleet"}, "boxes": {"SS": ["bob"]}, "owner:bob": {"S": BOB},
                                             "removing:bob": {"S": "2026-11-29T20:00:00Z"}})
    caller(BOB, "198.51.100.20")

    answer = app_client.http.post("/start")

    assert answer.status_code == 409
    assert "the box bob is being removed by an admin" in answer.json_body["Message"]
    assert team.groups() == [] and team.box_instances("bob") == []


def test_a_claim_refused_by_a_change_since_read_is_tried_again_not_called_full(team: Fleet,
                                                                                monkeypatch: pytest.MonkeyPatch):
    # The condition failed on a name being released at that moment; by the read-back it is free.
    ddb = aws.client("dynamodb")
    update, refused = ddb.update_item, []

    def once_refused(**kwargs: Any) -> Any:
        if not refused:
            refused.append(kwargs["Key"])
            raise ClientError({"Error": {"Code": "ConditionalCheckFailedException", "Message": "The conditional"
                                         " request failed"}}, "UpdateItem")
        return update(**kwargs)

    monkeypatch.setattr(ddb, "update_item", once_refused)
    config = Config.from_env(team.env(MAX_BOXES="1"))

    assert fleet.claim(ddb, config, "alice", ALICE) is None

    item = team.ddb.get_item(TableName=TABLE, Key={"id": {"S": "fleet"}})["Item"]
    assert refused and (item["boxes"]["SS"], item["owner:alice"]["S"]) == (["alice"], ALICE)


def test_a_caller_without_a_box_sees_none_and_nothing_is_created(team: Fleet, app_client: Client,
                                                                 caller: Callable[..., None]):
    caller(BOB)
    answer = app_client.http.get("/status")
    assert answer.status_code == 200
    assert (answer.json_body["box"], answer.json_body["state"], answer.json_body["owner"]) == ("bob", "none", BOB)
    assert team.groups() == []
    stop = app_client.http.post("/stop")
    assert (stop.status_code, stop.json_body["state"]) == (200, "none")


def test_another_owners_box_answers_404_and_nothing_changes(team: Fleet, app_client: Client,
                                                            caller: Callable[..., None]):
    caller(ALICE)
    app_client.http.post("/start")
    running(app_client, team, "alice")
    caller(BOB, "198.51.100.20")
    for method, path in (("GET", "/boxes/alice"), ("POST", "/boxes/alice/stop"), ("GET", "/boxes/nobody")):
        answer = app_client.http.request(method, path, body=b"", headers={})
        assert answer.status_code == 404, (method, path)
        # A box that exists answers exactly like one that does not.
        assert answer.json_body == {"Code": "NotFound", "Message": f"no box named {path.split('/')[2]} for this caller"}
    assert team.box_instances("alice")[0]["State"]["Name"] == "running"
    assert team.box_rules("alice") == ["203.0.113.10/32", "203.0.113.10/32"]
    # Bob's own calls never see Alice's box.
    assert app_client.http.get("/status").json_body["box"] == "bob"


def test_an_owner_may_address_their_own_box_by_name(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE)
    app_client.http.post("/start")
    assert app_client.http.get("/boxes/alice").json_body["state"] == "running"
    stopped = app_client.http.post("/boxes/alice/stop")
    assert (stopped.status_code, stopped.json_body["state"]) == (200, "stopping")


def test_bad_box_names_are_refused_with_400(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE)
    for name in ("Alice", "-x", "a" * 41, "a_b"):
        assert app_client.http.get(f"/boxes/{name}").status_code == 400


# --- admins -----------------------------------------------------------------------------------


def test_an_admin_lists_every_box_and_stops_one_without_being_let_in(team: Fleet, app_client: Client,
                                                                     caller: Callable[..., None]):
    caller(ALICE, "203.0.113.10")
    app_client.http.post("/start")
    caller(BOB, "198.51.100.20")
    app_client.http.post("/start")
    app_client.http.post("/stop")
    caller(ADMIN, "192.0.2.50")
    listed = app_client.http.get("/boxes")
    assert listed.status_code == 200
    rows = {row["box"]: row for row in listed.json_body["boxes"]}
    assert sorted(rows) == ["alice", "bob"]
    assert (rows["alice"]["owner"], rows["alice"]["state"]) == (ALICE, "running")
    assert rows["alice"]["instance_type"] == "t3.large" and rows["alice"]["uptime_seconds"] is not None
    assert rows["bob"]["state"] in ("stopping", "stopped") and rows["bob"]["uptime_seconds"] is None
    assert (listed.json_body["count"], listed.json_body["max_boxes"]) == (2, 20)
    stopped = app_client.http.post("/boxes/alice/stop")
    assert (stopped.status_code, stopped.json_body["owner"]) == (200, ALICE)
    assert team.box_instances("alice")[0]["State"]["Name"] in ("stopping", "stopped")
    # The admin's address is in no box's group.
    assert "192.0.2.50/32" not in team.box_rules("alice") + team.box_rules("bob")


def test_the_listing_shows_which_boxes_are_being_removed(team: Fleet, app_client: Client,
                                                         caller: Callable[..., None]):
    for owner in (ALICE, BOB):
        caller(owner)
        app_client.http.post("/start")
    # alice's group marked; carol's claim marked after her group went (a cut-off `destroy --box carol`).
    team.ec2.create_tags(Resources=[team.group("alice")["GroupId"]],
                         Tags=[{"Key": fleet.REMOVING_TAG, "Value": "2026-11-29T20:00:00Z"}])
    team.ddb.update_item(TableName=TABLE, Key={"id": {"S": "fleet"}},
                         UpdateExpression="ADD boxes :c SET #o = :owner, #r = :at",
                         ExpressionAttributeNames={"#o": "owner:carol", "#r": "removing:carol"},
                         ExpressionAttributeValues={":c": {"SS": ["carol"]}, ":owner": {"S": "carol-arn"},
                                                    ":at": {"S": "2026-11-29T21:00:00Z"}})
    caller(ADMIN)

    rows = {row["box"]: row for row in app_client.http.get("/boxes").json_body["boxes"]}

    assert {box: row.get("removing") for box, row in rows.items()} == {
        "alice": "2026-11-29T20:00:00Z", "bob": None, "carol": "2026-11-29T21:00:00Z"}


def test_a_non_admin_listing_boxes_gets_403(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE)
    answer = app_client.http.get("/boxes")
    assert answer.status_code == 403
    assert "ADMIN_OWNERS" in answer.json_body["Message"]


def test_the_box_routes_answer_404_on_a_single_box_deployment(empty_box: Devbox, make_client: Callable[..., Client]):
    client = make_client(empty_box.env())
    answer = client.http.get("/boxes")
    assert answer.status_code == 404 and "FLEET" in answer.json_body["Message"]


# --- events touch one box only ----------------------------------------------------------------


def test_a_stopped_event_of_one_box_touches_no_other_box(team: Fleet, app_client: Client,
                                                         caller: Callable[..., None]):
    caller(ALICE, "203.0.113.10")
    app_client.http.post("/start")
    caller(BOB, "198.51.100.20")
    app_client.http.post("/start")
    alice_id = running(app_client, team, "alice")
    running(app_client, team, "bob")
    team.ec2.stop_instances(InstanceIds=[alice_id])
    app_client.lambda_.invoke("on_stopped", state_event(app_client, alice_id, "stopped"))
    assert team.box_rules("alice") == []
    assert team.box_rules("bob") == ["198.51.100.20/32", "198.51.100.20/32"]
    assert team.record_names() == [f"bob.{DOMAIN}"]


def test_an_event_of_an_instance_outside_the_fleet_changes_nothing(team: Fleet, app_client: Client,
                                                                   caller: Callable[..., None]):
    caller(ALICE)
    app_client.http.post("/start")
    running(app_client, team, "alice")
    stranger = team.launch()  # an instance tagged devbox:box=devbox (no owner slug)
    answer = app_client.lambda_.invoke("on_stopped", state_event(app_client, stranger, "stopped"))
    assert answer.payload is None
    assert team.record_names() == [f"alice.{DOMAIN}"]
    assert team.box_rules("alice") == ["203.0.113.10/32", "203.0.113.10/32"]


def test_a_stopped_session_adds_its_cost_to_the_month_once(team: Fleet, app_client: Client,
                                                           caller: Callable[..., None]):
    caller(ALICE)
    app_client.http.post("/start")
    instance_id = running(app_client, team, "alice")
    team.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "devbox:spot-price", "Value": "0.100000 t3.large x"}])
    launched = team.box_instances("alice")[0]["LaunchTime"]
    team.ec2.stop_instances(InstanceIds=[instance_id])
    event = state_event(app_client, instance_id, "stopped", when=launched + timedelta(hours=2))
    app_client.lambda_.invoke("on_stopped", event)
    app_client.lambda_.invoke("on_stopped", event)  # EventBridge may deliver twice
    item = team.ddb.get_item(TableName=TABLE, Key={"id": {"S": "box:alice"}})["Item"]
    recorded = sum(float(v["N"]) for k, v in item.items() if k.startswith("cost:"))
    assert recorded == pytest.approx(0.2, abs=0.001)
    caller(ADMIN)
    row = app_client.http.get("/boxes").json_body["boxes"][0]
    if (launched + timedelta(hours=2)).month == datetime.now(timezone.utc).month:
        assert row["cost_this_month_usd"] == pytest.approx(0.2, abs=0.001)


# --- limits -----------------------------------------------------------------------------------


def test_past_max_boxes_a_new_owner_gets_409_and_nothing_is_created(team: Fleet, make_client: Callable[..., Client],
                                                                    caller: Callable[..., None]):
    client = make_client(team.env(MAX_BOXES="1"))
    caller(ALICE)
    assert client.http.post("/start").status_code == 200
    caller(BOB)
    answer = client.http.post("/start")
    assert answer.status_code == 409
    assert "MAX_BOXES" in answer.json_body["Message"] and "1 box" in answer.json_body["Message"]
    assert [g["GroupName"] for g in team.groups()] == [f"devbox:{team.box}/alice"]
    # The owner who has a box keeps using it.
    caller(ALICE)
    assert client.http.post("/start").status_code == 200


def test_an_owner_outside_allowed_owners_gets_403_and_nothing_is_created(team: Fleet,
                                                                         make_client: Callable[..., Client],
                                                                         caller: Callable[..., None]):
    client = make_client(team.env(ALLOWED_OWNERS="arn:aws:iam::123456789012:user/a*"))
    caller(BOB)
    answer = client.http.post("/start")
    assert answer.status_code == 403 and "ALLOWED_OWNERS" in answer.json_body["Message"]
    assert team.groups() == []
    caller(ALICE)
    assert client.http.post("/start").status_code == 200


def test_bad_input_on_a_first_start_claims_nothing(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller(ALICE)
    answer = app_client.http.post("/start", body=b'{"instance_type": "x1e.32xlarge"}',
                                  headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert team.groups() == [] and "Item" not in team.ddb.get_item(TableName=TABLE, Key={"id": {"S": "fleet"}})


def test_a_call_without_an_iam_identity_is_refused(team: Fleet, app_client: Client, caller: Callable[..., None]):
    caller("")
    answer = app_client.http.get("/status")
    assert answer.status_code == 403 and "IAM identity" in answer.json_body["Message"]


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner, slug", [
    (ALICE, "alice"),
    ("arn:aws:iam::123456789012:user/eng/Bob.Smith+dev", "bob-smith-dev"),
    ("arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_Dev_abc/dana@example.com", "dana-example-com"),
    ("arn:aws:iam::123456789012:root", "root"),
])
def test_the_box_name_is_the_readable_part_of_the_identity(owner: str, slug: str):
    assert fleet.slug_of(owner) == slug


def test_a_long_name_is_cut_to_40_characters_with_a_hash_of_the_whole_identity():
    first = fleet.slug_of("arn:aws:iam::123456789012:user/" + "a" * 60)
    second = fleet.slug_of("arn:aws:iam::123456789012:user/" + "a" * 61)
    assert len(first) == 40 and first != second
    assert fleet.check_slug(first) == first


def test_owner_key_role_gives_one_box_per_role():
    config = Config(box_name="d", launch_template_id="lt-0", security_group_id="sg-0", owner_key="role")
    session = {"userArn": "arn:aws:sts::123456789012:assumed-role/Dev/alice"}
    assert fleet.owner_of(session, config) == "arn:aws:sts::123456789012:assumed-role/Dev"
    per_session = Config(box_name="d", launch_template_id="lt-0", security_group_id="sg-0")
    assert fleet.owner_of(session, per_session) == session["userArn"]


def test_two_identities_with_one_readable_name_get_two_boxes(team: Fleet, app_client: Client,
                                                             caller: Callable[..., None]):
    other_alice = "arn:aws:sts::123456789012:assumed-role/Contractors/alice"
    caller(ALICE)
    app_client.http.post("/start")
    caller(other_alice, "198.51.100.7")
    answer = app_client.http.post("/start").json_body
    assert answer["box"].startswith("alice-") and answer["owner"] == other_alice
    assert team.box_rules(answer["box"]) == ["198.51.100.7/32", "198.51.100.7/32"]
    assert app_client.http.get("/status").json_body["box"] == answer["box"]
    caller(ALICE)
    assert app_client.http.get("/status").json_body["box"] == "alice"


# --- calls ------------------------------------------------------------------------------------


@pytest.fixture
def fleet_calls(team: Fleet) -> CallLog:
    return count_calls("ec2", "route53", "dynamodb")


def test_an_owners_status_makes_two_calls(team: Fleet, app_client: Client, caller: Callable[..., None],
                                          fleet_calls: CallLog):
    caller(ALICE)
    app_client.http.post("/start")
    running(app_client, team, "alice")
    fleet_calls.reset()
    app_client.http.get("/status")
    assert sorted(fleet_calls.made) == ["DescribeInstances", "DescribeSecurityGroups"]
    fleet_calls.reset()
    app_client.http.post("/start")
    assert sorted(fleet_calls.made) == ["DescribeInstances", "DescribeSecurityGroupRules", "DescribeSecurityGroups"]


# --- starts at once ---------------------------------------------------------------------------


def test_21_owners_at_once_with_max_boxes_20_get_20_boxes_and_one_409(team: Fleet, one_request_at_a_time: None,
                                                                       client_tokens: Any):
    config = Config.from_env(team.env(MAX_BOXES="20"))
    owners = [f"arn:aws:iam::123456789012:user/dev{n:02d}" for n in range(21)]
    results = at_once([lambda o=o: fleet_service.start(aws.client("ec2"), aws.client("dynamodb"), config, o,
                                                        "203.0.113.9") for o in owners])
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1 and getattr(refused[0], "status_code", None) == 409, refused
    assert len(team.groups()) == 20
    started = [r["box"] for r in results if isinstance(r, dict)]
    assert sorted(started) == sorted(g["GroupName"].rsplit("/", 1)[1] for g in team.groups())
    assert all(len(team.box_instances(slug)) == 1 for slug in started)


def test_one_owners_8_first_starts_at_once_give_one_box(team: Fleet, one_request_at_a_time: None, client_tokens: Any):
    config = Config.from_env(team.env())
    results = at_once([lambda: fleet_service.start(aws.client("ec2"), aws.client("dynamodb"), config, ALICE,
                                                    "203.0.113.9") for _ in range(8)])
    assert all(isinstance(r, dict) and r["box"] == "alice" for r in results), results
    assert len(team.groups()) == 1
    assert len(team.box_instances("alice")) == 1
    volumes = team.ec2.describe_volumes(Filters=[{"Name": "tag:devbox:box", "Values": ["devbox/alice"]},
                                                 {"Name": "tag:devbox:role", "Values": ["data"]}])["Volumes"]
    assert len(volumes) == 1



def test_listing_the_boxes_makes_three_reads_whatever_the_fleets_size(team: Fleet, app_client: Client,
                                                                    caller: Callable[..., None],
                                                                    fleet_calls: CallLog):
    for n in range(4):
        caller(f"arn:aws:iam::123456789012:user/dev{n}")
        app_client.http.post("/start")
    caller(ADMIN)
    fleet_calls.reset()
    assert app_client.http.get("/boxes").json_body["count"] == 4
    assert sorted(fleet_calls.made) == ["DescribeInstances", "DescribeSecurityGroups", "Scan"]


def test_a_session_across_a_month_end_is_split_between_the_months():
    start = datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc)
    assert fleet.split_by_month(start, start + timedelta(hours=3), 0.5) == {"cost:2026-11": 0.5, "cost:2026-12": 1.0}
    assert fleet.split_by_month(start, start, 0.5) == {}


def test_an_identity_with_filter_wildcards_gets_its_own_box_not_the_one_it_matches(
        team: Fleet, app_client: Client, caller: Callable[..., None]):
    # An IAM user's path may hold * and ?, which EC2 reads as wildcards in filter values.
    victim, prober = "arn:aws:iam::123456789012:user/old/x", "arn:aws:iam::123456789012:user/?ld/x"
    caller(victim, "203.0.113.10")
    app_client.http.post("/start")
    caller(prober, "198.51.100.66")
    status = app_client.http.get("/status").json_body
    assert status["owner"] == prober and status["state"] == "none"
    started = app_client.http.post("/start").json_body
    assert started["owner"] == prober and started["box"] != "x"
    assert "198.51.100.66/32" not in team.box_rules("x")


def test_a_colliding_name_gets_a_suffix_nobody_can_compute_from_the_identity(team: Fleet, app_client: Client,
                                                                           caller: Callable[..., None]):
    import hashlib

    other_alice = "arn:aws:sts::123456789012:assumed-role/Contractors/alice"
    caller(ALICE)
    app_client.http.post("/start")
    caller(other_alice, "198.51.100.7")
    box = app_client.http.post("/start").json_body["box"]
    assert box.startswith("alice-") and box != "alice-" + hashlib.sha256(other_alice.encode()).hexdigest()[:8]
    # The same owner keeps that name.
    assert app_client.http.post("/start").json_body["box"] == box


def test_an_admin_sees_another_owners_box_without_their_addresses(team: Fleet, app_client: Client,
                                                                  caller: Callable[..., None]):
    caller(ALICE, "203.0.113.10")
    app_client.http.post("/start")
    assert app_client.http.get("/boxes/alice").json_body["allowed_ips"] == ["203.0.113.10/32"]
    caller(ADMIN, "192.0.2.50")
    seen = app_client.http.get("/boxes/alice").json_body
    assert (seen["box"], seen["owner"], seen["allowed_ips"]) == ("alice", ALICE, [])


def test_housekeeping_prunes_each_boxs_expired_rules_and_no_others(team: Fleet, app_client: Client,
                                                                    caller: Callable[..., None]):
    caller(ALICE, "203.0.113.10")
    app_client.http.post("/start")
    caller(BOB, "198.51.100.20")
    app_client.http.post("/start")
    old = (datetime.now(timezone.utc) - timedelta(hours=13)).strftime("%Y-%m-%dT%H:%M:%SZ")
    team.ec2.authorize_security_group_ingress(GroupId=team.group("alice")["GroupId"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": "192.0.2.9/32", "Description": f"devbox-access for=192.0.2.9 at={old}"}]}])
    event = app_client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                                resources=[], region="us-east-1")
    app_client.lambda_.invoke("housekeeping", event)
    assert team.box_rules("alice") == ["203.0.113.10/32", "203.0.113.10/32"]
    assert team.box_rules("bob") == ["198.51.100.20/32", "198.51.100.20/32"]


def test_a_claim_without_a_group_is_listed_and_counts(team: Fleet, app_client: Client, caller: Callable[..., None]):
    # A first start cut off after its claim, before it created the box's group.
    fleet.claim(aws.client("dynamodb"), Config.from_env(team.env()), "ghost", "arn:aws:iam::123456789012:user/ghost")
    caller(ADMIN)
    listed = app_client.http.get("/boxes").json_body
    assert [(b["box"], b["state"], b["owner"]) for b in listed["boxes"]] == [
        ("ghost", "none", "arn:aws:iam::123456789012:user/ghost")]
    assert listed["count"] == 1


def test_owner_key_role_gives_every_session_of_a_role_one_box(team: Fleet, make_client: Callable[..., Client],
                                                              caller: Callable[..., None]):
    client = make_client(team.env(OWNER_KEY="role"))
    caller("arn:aws:sts::123456789012:assumed-role/Dev/alice", "203.0.113.10")
    first = client.http.post("/start").json_body
    caller("arn:aws:sts::123456789012:assumed-role/Dev/bob", "198.51.100.20")
    second = client.http.post("/start").json_body
    assert first["box"] == second["box"] == "dev"
    assert first["owner"] == second["owner"] == "arn:aws:sts::123456789012:assumed-role/Dev"
    assert len(team.box_instances("dev")) == 1


def test_housekeeping_reads_the_whole_fleet_in_three_calls(team: Fleet, app_client: Client,
                                                           caller: Callable[..., None], fleet_calls: CallLog):
    for n in range(3):
        caller(f"arn:aws:iam::123456789012:user/dev{n}", f"203.0.113.{n + 1}")
        app_client.http.post("/start")
    fleet_calls.reset()
    event = app_client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event", detail={},
                                                resources=[], region="us-east-1")
    app_client.lambda_.invoke("housekeeping", event)
    assert sorted(fleet_calls.made) == ["DescribeInstances", "DescribeSecurityGroupRules", "DescribeSecurityGroups"]
    assert all(team.box_rules(f"dev{n}") == [f"203.0.113.{n + 1}/32"] * 2 for n in range(3))
