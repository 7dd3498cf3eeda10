"""Benchmarks: AWS calls per operation, cold start, package size, time to ready.

    python -m benchmarks.run [--runs 5] [--output benchmarks/results/benchmarks.json] [--skip calls|cold|package|ready]

Prints a table and writes the numbers as JSON. Everything runs locally against moto: the
call counts in-process (moto's mock, chalice's test client), the rest against the local
stack (moto server, the API server with its SigV4 check, the relay). The box model is walked
as a user meets it: no instance until the first start, then stop/start, and relaunches (spot
interruption, resize of a stopped spot box, rebuild) that move the data volume to a new instance.

Exits non-zero, after writing the JSON, when a measured flow did not do what it is named for
(so no number is taken from a broken path) or when GET /status of a box with an instance
needs more than STATUS_BUDGET calls.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAKE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
# GET /status of a box with an instance: DescribeInstances and DescribeSecurityGroupRules, no more.
STATUS_BUDGET = 2
# Resizing must be on for the resize-by-relaunch flow (as in the local stack's settings).
ALLOWED_TYPES = "t3.large,m6i.xlarge"
RESIZE_TO = "m6i.xlarge"
# How long one mark of a start (an event delivered, the volume attached) may take in the local stack.
MARK_TIMEOUT = 30.0
# Polls are cheap calls to moto; more often would slow what they measure (two cores here).
POLL = 0.05


class FlowError(RuntimeError):
    """A benchmarked flow did something else than what it is named for."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise FlowError(what)


@dataclass
class CallReport:
    """AWS calls per operation, and GET /status counted at each state of a box that has an instance."""

    operations: Dict[str, List[str]] = field(default_factory=dict)
    status_with_instance: Dict[str, int] = field(default_factory=dict)


class _Recorder:
    """The app driven through chalice's test client; each measured operation's AWS calls are recorded."""

    def __init__(self, client: Any, box: Any, log: Any, state_event: Callable[..., Dict[str, Any]],
                 scheduled_event: Callable[[Any], Dict[str, Any]], report: CallReport) -> None:
        self.client = client
        self.box = box
        self.log = log
        self.state_event = state_event
        self.scheduled_event = scheduled_event
        self.report = report

    def _run(self, name: Optional[str], action: Callable[[], Any]) -> Any:
        self.log.reset()
        answer = action()
        status_code = getattr(answer, "status_code", 200)
        _expect(status_code == 200, f"{name or 'a setup step'} answered {status_code}: {getattr(answer, 'body', '')!r}")
        if name is not None:
            self.report.operations[name] = list(self.log.calls)
        return answer

    def status(self, name: Optional[str] = None, probe: Optional[str] = None) -> Dict[str, Any]:
        """GET /status; a probe name records its count among the box-with-an-instance checks."""
        doc: Dict[str, Any] = self._run(name, lambda: self.client.http.get("/status")).json_body
        if probe is not None:
            _expect(doc.get("instance_id") is not None, f"GET /status ({probe}) found no instance")
            self.report.status_with_instance[probe] = len(self.log.calls)
        return doc

    def start(self, name: Optional[str], action: str, body: Optional[Dict[str, Any]] = None,
              reason: Optional[str] = None) -> Dict[str, Any]:
        """POST /start, checking that the service did the planned action (launch, relaunch, start, none)."""
        def send() -> Any:
            if body is None:
                return self.client.http.post("/start")
            return self.client.http.post("/start", body=json.dumps(body), headers={"Content-Type": "application/json"})

        doc: Dict[str, Any] = self._run(name, send).json_body
        _expect(doc.get("action") == action, f"{name}: expected action {action!r}, got {doc.get('action')!r}")
        if reason is not None:
            _expect(doc.get("reason") == reason, f"{name}: expected reason {reason!r}, got {doc.get('reason')!r}")
        return doc

    def stop(self, name: Optional[str] = None) -> None:
        self._run(name, lambda: self.client.http.post("/stop"))

    def event(self, handler: str, instance_id: str, state: str, name: Optional[str] = None,
              detail_type: Optional[str] = None) -> None:
        """Invoke an event handler with the event EventBridge would send."""
        event = self.state_event(self.client, instance_id, state)
        if detail_type is not None:
            event["detail-type"] = detail_type
        self._run(name, lambda: self.client.lambda_.invoke(handler, event))

    def housekeeping(self, name: str) -> None:
        self._run(name, lambda: self.client.lambda_.invoke("housekeeping", self.scheduled_event(self.client)))

    def holder(self) -> Optional[str]:
        """The instance the box's one data volume is attached to (checked without recording)."""
        volumes = self.box.volumes()
        _expect(len(volumes) == 1, f"the box has {len(volumes)} data volumes, not one")
        attached = [a["InstanceId"] for a in volumes[0].get("Attachments", []) if a.get("State") == "attached"]
        return attached[0] if attached else None

    def relaunched(self, name: str, before: str, doc: Dict[str, Any]) -> str:
        """The new current instance after a relaunch (the only one: the old one is retired) with the volume freed."""
        new = str(self.box.instance_id)
        _expect(new != before and doc.get("instance_id") == new, f"{name}: no new current instance")
        _expect(self.holder() is None, f"{name}: the data volume is still attached to {self.holder()}")
        return new


