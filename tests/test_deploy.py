"""`devbox deploy` / `devbox destroy`: the stack, the record in .chalice/, chalice, and their order."""
import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from devbox import deploy
from devbox.deploy import (
    STACK_POLICY,
    DeployError,
    add_deploy_arguments,
    add_destroy_arguments,
    deploy_stack,
    run_deploy,
    run_destroy,
    set_negative_caching_ttl,
    template_parameters,
)
from devbox.local import FAKE_IMAGE_ID, IMAGE_PARAMETER, local_template

REPO = Path(__file__).resolve().parent.parent
# Stacks in moto come from devbox.local's copy of infra/devbox.yaml, whose AMI default
# names a parameter moto can store (moto refuses names under /aws/).
STACK_ARN = "arn:aws:cloudformation:us-east-1:123456789012:stack/devbox/5d0f7e10"
INSTANCE_ID = "i-0123456789abcdef0"
SPOT_REQUEST = "sir-abcd1234"
ZONE_ID = "Z0123456789ABCDEFGHIJ"
AWS_SOA = "ns-2048.awsdns-00.com. awsdns-hostmaster.amazon.com. 1 7200 900 1209600 86400"


class Runner:
    """Stands in for subprocess: records each command and answers with a set exit code."""

    def __init__(self, log: Optional[List[str]] = None, exit_code: int = 0) -> None:
        self.commands: List[Tuple[List[str], str, Dict[str, str]]] = []
        self.log = log if log is not None else []
        self.exit_code = exit_code

    def __call__(self, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> int:
        self.commands.append((list(argv), cwd, dict(env)))
        self.log.append("chalice " + argv[1])
        return self.exit_code


def record_calls(client: Any, log: List[str]) -> Any:
    """Append "<service>.<Operation>" to log for each call (registered before any Stubber)."""
    service = client.meta.service_model.service_name

    def record(model: Any, **_: Any) -> None:
        log.append(f"{service}.{model.name}")

    client.meta.events.register("before-parameter-build.*.*", record)
    return client


def parse(add: Callable[[argparse.ArgumentParser], None], *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    (tmp_path / ".chalice").mkdir()
    shutil.copy(REPO / ".chalice" / "config.json", tmp_path / ".chalice" / "config.json")
    return tmp_path


@pytest.fixture
def aws() -> Iterator[Dict[str, Any]]:
    """moto, with the test AMI parameter; yields a cache of moto-backed clients."""
    with mock_aws():
        boto3.client("ssm").put_parameter(Name=IMAGE_PARAMETER, Value=FAKE_IMAGE_ID, Type="String")
        yield {}


def moto_clients(cache: Dict[str, Any], log: Optional[List[str]] = None) -> Callable[[str], Any]:
    def client(service: str) -> Any:
        if service not in cache:
            cache[service] = boto3.client(service)
            if log is not None:
                record_calls(cache[service], log)
        return cache[service]

    return client


def env_of(project_dir: Path, stage: str = "dev") -> Dict[str, str]:
    return json.loads((project_dir / ".chalice" / "config.json").read_text())["stages"][stage]["environment_variables"]


def stack_description(status: str = "CREATE_COMPLETE", outputs: Optional[Dict[str, str]] = None,
                      parameters: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    return {
        "Stacks": [
            {
                "StackName": "devbox",
                "StackId": STACK_ARN,
                "CreationTime": "2024-01-01T00:00:00Z",
                "StackStatus": status,
                "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in (parameters or {}).items()],
                "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in (outputs or {}).items()],
            }
        ]
    }


# --- arguments ---------------------------------------------------------------------------


def test_only_template_options_given_become_parameters() -> None:
    args = parse(add_deploy_arguments, "--instance-type", "t3.xlarge", "--key-name", "", "--idle-minutes", "0")
    assert template_parameters(args) == {"InstanceType": "t3.xlarge", "KeyName": "", "IdleMinutes": "0"}


def test_create_hosted_zone_flag_maps_to_the_template_strings() -> None:
    assert template_parameters(parse(add_deploy_arguments, "--create-hosted-zone"))["CreateHostedZone"] == "true"
    assert template_parameters(parse(add_deploy_arguments, "--no-create-hosted-zone"))["CreateHostedZone"] == "false"
    assert "CreateHostedZone" not in template_parameters(parse(add_deploy_arguments))


def test_stage_and_profile_given_before_the_subcommand_survive_it() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile")
    parser.add_argument("--stage", default="dev")
    sub = parser.add_subparsers().add_parser("deploy", conflict_handler="resolve")
    add_deploy_arguments(sub)
    args = parser.parse_args(["--profile", "work", "--stage", "prod", "deploy"])
    assert (args.profile, args.stage, args.stack_name) == ("work", "prod", "devbox")


# --- deploy against moto -----------------------------------------------------------------


def test_deploy_creates_the_stack_records_it_then_runs_chalice_deploy(aws: Dict[str, Any], project_dir: Path) -> None:
    runner = Runner()
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--instance-type", "t3.medium")

    assert run_deploy(args, clients=moto_clients(aws), runner=runner, template_body=local_template()) == 0

    cfn = boto3.client("cloudformation")
    stack = cfn.describe_stacks(StackName="devbox")["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}["InstanceType"] == "t3.medium"
    assert env_of(project_dir)["INSTANCE_ID"] == outputs["InstanceId"]
    assert (project_dir / ".chalice" / "policy-dev.json").exists()
    (argv, cwd, env), = runner.commands
    assert argv[1:] == ["deploy", "--stage", "dev"]
    assert cwd == str(project_dir)
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"


def test_new_stack_forbids_replacing_the_instance_on_update(aws: Dict[str, Any], project_dir: Path) -> None:
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir))
    run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=local_template())

    policy = json.loads(boto3.client("cloudformation").get_stack_policy(StackName="devbox")["StackPolicyBody"])
    assert policy == STACK_POLICY
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert "Update:Replace" in deny["Action"] and deny["Resource"] == "LogicalResourceId/Instance"


def test_deploy_again_without_changes_leaves_the_stack_alone(aws: Dict[str, Any], project_dir: Path) -> None:
    log: List[str] = []
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--instance-type", "t3.medium")
    run_deploy(args, clients=moto_clients(aws, log), runner=Runner(), template_body=local_template())
    log.clear()
    runner = Runner()

    assert run_deploy(args, clients=moto_clients(aws, log), runner=runner, template_body=local_template()) == 0

    assert "cloudformation.UpdateStack" not in log
    assert len(runner.commands) == 1


# Updates are tested with a stubbed CloudFormation below: moto keeps only the parameters
# given at create time, so UsePreviousValue for a defaulted one fails there (AWS keeps all).


def test_failed_chalice_deploy_is_the_exit_code(aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir))
    assert run_deploy(args, clients=moto_clients(aws), runner=Runner(exit_code=2), template_body=local_template()) == 2
    assert "chalice deploy failed" in capsys.readouterr().err


