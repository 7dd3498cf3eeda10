"""The local stack: the whole devbox system on a laptop, with moto standing in for AWS.

`devbox local` starts a moto server (devbox.fakeaws: moto, plus an endpoint that plays the
spot service), creates the devbox resources in it from infra/devbox.yaml through moto's
CloudFormation (a launch template, a group, a zone: no instance), serves the Chalice app
against it with Chalice's local server plus API Gateway's SigV4 check (devbox.peer_server:
unsigned, expired or wrongly signed calls get API Gateway's 403, as they would on AWS), and
relays EC2 state changes of the box's instances to the app's event handlers (moto delivers no
EventBridge events). `devbox local --demo` then walks the box through its life with the real
`devbox` command and exits: the first start (an instance and a data volume), stop and start, a
resize by relaunch, and the recovery from a spot interruption, checking each time that the
same data volume followed.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from devbox.api import EXIT_FAILURE, CliError
from devbox.sigv4_check import LocalIdentity

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "devbox.yaml"
REGION = "us-east-1"
STACK_NAME = "devbox-local"
LOCAL_DOMAIN = "devbox.local.test"
# The launch template's image is "resolve:ssm:<Canonical's parameter>": moto keeps it as it
# is (it resolves nothing at launch), so the template needs no change to run here.
# Resizing is on locally, so the demo can show a resize by relaunch.
LOCAL_SETTINGS = {"ALLOWED_INSTANCE_TYPES": "t3.large,m6i.xlarge"}
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# The API callers the local API server knows (IAM users of moto's account 123456789012); the
# first is the one client_env() signs as. A LocalStack may be given others.
LOCAL_IDENTITIES = (
    LocalIdentity(FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"], FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "devbox-local"),
)
# How long each child may take to say it serves.
MOTO_START_TIMEOUT = 30.0
API_START_TIMEOUT = 60.0
RELAY_START_TIMEOUT = 30.0


class LocalStackError(CliError):
    """The local stack could not be brought up, or a part of it stopped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)