def aws_calls_per_operation() -> CallReport:
    """Walk the box through its life against in-process moto and list the AWS calls of each operation."""
    os.environ.update(FAKE)
    sys.path.insert(0, str(ROOT))
    from chalice.local import LambdaEventConverter
    from chalice.test import Client
    from moto import mock_aws

    from chalicelib import aws
    from tests.conftest import CallLog, Devbox, scheduled_event, state_event, write_project

    report = CallReport()
    source_ip = LambdaEventConverter.LOCAL_SOURCE_IP
    with mock_aws(), tempfile.TemporaryDirectory() as workdir:
        aws.reset_clients()
        from app import app

        box = Devbox()
        log = CallLog()
        for service in ("ec2", "route53", "sns"):
            aws.client(service).meta.events.register("before-call", log.record)
        # The app's one log line per operation would drown the table.
        project = write_project(Path(workdir), box.env(ALLOWED_INSTANCE_TYPES=ALLOWED_TYPES, LOG_LEVEL="WARNING"))
        client = Client(app, stage_name="dev", project_dir=str(project))
        try:
            # Chalice warns on every request that it does not enforce IAM locally; known and beside the point.
            warnings.filterwarnings("ignore", message="IAMAuthorizer is not a supported", category=UserWarning)
            _walk(_Recorder(client, box, log, state_event, scheduled_event, report),
                  lambda ip: setattr(LambdaEventConverter, "LOCAL_SOURCE_IP", ip))
        finally:
            LambdaEventConverter.LOCAL_SOURCE_IP = source_ip
            aws.reset_clients()
    return report