def test_deploy_that_creates_a_zone_shortens_its_negative_caching(aws: Dict[str, Any], project_dir: Path) -> None:
    # moto's own SOA for a new zone is malformed, so Route53 is stubbed here and tested
    # against moto (with an AWS-shaped SOA) in the set_negative_caching_ttl tests.
    route53 = boto3.client("route53")
    stub = Stubber(route53)
    stub.add_response("get_hosted_zone", {"HostedZone": {"Id": "/hostedzone/Z1", "Name": "box.example.com.", "CallerReference": "x"}}, {"Id": ANY})
    stub.add_response(
        "list_resource_record_sets",
        {"ResourceRecordSets": [{"Name": "box.example.com.", "Type": "SOA", "TTL": 900, "ResourceRecords": [{"Value": AWS_SOA}]}],
         "IsTruncated": False, "MaxItems": "1"},
        {"HostedZoneId": ANY, "StartRecordName": "box.example.com.", "StartRecordType": "SOA", "MaxItems": "1"},
    )
    upsert = {"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "box.example.com.", "Type": "SOA", "TTL": 30,
        "ResourceRecords": [{"Value": AWS_SOA.rsplit(" ", 1)[0] + " 30"}]}}
    stub.add_response(
        "change_resource_record_sets",
        {"ChangeInfo": {"Id": "c1", "Status": "PENDING", "SubmittedAt": "2024-01-01T00:00:00Z"}},
        {"HostedZoneId": ANY, "ChangeBatch": {"Comment": ANY, "Changes": [upsert]}},
    )
    stub.add_response(
        "get_hosted_zone",
        {"HostedZone": {"Id": "/hostedzone/Z1", "Name": "box.example.com.", "CallerReference": "x"},
         "DelegationSet": {"NameServers": ["ns-1.example.net"]}},
        {"Id": ANY},
    )
    aws["route53"] = route53
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--domain-name", "box.example.com",
                 "--create-hosted-zone", "--negative-ttl", "30")
    with stub:
        assert run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=local_template()) == 0
        stub.assert_no_pending_responses()
    assert env_of(project_dir)["HOSTED_ZONE_ID"]


