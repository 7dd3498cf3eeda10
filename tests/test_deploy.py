"""`devbox deploy` / `devbox destroy`: the stack, the record in .chalice/, chalice, the box's tagged resources, their order."""
import argparse
import io
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
    DeployError,
    Teardown,
    add_deploy_arguments,
    add_destroy_arguments,
    deploy_stack,
    plan_teardown,
    run_deploy,
    run_destroy,
    set_negative_caching_ttl,
    template_parameters,
)
from devbox.stack import render_template

REPO = Path(__file__).resolve().parent.parent
STACK_ARN = "arn:aws:cloudformation:us-east-1:123456789012:stack/devbox/5d0f7e10"
INSTANCE_ID = "i-0123456789abcdef0"
SPOT_REQUEST = "sir-abcd1234"
VOLUME_ID = "vol-0123456789abcdef0"
SNAPSHOT_ID = "snap-0123456789abcdef0"
ZONE_ID = "Z0123456789ABCDEFGHIJ"
IMAGE_ID = "ami-0123456789abcdef0"
AWS_SOA = "ns-2048.awsdns-00.com. awsdns-hostmaster.amazon.com. 1 7200 900 1209600 86400"
SPOT_MARKET = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}
LIVE_REQUEST_STATES = ["open", "active", "disabled"]


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


class Terminal(io.StringIO):
    """A stdin that is a terminal, with the user's answer already typed."""

    def isatty(self) -> bool:
        return True


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


def template() -> str:
    # The plain template: moto takes the launch template's resolve:ssm: image literally.
    return render_template()


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    (tmp_path / ".chalice").mkdir()
    shutil.copy(REPO / ".chalice" / "config.json", tmp_path / ".chalice" / "config.json")
    return tmp_path


@pytest.fixture
def aws() -> Iterator[Dict[str, Any]]:
    """moto; yields a cache of moto-backed clients."""
    with mock_aws():
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


def deployed(aws: Dict[str, Any], project_dir: Path, *argv: str) -> Dict[str, str]:
    """Deploy the stack into moto (chalice stubbed out); returns the recorded env vars."""
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), *argv)
    assert run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=template()) == 0
    return env_of(project_dir)


def launch(box: str, launch_template_id: Optional[str] = None, **tags: str) -> Dict[str, Any]:
    """An instance as the service launches it: from the launch template, spot, tagged with the box."""
    ec2 = boto3.client("ec2")
    source: Dict[str, Any] = (
        {"LaunchTemplate": {"LaunchTemplateId": launch_template_id}} if launch_template_id else
        {"ImageId": IMAGE_ID, "InstanceType": "t3.large"}
    )
    instance = ec2.run_instances(
        MinCount=1, MaxCount=1, InstanceMarketOptions=SPOT_MARKET,  # type: ignore[arg-type]
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in
                                                                  {"devbox:box": box, **tags}.items()]}],
        **source,
    )["Instances"][0]
    return dict(instance)


def spot_request(box: str) -> str:
    """A persistent spot request tagged with the box (moto makes none for run_instances), and its instance tagged too."""
    ec2 = boto3.client("ec2")
    request = ec2.request_spot_instances(
        InstanceCount=1, Type="persistent",
        LaunchSpecification={"ImageId": IMAGE_ID, "InstanceType": "t3.large"},
        TagSpecifications=[{"ResourceType": "spot-instances-request", "Tags": [{"Key": "devbox:box", "Value": box}]}],
    )["SpotInstanceRequests"][0]
    request_id = request["SpotInstanceRequestId"]
    (described,) = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])["SpotInstanceRequests"]
    if described.get("InstanceId"):
        ec2.create_tags(Resources=[described["InstanceId"]], Tags=[{"Key": "devbox:box", "Value": box}])
    return str(request_id)