def _walk(app: _Recorder, caller: Callable[[str], None]) -> None:
    """The operations in the order a box lives through them; unnamed steps only set up the next one.

    A stop (by the user or the spot service) is followed by its stopped event, as on AWS, so
    each start after it lets a caller in again (AuthorizeSecurityGroupIngress).
    """
    box = app.box
    caller("203.0.113.7")
    app.status("GET /status (no instance yet)")
    app.start("POST /start (first start: launch + data volume)", "launch", reason="first start")
    first = str(box.instance_id)
    _expect(len(box.instances()) == 1 and app.holder() is None, "the first start left other than one free volume")
    app.event("on_running", first, "running", "on_running (first start: attach volume)")
    _expect(app.holder() == first, "on_running did not attach the data volume to the first instance")
    app.status("GET /status", probe="running box")
    app.start("POST /start (running box, caller allowed)", "none")
    caller("198.51.100.9")
    app.start("POST /start (running box, new caller)", "none")
    # The group at its quota of 60 inbound rules: a new caller evicts the oldest caller (two rules) first.
    fillers = _fill_group(box, 28)
    caller("198.51.100.77")
    app.start("POST /start (full group, new caller: evicts oldest)", "none")
    _expect(len(box.rules()) == 60 and "192.0.2.1/32" not in box.rule_cidrs(),
            "the start on a full group did not evict the oldest caller and stay at 60 rules")
    _unfill_group(box, fillers + ["198.51.100.77/32"])
    app.stop("POST /stop (running box)")
    app.stop("POST /stop (stopped box)")
    app.status(probe="stopped box")
    app.event("on_stopped", first, "stopped", "on_stopped")
    caller("203.0.113.7")
    app.start("POST /start (stopped box, new caller)", "start")
    _expect(str(box.instance_id) == first, "the cold start replaced the instance")
    app.event("on_running", first, "running", "on_running (spot box, DNS managed)")
    app.event("on_interruption", first, "running", "on_interruption (no topic)",
              detail_type="EC2 Spot Instance Interruption Warning")
    app.housekeeping("housekeeping (no MAX_RUNTIME_HOURS)")

    box.interrupt()
    app.event("on_stopped", first, "stopped")
    doc = app.status(probe="interrupted spot box")
    _expect(doc.get("interrupted") is True, "the status of the interrupted box does not say so")
    name = "POST /start (interrupted spot box: relaunch)"
    doc = app.start(name, "relaunch", reason="interrupted by the spot service")
    second = app.relaunched(name, first, doc)
    app.status(probe="after a relaunch, before its running event")
    app.event("on_running", second, "running", "on_running (after a relaunch: move the volume)")
    _expect(app.holder() == second, "on_running did not move the data volume to the relaunched instance")

    app.stop()
    app.event("on_stopped", second, "stopped")
    name = "POST /start (resize of a stopped spot box: relaunch)"
    doc = app.start(name, "relaunch", {"instance_type": RESIZE_TO}, reason=f"resize to {RESIZE_TO}")
    third = app.relaunched(name, second, doc)
    _expect(box.current()["InstanceType"] == RESIZE_TO, f"the resized box is not a {RESIZE_TO}")
    app.event("on_running", third, "running")

    app.stop()
    app.event("on_stopped", third, "stopped")
    name = "POST /start (rebuild)"
    doc = app.start(name, "relaunch", {"rebuild": True}, reason="rebuild")
    fourth = app.relaunched(name, third, doc)
    app.event("on_running", fourth, "running")
    _expect(app.holder() == fourth, "the data volume did not follow the rebuild")


def _fill_group(box: Any, callers: int) -> List[str]:
    """Add the pairs of callers 192.0.2.1.. as the app does, stamped older than anyone else; their CIDRs."""
    cidrs = []
    oldest = datetime.now(timezone.utc) - timedelta(hours=1)
    for n in range(1, callers + 1):
        cidr = f"192.0.2.{n}/32"
        at = (oldest + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")
        description = f"devbox-access for=192.0.2.{n} at={at}"
        ranges = [{"CidrIp": cidr, "Description": description}]
        box.ec2.authorize_security_group_ingress(GroupId=box.group_id, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": ranges},
            {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": ranges}])
        cidrs.append(cidr)
    return cidrs


def _unfill_group(box: Any, cidrs: List[str]) -> None:
    """Revoke the rules of these CIDRs still in the group, so the walk goes on as before."""
    ids = [r["SecurityGroupRuleId"] for r in box.rules() if r.get("CidrIpv4") in cidrs]
    if ids:
        box.ec2.revoke_security_group_ingress(GroupId=box.group_id, SecurityGroupRuleIds=ids)


_COLD = r'''
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, ROOT)
import app as module
t1 = time.perf_counter()
def event():
    return {"resource": "/status", "path": "/status", "httpMethod": "GET", "headers": {},
            "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
            "requestContext": {"httpMethod": "GET", "resourcePath": "/status", "path": "/api/status",
                               "identity": {"sourceIp": "203.0.113.7"}}, "body": None, "isBase64Encoded": False}
first = module.app(event(), None)
t2 = time.perf_counter()
warm = []
for _ in range(5):
    s = time.perf_counter(); module.app(event(), None); warm.append(time.perf_counter() - s)
print(json.dumps({"import": t1 - t0, "first_request": t2 - t1, "warm": sorted(warm)[2], "status": first["statusCode"],
                  "has_instance": json.loads(first["body"]).get("instance_id") is not None}))
'''


def cold_start(runs: int) -> Dict[str, Any]:
    """Fresh processes importing the app and serving a first /status against a moto server.

    The box is started first, so /status takes its two-call path (a box with an instance), as
    before the box model.
    """
    sys.path.insert(0, str(ROOT))
    import requests

    from devbox.local import LocalStack

    with tempfile.TemporaryDirectory() as workdir:
        stack = LocalStack(Path(workdir), say=lambda _: None)
        try:
            stack.start()
            watch = _Watch(stack)
            answer = requests.post(f"{stack.url}/start", auth=stack.auth(), timeout=60)
            first = answer.json().get("instance_id")
            _expect(answer.status_code == 200 and bool(first), f"cold start setup: /start said {answer.text[:300]}")
            _expect(_until(lambda: watch.volume_holder() == first) is not None,
                    "cold start setup: the first start's data volume was not attached")
            env = {**os.environ, **FAKE, **stack.app_env, "AWS_ENDPOINT_URL": stack.endpoint}
            script = _COLD.replace("ROOT", repr(str(ROOT)))
            # One unmeasured run: the first calls of a fresh process to moto are not what is measured.
            subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=True)
            samples = []
            for _ in range(runs):
                done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True)
                samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
            importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import app"], env=env,
                                        capture_output=True, text=True, cwd=str(ROOT))
        finally:
            stack.close()
    _expect(all(s["status"] == 200 and s["has_instance"] for s in samples), f"cold start: {samples}")
    return {
        "runs": runs,
        "import_app_ms": round(statistics.median(s["import"] for s in samples) * 1000, 1),
        "first_status_ms": round(statistics.median(s["first_request"] for s in samples) * 1000, 1),
        "warm_status_ms": round(statistics.median(s["warm"] for s in samples) * 1000, 1),
        "heaviest_imports_ms": _heaviest_imports(importtime.stderr),
    }