def test_deploy_with_a_zone_brought_along_leaves_its_soa_unless_asked(aws: Dict[str, Any], project_dir: Path) -> None:
    zone = boto3.client("route53").create_hosted_zone(Name="example.com", CallerReference="t")["HostedZone"]
    route53 = boto3.client("route53")
    aws["route53"] = route53
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--domain-name", "box.example.com",
                 "--hosted-zone-id", zone["Id"].rsplit("/", 1)[-1])
    with Stubber(route53) as stub:  # any Route53 call would fail: none is expected
        assert run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=local_template()) == 0
        stub.assert_no_pending_responses()
    assert env_of(project_dir)["HOSTED_ZONE_ID"] == zone["Id"].rsplit("/", 1)[-1]


# --- deploy_stack with a stubbed CloudFormation ------------------------------------------


def test_update_that_cloudformation_finds_empty_is_fine() -> None:
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description(parameters={"InstanceType": "t3.large"}), {"StackName": "devbox"})
        stub.add_response("get_template", {"TemplateBody": "older template"}, {"StackName": "devbox", "TemplateStage": "Original"})
        stub.add_client_error("update_stack", "ValidationError", "No updates are to be performed.")
        assert deploy_stack(cfn, "devbox", "new template", {}) == "unchanged"
        stub.assert_no_pending_responses()


def test_update_passes_unset_parameters_as_previous_values() -> None:
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description(parameters={"InstanceType": "t3.large", "KeyName": "me"}),
                          {"StackName": "devbox"})
        stub.add_response("get_template", {"TemplateBody": "older template"}, {"StackName": "devbox", "TemplateStage": "Original"})
        stub.add_response(
            "update_stack",
            {"StackId": STACK_ARN},
            {
                "StackName": "devbox",
                "TemplateBody": "new template",
                "Parameters": [
                    {"ParameterKey": "InstanceType", "UsePreviousValue": True},
                    {"ParameterKey": "KeyName", "ParameterValue": ""},
                    {"ParameterKey": "IdleMinutes", "ParameterValue": "45"},
                ],
                "StackPolicyBody": json.dumps(STACK_POLICY),
            },
        )
        stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE"), {"StackName": "devbox"})
        assert deploy_stack(cfn, "devbox", "new template", {"KeyName": "", "IdleMinutes": "45"}) == "updated"
        stub.assert_no_pending_responses()


def test_update_refused_by_the_stack_policy_says_how_to_rebuild() -> None:
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description(), {"StackName": "devbox"})
        stub.add_response("get_template", {"TemplateBody": "older template"}, {"StackName": "devbox", "TemplateStage": "Original"})
        stub.add_response("update_stack", {"StackId": STACK_ARN}, None)
        stub.add_response("describe_stacks", stack_description("UPDATE_ROLLBACK_COMPLETE"), {"StackName": "devbox"})
        stub.add_response(
            "describe_stack_events",
            {"StackEvents": [{
                "StackId": STACK_ARN, "EventId": "e1", "StackName": "devbox", "Timestamp": "2024-01-01T00:00:00Z",
                "LogicalResourceId": "Instance", "ResourceStatus": "UPDATE_FAILED",
                "ResourceStatusReason": "Action denied by stack policy: Update:Replace on LogicalResourceId/Instance",
            }]},
            {"StackName": "devbox"},
        )
        with pytest.raises(DeployError) as raised:
            deploy_stack(cfn, "devbox", "new template", {"InstanceType": "m7i.large"})
    assert "Action denied by stack policy" in str(raised.value)
    assert "devbox destroy" in str(raised.value)


def test_stack_left_by_a_failed_create_is_not_updated() -> None:
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description("ROLLBACK_COMPLETE"), {"StackName": "devbox"})
        with pytest.raises(DeployError, match="devbox destroy"):
            deploy_stack(cfn, "devbox", "template", {})
        stub.assert_no_pending_responses()


# --- the SOA's negative caching, against moto ---------------------------------------------


@pytest.fixture
def zone(aws: Dict[str, Any]) -> Tuple[Any, str]:
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(Name="box.example.com", CallerReference="t")["HostedZone"]["Id"]
    # moto stores its default SOA value wrapped in a dict's repr; give the zone the SOA AWS writes.
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "box.example.com.", "Type": "SOA", "TTL": 900, "ResourceRecords": [{"Value": AWS_SOA}]}}]})
    return route53, zone_id