class Child(NamedTuple):
    """A process of the local stack: what it is, the process, and the log it writes."""

    name: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " / ".join(text[-lines:])

    def says(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except FileNotFoundError:
            return False


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: Optional[subprocess.Popen] = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{_name(process)} exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def _name(process: subprocess.Popen) -> str:
    args = process.args
    return " ".join(str(a) for a in args[:3]) if isinstance(args, (list, tuple)) else str(args)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_serving(child: Child, port: int, ready: str, timeout: float) -> None:
    """Wait until the child says `ready` (it prints that once its port is bound) and the port answers.

    A port that answers proves nothing on its own: another process may hold it while the child
    fails to bind and exits. So the child must be alive, and have said so, after the port answers.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_alive(child, f"before serving on 127.0.0.1:{port}")
        if child.says(ready) and _answers(port):
            break
        if time.monotonic() > deadline:
            held = (f"127.0.0.1:{port} answers, but not from {child.name} (another process holds the port?)"
                    if _answers(port) else f"nothing listens on 127.0.0.1:{port}")
            raise LocalStackError(f"{child.name} did not start within {timeout:.0f} s: {held}; its log: {child.log}")
        time.sleep(0.1)
    check_alive(child, f"after 127.0.0.1:{port} answered")


def check_alive(child: Child, when: str) -> None:
    """Raise LocalStackError naming the child and its log if it has exited."""
    code = child.process.poll()
    if code is None:
        return
    tail = child.log_tail()
    raise LocalStackError(f"{child.name} exited with code {code} {when}"
                          + (f": {tail}" if tail else "") + f"; its log: {child.log}")


def aws_environment(endpoint: str) -> Dict[str, str]:
    """Environment variables that point boto3 (and so the app) at the moto server."""
    return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}


def create_resources(endpoint: str, domain: str = LOCAL_DOMAIN) -> Dict[str, str]:
    """Create the devbox stack from infra/devbox.yaml in moto; returns the app's env vars.

    The box has no instance yet, as after a deploy: the first start launches one.
    """
    import boto3

    from devbox.stack import outputs_to_env

    session = boto3.session.Session(region_name=REGION, **_boto_credentials())
    cfn = session.client("cloudformation", endpoint_url=endpoint)
    cfn.create_stack(
        StackName=STACK_NAME,
        TemplateBody=local_template(),
        Parameters=[
            {"ParameterKey": "DomainName", "ParameterValue": domain},
            {"ParameterKey": "CreateHostedZone", "ParameterValue": "true"},
        ],
        Capabilities=["CAPABILITY_IAM"],  # the template holds the instance role, as on AWS
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=STACK_NAME, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    outputs = cfn.describe_stacks(StackName=STACK_NAME)["Stacks"][0].get("Outputs", [])
    return outputs_to_env({o["OutputKey"]: o.get("OutputValue", "") for o in outputs})


def local_template() -> str:
    """The template the local stack deploys: infra/devbox.yaml as it is."""
    return TEMPLATE.read_text()


def _boto_credentials() -> Dict[str, str]:
    return {"aws_access_key_id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def write_project(directory: Path, app_env: Dict[str, str], stage: str = "local") -> Path:
    """A Chalice project folder that serves this repository's app with the local stack's config.

    The repository's own .chalice/config.json is left alone: the app's code is linked in
    and only the configuration is new.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("app.py", "chalicelib", "requirements.txt"):
        link = directory / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    (directory / ".chalice").mkdir(exist_ok=True)
    config = {
        "version": "2.0",
        "app_name": "devbox",
        "stages": {stage: {"api_gateway_stage": "api", "environment_variables": app_env}},
    }
    (directory / ".chalice" / "config.json").write_text(json.dumps(config, indent=2))
    return directory


class RelayProcess:
    """The relay's process and what it reports in its log."""

    def __init__(self, process: subprocess.Popen, log: Path) -> None:
        self.process = process
        self.log = log

    def lines(self) -> List[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def ready(self) -> bool:
        return any(line.startswith("relay: watching") for line in self.lines())

    @property
    def delivered(self) -> List[str]:
        """States delivered to the handlers so far, in order."""
        return [line.split("'")[1] for line in self.lines() if line.startswith("relay: delivered '")]

    @property
    def errors(self) -> List[str]:
        return [line for line in self.lines() if line.startswith("relay: error")]


class LocalStack:
    """moto server + resources + the API server (SigV4 checked) + relay, torn down together."""

    def __init__(self, workdir: Path, say: Callable[[str], None] = print, api_port: int = 0, moto_port: int = 0,
                 extra_app_env: Optional[Dict[str, str]] = None, peer_source_ip: bool = False,
                 identities: Sequence[LocalIdentity] = LOCAL_IDENTITIES) -> None:
        self.workdir = workdir
        self.say = say
        self.api_port = api_port or free_port()
        self.moto_port = moto_port or free_port()
        self.extra_app_env = extra_app_env or {}
        # Accepted for callers written when only the peer server reported the connection's
        # address; the API server now always does, as API Gateway does.
        self.peer_source_ip = peer_source_ip
        if not identities:
            raise ValueError("the local stack needs at least one local identity to sign with")
        self.identities = list(identities)
        self.children: List[Child] = []
        self.relay: Optional[RelayProcess] = None
        self.app_env: Dict[str, str] = {}

    @property
    def processes(self) -> List[subprocess.Popen]:
        """The processes started, oldest first."""
        return [child.process for child in self.children]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, args: List[str], env: Dict[str, str], log_name: str) -> Child:
        path = self.workdir / log_name
        with open(path, "wb") as log:
            process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=str(self.workdir), start_new_session=True)
        child = Child(name, process, path)
        self.children.append(child)
        return child

    def start(self) -> "LocalStack":
        """Bring everything up; on any failure, tear down what was started."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        moto = self._spawn("the fake AWS server (devbox.fakeaws)",
                           [sys.executable, "-m", "devbox.fakeaws", "--port", str(self.moto_port), "--region", REGION],
                           {**base_env, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}, "moto.log")
        # devbox.fakeaws prints "... on 127.0.0.1:PORT" once its socket is bound.
        wait_until_serving(moto, self.moto_port, f"on 127.0.0.1:{self.moto_port}", MOTO_START_TIMEOUT)
        self.say(f"moto server (stands in for AWS, and plays the spot service): {self.endpoint}")
        self.app_env = {**create_resources(self.endpoint), **LOCAL_SETTINGS, **self.extra_app_env}
        self.say("created from infra/devbox.yaml in moto's CloudFormation: "
                 + ", ".join(f"{k}={v}" for k, v in self.app_env.items() if v))
        project = write_project(self.workdir / "project", self.app_env)
        from devbox.peer_server import READY

        keys = self.workdir / "identities.json"
        keys.touch(mode=0o600)
        keys.write_text(json.dumps([identity.as_dict() for identity in self.identities]))
        api = self._spawn("the devbox API server (devbox.peer_server)",
                          [sys.executable, "-m", "devbox.peer_server", "--project-dir", str(project),
                           "--port", str(self.api_port), "--stage", "local", "--region", REGION,
                           "--identities", str(keys)],
                          {**base_env, **aws_environment(self.endpoint), "PYTHONPATH": str(ROOT)}, "api.log")
        wait_until_serving(api, self.api_port, READY, API_START_TIMEOUT)
        self.say(f"the devbox API (chalice's local server; SigV4 checked as API Gateway does): {self.url}")
        relay = self._spawn("the relay (devbox.relay)", [sys.executable, "-m", "devbox.relay", "--project-dir",
                                                         str(project)],
                            {**base_env, **aws_environment(self.endpoint), **self.app_env, "PYTHONPATH": str(ROOT)},
                            "relay.log")
        self.relay = RelayProcess(relay.process, relay.log)
        deadline = time.monotonic() + RELAY_START_TIMEOUT
        while not self.relay.ready():
            check_alive(relay, "before it watched moto")
            if time.monotonic() > deadline:
                raise LocalStackError(f"{relay.name} did not start within {RELAY_START_TIMEOUT:.0f} s; "
                                      f"its log: {relay.log}")
            time.sleep(0.2)
        self.say("relay: state changes of the box's instances in moto go to the app's on_running/on_stopped handlers")
        self.check_alive()

    def check_alive(self) -> None:
        """Raise LocalStackError naming the first process of the stack that has exited, and its log."""
        for child in self.children:
            check_alive(child, "while the local stack was up")

    def exited(self) -> Optional[Child]:
        """The first process of the stack that has exited, or None."""
        return next((child for child in self.children if child.process.poll() is not None), None)

    def close(self) -> None:
        """Stop every process started (relay, API, moto), leaving none behind."""
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.children.clear()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.close()

    def client_env(self, identity: Optional[LocalIdentity] = None) -> Dict[str, str]:
        """Environment for a `devbox` command aimed at this stack, signing as identity (default: the first)."""
        signer = identity or self.identities[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": signer.access_key, "AWS_SECRET_ACCESS_KEY": signer.secret_key,
                    "AWS_DEFAULT_REGION": REGION, "DEVBOX_URL": self.url,
                    # `devbox start` records when it ran (the proxy's reconnect guard): keep that local.
                    "XDG_STATE_HOME": str(self.workdir / "state")})
        if signer.session_token:
            env["AWS_SESSION_TOKEN"] = signer.session_token
        return env

    def auth(self, identity: Optional[LocalIdentity] = None) -> Any:
        """A requests auth object that signs calls to this stack's API as identity (default: the first)."""
        from requests_aws4auth import AWS4Auth

        signer = identity or self.identities[0]
        return AWS4Auth(signer.access_key, signer.secret_key, REGION, "execute-api",
                        session_token=signer.session_token)

    def aws(self, service: str) -> Any:
        """A boto3 client for the moto server (to check what the app did)."""
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **_boto_credentials())

    def instances(self) -> List[Dict[str, Any]]:
        """The box's instances (found by tag), terminated ones included, oldest first."""
        from devbox.boxaws import find_instances

        return find_instances(self.aws("ec2"), self.app_env["BOX_NAME"], include_terminated=True)

    def current(self) -> Optional[Dict[str, Any]]:
        """The box's current instance (live, not retired), or None."""
        from devbox.boxaws import RETIRED_TAG, tag_value

        live = [i for i in self.instances() if i["State"]["Name"] not in ("shutting-down", "terminated")
                and tag_value(i, RETIRED_TAG) is None]
        return live[-1] if live else None

    def data_volumes(self) -> List[Dict[str, Any]]:
        """The box's data volumes (one, once it was started)."""
        from devbox.boxaws import find_data_volumes

        return find_data_volumes(self.aws("ec2"), self.app_env["BOX_NAME"])

    def volume_holder(self) -> Optional[str]:
        """The instance the box's data volume is attached to, or None."""
        volumes = self.data_volumes()
        attached = [a["InstanceId"] for v in volumes for a in v.get("Attachments", []) if a.get("State") == "attached"]
        return attached[0] if attached else None

    def interrupt(self, instance_id: str) -> None:
        """Stop an instance as the spot service does when it reclaims capacity (devbox.fakeaws)."""
        import urllib.request

        from devbox.fakeaws import INTERRUPT_PATH

        request = urllib.request.Request(self.endpoint + INTERRUPT_PATH, method="POST",
                                         data=json.dumps({"instance_id": instance_id}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def access_rules(self) -> List[str]:
        """The CIDRs of the devbox group's inbound rules."""
        rules = self.aws("ec2").describe_security_group_rules(
            Filters=[{"Name": "group-id", "Values": [self.app_env["SECURITY_GROUP_ID"]]}])["SecurityGroupRules"]
        return sorted(r.get("CidrIpv4") or r.get("CidrIpv6") or "" for r in rules if not r["IsEgress"])

    def a_record(self) -> Optional[str]:
        """The A record's value for the devbox name, or None."""
        zone = self.app_env.get("HOSTED_ZONE_ID")
        if not zone:
            return None
        for record in self.aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]:
            if record["Type"] == "A" and record["Name"].rstrip(".") == self.app_env["DOMAIN_NAME"]:
                return str(record["ResourceRecords"][0]["Value"])
        return None


def run_cli(stack: LocalStack, args: List[str], say: Callable[[str], None],
            identity: Optional[LocalIdentity] = None) -> int:
    """Run the real `devbox` command against the stack (signed as identity, default the first), echoing its output."""
    command = [sys.executable, "-m", "devbox", *args]
    who = f"[{identity.user_name}] " if identity else ""
    say(f"{who}$ devbox {' '.join(args)}")
    try:
        done = subprocess.run(command, env=stack.client_env(identity), capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        say("    (no answer within 180 s)")
        return 124
    for line in (done.stdout + done.stderr).splitlines():
        say(f"    {line}")
    return done.returncode


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def demo(stack: LocalStack, say: Callable[[str], None]) -> int:
    """Walk the box through its life, checking what a user would check at each step."""
    failures: List[str] = []

    def step(ok: bool, text: str) -> None:
        say(("  ok   " if ok else "  FAIL ") + text)
        if not ok:
            failures.append(text)

    def delivered(instance_id: Optional[str], state: str) -> bool:
        return stack.relay is not None and any(
            line.startswith(f"relay: delivered '{state}' of {instance_id}") for line in stack.relay.lines())

    def start(args: List[str], text: str) -> Optional[Dict[str, Any]]:
        step(run_cli(stack, ["start", *args, "--wait", "--timeout", "60", "--no-ssh-probe"], say) == 0, text)
        current = stack.current()
        step(current is not None and wait_until(lambda: delivered(current["InstanceId"], "running")),
             "the relay delivered EC2's 'running' event of the current instance to on_running")
        return current

    def volume_follows(current: Optional[Dict[str, Any]], volume_id: Optional[str]) -> None:
        instance_id = current["InstanceId"] if current else None
        step(wait_until(lambda: stack.volume_holder() == instance_id),
             f"the data volume {volume_id} is attached to the current instance {instance_id}")
        step([v["VolumeId"] for v in stack.data_volumes()] == [volume_id], "the box still has exactly that one data volume")

    def stop(text: str) -> None:
        current = stack.current()
        step(run_cli(stack, ["stop", "--wait", "--timeout", "60"], say) == 0, text)
        step(wait_until(lambda: current is not None and delivered(current["InstanceId"], "stopped")),
             "the relay delivered EC2's 'stopped' event to on_stopped")
        step(wait_until(lambda: stack.access_rules() == []), "the access rules are revoked")
        step(wait_until(lambda: stack.a_record() is None), "the A record is deleted")

    say("\n1. first start: the box has no instance yet (local mode: no SSH probe, moto's IPs are not real hosts)")
    step(stack.current() is None and stack.data_volumes() == [], "before: no instance, no data volume")
    first = start([], "devbox start exits 0")
    volumes = stack.data_volumes()
    volume_id = volumes[0]["VolumeId"] if len(volumes) == 1 else None
    step(volume_id is not None, f"the first start created one data volume: {volume_id}")
    volume_follows(first, volume_id)
    step(wait_until(lambda: "127.0.0.1/32" in stack.access_rules()),
         f"the caller's address 127.0.0.1/32 is let in: {stack.access_rules()}")
    step(wait_until(lambda: stack.a_record() is not None),
         f"{stack.app_env.get('DOMAIN_NAME')} has an A record -> {stack.a_record()}")
    say("\n2. status")
    step(run_cli(stack, ["status"], say) == 0, "devbox status exits 0")

    say("\n3. stop, then start the same instance again")
    stop("devbox stop exits 0")
    again = start([], "devbox start exits 0")
    step(again is not None and first is not None and again["InstanceId"] == first["InstanceId"],
         "the same instance started again (a stopped instance is started, not replaced)")
    volume_follows(again, volume_id)

    say("\n4. resize: a stopped spot instance cannot change type, so the box is relaunched as m6i.xlarge")
    stop("devbox stop exits 0")
    resized = start(["--type", "m6i.xlarge"], "devbox start --type m6i.xlarge exits 0")
    step(resized is not None and resized["InstanceType"] == "m6i.xlarge" and resized.get("InstanceLifecycle") == "spot"
         and resized["InstanceId"] != (again or {}).get("InstanceId"),
         f"a new spot instance of type m6i.xlarge: {(resized or {}).get('InstanceId')}")
    volume_follows(resized, volume_id)
    step(wait_until(lambda: _state_of(stack, (again or {}).get("InstanceId")) == "terminated"),
         "the replaced instance is terminated")

    say("\n5. the spot service interrupts the box (injected); `devbox start` brings it back on a new instance")
    if resized is not None:
        stack.interrupt(resized["InstanceId"])
    step(wait_until(lambda: delivered((resized or {}).get("InstanceId"), "stopped")),
         "the relay delivered the interruption's 'stopped' event")
    step(wait_until(lambda: stack.access_rules() == [] and stack.a_record() is None),
         "access and the A record are gone while it is stopped")
    step(run_cli(stack, ["status"], say) == 0, "devbox status exits 0 (and says the spot service stopped it)")
    recovered = start([], "devbox start exits 0 (a relaunch: EC2 alone may restart an interrupted instance)")
    step(recovered is not None and recovered["InstanceId"] != (resized or {}).get("InstanceId")
         and recovered.get("InstanceLifecycle") == "spot",
         f"a new spot instance: {(recovered or {}).get('InstanceId')}")
    volume_follows(recovered, volume_id)
    step(wait_until(lambda: stack.a_record() is not None), "the A record points at the new instance")

    say("\n6. stop the box")
    stop("devbox stop exits 0")
    if stack.relay is not None and stack.relay.errors:
        step(False, f"the relay reported errors: {stack.relay.errors}")
    say("\ndemo " + ("passed" if not failures else f"FAILED: {len(failures)} step(s)"))
    return 0 if not failures else 1


def _state_of(stack: LocalStack, instance_id: Optional[str]) -> Optional[str]:
    for found in stack.instances():
        if found["InstanceId"] == instance_id:
            return str(found["State"]["Name"])
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `devbox local`."""
    parser.add_argument("--demo", action="store_true",
                        help="walk the box through first start, stop/start, resize, spot recovery and stop, then exit")
    parser.add_argument("--owners", type=_owner_count, default=0, metavar="N",
                        help="a fleet (FLEET=true) with N local identities, each with its own box, plus an admin; "
                        "with --demo, each owner's box is walked through start, status and stop")
    parser.add_argument("--port", type=int, default=0, help="port for the API (default: a free one)")
    parser.add_argument("--moto-port", type=int, default=0, help="port for the moto server (default: a free one)")


def _serve(stack: LocalStack, say: Callable[[str], None]) -> int:
    """Keep the stack up until Ctrl-C (KeyboardInterrupt) or until one of its processes exits (1)."""
    while True:
        time.sleep(1)
        dead = stack.exited()
        if dead is not None:
            say(f"{dead.name} exited unexpectedly (code {dead.process.returncode}); its log: {dead.log}")
            return 1


def _owner_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 20:
        raise argparse.ArgumentTypeError("--owners: 1 to 20")
    return value


def _interrupt(*_: Any) -> None:
    # SIGTERM takes the same clean path as Ctrl-C: every process is stopped.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """`devbox local`: bring the stack up, then run the demo or serve until Ctrl-C."""
    def say(text: str) -> None:
        print(text, flush=True)

    # The logs outlive a failed run, so the message that names one can be followed.
    workdir = Path(tempfile.mkdtemp(prefix="devbox-local-"))
    owners = getattr(args, "owners", 0)
    identities: Sequence[LocalIdentity] = LOCAL_IDENTITIES
    settings: Dict[str, str] = {}
    if owners:
        from devbox import fleetdemo

        identities = fleetdemo.fleet_identities(owners)
        settings = fleetdemo.fleet_settings(identities[-1])
    stack = LocalStack(workdir, say, api_port=args.port, moto_port=args.moto_port, extra_app_env=settings,
                       identities=identities)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    keep_logs = True
    try:
        stack.start()
        if args.demo:
            if owners:
                from devbox import fleetdemo

                code = fleetdemo.demo_fleet(stack, say, identities[:-1], identities[-1])
            else:
                code = demo(stack, say)
            keep_logs = code != 0
            return code
        if owners:
            from devbox import fleetdemo

            say(f"\nThe local fleet is up: {owners} owner(s) and an admin ({fleetdemo.ADMIN_NAME}). Calls must be "
                "SigV4-signed (service execute-api), as on AWS. In another terminal:")
            fleetdemo.print_credentials(stack, say, identities)
            say("Ctrl-C stops everything.")
            return _serve(stack, say)
        signer = stack.identities[0]
        say("\nThe local devbox stack is up. Calls must be SigV4-signed (service execute-api), as on AWS.")
        say("In another terminal:")
        say(f"  export DEVBOX_URL={stack.url} AWS_ACCESS_KEY_ID={signer.access_key} "
            f"AWS_SECRET_ACCESS_KEY={signer.secret_key} AWS_DEFAULT_REGION={REGION}")
        say("  devbox start --wait --no-ssh-probe && devbox status && devbox stop")
        say("Ctrl-C stops everything.")
        return _serve(stack, say)
    except KeyboardInterrupt:
        keep_logs = False
        say("\nstopping the local stack")
        return 130 if not args.demo else 1
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)
        if keep_logs:
            print(f"devbox local: logs kept in {workdir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