def _heaviest_imports(report: str, top: int = 6) -> Dict[str, float]:
    """Top-level packages by cumulative import time, from `python -X importtime`."""
    totals: Dict[str, float] = {}
    for line in report.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:
            totals[match.group(3)] = round(int(match.group(1)) / 1000, 1)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def package_size() -> Dict[str, Any]:
    """Size of the Lambda deployment package that `chalice package` builds."""
    chalice = str(Path(sys.executable).parent / "chalice")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([chalice, "package", "--stage", "dev", out], cwd=str(ROOT), check=True, capture_output=True,
                       env={**os.environ, **FAKE})
        archive = Path(out) / "deployment.zip"
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
        return {"zip_bytes": archive.stat().st_size, "files": len(names),
                "third_party": sorted({n.split("/")[0] for n in names if not n.startswith(("app.py", "chalicelib"))})}


class _Watch:
    """What a start's marks are read from: the relay's log and moto, through clients built once.

    LocalStack's own helpers build a boto3 client per call (tens of ms); polling with them
    would blur the marks.
    """

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.ec2 = stack.aws("ec2")
        self.route53 = stack.aws("route53")
        self.box = stack.app_env["BOX_NAME"]

    def delivered(self, instance_id: Optional[str], state: str) -> int:
        """How many times the relay has delivered this state of this instance to the app's handler."""
        relay = self.stack.relay
        if relay is None or not instance_id:
            return 0
        prefix = f"relay: delivered '{state}' of {instance_id} "
        return sum(1 for line in relay.lines() if line.startswith(prefix))

    def volume_holder(self) -> Optional[str]:
        """The instance the box's data volume is attached to (None: free, or no volume yet)."""
        from devbox.boxaws import find_data_volumes

        attached = [a["InstanceId"] for v in find_data_volumes(self.ec2, self.box)
                    for a in v.get("Attachments", []) if a.get("State") == "attached"]
        return attached[0] if attached else None

    def record(self) -> Optional[str]:
        """The value of the devbox name's A record, or None."""
        zone = self.stack.app_env.get("HOSTED_ZONE_ID")
        if not zone:
            return None
        for record in self.route53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]:
            if record["Type"] == "A" and record["Name"].rstrip(".") == self.stack.app_env["DOMAIN_NAME"]:
                return str(record["ResourceRecords"][0]["Value"])
        return None

    def state(self, instance_id: str) -> Optional[str]:
        reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return next((str(i["State"]["Name"]) for r in reservations for i in r["Instances"]), None)