def soa_of(route53: Any, zone_id: str) -> Dict[str, Any]:
    records = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    (soa,) = [r for r in records if r["Type"] == "SOA"]
    return dict(soa)


def test_negative_caching_ttl_changes_only_the_soa_minimum_and_ttl(zone: Tuple[Any, str]) -> None:
    route53, zone_id = zone
    value = set_negative_caching_ttl(route53, zone_id.rsplit("/", 1)[-1], 60)

    soa = soa_of(route53, zone_id)
    assert soa["TTL"] == 60
    assert soa["ResourceRecords"] == [{"Value": value}]
    assert value.split() == AWS_SOA.split()[:6] + ["60"]


def test_negative_caching_ttl_accepts_the_full_zone_id(zone: Tuple[Any, str]) -> None:
    route53, zone_id = zone
    set_negative_caching_ttl(route53, zone_id, 5)
    assert soa_of(route53, zone_id)["ResourceRecords"][0]["Value"].endswith(" 1209600 5")


def test_negative_caching_ttl_refuses_an_soa_of_unknown_form() -> None:
    route53 = boto3.client("route53")
    with Stubber(route53) as stub:
        stub.add_response("get_hosted_zone", {"HostedZone": {"Id": "/hostedzone/Z1", "Name": "box.example.com.", "CallerReference": "x"}})
        stub.add_response("list_resource_record_sets", {"ResourceRecordSets": [
            {"Name": "box.example.com.", "Type": "SOA", "TTL": 900, "ResourceRecords": [{"Value": "ns-1. host. 1 2 3"}]}],
            "IsTruncated": False, "MaxItems": "1"})
        with pytest.raises(DeployError, match="not in the expected form"):
            set_negative_caching_ttl(route53, "Z1", 60)
        stub.assert_no_pending_responses()  # and no UPSERT was queued or made


# --- destroy ------------------------------------------------------------------------------


def stubbed_clients(log: List[str]) -> Tuple[Dict[str, Any], Dict[str, Stubber]]:
    clients = {name: record_calls(boto3.client(name), log) for name in ("cloudformation", "ec2", "route53")}
    return clients, {name: Stubber(client) for name, client in clients.items()}