def data_volume(box: str, instance: Mapping[str, Any]) -> str:
    """The box's data volume, attached to an instance, as the service creates it."""
    ec2 = boto3.client("ec2")
    volume_id = ec2.create_volume(
        AvailabilityZone=instance["Placement"]["AvailabilityZone"], Size=50, VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [
            {"Key": "devbox:box", "Value": box}, {"Key": "devbox:role", "Value": "data"}]}],
    )["VolumeId"]
    ec2.attach_volume(VolumeId=volume_id, InstanceId=instance["InstanceId"], Device="/dev/sdf")
    return str(volume_id)


def state_of(instance_id: str) -> str:
    reservations = boto3.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def live_requests(box: str) -> List[str]:
    requests = boto3.client("ec2").describe_spot_instance_requests(Filters=[
        {"Name": "tag:devbox:box", "Values": [box]}, {"Name": "state", "Values": LIVE_REQUEST_STATES}])
    return [r["SpotInstanceRequestId"] for r in requests["SpotInstanceRequests"]]


def volumes_of(box: str) -> List[str]:
    volumes = boto3.client("ec2").describe_volumes(Filters=[{"Name": "tag:devbox:box", "Values": [box]}])["Volumes"]
    return [v["VolumeId"] for v in volumes]


def snapshots_of(box: str) -> List[Dict[str, Any]]:
    found = boto3.client("ec2").describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:devbox:box", "Values": [box]}])
    return list(found["Snapshots"])


def stack_names() -> List[str]:
    live = boto3.client("cloudformation").list_stacks()["StackSummaries"]
    return [s["StackName"] for s in live if s["StackStatus"] != "DELETE_COMPLETE"]


def destroy_args(project_dir: Path, *argv: str) -> argparse.Namespace:
    return parse(add_destroy_arguments, "--project-dir", str(project_dir), *argv)


# --- arguments ---------------------------------------------------------------------------


def test_only_template_options_given_become_parameters() -> None:
    args = parse(add_deploy_arguments, "--instance-type", "t3.xlarge", "--key-name", "", "--idle-minutes", "0")
    assert template_parameters(args) == {"InstanceType": "t3.xlarge", "KeyName": "", "IdleMinutes": "0"}


def test_image_parameter_option_sets_the_templates_image_parameter() -> None:
    args = parse(add_deploy_arguments, "--image-parameter", "/my/images/devbox")
    assert template_parameters(args) == {"ImageParameter": "/my/images/devbox"}


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


def test_destroy_keeps_the_data_unless_told_otherwise() -> None:
    assert (parse(add_destroy_arguments).delete_data, parse(add_destroy_arguments).yes) == (False, False)
    args = parse(add_destroy_arguments, "--delete-data", "--yes")
    assert (args.delete_data, args.yes) == (True, True)


# --- deploy against moto -----------------------------------------------------------------


def test_deploy_creates_the_stack_records_the_box_then_runs_chalice_deploy(aws: Dict[str, Any], project_dir: Path) -> None:
    runner = Runner()
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--instance-type", "t3.medium")

    assert run_deploy(args, clients=moto_clients(aws), runner=runner, template_body=template()) == 0

    cfn = boto3.client("cloudformation")
    stack = cfn.describe_stacks(StackName="devbox")["Stacks"][0]
    outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in stack["Outputs"]}
    env = env_of(project_dir)
    assert env["BOX_NAME"] == "devbox"
    assert env["LAUNCH_TEMPLATE_ID"] == outputs["LaunchTemplateId"]
    assert env["SECURITY_GROUP_ID"] == outputs["SecurityGroupId"]
    assert (env["SUBNET_IDS"], env["HOSTED_ZONE_ID"], env["DOMAIN_NAME"]) == ("", "", "")
    assert "INSTANCE_ID" not in env
    assert (project_dir / ".chalice" / "policy-dev.json").exists()
    # No instance in the stack: the type is the launch template's.
    assert boto3.client("ec2").describe_instances()["Reservations"] == []
    versions = boto3.client("ec2").describe_launch_template_versions(LaunchTemplateId=env["LAUNCH_TEMPLATE_ID"])
    assert versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]["InstanceType"] == "t3.medium"
    (argv, cwd, chalice_env), = runner.commands
    assert argv[1:] == ["deploy", "--stage", "dev"]
    assert cwd == str(project_dir)
    assert chalice_env["AWS_DEFAULT_REGION"] == "us-east-1"