def _until(check: Callable[[], bool], timeout: float = MARK_TIMEOUT) -> Optional[float]:
    """Seconds until check() held, or None after the timeout."""
    started = time.perf_counter()
    while True:
        if check():
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            return None
        time.sleep(POLL)


def _marks(started: float, checks: Dict[str, Callable[[], bool]]) -> Dict[str, Optional[float]]:
    """Milliseconds from started until each check first held (None: not within MARK_TIMEOUT)."""
    marks: Dict[str, Optional[float]] = {name: None for name in checks}
    while time.perf_counter() - started < MARK_TIMEOUT:
        for name, check in checks.items():
            if marks[name] is None and check():
                marks[name] = round((time.perf_counter() - started) * 1000, 1)
        if all(mark is not None for mark in marks.values()):
            break
        time.sleep(POLL)
    return marks


def _settle_stopped(watch: _Watch, instance_id: str, delivered_before: int) -> None:
    """Wait until the relay delivered the stop to on_stopped: access and the A record are gone, as a user finds them."""
    _expect(_until(lambda: watch.delivered(instance_id, "stopped") > delivered_before) is not None,
            f"the relay did not deliver the stop of {instance_id}")
    _expect(_until(lambda: watch.record() is None) is not None, "the A record outlived the stop")


def _cli_start(stack: Any, watch: _Watch, moved_from: Optional[str] = None) -> Dict[str, Optional[float]]:
    """`devbox start --wait --no-ssh-probe` timed to its exit; after a relaunch, also to the data volume moved
    from the instance it left to the new one.

    Nothing polls moto while the command runs: on a small machine the polls would slow the
    command and the relay they measure. A volume already attached when the command exits
    counts at the exit.
    """
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "devbox", "start", "--wait", "--no-ssh-probe", "--timeout", "60"],
                               env=stack.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=MARK_TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    cli_ms = round((time.perf_counter() - started) * 1000, 1)
    _expect(process.returncode == 0, f"devbox start exited {process.returncode}: {out}{err}")
    if moved_from is None:
        return {"cli_ms": cli_ms}
    marks = _marks(started, {"volume_ms": lambda: watch.volume_holder() not in (None, moved_from)})
    return {"cli_ms": cli_ms, "volume_ms": marks["volume_ms"]}


