"""Shared fixtures: fake credentials, moto, the devbox's AWS resources, a Chalice test client."""
import json
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, MutableMapping, Optional, Sequence

import boto3
import pytest
from botocore.client import BaseClient
from chalice.local import LambdaEventConverter
from chalice.test import Client
from moto import mock_aws

from chalicelib import aws

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
DOMAIN = "devbox.example.com"
# moto does not check that an image exists; loading its AMI catalogue costs ~1 s a test.
IMAGE_ID = "ami-0123456789abcdef0"
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never reach a real AWS account, nor the user's own state files; start every test with fresh clients."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "DEVBOX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    aws.reset_clients()
    yield
    aws.reset_clients()


@pytest.fixture
def moto() -> Iterator[None]:
    with mock_aws():
        yield


BOX = "devbox"
SPOT_MARKET = {"MarketType": "spot",
               "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}


class Devbox:
    """The AWS resources of one devbox deployment, created in moto: a launch template, a group, a zone.

    ``launch()`` gives the box an instance and a data volume the way its first start does.
    """

    def __init__(self, with_dns: bool = True, box: str = BOX) -> None:
        self.box = box
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.route53 = boto3.client("route53", region_name=REGION)
        vpc_id = self.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        self.group_id = self.ec2.create_security_group(
            GroupName=f"{box}-access", Description="devbox access", VpcId=vpc_id
        )["GroupId"]
        self.template_id = self.ec2.create_launch_template(
            LaunchTemplateName=f"{box}-template",
            LaunchTemplateData={
                "ImageId": IMAGE_ID, "InstanceType": "t3.large",
                "NetworkInterfaces": [{"DeviceIndex": 0, "AssociatePublicIpAddress": True, "Groups": [self.group_id]}],
                "MetadataOptions": {"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
            },
        )["LaunchTemplate"]["LaunchTemplateId"]
        self.zone_id = ""
        if with_dns:
            zone = self.route53.create_hosted_zone(Name="example.com", CallerReference=f"devbox-tests-{box}")
            self.zone_id = zone["HostedZone"]["Id"].rsplit("/", 1)[-1]

    def env(self, **overrides: str) -> Dict[str, str]:
        """The stage's environment variables for this deployment."""
        values = {
            "BOX_NAME": self.box,
            "LAUNCH_TEMPLATE_ID": self.template_id,
            "SECURITY_GROUP_ID": self.group_id,
            "HOSTED_ZONE_ID": self.zone_id,
            "DOMAIN_NAME": DOMAIN if self.zone_id else "",
            "DNS_TTL": "60",
            "SSH_PORT": "22",
        }
        values.update(overrides)
        return values

    def launch(self, instance_type: str = "t3.large", spot: bool = True, zone_index: int = 0) -> str:
        """Give the box a running instance with its data volume attached (as a first start plus its running event)."""
        subnet = self.subnets()[zone_index]
        kwargs: Dict[str, Any] = {"InstanceMarketOptions": SPOT_MARKET} if spot else {}
        instance = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.template_id, "Version": "$Latest"}, MinCount=1, MaxCount=1,
            InstanceType=instance_type,
            NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet["SubnetId"], "Groups": [self.group_id],
                                "AssociatePublicIpAddress": True}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "devbox:box", "Value": self.box}]}],
            **kwargs,
        )["Instances"][0]
        volume = self.ec2.create_volume(
            AvailabilityZone=subnet["AvailabilityZone"], Size=50, VolumeType="gp3", Encrypted=True,
            TagSpecifications=[{"ResourceType": "volume", "Tags": [
                {"Key": "devbox:box", "Value": self.box}, {"Key": "devbox:role", "Value": "data"}]}],
        )
        self.ec2.create_tags(Resources=[instance["InstanceId"]],
                             Tags=[{"Key": "devbox:volume", "Value": volume["VolumeId"]}])
        self.ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=instance["InstanceId"], Device="/dev/sdf")
        return str(instance["InstanceId"])

    def subnets(self) -> List[Dict[str, Any]]:
        """The default VPC's default subnets, ordered by zone (as the app orders them)."""
        found = self.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        return sorted(found, key=lambda s: (s["AvailabilityZone"], s["SubnetId"]))

    def instances(self, live_only: bool = True) -> List[Dict[str, Any]]:
        """The box's instances (by tag), oldest first; live ones only unless told otherwise."""
        found = [i for r in self.ec2.describe_instances(
            Filters=[{"Name": "tag:devbox:box", "Values": [self.box]}])["Reservations"] for i in r["Instances"]]
        if live_only:
            found = [i for i in found if i["State"]["Name"] not in ("shutting-down", "terminated")]
        return sorted(found, key=lambda i: (i["LaunchTime"], i["InstanceId"]))

    def current(self) -> Dict[str, Any]:
        """The box's current instance: live and not retired (exactly one, or the test fails)."""
        current = [i for i in self.instances() if not any(t["Key"] == "devbox:retired" for t in i.get("Tags", []))]
        assert len(current) == 1, f"the box has {len(current)} current instances"
        return current[0]

    @property
    def instance_id(self) -> str:
        return str(self.current()["InstanceId"])

    def volumes(self) -> List[Dict[str, Any]]:
        """The box's data volumes."""
        return list(self.ec2.describe_volumes(Filters=[
            {"Name": "tag:devbox:box", "Values": [self.box]}, {"Name": "tag:devbox:role", "Values": ["data"]}])["Volumes"])

    def state(self) -> str:
        return str(self.current()["State"]["Name"])

    def public_ip(self) -> Optional[str]:
        return self.current().get("PublicIpAddress")

    def stop(self) -> None:
        self.ec2.stop_instances(InstanceIds=[self.instance_id])

    def interrupt(self) -> None:
        """Stop the current instance the way the spot service does (moto never does it by itself)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instances import StateReason

        instance_id = self.instance_id
        self.ec2.stop_instances(InstanceIds=[instance_id])
        found = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id)
        found.state_reason = StateReason("Server.SpotInstanceShutdown: Spot Instance shutdown", "Server.SpotInstanceShutdown")

    def rules(self) -> List[Dict[str, Any]]:
        """Inbound rules of the group."""
        found = self.ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [self.group_id]}])
        return [r for r in found["SecurityGroupRules"] if not r["IsEgress"]]

    def rule_cidrs(self) -> List[str]:
        return sorted(r.get("CidrIpv4") or r.get("CidrIpv6") for r in self.rules())

    def add_manual_rule(self, cidr: str = "198.51.100.0/24", port: int = 22) -> None:
        """A rule a person added by hand (no devbox description)."""
        self.ec2.authorize_security_group_ingress(
            GroupId=self.group_id,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                            "IpRanges": [{"CidrIp": cidr, "Description": "office"}]}],
        )

    def a_records(self) -> List[Dict[str, Any]]:
        if not self.zone_id:
            return []
        sets = self.route53.list_resource_record_sets(HostedZoneId=self.zone_id)["ResourceRecordSets"]
        return [r for r in sets if r["Type"] == "A"]


ALICE = "arn:aws:iam::123456789012:user/alice"
BOB = "arn:aws:iam::123456789012:user/bob"
ADMIN = "arn:aws:iam::123456789012:user/ops/carol"
TABLE = "devbox-boxes"


class Fleet(Devbox):
    """A fleet deployment in moto: the shared launch template, group and zone, and the claims table."""

    def __init__(self) -> None:
        super().__init__()
        self.ddb = boto3.client("dynamodb", region_name=REGION)
        self.ddb.create_table(TableName=TABLE, AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                              KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}], BillingMode="PAY_PER_REQUEST")

    def env(self, **overrides: str) -> Dict[str, str]:
        values = {"FLEET": "true", "BOXES_TABLE": TABLE, "ADMIN_OWNERS": ADMIN}
        values.update(overrides)
        return super().env(**values)

    def group(self, slug: str) -> Dict[str, Any]:
        found = self.ec2.describe_security_groups(
            Filters=[{"Name": "tag:devbox:box", "Values": [f"{self.box}/{slug}"]}])["SecurityGroups"]
        assert len(found) == 1, f"{slug} has {len(found)} groups"
        return dict(found[0])

    def groups(self) -> List[Dict[str, Any]]:
        return list(self.ec2.describe_security_groups(
            Filters=[{"Name": "tag:devbox:box", "Values": [f"{self.box}/*"]}])["SecurityGroups"])

    def box_rules(self, slug: str) -> List[str]:
        # Every address of every permission (moto merges addresses on one port into one permission).
        return sorted(r["CidrIp"] for p in self.group(slug)["IpPermissions"] for r in p.get("IpRanges", []))

    def box_instances(self, slug: str) -> List[Dict[str, Any]]:
        return [i for r in self.ec2.describe_instances(Filters=[
            {"Name": "tag:devbox:box", "Values": [f"{self.box}/{slug}"]}])["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] not in ("shutting-down", "terminated")]

    def record_names(self) -> List[str]:
        return sorted(r["Name"].rstrip(".") for r in self.a_records())


@pytest.fixture
def empty_box(moto: None) -> Devbox:
    """A deployment whose box was never started: no instance, no data volume."""
    return Devbox()


@pytest.fixture
def devbox(empty_box: Devbox) -> Devbox:
    """A running spot devbox with its data volume, group and hosted zone."""
    empty_box.launch()
    return empty_box


@pytest.fixture
def stopped_devbox(devbox: Devbox) -> Devbox:
    devbox.stop()
    return devbox


def write_project(directory: Path, env: Dict[str, str]) -> Path:
    """A Chalice project folder whose dev stage carries the given environment."""
    chalice_dir = directory / ".chalice"
    chalice_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    config["stages"]["dev"]["environment_variables"] = env
    (chalice_dir / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., Client]]:
    """Build a chalice test client for the app with a given stage environment."""
    from app import app

    clients: List[Client] = []

    def build(env: Dict[str, str]) -> Client:
        project = write_project(tmp_path / f"project{len(clients)}", env)
        test_client = Client(app, stage_name="dev", project_dir=str(project))
        clients.append(test_client)
        return test_client

    yield build


@pytest.fixture
def api(devbox: Devbox, make_client: Callable[..., Client]) -> Client:
    return make_client(devbox.env())


@pytest.fixture
def caller_ip(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make the next requests come from another source IP (as API Gateway reports it)."""

    def use(ip: str) -> None:
        monkeypatch.setattr(LambdaEventConverter, "LOCAL_SOURCE_IP", ip)

    return use