def test_deploy_sets_no_stack_policy(aws: Dict[str, Any], project_dir: Path) -> None:
    deployed(aws, project_dir)
    assert not boto3.client("cloudformation").get_stack_policy(StackName="devbox").get("StackPolicyBody")


def test_launch_template_reads_the_image_parameter_at_launch(aws: Dict[str, Any], project_dir: Path) -> None:
    env = deployed(aws, project_dir, "--image-parameter", "/my/images/devbox")

    versions = boto3.client("ec2").describe_launch_template_versions(LaunchTemplateId=env["LAUNCH_TEMPLATE_ID"])
    assert versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]["ImageId"] == "resolve:ssm:/my/images/devbox"


def test_deploy_again_without_changes_is_unchanged(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log: List[str] = []
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--instance-type", "t3.medium")
    run_deploy(args, clients=moto_clients(aws, log), runner=Runner(), template_body=template())
    log.clear()
    capsys.readouterr()
    runner = Runner()

    assert run_deploy(args, clients=moto_clients(aws, log), runner=runner, template_body=template()) == 0

    assert "stack devbox: unchanged" in capsys.readouterr().out
    assert "cloudformation.UpdateStack" not in log
    assert len(runner.commands) == 1


# Updates are tested with a stubbed CloudFormation below: moto keeps only the parameters
# given at create time, so UsePreviousValue for a defaulted one fails there (AWS keeps all).


def test_failed_chalice_deploy_is_the_exit_code(aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir))
    assert run_deploy(args, clients=moto_clients(aws), runner=Runner(exit_code=2), template_body=template()) == 2
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
        assert run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=template()) == 0
        stub.assert_no_pending_responses()
    assert env_of(project_dir)["HOSTED_ZONE_ID"]


def test_deploy_with_a_zone_brought_along_leaves_its_soa_unless_asked(aws: Dict[str, Any], project_dir: Path) -> None:
    zone = boto3.client("route53").create_hosted_zone(Name="example.com", CallerReference="t")["HostedZone"]
    route53 = boto3.client("route53")
    aws["route53"] = route53
    args = parse(add_deploy_arguments, "--project-dir", str(project_dir), "--domain-name", "box.example.com",
                 "--hosted-zone-id", zone["Id"].rsplit("/", 1)[-1])
    with Stubber(route53) as stub:  # any Route53 call would fail: none is expected
        assert run_deploy(args, clients=moto_clients(aws), runner=Runner(), template_body=template()) == 0
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


def test_update_passes_unset_parameters_as_previous_values_and_no_stack_policy() -> None:
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
                # The template holds an IAM role: CloudFormation refuses the update without this.
                "Capabilities": ["CAPABILITY_IAM"],
            },
        )
        stub.add_response("describe_stacks", stack_description("UPDATE_COMPLETE"), {"StackName": "devbox"})
        assert deploy_stack(cfn, "devbox", "new template", {"KeyName": "", "IdleMinutes": "45"}) == "updated"
        stub.assert_no_pending_responses()