def _ready_once(workdir: Path) -> Dict[str, Any]:
    """One fresh local stack: first start, stop and `devbox start --wait`, then two relaunches after interruptions."""
    import requests

    from devbox.local import LocalStack

    sample: Dict[str, Any] = {}
    with LocalStack(workdir, say=lambda _: None) as stack:
        watch = _Watch(stack)
        # The API checks SigV4 as API Gateway does: every call is signed, as the devbox command signs it.
        api = requests.Session()
        api.auth = stack.auth()
        api.get(f"{stack.url}/status", timeout=30).raise_for_status()  # warm moto's backend, as a deployed API is warm

        # The first start: RunInstances and CreateVolume in /start, the volume attached by on_running.
        started = time.perf_counter()
        answer = api.post(f"{stack.url}/start", timeout=30)
        sample["api_start_ms"] = round((time.perf_counter() - started) * 1000, 1)
        first = answer.json()
        _expect(answer.status_code == 200 and first.get("action") == "launch", f"first start: {first}")
        first_id = str(first["instance_id"])
        sample.update(_marks(started, {
            "relay_delivered_running_ms": lambda: watch.delivered(first_id, "running") > 0,
            "dns_record_in_place_ms": lambda: watch.record() is not None,
            "data_volume_attached_ms": lambda: watch.volume_holder() == first_id,
        }))

        # Stop, then `devbox start --wait` starts the same instance again (the volume stays attached).
        stopped = watch.delivered(first_id, "stopped")
        running = watch.delivered(first_id, "running")
        api.post(f"{stack.url}/stop", timeout=30).raise_for_status()
        _settle_stopped(watch, first_id, stopped)
        sample["devbox_start_wait_cli_ms"] = _cli_start(stack, watch)["cli_ms"]
        _expect((stack.current() or {}).get("InstanceId") == first_id, "devbox start replaced a stopped instance")
        _expect(_until(lambda: watch.delivered(first_id, "running") > running) is not None,
                "the relay did not deliver the cold start's running event")

        # The spot service interrupts it; /start relaunches, polled through the API and moto.
        stopped = watch.delivered(first_id, "stopped")
        stack.interrupt(first_id)
        _settle_stopped(watch, first_id, stopped)
        started = time.perf_counter()
        answer = api.post(f"{stack.url}/start", timeout=30)
        sample["relaunch_api_start_ms"] = round((time.perf_counter() - started) * 1000, 1)
        second = answer.json()
        _expect(answer.status_code == 200 and second.get("action") == "relaunch", f"relaunch: {second}")
        second_id = str(second["instance_id"])
        _expect(second_id != first_id and watch.state(first_id) in ("shutting-down", "terminated"),
                "the relaunch did not replace and terminate the interrupted instance")
        sample.update({f"relaunch_{k}": v for k, v in _marks(started, {
            "relay_delivered_running_ms": lambda: watch.delivered(second_id, "running") > 0,
            "dns_record_in_place_ms": lambda: watch.record() is not None,
            "data_volume_attached_ms": lambda: watch.volume_holder() == second_id,
        }).items()})

        # Interrupted again; this time the user's `devbox start --wait --no-ssh-probe` brings it back.
        stopped = watch.delivered(second_id, "stopped")
        stack.interrupt(second_id)
        _settle_stopped(watch, second_id, stopped)
        cli = _cli_start(stack, watch, moved_from=second_id)
        sample["relaunch_devbox_start_wait_cli_ms"] = cli["cli_ms"]
        sample["relaunch_cli_ready_with_volume_ms"] = cli["volume_ms"]
        current = stack.current()
        _expect(current is not None and current["InstanceId"] != second_id, "devbox start did not relaunch")
        _expect(len(stack.data_volumes()) == 1, "the box has more than one data volume")
        # A handler that failed is delivered again at the next poll, as Lambda retries an event: the
        # marks include that delay, and the errors are reported beside the numbers.
        sample["relay_errors"] = stack.relay.errors if stack.relay is not None else []
    return sample


# The medians reported, in order; each sample has these keys (None: the mark was not reached).
READY_KEYS = (
    "api_start_ms", "relay_delivered_running_ms", "dns_record_in_place_ms", "data_volume_attached_ms",
    "devbox_start_wait_cli_ms",
    "relaunch_api_start_ms", "relaunch_relay_delivered_running_ms", "relaunch_dns_record_in_place_ms",
    "relaunch_data_volume_attached_ms", "relaunch_devbox_start_wait_cli_ms", "relaunch_cli_ready_with_volume_ms",
)


