"""Load test: a bounded burst of concurrent signed /status and /start calls from many callers.

Runs against the local stack (moto server + Chalice's local server on loopback) with the
app's real rule quota: a group holds 60 inbound rules, as in AWS, so 30 callers fit and the
default burst brings 50. Each simulated caller binds its own loopback address (127.0.1.N),
and the server reports the connection's address as sourceIp, as API Gateway does. Reports
requests made, errors, latency percentiles, how often a start had to plan again because
the group was full, and whether the group's final rules are exactly the newest callers
that fit, each with one SSH and one ping rule.

"Newest" is by the rules' stamps (``devbox-access for=<ip> at=<UTC>``), the order the app
evicts in. A watcher reads the group every WATCH_SECONDS during the burst and keeps each
caller's newest stamp; no caller left out at the end may have been seen with a stamp newer
than the oldest caller kept. A rule that came and went between two reads is not seen: the
check can miss a wrong eviction, never invent one.

The burst opens with every caller's /start at once (the 20 that do not fit evict while the
others are still being let in); then it goes round the callers, one call in --start-every a
start, the others /status. Going round 50 callers with room for 30, every one of those starts
finds its caller evicted and evicts in turn: a cache thrash, harsher than people starting
their sessions. --start-every 3 is the harshest mix tried.

The box has no instance when the burst begins, so its first /start calls race to launch
it: they must end with one instance and one data volume attached to it (RunInstances and
CreateVolume take a client token, which the local fake AWS honours as EC2 does).

    python -m benchmarks.load [--callers 50] [--requests 500] [--concurrency 16] [--start-every 5]
"""
import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from devbox.boxaws import find_data_volumes, find_instances
from devbox.local import FAKE_CREDENTIALS, REGION, LocalStack

RESULTS = Path(__file__).resolve().parent / "results"
# How long the relay may take, after the burst, to deliver the running event that attaches the volume.
SETTLE_SECONDS = 30.0
# The app's RULE_QUOTA when the stage does not set one: AWS's (and moto's) 60 inbound rules per group.
DEFAULT_RULE_QUOTA = 60
# How often the watcher reads the group during the burst (each read is one call to moto).
WATCH_SECONDS = 0.5
# The app's own rules, as the app describes them; anything else in the group is unexpected here.
APP_RULE = re.compile(r"\Adevbox-access for=(?P<ip>[0-9.]+) at=(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\Z")
PAIR = {("tcp", 22), ("icmp", 8)}
# After the first wave, one call in this many is a start; the others poll /status, as `devbox start --wait` does.
START_EVERY = 5


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


class RuleWatcher:
    """Reads the group over and over in a thread; keeps the newest stamp seen on each caller's rules."""

    def __init__(self, stack: LocalStack) -> None:
        self.ec2 = stack.aws("ec2")
        self.group_id = stack.app_env["SECURITY_GROUP_ID"]
        self.newest: Dict[str, datetime] = {}
        self.reads = 0
        self.most_rules = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rule-watcher", daemon=True)

    def __enter__(self) -> "RuleWatcher":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def rules(self) -> List[Dict[str, Any]]:
        """The group's inbound rules now."""
        found = self.ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [self.group_id]}])
        return [r for r in found["SecurityGroupRules"] if not r["IsEgress"]]

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            rules = self.rules()
            self.reads += 1
            self.most_rules = max(self.most_rules, len(rules))
            for ip, stamp in (_stamp(r) for r in rules):
                if ip and stamp and (ip not in self.newest or stamp > self.newest[ip]):
                    self.newest[ip] = stamp