def test_failed_update_names_the_failed_resources_on_one_line() -> None:
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
                "LogicalResourceId": "LaunchTemplate", "ResourceStatus": "UPDATE_FAILED",
                "ResourceStatusReason": "Invalid instance type",
            }]},
            {"StackName": "devbox"},
        )
        with pytest.raises(DeployError) as raised:
            deploy_stack(cfn, "devbox", "new template", {"InstanceType": "x9.huge"})
    assert "LaunchTemplate: UPDATE_FAILED: Invalid instance type" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_stack_left_by_a_failed_create_is_not_updated() -> None:
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description("ROLLBACK_COMPLETE"), {"StackName": "devbox"})
        with pytest.raises(DeployError, match="devbox destroy"):
            deploy_stack(cfn, "devbox", "template", {})
        stub.assert_no_pending_responses()


def test_stack_with_the_one_instance_models_instance_is_not_updated() -> None:
    # Its instance keeps the user's files on its root disk; this template would delete it.
    cfn = boto3.client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", stack_description(outputs={"InstanceId": INSTANCE_ID}), {"StackName": "devbox"})
        with pytest.raises(DeployError, match=f"{INSTANCE_ID}.*devbox destroy"):
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


# --- what destroy removes ------------------------------------------------------------------


def test_teardown_follows_the_stacks_outputs() -> None:
    stack = stack_description(outputs={"BoxName": "work", "HostedZoneId": ZONE_ID, "DomainName": "box.example.com"})["Stacks"][0]
    assert plan_teardown("devbox", stack, {}) == Teardown(
        box_name="work", stack_id=STACK_ARN, zone_id=ZONE_ID, domain_name="box.example.com", legacy_instance_id="")


def test_teardown_of_a_failed_create_uses_the_stack_name_and_the_zone_it_was_given() -> None:
    stack = stack_description("ROLLBACK_COMPLETE", parameters={"HostedZoneId": ZONE_ID, "DomainName": "box.example.com"})["Stacks"][0]
    assert plan_teardown("devbox", stack, {}) == Teardown(
        box_name="devbox", stack_id=STACK_ARN, zone_id=ZONE_ID, domain_name="box.example.com", legacy_instance_id="")


def test_teardown_without_a_stack_finds_the_record_in_what_deploy_recorded() -> None:
    recorded = {"BOX_NAME": "devbox", "HOSTED_ZONE_ID": ZONE_ID, "DOMAIN_NAME": "box.example.com"}
    assert plan_teardown("devbox", None, recorded) == Teardown(
        box_name="devbox", stack_id=None, zone_id=ZONE_ID, domain_name="box.example.com", legacy_instance_id="")
    # What was recorded for another box is not this box's record.
    assert plan_teardown("other", None, recorded).zone_id == ""


def test_teardown_of_a_one_instance_stack_names_its_instance() -> None:
    stack = stack_description(outputs={"InstanceId": INSTANCE_ID, "SecurityGroupId": "sg-1"})["Stacks"][0]
    assert plan_teardown("devbox", stack, {}).legacy_instance_id == INSTANCE_ID


# --- destroy, call order with stubs ---------------------------------------------------------


def stubbed_clients(log: List[str]) -> Tuple[Dict[str, Any], Dict[str, Stubber]]:
    clients = {name: record_calls(boto3.client(name), log) for name in ("cloudformation", "ec2", "route53")}
    return clients, {name: Stubber(client) for name, client in clients.items()}