def test_destroy_cancels_the_spot_request_before_terminating_then_deletes_the_stack(project_dir: Path) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    outputs = {"InstanceId": INSTANCE_ID, "SecurityGroupId": "sg-0123456789abcdef0", "HostedZoneId": ZONE_ID, "DomainName": "box.example.com"}
    stubs["cloudformation"].add_response("describe_stacks", stack_description(outputs=outputs), {"StackName": "devbox"})
    running = {"InstanceId": INSTANCE_ID, "State": {"Name": "running", "Code": 16}, "SpotInstanceRequestId": SPOT_REQUEST}
    stubs["ec2"].add_response("describe_instances", {"Reservations": [{"Instances": [running]}]}, {"InstanceIds": [INSTANCE_ID]})
    stubs["ec2"].add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
        {"SpotInstanceRequestId": SPOT_REQUEST, "State": "cancelled"}]}, {"SpotInstanceRequestIds": [SPOT_REQUEST]})
    stubs["ec2"].add_response("terminate_instances", {}, {"InstanceIds": [INSTANCE_ID]})
    terminated = {**running, "State": {"Name": "terminated", "Code": 48}}
    stubs["ec2"].add_response("describe_instances", {"Reservations": [{"Instances": [terminated]}]}, {"InstanceIds": [INSTANCE_ID]})
    record = {"Name": "box.example.com.", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.7"}]}
    stubs["route53"].add_response("list_resource_record_sets", {"ResourceRecordSets": [record], "IsTruncated": False, "MaxItems": "1"},
                                  {"HostedZoneId": ZONE_ID, "StartRecordName": "box.example.com", "StartRecordType": "A", "MaxItems": "1"})
    stubs["route53"].add_response("change_resource_record_sets", {"ChangeInfo": {"Id": "c", "Status": "PENDING", "SubmittedAt": "2024-01-01T00:00:00Z"}},
                                  {"HostedZoneId": ZONE_ID, "ChangeBatch": {"Comment": ANY, "Changes": [{"Action": "DELETE", "ResourceRecordSet": record}]}})
    stubs["cloudformation"].add_response("delete_stack", {}, {"StackName": STACK_ARN})
    stubs["cloudformation"].add_response("describe_stacks", stack_description("DELETE_COMPLETE"), {"StackName": STACK_ARN})
    runner = Runner(log)
    args = parse(add_destroy_arguments, "--project-dir", str(project_dir))

    for stub in stubs.values():
        stub.activate()
    assert run_destroy(args, clients=clients.__getitem__, runner=runner) == 0
    for stub in stubs.values():
        stub.assert_no_pending_responses()

    assert log == [
        "chalice delete",
        "cloudformation.DescribeStacks",
        "ec2.DescribeInstances",
        "ec2.CancelSpotInstanceRequests",
        "ec2.TerminateInstances",
        "ec2.DescribeInstances",
        "route53.ListResourceRecordSets",
        "route53.ChangeResourceRecordSets",
        "cloudformation.DeleteStack",
        "cloudformation.DescribeStacks",
    ]
    assert runner.commands[0][0][1:] == ["delete", "--stage", "dev"]


def test_destroy_stops_when_chalice_delete_fails(project_dir: Path) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    for stub in stubs.values():
        stub.activate()
    args = parse(add_destroy_arguments, "--project-dir", str(project_dir), "--stage", "prod")

    assert run_destroy(args, clients=clients.__getitem__, runner=Runner(log, exit_code=1)) == 1
    assert log == ["chalice delete"]


def test_destroy_without_a_stack_only_deletes_the_app(project_dir: Path) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    stubs["cloudformation"].add_client_error("describe_stacks", "ValidationError", "Stack with id devbox does not exist")
    stubs["cloudformation"].activate()
    args = parse(add_destroy_arguments, "--project-dir", str(project_dir))

    assert run_destroy(args, clients=clients.__getitem__, runner=Runner(log)) == 0
    assert log == ["chalice delete", "cloudformation.DescribeStacks"]


def test_destroy_after_deploy_leaves_nothing_behind(aws: Dict[str, Any], project_dir: Path) -> None:
    deploy_args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--domain-name", "box.example.com",
                        "--create-hosted-zone")
    route53 = boto3.client("route53")
    aws["route53"] = route53
    # Skip the SOA step (moto's SOA is malformed); destroy below uses moto's Route53 for real.
    aws_clients = moto_clients(aws)
    with Stubber(route53) as stub:
        stub.add_response("get_hosted_zone", {"HostedZone": {"Id": "/hostedzone/Z1", "Name": "box.example.com.", "CallerReference": "x"}})
        stub.add_response("list_resource_record_sets", {"ResourceRecordSets": [
            {"Name": "box.example.com.", "Type": "SOA", "TTL": 900, "ResourceRecords": [{"Value": AWS_SOA}]}], "IsTruncated": False, "MaxItems": "1"})
        stub.add_response("change_resource_record_sets", {"ChangeInfo": {"Id": "c", "Status": "PENDING", "SubmittedAt": "2024-01-01T00:00:00Z"}})
        stub.add_response("get_hosted_zone", {"HostedZone": {"Id": "/hostedzone/Z1", "Name": "box.example.com.", "CallerReference": "x"}})
        assert run_deploy(deploy_args, clients=aws_clients, runner=Runner(), template_body=local_template()) == 0
    env = env_of(project_dir)
    # The app had pointed the name at the running box before it was deleted.
    route53.change_resource_record_sets(HostedZoneId=env["HOSTED_ZONE_ID"], ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "box.example.com", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.7"}]}}]})
    runner = Runner()

    assert run_destroy(parse(add_destroy_arguments, "--project-dir", str(project_dir)), clients=aws_clients, runner=runner) == 0

    (instance,) = boto3.client("ec2").describe_instances(InstanceIds=[env["INSTANCE_ID"]])["Reservations"][0]["Instances"]
    assert instance["State"]["Name"] == "terminated"
    assert boto3.client("cloudformation").list_stacks(StackStatusFilter=["CREATE_COMPLETE"])["StackSummaries"] == []
    # AWS would now delete the zone, which it refuses while the A record exists; moto
    # leaves zones behind on stack deletion, so check the record instead.
    records = boto3.client("route53").list_resource_record_sets(HostedZoneId=env["HOSTED_ZONE_ID"])["ResourceRecordSets"]
    assert sorted(r["Type"] for r in records) == ["NS", "SOA"]
    assert [c[0][1] for c in runner.commands] == ["delete"]


def test_chalice_command_carries_stage_and_profile() -> None:
    assert deploy.chalice_command("deploy", "prod", "work")[1:] == ["deploy", "--stage", "prod", "--profile", "work"]
    assert deploy.chalice_command("delete", "dev", None)[1:] == ["delete", "--stage", "dev"]