def time_to_ready(runs: int) -> Tuple[Dict[str, Any], List[str]]:
    """In the local stack, medians over fresh stacks: from a call to the box running with DNS, access and its volume.

    Returns the report and the problems met (a run that failed, a mark never reached).
    """
    sys.path.insert(0, str(ROOT))
    samples: List[Dict[str, Any]] = []
    problems: List[str] = []
    for run in range(1, runs + 1):
        with tempfile.TemporaryDirectory(prefix="devbox-bench-") as workdir:
            try:
                sample = _ready_once(Path(workdir))
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
                problems.append(f"time to ready, run {run}: {type(err).__name__}: {err}")
                continue
        samples.append({"run": run, **sample})
        problems += [f"time to ready, run {run}: {key} not reached within {MARK_TIMEOUT:g} s"
                     for key in READY_KEYS if sample.get(key) is None]
    report: Dict[str, Any] = {"runs": runs, "runs_completed": len(samples)}
    for key in READY_KEYS:
        values = [float(s[key]) for s in samples if s.get(key) is not None]
        report[key] = round(statistics.median(values), 1) if values else None
    report["relay_errors"] = [f"run {sample['run']}: {error}" for sample in samples
                              for error in sample.get("relay_errors", [])]
    report["samples"] = [{k: v for k, v in sample.items() if k != "relay_errors"} for sample in samples]
    report["note"] = (
        "medians over fresh local stacks, polled every 50 ms. first start: POST /start (RunInstances + CreateVolume), "
        "then the relay's running event attaches the volume and upserts DNS. devbox_start_wait_cli: a stopped box "
        "started again (same instance, volume attached). relaunch: after LocalStack.interrupt (the spot service "
        "stopping the instance) and its stopped event, POST /start launches a new instance and terminates the old "
        "one; on_running moves the volume. devbox start --wait --no-ssh-probe returns once the status says running, "
        "before the volume is attached; relaunch_cli_ready_with_volume_ms runs until the volume is on the new "
        "instance too. The CLI times include starting Python (~0.4 s). moto boots instantly: all of this is ours "
        "(API, the relay's 250 ms poll, handlers); on AWS add the instance's boot (~20-40 s), and EventBridge "
        "replaces the relay."
    )
    return report, problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the devbox service.")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes (cold start) and fresh stacks "
                        "(time to ready) the medians are taken over")
    parser.add_argument("--output", default=str(RESULTS / "benchmarks.json"))
    parser.add_argument("--skip", action="append", default=[], choices=["calls", "cold", "package", "ready"])
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50:
        parser.error("--runs: 1 to 50")
    report: Dict[str, Any] = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "python": sys.version.split()[0], "cpus": os.cpu_count(),
                              # The times are only as quiet as the machine: other work shows in these.
                              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    problems: List[str] = []
    if "calls" not in args.skip:
        try:
            calls = aws_calls_per_operation()
        except FlowError as err:
            problems.append(f"AWS calls: {err}")
        else:
            report["aws_calls"] = {name: {"count": len(found), "calls": found}
                                   for name, found in calls.operations.items()}
            over = {k: v for k, v in calls.status_with_instance.items() if v > STATUS_BUDGET}
            report["status_budget"] = {"budget": STATUS_BUDGET, "calls": calls.status_with_instance,
                                       "within_budget": not over}
            problems += [f"GET /status ({k}) made {v} AWS calls; the budget is {STATUS_BUDGET}"
                         for k, v in over.items()]
            report["aws_calls_notes"] = [
                "moto creates no spot request for a spot RunInstances: on AWS each relaunch adds one "
                "CancelSpotInstanceRequests before TerminateInstances",
                "a relaunch of a stopped instance detaches the data volume in /start (DetachVolume); the running "
                "handler then only attaches it (DescribeVolumes, AttachVolume)",
                "housekeeping always describes the box's instances now: it finishes relaunches that were cut off",
                "GET /status and POST /start make their first two reads (DescribeInstances, "
                "DescribeSecurityGroupRules) side by side: listed in that order, they cost one round trip",
                "a start on a full group evicts the oldest caller (one RevokeSecurityGroupIngress) before it adds; "
                "when starts race for the group, a start also reads the group again after three callers in a row "
                "were taken by others or after AWS refused its add (RulesPerSecurityGroupLimitExceeded)",
            ]
    if "cold" not in args.skip:
        report["cold_start"] = cold_start(args.runs)
    if "package" not in args.skip:
        report["package"] = package_size()
    if "ready" not in args.skip:
        report["time_to_ready"], found = time_to_ready(args.runs)
        problems += found
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["problems"] = problems
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {output}")
    return 1 if problems else 0


def print_table(report: Dict[str, Any]) -> None:
    """The report as aligned text."""
    for name, entry in report.get("aws_calls", {}).items():
        print(f"{name:<55} {entry['count']:>2}  {', '.join(entry['calls'])}")
    budget = report.get("status_budget")
    if budget:
        verdict = "ok" if budget["within_budget"] else "OVER BUDGET"
        print(f"\nGET /status with an instance, budget {budget['budget']}: {verdict} {budget['calls']}")
    for section in ("cold_start", "package", "time_to_ready"):
        if section in report:
            print(f"\n{section}")
            for key, value in report[section].items():
                if key == "relay_errors":
                    print(f"  {key:<38} {len(value)}" + "".join(f"\n    {error}" for error in value))
                elif key != "samples":
                    print(f"  {key:<38} {value}")
    print(f"\nload average before {report.get('load_average_before')}, after {report.get('load_average_after')}, "
          f"on {report.get('cpus')} CPUs")
    for problem in report.get("problems", []):
        print(f"PROBLEM: {problem}")


if __name__ == "__main__":
    sys.exit(main())