BOX_FILTER = {"Name": "tag:devbox:box", "Values": ["devbox"]}
LIVE_INSTANCE_FILTER = {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopping", "stopped"]}


def test_destroy_cancels_the_spot_requests_before_terminating_the_instances(project_dir: Path) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    outputs = {"BoxName": "devbox", "LaunchTemplateId": "lt-1", "SecurityGroupId": "sg-1",
               "HostedZoneId": ZONE_ID, "DomainName": "box.example.com"}
    cfn, ec2, route53 = stubs["cloudformation"], stubs["ec2"], stubs["route53"]
    cfn.add_response("describe_stacks", stack_description(outputs=outputs), {"StackName": "devbox"})
    running = {"InstanceId": INSTANCE_ID, "State": {"Name": "running", "Code": 16}, "SpotInstanceRequestId": SPOT_REQUEST}
    ec2.add_response("describe_instances", {"Reservations": [{"Instances": [running]}]}, {"Filters": [BOX_FILTER]})
    ec2.add_response("describe_spot_instance_requests", {"SpotInstanceRequests": [
        {"SpotInstanceRequestId": SPOT_REQUEST, "State": "active", "InstanceId": INSTANCE_ID}]},
        {"Filters": [BOX_FILTER, {"Name": "state", "Values": LIVE_REQUEST_STATES}]})
    ec2.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
        {"SpotInstanceRequestId": SPOT_REQUEST, "State": "cancelled"}]}, {"SpotInstanceRequestIds": [SPOT_REQUEST]})
    ec2.add_response("describe_instances", {"Reservations": [{"Instances": [running]}]},
                     {"Filters": [BOX_FILTER, LIVE_INSTANCE_FILTER]})
    ec2.add_response("terminate_instances", {}, {"InstanceIds": [INSTANCE_ID]})
    terminated = {**running, "State": {"Name": "terminated", "Code": 48}}
    ec2.add_response("describe_instances", {"Reservations": [{"Instances": [terminated]}]}, {"InstanceIds": [INSTANCE_ID]})
    record = {"Name": "box.example.com.", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.7"}]}
    route53.add_response("list_resource_record_sets", {"ResourceRecordSets": [record], "IsTruncated": False, "MaxItems": "10"},
                         {"HostedZoneId": ZONE_ID, "StartRecordName": "box.example.com", "StartRecordType": "A", "MaxItems": "10"})
    route53.add_response("change_resource_record_sets", {"ChangeInfo": {"Id": "c", "Status": "PENDING", "SubmittedAt": "2024-01-01T00:00:00Z"}},
                         {"HostedZoneId": ZONE_ID, "ChangeBatch": {"Comment": ANY, "Changes": [{"Action": "DELETE", "ResourceRecordSet": record}]}})
    volume = {"VolumeId": VOLUME_ID, "Size": 50, "VolumeType": "gp3", "State": "available"}
    ec2.add_response("describe_volumes", {"Volumes": [volume]},
                     {"Filters": [BOX_FILTER, {"Name": "tag:devbox:role", "Values": ["data"]}]})
    ec2.add_response("create_snapshot", {"SnapshotId": SNAPSHOT_ID, "VolumeId": VOLUME_ID, "State": "pending"},
                     {"VolumeId": VOLUME_ID, "Description": ANY, "TagSpecifications": ANY})
    ec2.add_response("describe_snapshots", {"Snapshots": [{"SnapshotId": SNAPSHOT_ID, "State": "completed"}]},
                     {"SnapshotIds": [SNAPSHOT_ID]})
    cfn.add_response("delete_stack", {}, {"StackName": STACK_ARN})
    cfn.add_response("describe_stacks", stack_description("DELETE_COMPLETE"), {"StackName": STACK_ARN})
    runner = Runner(log)

    for stub in stubs.values():
        stub.activate()
    assert run_destroy(destroy_args(project_dir), clients=clients.__getitem__, runner=runner) == 0
    for stub in stubs.values():
        stub.assert_no_pending_responses()

    assert log == [
        "cloudformation.DescribeStacks",
        "chalice delete",
        "ec2.DescribeInstances",
        "ec2.DescribeSpotInstanceRequests",
        "ec2.CancelSpotInstanceRequests",
        "ec2.DescribeInstances",
        "ec2.TerminateInstances",
        "ec2.DescribeInstances",
        "route53.ListResourceRecordSets",
        "route53.ChangeResourceRecordSets",
        "ec2.DescribeVolumes",
        "ec2.CreateSnapshot",
        "ec2.DescribeSnapshots",
        "cloudformation.DeleteStack",
        "cloudformation.DescribeStacks",
    ]
    assert runner.commands[0][0][1:] == ["delete", "--stage", "dev"]


def test_destroy_of_a_one_instance_stack_cancels_its_request_before_terminating_it(project_dir: Path) -> None:
    # A stack from before the box model: its instance carries no box tag, only the stack knows it.
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    cfn, ec2 = stubs["cloudformation"], stubs["ec2"]
    cfn.add_response("describe_stacks", stack_description(outputs={"InstanceId": INSTANCE_ID, "SecurityGroupId": "sg-1"}),
                     {"StackName": "devbox"})
    running = {"InstanceId": INSTANCE_ID, "State": {"Name": "running", "Code": 16}, "SpotInstanceRequestId": SPOT_REQUEST}
    ec2.add_response("describe_instances", {"Reservations": [{"Instances": [running]}]}, {"InstanceIds": [INSTANCE_ID]})
    ec2.add_response("describe_instances", {"Reservations": []}, {"Filters": [BOX_FILTER]})
    ec2.add_response("describe_spot_instance_requests", {"SpotInstanceRequests": []}, None)
    ec2.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
        {"SpotInstanceRequestId": SPOT_REQUEST, "State": "cancelled"}]}, {"SpotInstanceRequestIds": [SPOT_REQUEST]})
    ec2.add_response("describe_instances", {"Reservations": []}, {"Filters": [BOX_FILTER, LIVE_INSTANCE_FILTER]})
    ec2.add_response("terminate_instances", {}, {"InstanceIds": [INSTANCE_ID]})
    ec2.add_response("describe_instances", {"Reservations": [{"Instances": [{**running, "State": {"Name": "terminated", "Code": 48}}]}]},
                     {"InstanceIds": [INSTANCE_ID]})
    ec2.add_response("describe_volumes", {"Volumes": []}, None)
    cfn.add_response("delete_stack", {}, {"StackName": STACK_ARN})
    cfn.add_response("describe_stacks", stack_description("DELETE_COMPLETE"), {"StackName": STACK_ARN})
    for stub in stubs.values():
        stub.activate()

    assert run_destroy(destroy_args(project_dir), clients=clients.__getitem__, runner=Runner(log)) == 0

    for stub in stubs.values():
        stub.assert_no_pending_responses()
    assert log.index("ec2.CancelSpotInstanceRequests") < log.index("ec2.TerminateInstances")


