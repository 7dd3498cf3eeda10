"""Load test: a bounded burst of concurrent signed /status and /start calls from many callers.

Runs against the local stack (moto server + Chalice's local server on loopback). Each
simulated caller binds its own loopback address (127.0.1.N), and the server reports the
connection's address as sourceIp, as API Gateway does. Reports requests made, errors,
latency percentiles, and whether the group's final rules are exactly one SSH and one
ping rule per caller.

The box has no instance when the burst begins, so its first /start calls race to launch
it: they must end with one instance and one data volume attached to it (RunInstances and
CreateVolume take a client token, which the local fake AWS honours as EC2 does).

    python -m benchmarks.load [--callers 40] [--requests 400] [--concurrency 16]
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from devbox.boxaws import find_data_volumes, find_instances
from devbox.local import FAKE_CREDENTIALS, REGION, LocalStack

RESULTS = Path(__file__).resolve().parent / "results"
# How long the relay may take, after the burst, to deliver the running event that attaches the volume.
SETTLE_SECONDS = 30.0


def signed_headers(method: str, url: str, body: bytes) -> Dict[str, str]:
    """SigV4 headers for execute-api, as the devbox client sends them."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body, headers={"Content-Type": "application/json"})
    credentials = Credentials(FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"], FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    SigV4Auth(credentials, "execute-api", REGION).add_auth(request)
    return dict(request.headers.items())


class Answer(NamedTuple):
    """One response: HTTP status, seconds it took, and the JSON body (None when there is none)."""

    status: int
    seconds: float
    body: Optional[Dict[str, Any]]


def request(port: int, source_ip: str, method: str, path: str, timeout: float = 30.0) -> Answer:
    """One signed request from the given source address."""
    body = b"{}" if method == "POST" else b""
    headers = signed_headers(method, f"http://127.0.0.1:{port}{path}", body)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source_ip, 0))
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        content = response.read()
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    try:
        document = json.loads(content) if content else None
    except ValueError:
        document = None
    return Answer(response.status, seconds, document if isinstance(document, dict) else None)


def call(port: int, source_ip: str, method: str, path: str, timeout: float = 30.0) -> Tuple[int, float]:
    """One signed request from the given source address; returns (status, seconds)."""
    answer = request(port, source_ip, method, path, timeout)
    return answer.status, answer.seconds


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(stack: LocalStack, callers: int, requests: int, concurrency: int) -> Dict[str, Any]:
    """Fire the burst and check the final rule set."""
    ips = [f"127.0.1.{i}" for i in range(1, callers + 1)]
    # Every caller starts once; the rest of the burst is a mix of status and start calls.
    plan = [(ip, "POST", "/start") for ip in ips]
    plan += [(ips[i % callers], "GET" if i % 3 else "POST", "/status" if i % 3 else "/start")
             for i in range(max(0, requests - callers))]
    latencies: List[float] = []
    statuses: Dict[str, int] = {}
    start_actions: Dict[str, int] = {}
    errors: List[str] = []
    lock = threading.Lock()

    def one(item: Tuple[str, str, str]) -> None:
        ip, method, path = item
        try:
            answer = request(stack.api_port, ip, method, path)
        except OSError as err:
            with lock:
                errors.append(f"{method} {path} from {ip}: {err}")
            return
        body = answer.body or {}
        with lock:
            latencies.append(answer.seconds)
            statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
            if answer.status != 200:
                errors.append(f"{method} {path} from {ip}: HTTP {answer.status}: {str(body.get('Message', ''))[:160]}")
            elif path == "/start":
                action = str(body.get("action"))
                start_actions[action] = start_actions.get(action, 0) + 1

    # moto answers its first EC2 call slowly (it builds its backend); keep that out of the numbers.
    call(stack.api_port, "127.0.0.1", "GET", "/status")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, plan))
    elapsed = time.perf_counter() - started
    box = box_outcome(stack)
    rules = stack.aws("ec2").describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [stack.app_env["SECURITY_GROUP_ID"]]}])["SecurityGroupRules"]
    final = sorted((r["IpProtocol"], r["FromPort"], r.get("CidrIpv4")) for r in rules if not r["IsEgress"])
    expected = sorted([("tcp", 22, f"{ip}/32") for ip in ips] + [("icmp", 8, f"{ip}/32") for ip in ips])
    return {
        "callers": callers,
        "requests": len(plan),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests_per_second": round(len(plan) / elapsed, 1) if elapsed else None,
        "statuses": statuses,
        "start_actions": start_actions,
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
            "p90": round(percentile(latencies, 0.90) * 1000, 1) if latencies else None,
            "p99": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
            "max": round(max(latencies) * 1000, 1) if latencies else None,
            "mean": round(statistics.mean(latencies) * 1000, 1) if latencies else None,
        },
        "final_rules": len(final),
        "final_rules_as_expected": final == expected,
        "unexpected_rules": [list(r) for r in final if r not in expected][:5],
        "missing_rules": [list(r) for r in expected if r not in final][:5],
        "box": box,
    }


def box_outcome(stack: LocalStack) -> Dict[str, Any]:
    """The box after the burst: one live instance, one data volume, attached to it once the relay caught up."""
    ec2 = stack.aws("ec2")
    box_name = stack.app_env["BOX_NAME"]

    def holders() -> List[str]:
        return [a["InstanceId"] for v in find_data_volumes(ec2, box_name)
                for a in v.get("Attachments", []) if a.get("State") == "attached"]

    launched = find_instances(ec2, box_name, include_terminated=True)
    live = [i["InstanceId"] for i in launched if i["State"]["Name"] not in ("shutting-down", "terminated")]
    deadline = time.monotonic() + SETTLE_SECONDS
    while len(live) == 1 and holders() != live and time.monotonic() < deadline:
        time.sleep(0.2)
    volumes = find_data_volumes(ec2, box_name)
    attached = holders()
    relay_errors = stack.relay.errors if stack.relay is not None else []
    return {
        "instances_launched": len(launched),
        "live_instances": len(live),
        "data_volumes": len(volumes),
        "volume_attached_to_the_instance": len(live) == 1 and attached == live,
        # A handler error is what Lambda would log and retry (the relay delivers the event again).
        "relay_errors": relay_errors[:5],
        "as_expected": len(launched) == 1 and len(volumes) == 1 and attached == live,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Load test of the devbox API on the local stack.")
    parser.add_argument("--callers", type=int, default=40)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output", default=str(RESULTS / "load.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.callers <= 250 or not 1 <= args.requests <= 5000 or not 1 <= args.concurrency <= 64:
        parser.error("keep the burst bounded: callers 1-250, requests 1-5000, concurrency 1-64")
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="devbox-load-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None, peer_source_ip=True,
                        extra_app_env={"RULE_QUOTA": "1000"}) as stack:
            report = run_load(stack, args.callers, args.requests, args.concurrency)
    # Latencies are only as quiet as the machine: other work shows in these.
    report["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()],
                              "cpus": os.cpu_count()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(f"written to {output}")
    return 0 if report["errors"] == 0 and report["final_rules_as_expected"] and report["box"]["as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