def _stamp(rule: Dict[str, Any]) -> Tuple[Optional[str], Optional[datetime]]:
    """(caller address, stamp) of a rule in the app's format, naming the address it lets in; else (None, None)."""
    match = APP_RULE.match(rule.get("Description") or "")
    if match is None or rule.get("CidrIpv4") != f"{match.group('ip')}/32":
        return None, None
    return match.group("ip"), datetime.strptime(match.group("at"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def check_access(rules: List[Dict[str, Any]], ips: List[str], fit: int, seen: Dict[str, datetime]) -> Dict[str, Any]:
    """Whether the group holds exactly the newest `fit` callers, each with a whole pair, and nothing else."""
    pairs: Dict[str, List[Tuple[str, int]]] = {}
    stamps: Dict[str, List[datetime]] = {}
    strangers = []
    for rule in rules:
        ip, stamp = _stamp(rule)
        if ip is None or stamp is None or ip not in ips:
            strangers.append([rule["IpProtocol"], rule["FromPort"], rule.get("CidrIpv4") or rule.get("CidrIpv6"),
                              rule.get("Description")])
            continue
        pairs.setdefault(ip, []).append((rule["IpProtocol"], rule["FromPort"]))
        stamps.setdefault(ip, []).append(stamp)
    broken = sorted(ip for ip, found in pairs.items() if len(found) != 2 or set(found) != PAIR)
    kept = {ip: max(found) for ip, found in stamps.items()}
    left_out = [ip for ip in ips if ip not in kept]
    oldest_kept = min(kept.values()) if kept else None
    newest_left_out = max((seen[ip] for ip in left_out if ip in seen), default=None)
    # Stamps have whole seconds: callers stamped in the same second are equally new.
    newer_left_out = sorted(ip for ip in left_out if oldest_kept and ip in seen and seen[ip] > oldest_kept)
    return {
        "final_rules": len(rules),
        "final_callers": len(kept),
        "callers_that_fit": fit,
        "whole_pairs": not broken,
        "half_or_odd_pairs": broken[:5],
        "unexpected_rules": strangers[:5],
        "left_out_callers": len(left_out),
        "left_out_seen_by_watcher": sum(1 for ip in left_out if ip in seen),
        "oldest_kept_stamp": _iso(oldest_kept),
        "newest_left_out_stamp": _iso(newest_left_out),
        "left_out_newer_than_kept": newer_left_out[:5],
        "final_rules_as_expected": (not strangers and not broken and len(kept) == fit and len(rules) == 2 * fit
                                    and not newer_left_out),
    }


def _iso(value: Optional[datetime]) -> Optional[str]:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def start_calls(log_lines: Iterable[str]) -> Dict[str, Any]:
    """From the API's log (one JSON line per request): the AWS calls of each /start that answered 200.

    A start reads the rules once beside the instances and again before each new plan; it
    revokes once per caller it evicts (or finds already evicted by another start).
    """
    reads: Dict[str, int] = {}
    calls: List[float] = []
    revokes: List[float] = []
    for line in log_lines:
        brace = line.find("{")
        if brace < 0:
            continue
        try:
            record = json.loads(line[brace:])
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("operation") != "start" or record.get("status") != 200:
            continue
        made = [str(c) for c in record.get("calls", [])]
        count = str(made.count("DescribeSecurityGroupRules"))
        reads[count] = reads.get(count, 0) + 1
        calls.append(len(made))
        revokes.append(made.count("RevokeSecurityGroupIngress"))
    return {
        "rule_reads_per_start": dict(sorted(reads.items(), key=lambda kv: int(kv[0]))),
        "aws_calls_per_start": {"p50": percentile(calls, 0.5), "p90": percentile(calls, 0.9), "max": max(calls)}
        if calls else None,
        "revokes_per_start": {"p50": percentile(revokes, 0.5), "p90": percentile(revokes, 0.9), "max": max(revokes)}
        if revokes else None,
    }


def run_load(stack: LocalStack, callers: int, requests: int, concurrency: int,
             start_every: int = START_EVERY) -> Dict[str, Any]:
    """Fire the burst and check the final rule set."""
    ips = [f"127.0.1.{i}" for i in range(1, callers + 1)]
    # Every caller starts once, all at the beginning; the rest of the burst goes round the callers,
    # one call in start_every a start. With more callers than fit, each of those starts finds its
    # caller evicted and evicts the oldest in turn.
    plan = [(ip, "POST", "/start") for ip in ips]
    plan += [(ips[i % callers], "GET" if i % start_every else "POST", "/status" if i % start_every else "/start")
             for i in range(max(0, requests - callers))]
    quota = int(stack.app_env.get("RULE_QUOTA", DEFAULT_RULE_QUOTA))
    fit = min(callers, quota // 2)
    latencies: List[float] = []
    statuses: Dict[str, int] = {}
    start_actions: Dict[str, int] = {}
    errors: List[str] = []
    resets: List[str] = []
    lock = threading.Lock()

    def one(item: Tuple[str, str, str]) -> None:
        ip, method, path = item
        try:
            try:
                answer = request(stack.api_port, ip, method, path)
            except ConnectionResetError:
                # Chalice's local server (a listen backlog of 5) now and then resets a connection when
                # 16 arrive at once; both calls are safe to repeat. Counted apart, and once only.
                with lock:
                    resets.append(f"{method} {path} from {ip}")
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
    log = stack.workdir / "api.log"
    log_offset = log.stat().st_size if log.exists() else 0
    with RuleWatcher(stack) as watcher:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, plan))
        elapsed = time.perf_counter() - started
    access = check_access(watcher.rules(), ips, fit, watcher.newest)
    box = box_outcome(stack)
    with open(log, "rb") as api_log:
        api_log.seek(log_offset)
        starts = start_calls(api_log.read().decode("utf-8", "replace").splitlines())
    return {
        "callers": callers,
        "requests": len(plan),
        "concurrency": concurrency,
        "start_every": start_every,
        "starts": sum(1 for _, _, path in plan if path == "/start"),
        "rule_quota": quota,
        "seconds": round(elapsed, 2),
        "requests_per_second": round(len(plan) / elapsed, 1) if elapsed else None,
        "statuses": statuses,
        "start_actions": start_actions,
        "errors": len(errors),
        "error_samples": errors[:5],
        "connections_reset_and_repeated": resets,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
            "p90": round(percentile(latencies, 0.90) * 1000, 1) if latencies else None,
            "p99": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
            "max": round(max(latencies) * 1000, 1) if latencies else None,
            "mean": round(statistics.mean(latencies) * 1000, 1) if latencies else None,
        },
        # Per /start that answered 200. Rule reads: 1 is the read beside the instances; each more is a
        # new plan, after AWS refused an add over the quota or after callers in line were taken by others.
        **starts,
        "watcher": {"reads": watcher.reads, "most_rules_seen": watcher.most_rules},
        **access,
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
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--start-every", type=int, default=START_EVERY,
                        help="after the first wave, one call in this many is a start (3: the harshest tried)")
    parser.add_argument("--output", default=str(RESULTS / "load.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.callers <= 250 or not 1 <= args.requests <= 5000 or not 1 <= args.concurrency <= 64:
        parser.error("keep the burst bounded: callers 1-250, requests 1-5000, concurrency 1-64")
    if not 1 <= args.start_every <= 100:
        parser.error("--start-every: 1 to 100")
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="devbox-load-") as workdir:
        # The stage keeps the app's own RULE_QUOTA (60): moto, like AWS, holds a group to 60 inbound rules.
        with LocalStack(Path(workdir), say=lambda _: None) as stack:
            report = run_load(stack, args.callers, args.requests, args.concurrency, args.start_every)
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