def test_destroy_stops_when_chalice_delete_fails(project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    stubs["cloudformation"].add_response("describe_stacks", stack_description(outputs={"BoxName": "devbox"}), {"StackName": "devbox"})
    for stub in stubs.values():
        stub.activate()

    assert run_destroy(destroy_args(project_dir, "--stage", "prod"), clients=clients.__getitem__,
                       runner=Runner(log, exit_code=1)) == 1

    assert log == ["cloudformation.DescribeStacks", "chalice delete"]
    assert "nothing else was removed" in capsys.readouterr().err


def test_destroy_error_is_one_line_on_stderr(project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log: List[str] = []
    clients, stubs = stubbed_clients(log)
    stubs["cloudformation"].add_response("describe_stacks", stack_description(outputs={"BoxName": "devbox"}), {"StackName": "devbox"})
    stubs["ec2"].add_client_error("describe_instances", "UnauthorizedOperation", "You are not authorized")
    for stub in stubs.values():
        stub.activate()

    assert run_destroy(destroy_args(project_dir), clients=clients.__getitem__, runner=Runner(log)) == 1

    err = capsys.readouterr().err
    assert err.startswith("devbox destroy: ") and "UnauthorizedOperation" in err
    assert err.count("\n") == 1


# --- destroy against moto -------------------------------------------------------------------


def test_destroy_terminates_every_instance_of_the_box_and_leaves_no_spot_request_open(
    aws: Dict[str, Any], project_dir: Path
) -> None:
    env = deployed(aws, project_dir)
    current = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    retired = launch("devbox", env["LAUNCH_TEMPLATE_ID"], **{"devbox:retired": "2024-01-01T00:00:00Z"})
    stopped = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    boto3.client("ec2").stop_instances(InstanceIds=[stopped["InstanceId"]])
    request = spot_request("devbox")
    (requested,) = boto3.client("ec2").describe_spot_instance_requests(SpotInstanceRequestIds=[request])["SpotInstanceRequests"]
    runner = Runner()

    assert run_destroy(destroy_args(project_dir), clients=moto_clients(aws), runner=runner) == 0

    for instance_id in (current["InstanceId"], retired["InstanceId"], stopped["InstanceId"], requested["InstanceId"]):
        assert state_of(instance_id) == "terminated"
    assert live_requests("devbox") == []
    assert stack_names() == []
    assert [c[0][1] for c in runner.commands] == ["delete"]


def test_destroy_snapshots_and_keeps_the_data_volume_by_default(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deployed(aws, project_dir)
    volume_id = data_volume("devbox", launch("devbox", env["LAUNCH_TEMPLATE_ID"]))
    capsys.readouterr()

    assert run_destroy(destroy_args(project_dir), clients=moto_clients(aws), runner=Runner()) == 0

    assert volumes_of("devbox") == [volume_id]
    (snapshot,) = snapshots_of("devbox")
    assert (snapshot["VolumeId"], snapshot["State"]) == (volume_id, "completed")
    out = capsys.readouterr().out
    assert f"snapshot {snapshot['SnapshotId']} completed" in out
    # 50 GiB of gp3: what keeping it costs, and how to delete it.
    assert "$4.00 a month" in out
    assert f"aws ec2 delete-volume --volume-id {volume_id} --region us-east-1" in out
    assert stack_names() == []


def test_delete_data_with_yes_deletes_the_volume_without_a_snapshot(aws: Dict[str, Any], project_dir: Path) -> None:
    env = deployed(aws, project_dir)
    data_volume("devbox", launch("devbox", env["LAUNCH_TEMPLATE_ID"]))

    assert run_destroy(destroy_args(project_dir, "--delete-data", "--yes"), clients=moto_clients(aws), runner=Runner()) == 0

    assert volumes_of("devbox") == []
    assert snapshots_of("devbox") == []


def test_delete_data_without_yes_or_a_terminal_changes_nothing(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deployed(aws, project_dir)
    instance = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    volume_id = data_volume("devbox", instance)
    log: List[str] = []
    runner = Runner(log)

    code = run_destroy(destroy_args(project_dir, "--delete-data"), clients=moto_clients({}, log), runner=runner,
                       stdin=io.StringIO("devbox\n"))

    assert code != 0
    assert "--yes" in capsys.readouterr().err
    # The process's own stdin, not a terminal under pytest, is refused the same way.
    assert run_destroy(destroy_args(project_dir, "--delete-data"), clients=moto_clients({}, log), runner=runner) != 0
    assert log == []  # not even chalice delete
    assert state_of(instance["InstanceId"]) == "running"
    assert volumes_of("devbox") == [volume_id]
    assert stack_names() == ["devbox"]


def test_delete_data_confirmed_at_the_terminal_deletes_the_volume(aws: Dict[str, Any], project_dir: Path) -> None:
    env = deployed(aws, project_dir)
    data_volume("devbox", launch("devbox", env["LAUNCH_TEMPLATE_ID"]))

    assert run_destroy(destroy_args(project_dir, "--delete-data"), clients=moto_clients(aws), runner=Runner(),
                       stdin=Terminal("devbox\n")) == 0

    assert volumes_of("devbox") == []
    assert snapshots_of("devbox") == []


def test_delete_data_not_confirmed_at_the_terminal_changes_nothing(aws: Dict[str, Any], project_dir: Path) -> None:
    env = deployed(aws, project_dir)
    instance = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    volume_id = data_volume("devbox", instance)
    runner = Runner()

    assert run_destroy(destroy_args(project_dir, "--delete-data"), clients=moto_clients(aws), runner=runner,
                       stdin=Terminal("y\n")) == 1

    assert runner.commands == []
    assert state_of(instance["InstanceId"]) == "running"
    assert volumes_of("devbox") == [volume_id]
    assert stack_names() == ["devbox"]


def test_destroy_after_the_stack_is_gone_still_cleans_up_the_tagged_resources(
    aws: Dict[str, Any], project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(Name="example.com", CallerReference="t")["HostedZone"]["Id"].rsplit("/", 1)[-1]
    # What the last deploy recorded, and the A record the app had written into the user's zone.
    config_path = project_dir / ".chalice" / "config.json"
    config = json.loads(config_path.read_text())
    config["stages"]["dev"]["environment_variables"].update(
        {"BOX_NAME": "devbox", "HOSTED_ZONE_ID": zone_id, "DOMAIN_NAME": "box.example.com"})
    config_path.write_text(json.dumps(config))
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "box.example.com", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.7"}]}}]})
    instance = launch("devbox")
    volume_id = data_volume("devbox", instance)
    spot_request("devbox")

    assert run_destroy(destroy_args(project_dir), clients=moto_clients(aws), runner=Runner()) == 0

    assert state_of(instance["InstanceId"]) == "terminated"
    assert live_requests("devbox") == []
    assert volumes_of("devbox") == [volume_id] and len(snapshots_of("devbox")) == 1
    records = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    assert sorted(r["Type"] for r in records) == ["NS", "SOA"]
    assert "stack devbox does not exist" in capsys.readouterr().out


def test_destroy_never_touches_another_boxs_resources(aws: Dict[str, Any], project_dir: Path) -> None:
    env = deployed(aws, project_dir)
    mine = launch("devbox", env["LAUNCH_TEMPLATE_ID"])
    data_volume("devbox", mine)
    theirs = launch("devbox-alice", env["LAUNCH_TEMPLATE_ID"])
    their_volume = data_volume("devbox-alice", theirs)
    their_request = spot_request("devbox-alice")

    assert run_destroy(destroy_args(project_dir, "--delete-data", "--yes"), clients=moto_clients(aws), runner=Runner()) == 0

    assert state_of(mine["InstanceId"]) == "terminated"
    assert state_of(theirs["InstanceId"]) == "running"
    assert live_requests("devbox-alice") == [their_request]
    assert volumes_of("devbox-alice") == [their_volume]
    assert snapshots_of("devbox-alice") == []


def test_destroy_after_deploy_with_a_zone_leaves_no_record_behind(aws: Dict[str, Any], project_dir: Path) -> None:
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
        assert run_deploy(deploy_args, clients=aws_clients, runner=Runner(), template_body=template()) == 0
    env = env_of(project_dir)
    # The app had pointed the name at the running box before it was deleted.
    route53.change_resource_record_sets(HostedZoneId=env["HOSTED_ZONE_ID"], ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "box.example.com", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "198.51.100.7"}]}}]})

    assert run_destroy(destroy_args(project_dir), clients=aws_clients, runner=Runner()) == 0

    assert stack_names() == []
    # AWS would now delete the zone, which it refuses while the A record exists; moto
    # leaves zones behind on stack deletion, so check the record instead.
    records = boto3.client("route53").list_resource_record_sets(HostedZoneId=env["HOSTED_ZONE_ID"])["ResourceRecordSets"]
    assert sorted(r["Type"] for r in records) == ["NS", "SOA"]


def test_chalice_command_carries_stage_and_profile() -> None:
    assert deploy.chalice_command("deploy", "prod", "work")[1:] == ["deploy", "--stage", "prod", "--profile", "work"]
    assert deploy.chalice_command("delete", "dev", None)[1:] == ["delete", "--stage", "dev"]