def state_event(client: Client, instance_id: str, state: str, when: Optional[datetime] = None) -> Dict[str, Any]:
    """An EC2 state-change event as EventBridge delivers it."""
    event = client.events.generate_cw_event(
        source="aws.ec2",
        detail_type="EC2 Instance State-change Notification",
        detail={"instance-id": instance_id, "state": state},
        resources=[f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
        region=REGION,
    )
    event["time"] = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return event


READS = ["DescribeInstances", "DescribeSecurityGroupRules"]


def in_order(calls: List[str]) -> List[str]:
    """Calls with the two reads made side by side (in either order) put in one order."""
    return READS + calls[2:] if sorted(calls[:2]) == READS else list(calls)


class CallLog:
    """AWS API calls made through the app's clients, recorded with botocore's event hooks.

    ``calls`` lists them in order, except that the two reads /status and /start make side by
    side (instances and rules) are always listed instances first.
    """

    def __init__(self) -> None:
        self.made: List[str] = []

    @property
    def calls(self) -> List[str]:
        return in_order(self.made)

    def record(self, model: Any, **_: Any) -> None:
        self.made.append(model.name)

    def reset(self) -> None:
        self.made.clear()


def count_calls(*services: str) -> CallLog:
    """A CallLog of every API call the app's clients of these services make."""
    log = CallLog()
    for service in services:
        aws.client(service).meta.events.register("before-call", log.record)
    return log


@pytest.fixture
def aws_calls(moto: None) -> CallLog:
    """Count every API call the app's EC2 and Route53 clients make."""
    return count_calls("ec2", "route53", "sns")


@contextmanager
def signed_as(who: MutableMapping[str, str]) -> Iterator[None]:
    """While open, chalice's test client's requests carry ``who["arn"]`` as the caller's IAM identity and
    ``who["ip"]`` as its address, as API Gateway's request context reports them (change ``who`` between calls)."""
    original = LambdaEventConverter.create_lambda_event

    def create(self: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        event = original(self, *args, **kwargs)
        event["requestContext"]["identity"].update(sourceIp=who["ip"], userArn=who["arn"])
        return event

    LambdaEventConverter.create_lambda_event = create  # type: ignore[method-assign]
    try:
        yield
    finally:
        LambdaEventConverter.create_lambda_event = original  # type: ignore[method-assign]


def at_once(calls: Sequence[Callable[[], Any]]) -> List[Any]:
    """Run the calls in threads released together; each one's result, or the exception it raised."""
    results: List[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except Exception as err:  # the test inspects what each call got
            results[index] = err

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class _RawBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def _error_body(service: str, code: str) -> bytes:
    if service == "ec2":
        return (f"<Response><Errors><Error><Code>{code}</Code><Message>injected {code}</Message></Error>"
                "</Errors><RequestID>test</RequestID></Response>").encode()
    return (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>injected {code}</Message>"
            "</Error><RequestId>test</RequestId></ErrorResponse>").encode()


class _FakeHttp:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: Dict[str, str] = {}


@pytest.fixture
def inject_fault(moto: None) -> Callable[..., None]:
    """Make one operation of the app's client fail with a real AWS error code; all else goes to moto.

    By default the fault replaces the whole call (before-call), so moto never performs it.
    With ``retried=True`` it replaces each HTTP attempt (before-send) so botocore's retry
    logic sees it as it would see AWS's answer; moto still runs those attempts, so use that
    only for read-only operations.
    """
    from botocore.awsrequest import AWSResponse

    def inject(service: str, operation: str, code: str, status: int = 400,
               times: Optional[int] = None, retried: bool = False) -> None:
        remaining = [times]

        def exhausted() -> bool:
            if remaining[0] is None:
                return False
            remaining[0] -= 1
            return remaining[0] < 0

        def fail_call(**_: Any) -> Any:
            if exhausted():
                return None
            return _FakeHttp(status), {"Error": {"Code": code, "Message": f"injected {code}"},
                                       "ResponseMetadata": {"HTTPStatusCode": status}}

        def fail_send(request: Any, **_: Any) -> Any:
            if exhausted():
                return None
            return AWSResponse(request.url, status, {}, _RawBody(_error_body(service, code)))

        meta = aws.client(service).meta
        service_id = meta.service_model.service_id.hyphenize()
        if retried:
            meta.events.register(f"before-send.{service_id}.{operation}", fail_send)
        else:
            meta.events.register(f"before-call.{service_id}.{operation}", fail_call)

    return inject


def add_app_rule(box: Devbox, ip: str, added_at: datetime, port: int = 22) -> None:
    """A rule as the app adds it, with the given age."""
    stamp = added_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    box.ec2.authorize_security_group_ingress(
        GroupId=box.group_id,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                        "IpRanges": [{"CidrIp": f"{ip}/32", "Description": f"devbox-access for={ip} at={stamp}"}]}],
    )


def scheduled_event(client: Client) -> Dict[str, Any]:
    """The event EventBridge sends to a scheduled function."""
    event = client.events.generate_cw_event(
        source="aws.events", detail_type="Scheduled Event", detail={},
        resources=[f"arn:aws:events:{REGION}:123456789012:rule/devbox-housekeeping"], region=REGION,
    )
    event["time"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return event


@pytest.fixture
def one_request_at_a_time(moto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every boto3 call in this test reaches moto's in-process backend one at a time.

    AWS serves concurrent requests; moto's backend is not thread-safe (a describe iterates a dict
    another thread's create is changing: "dictionary changed size during iteration") and checks
    then writes in separate steps. Serializing whole requests keeps the races the app must survive,
    which lie between its calls, and makes each call atomic as AWS applies it.
    """
    lock = threading.RLock()
    original = BaseClient._make_api_call

    def serialized(self: BaseClient, operation_name: str, api_params: Dict[str, Any]) -> Any:
        with lock:
            return original(self, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", serialized)


@pytest.fixture
def client_tokens(moto: None, monkeypatch: pytest.MonkeyPatch) -> Dict[Any, Any]:
    """EC2's documented ClientToken idempotency, which moto lacks, on the app's EC2 client.

    AWS answers a RunInstances or CreateVolume call that repeats a token with the first call's
    answer (only the instance's state may differ) and creates nothing ("Ensuring idempotency in
    Amazon EC2 API requests"). Calls with one token are serialized, as AWS's answer is atomic.
    """
    ec2 = aws.client("ec2")
    lock = threading.Lock()
    answers: Dict[Any, Any] = {}

    def idempotent(name: str) -> Callable[..., Any]:
        method = getattr(ec2, name)

        def call(**kwargs: Any) -> Any:
            token = kwargs.get("ClientToken")
            if not token:
                return method(**kwargs)
            with lock:
                if (name, token) not in answers:
                    answers[(name, token)] = method(**kwargs)
                answer = answers[(name, token)]
            if name == "run_instances":
                ids = [i["InstanceId"] for i in answer["Instances"]]
                states = {i["InstanceId"]: i["State"] for r in boto3.client("ec2", region_name=REGION)
                          .describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]}
                answer = {**answer, "Instances": [{**i, "State": states[i["InstanceId"]]} for i in answer["Instances"]]}
            return answer

        return call

    monkeypatch.setattr(ec2, "run_instances", idempotent("run_instances"))
    monkeypatch.setattr(ec2, "create_volume", idempotent("create_volume"))
    return answers
