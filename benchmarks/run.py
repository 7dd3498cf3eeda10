"""Benchmarks: AWS calls per operation, cold start, package size, time to ready.

    python -m benchmarks.run [--runs 5] [--output benchmarks/results/benchmarks.json]

Prints a table and writes the numbers as JSON. Everything runs locally against moto.
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
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAKE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}


def aws_calls_per_operation() -> Dict[str, List[str]]:
    """Run each operation once against in-process moto and list the AWS calls it made."""
    os.environ.update(FAKE)
    sys.path.insert(0, str(ROOT))
    from chalice.local import LambdaEventConverter
    from chalice.test import Client
    from moto import mock_aws

    from chalicelib import aws
    from tests.conftest import CallLog, Devbox, scheduled_event, state_event, write_project

    calls: Dict[str, List[str]] = {}
    with mock_aws(), tempfile.TemporaryDirectory() as workdir:
        aws.reset_clients()
        from app import app

        box = Devbox()
        log = CallLog()
        for service in ("ec2", "route53", "sns"):
            aws.client(service).meta.events.register("before-call", log.record)
        client = Client(app, stage_name="dev", project_dir=str(write_project(Path(workdir), box.env())))

        def measure(name: str, action: Any) -> None:
            log.reset()
            action()
            calls[name] = list(log.calls)

        box.stop()
        LambdaEventConverter.LOCAL_SOURCE_IP = "203.0.113.7"
        measure("GET /status", lambda: client.http.get("/status"))
        measure("POST /start (stopped box, new caller)", lambda: client.http.post("/start"))
        measure("on_running (spot box, DNS managed)",
                lambda: client.lambda_.invoke("on_running", state_event(client, box.instance_id, "running")))
        measure("POST /start (running box, caller allowed)", lambda: client.http.post("/start"))
        LambdaEventConverter.LOCAL_SOURCE_IP = "198.51.100.9"
        measure("POST /start (running box, new caller)", lambda: client.http.post("/start"))
        measure("POST /stop (running box)", lambda: client.http.post("/stop"))
        measure("POST /stop (stopped box)", lambda: client.http.post("/stop"))
        measure("on_stopped", lambda: client.lambda_.invoke("on_stopped", state_event(client, box.instance_id, "stopped")))
        event = state_event(client, box.instance_id, "running")
        event["detail-type"] = "EC2 Spot Instance Interruption Warning"
        measure("on_interruption (no topic)", lambda: client.lambda_.invoke("on_interruption", event))
        measure("housekeeping (no MAX_RUNTIME_HOURS)", lambda: client.lambda_.invoke("housekeeping", scheduled_event(client)))
        LambdaEventConverter.LOCAL_SOURCE_IP = "127.0.0.1"
    return calls


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
print(json.dumps({"import": t1 - t0, "first_request": t2 - t1, "warm": sorted(warm)[2], "status": first["statusCode"]}))
'''


def cold_start(runs: int) -> Dict[str, Any]:
    """Fresh processes importing the app and serving a first /status against a moto server."""
    sys.path.insert(0, str(ROOT))
    from devbox.local import LocalStack

    with tempfile.TemporaryDirectory() as workdir:
        stack = LocalStack(Path(workdir), say=lambda _: None)
        try:
            stack.start()
            env = {**os.environ, **FAKE, **stack.app_env, "AWS_ENDPOINT_URL": stack.endpoint}
            script = _COLD.replace("ROOT", repr(str(ROOT)))
            # One unmeasured run: moto builds its EC2 backend on the first call.
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
    assert all(s["status"] == 200 for s in samples), samples
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


def time_to_ready() -> Dict[str, Any]:
    """In the local stack: from `devbox start` to the box running with its DNS record and access."""
    sys.path.insert(0, str(ROOT))
    import requests

    from devbox.local import LocalStack

    with tempfile.TemporaryDirectory() as workdir:
        with LocalStack(Path(workdir), say=lambda _: None) as stack:
            requests.get(f"{stack.url}/status", timeout=30)  # warm moto's backend, as a deployed API is warm
            started = time.perf_counter()
            response = requests.post(f"{stack.url}/start", timeout=30)
            api_done = time.perf_counter()
            marks: Dict[str, Optional[float]] = {"running": None, "dns": None}
            deadline = started + 30
            while time.perf_counter() < deadline and None in marks.values():
                if marks["running"] is None and stack.relay and "running" in stack.relay.delivered:
                    marks["running"] = time.perf_counter()
                if marks["dns"] is None and stack.a_record():
                    marks["dns"] = time.perf_counter()
                time.sleep(0.02)
            cli_started = time.perf_counter()
            requests.post(f"{stack.url}/stop", timeout=30)
            time.sleep(1)
            cli = subprocess.run([sys.executable, "-m", "devbox", "start", "--wait", "--no-ssh-probe", "--timeout", "60"],
                                 env=stack.client_env(), capture_output=True, text=True)
            cli_done = time.perf_counter()
    ms = lambda t: round((t - started) * 1000, 1) if t else None  # noqa: E731
    return {
        "api_start_ms": ms(api_done),
        "api_status": response.status_code,
        "relay_delivered_running_ms": ms(marks["running"]),
        "dns_record_in_place_ms": ms(marks["dns"]),
        "devbox_start_wait_cli_ms": round((cli_done - cli_started - 1) * 1000, 1),
        "cli_exit": cli.returncode,
        "note": "moto boots instantly: all of this is ours (API, relay poll interval, DNS); on AWS add ~20-40 s of "
                "instance boot, and the relay is EventBridge (typically well under a second).",
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the devbox service.")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes for the cold start median")
    parser.add_argument("--output", default=str(RESULTS / "benchmarks.json"))
    parser.add_argument("--skip", action="append", default=[], choices=["calls", "cold", "package", "ready"])
    args = parser.parse_args(argv)
    report: Dict[str, Any] = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "python": sys.version.split()[0]}
    if "calls" not in args.skip:
        calls = aws_calls_per_operation()
        report["aws_calls"] = {name: {"count": len(found), "calls": found} for name, found in calls.items()}
    if "cold" not in args.skip:
        report["cold_start"] = cold_start(args.runs)
    if "package" not in args.skip:
        report["package"] = package_size()
    if "ready" not in args.skip:
        report["time_to_ready"] = time_to_ready()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {output}")
    return 0


def print_table(report: Dict[str, Any]) -> None:
    """The report as aligned text."""
    for name, entry in report.get("aws_calls", {}).items():
        print(f"{name:<45} {entry['count']:>2}  {', '.join(entry['calls'])}")
    for section in ("cold_start", "package", "time_to_ready"):
        if section in report:
            print(f"\n{section}")
            for key, value in report[section].items():
                print(f"  {key:<32} {value}")


if __name__ == "__main__":
    sys.exit(main())
