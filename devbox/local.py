"""The local stack: the whole devbox system on a laptop, with moto standing in for AWS.

`devbox local` starts a moto server, creates the devbox resources in it from
infra/devbox.yaml through moto's CloudFormation, serves the Chalice app with
`chalice local` against it, and relays EC2 state changes to the app's event handlers
(moto delivers no EventBridge events). `devbox local --demo` then walks the box
through start, status and stop with the real `devbox` command and exits.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "devbox.yaml"
REGION = "us-east-1"
STACK_NAME = "devbox-local"
LOCAL_DOMAIN = "devbox.local.test"
# The template's ImageId is an SSM parameter name (Canonical's public one by default). moto
# resolves every SSM-typed default even when a value is given, does not know Canonical's
# parameters and refuses to create names under /aws/: so the local stack stores a fake AMI
# id under its own name and deploys the template with that name as the default.
IMAGE_PARAMETER = "/devbox/local/ami-id"
FAKE_IMAGE_ID = "ami-0123456789abcdef0"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


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


def aws_environment(endpoint: str) -> Dict[str, str]:
    """Environment variables that point boto3 (and so the app) at the moto server."""
    return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}


def create_resources(endpoint: str, domain: str = LOCAL_DOMAIN) -> Dict[str, str]:
    """Create the devbox stack from infra/devbox.yaml in moto; returns the app's env vars.

    Leaves the instance stopped, as a user's box is between sessions.
    """
    import boto3

    from devbox.stack import outputs_to_env

    session = boto3.session.Session(region_name=REGION, **_boto_credentials())
    session.client("ssm", endpoint_url=endpoint).put_parameter(
        Name=IMAGE_PARAMETER, Value=FAKE_IMAGE_ID, Type="String", Overwrite=True
    )
    cfn = session.client("cloudformation", endpoint_url=endpoint)
    cfn.create_stack(
        StackName=STACK_NAME,
        TemplateBody=local_template(),
        Parameters=[
            {"ParameterKey": "DomainName", "ParameterValue": domain},
            {"ParameterKey": "CreateHostedZone", "ParameterValue": "true"},
        ],
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=STACK_NAME, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    outputs = cfn.describe_stacks(StackName=STACK_NAME)["Stacks"][0].get("Outputs", [])
    env = outputs_to_env({o["OutputKey"]: o.get("OutputValue", "") for o in outputs})
    ec2 = session.client("ec2", endpoint_url=endpoint)
    ec2.stop_instances(InstanceIds=[env["INSTANCE_ID"]])
    return env


def local_template() -> str:
    """infra/devbox.yaml with the one change moto needs: the image parameter's default."""
    import yaml

    template = yaml.safe_load(TEMPLATE.read_text())
    template["Parameters"]["ImageId"]["Default"] = IMAGE_PARAMETER
    return json.dumps(template)


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
    """moto server + resources + chalice local + relay, torn down together."""

    def __init__(self, workdir: Path, say: Callable[[str], None] = print, api_port: int = 0, moto_port: int = 0,
                 extra_app_env: Optional[Dict[str, str]] = None, peer_source_ip: bool = False) -> None:
        self.workdir = workdir
        self.say = say
        self.api_port = api_port or free_port()
        self.moto_port = moto_port or free_port()
        self.extra_app_env = extra_app_env or {}
        # chalice local reports every caller as 127.0.0.1; the peer server reports the
        # connection's address, as API Gateway does (for tests with many callers).
        self.peer_source_ip = peer_source_ip
        self.processes: List[subprocess.Popen] = []
        self.relay: Optional[RelayProcess] = None
        self.app_env: Dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, args: List[str], env: Dict[str, str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "wb")
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=str(self.workdir), start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

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
        moto = self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                           {**base_env, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}, "moto.log")
        wait_for_port(self.moto_port, 30, moto)
        self.say(f"moto server (stands in for AWS): {self.endpoint}")
        self.app_env = {**create_resources(self.endpoint), **self.extra_app_env}
        self.say("created from infra/devbox.yaml in moto's CloudFormation: "
                 + ", ".join(f"{k}={v}" for k, v in self.app_env.items() if v))
        project = write_project(self.workdir / "project", self.app_env)
        if self.peer_source_ip:
            server = [sys.executable, "-m", "devbox.peer_server", "--project-dir", str(project),
                      "--port", str(self.api_port), "--stage", "local"]
        else:
            server = [str(Path(sys.executable).parent / "chalice"), "--project-dir", str(project), "local",
                      "--host", "127.0.0.1", "--port", str(self.api_port), "--stage", "local", "--no-autoreload"]
        chalice = self._spawn(server, {**base_env, **aws_environment(self.endpoint), "PYTHONPATH": str(ROOT)},
                              "chalice.log")
        wait_for_port(self.api_port, 60, chalice)
        self.say(f"chalice local (the devbox API): {self.url}")
        relay = self._spawn([sys.executable, "-m", "devbox.relay", "--project-dir", str(project)],
                            {**base_env, **aws_environment(self.endpoint), **self.app_env, "PYTHONPATH": str(ROOT)},
                            "relay.log")
        self.relay = RelayProcess(relay, self.workdir / "relay.log")
        if not wait_until(self.relay.ready, timeout=30):
            raise RuntimeError(f"the relay did not start; see {self.workdir / 'relay.log'}")
        self.say("relay: EC2 state changes in moto go to the app's on_running/on_stopped handlers")

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
        self.processes.clear()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.close()

    def client_env(self) -> Dict[str, str]:
        """Environment for a `devbox` command aimed at this stack."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(FAKE_CREDENTIALS)
        env.update({"AWS_DEFAULT_REGION": REGION, "DEVBOX_URL": self.url})
        return env

    def aws(self, service: str) -> Any:
        """A boto3 client for the moto server (to check what the app did)."""
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **_boto_credentials())

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


def run_cli(stack: LocalStack, args: List[str], say: Callable[[str], None]) -> int:
    """Run the real `devbox` command against the stack, echoing its output."""
    command = [sys.executable, "-m", "devbox", *args]
    say(f"$ devbox {' '.join(args)}")
    try:
        done = subprocess.run(command, env=stack.client_env(), capture_output=True, text=True, timeout=180)
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
    """Walk the box through start, status and stop, checking what a user would check."""
    failures: List[str] = []

    def step(ok: bool, text: str) -> None:
        say(("  ok   " if ok else "  FAIL ") + text)
        if not ok:
            failures.append(text)

    say("\n1. start the box and wait until it is ready (local mode: no SSH probe, moto's IPs are not real hosts)")
    step(run_cli(stack, ["start", "--wait", "--timeout", "60", "--no-ssh-probe"], say) == 0, "devbox start exits 0")
    step(wait_until(lambda: "127.0.0.1/32" in stack.access_rules()),
         f"the caller's address 127.0.0.1/32 is let in: {stack.access_rules()}")
    step(wait_until(lambda: stack.relay is not None and "running" in stack.relay.delivered),
         "the relay delivered EC2's 'running' event to the app's on_running handler")
    step(wait_until(lambda: stack.a_record() is not None),
         f"{stack.app_env.get('DOMAIN_NAME')} has an A record -> {stack.a_record()}")
    say("\n2. status")
    step(run_cli(stack, ["status"], say) == 0, "devbox status exits 0")
    say("\n3. stop the box")
    step(run_cli(stack, ["stop", "--wait", "--timeout", "60"], say) == 0, "devbox stop exits 0")
    step(wait_until(lambda: stack.relay is not None and "stopped" in stack.relay.delivered),
         "the relay delivered EC2's 'stopped' event to the app's on_stopped handler")
    step(wait_until(lambda: stack.access_rules() == []), "the access rules are revoked")
    step(wait_until(lambda: stack.a_record() is None), "the A record is deleted")
    if stack.relay is not None and stack.relay.errors:
        step(False, f"the relay reported errors: {stack.relay.errors}")
    say("\ndemo " + ("passed" if not failures else f"FAILED: {len(failures)} step(s)"))
    return 0 if not failures else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `devbox local`."""
    parser.add_argument("--demo", action="store_true", help="walk the box through start, status and stop, then exit")
    parser.add_argument("--port", type=int, default=0, help="port for the API (default: a free one)")
    parser.add_argument("--moto-port", type=int, default=0, help="port for the moto server (default: a free one)")


def _interrupt(*_: Any) -> None:
    # SIGTERM takes the same clean path as Ctrl-C: every process is stopped.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """`devbox local`: bring the stack up, then run the demo or serve until Ctrl-C."""
    def say(text: str) -> None:
        print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="devbox-local-") as workdir:
        stack = LocalStack(Path(workdir), say, api_port=args.port, moto_port=args.moto_port)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            stack.start()
            if args.demo:
                return demo(stack, say)
            say("\nThe local devbox stack is up. In another terminal:")
            say(f"  export DEVBOX_URL={stack.url} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "
                f"AWS_DEFAULT_REGION={REGION}")
            say("  devbox start --wait --no-ssh-probe && devbox status && devbox stop")
            say("Ctrl-C stops everything.")
            while True:
                time.sleep(1)
                for process in stack.processes:
                    if process.poll() is not None:
                        say(f"{_name(process)} exited unexpectedly ({process.returncode}); see {workdir}")
                        return 1
        except KeyboardInterrupt:
            say("\nstopping the local stack")
            return 130 if not args.demo else 1
        finally:
            stack.close()
            signal.signal(signal.SIGTERM, previous)
