"""AWS calls per operation of a fleet (FLEET=true): an owner's routes and events, and an admin's /boxes.

    python -m benchmarks.fleet [--boxes 50]

Counted in-process (moto's mock, chalice's test client, botocore's before-call hook), so the
numbers are the calls the code makes, whatever moto's speed. /boxes is measured with --boxes
boxes, each with an instance, to show that its calls do not grow with the fleet.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAKE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}


def measure(boxes: int) -> Dict[str, Any]:
    """Calls (names, in order made) per operation, and /boxes over a fleet of ``boxes`` boxes."""
    os.environ.update(FAKE)
    sys.path.insert(0, str(ROOT))
    from chalice.test import Client
    from moto import mock_aws

    from chalicelib import aws
    from tests.conftest import ADMIN, ALICE, Fleet, count_calls, signed_as, state_event, write_project

    who = {"arn": ALICE, "ip": "203.0.113.10"}
    report: Dict[str, Any] = {"calls": {}}
    try:
        with mock_aws(), tempfile.TemporaryDirectory() as workdir, signed_as(who):
            aws.reset_clients()
            from app import app

            team = Fleet()
            env = team.env(MAX_BOXES=str(max(20, boxes + 1)))
            client = Client(app, stage_name="dev", project_dir=str(write_project(Path(workdir), env)))
            log = count_calls("ec2", "route53", "dynamodb")

            def count(label: str, call: Any) -> None:
                log.reset()
                call()
                report["calls"][label] = {"count": len(log.made), "calls": list(log.made)}

            def instance_of(slug: str) -> str:
                return str(team.box_instances(slug)[0]["InstanceId"])

            count("GET /status (owner, no box yet)", lambda: client.http.get("/status"))
            count("POST /start (first start: claim, group, launch, volume)", lambda: client.http.post("/start"))
            count("on_running (first instance)", lambda: client.lambda_.invoke(
                "on_running", state_event(client, instance_of("alice"), "running")))
            count("GET /status (owner, running box)", lambda: client.http.get("/status"))
            count("POST /start (running box, caller allowed)", lambda: client.http.post("/start"))
            count("POST /stop (owner)", lambda: client.http.post("/stop"))
            team.ec2.stop_instances(InstanceIds=[instance_of("alice")])
            count("on_stopped (one box's rules and record, the session's cost)", lambda: client.lambda_.invoke(
                "on_stopped", state_event(client, instance_of("alice"), "stopped")))
            count("GET /status (owner, stopped box)", lambda: client.http.get("/status"))
            count("POST /start (stopped box)", lambda: client.http.post("/start"))
            for n in range(1, boxes):
                who["arn"] = f"arn:aws:iam::123456789012:user/dev{n:03d}"
                assert client.http.post("/start").status_code == 200
            who["arn"] = ADMIN
            started = time.perf_counter()
            count(f"GET /boxes (admin, {boxes} boxes)", lambda: client.http.get("/boxes"))
            report["boxes_ms_in_process"] = round((time.perf_counter() - started) * 1000, 1)
            listed = client.http.get("/boxes").json_body
            report["boxes_listed"] = listed["count"]
            count("POST /boxes/dev001/stop (admin)", lambda: client.http.post("/boxes/dev001/stop"))
            count("housekeeping (every box in turn)", lambda: client.lambda_.invoke(
                "housekeeping", client.events.generate_cw_event(
                    source="aws.events", detail_type="Scheduled Event", detail={}, resources=[],
                    region="us-east-1")))
    finally:
        aws.reset_clients()
    report["measured_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    report["boxes"] = boxes
    return report


def main() -> int:
    """Measure, print a table, write benchmarks/results/fleet.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=50, help="boxes in the fleet when /boxes is measured")
    args = parser.parse_args()
    if not 2 <= args.boxes <= 500:
        parser.error("--boxes: 2 to 500")
    report = measure(args.boxes)
    print(f"{'operation':<62}{'AWS calls':>10}")
    for label, row in report["calls"].items():
        print(f"{label:<62}{row['count']:>10}")
    print(f"\n/boxes listed {report['boxes_listed']} boxes")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "fleet.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
