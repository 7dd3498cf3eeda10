"""Latency of /status and a warm /start with their two reads one after the other, and side by side.

    python -m benchmarks.side_by_side [--delay-ms 200] [--runs 7]

Each AWS call is held for a fixed delay (a botocore before-send hook sleeps, then lets in-process
moto answer), the way a real endpoint's round trip would hold it. "Sequential" runs the same code
with the helper that makes the two reads at once replaced by one that makes them in turn.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAKE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}


def _in_turn(first: Callable[[], Any], second: Callable[[], Any]) -> Tuple[Any, Any]:
    return first(), second()


def measure(delay_ms: float, runs: int) -> Dict[str, Dict[str, float]]:
    """Median milliseconds of /status and a warm /start, reads in turn and side by side."""
    os.environ.update(FAKE)
    sys.path.insert(0, str(ROOT))
    from chalice.local import LambdaEventConverter
    from chalice.test import Client
    from moto import mock_aws

    from chalicelib import aws, service
    from tests.conftest import Devbox, write_project

    results: Dict[str, Dict[str, float]] = {}
    with mock_aws(), tempfile.TemporaryDirectory() as workdir:
        aws.reset_clients()
        from app import app

        box = Devbox()
        box.launch()

        def hold(**_: Any) -> None:
            time.sleep(delay_ms / 1000)

        aws.client("ec2").meta.events.register("before-send", hold)
        client = Client(app, stage_name="dev", project_dir=str(write_project(Path(workdir), box.env())))
        LambdaEventConverter.LOCAL_SOURCE_IP = "203.0.113.7"
        client.http.post("/start")  # the caller is let in once: later starts are warm (two reads)
        parallel = service._side_by_side
        for mode, helper in (("sequential", _in_turn), ("side_by_side", parallel)):
            service._side_by_side = helper  # type: ignore[assignment]
            for name, call in (("GET /status", lambda: client.http.get("/status")),
                               ("POST /start (warm)", lambda: client.http.post("/start"))):
                samples = []
                for _ in range(runs):
                    started = time.perf_counter()
                    assert call().status_code == 200
                    samples.append((time.perf_counter() - started) * 1000)
                results.setdefault(name, {})[mode] = round(statistics.median(samples), 1)
        service._side_by_side = parallel  # type: ignore[assignment]
        LambdaEventConverter.LOCAL_SOURCE_IP = "127.0.0.1"
    return results


def main() -> int:
    """Measure, print a table, write benchmarks/results/side_by_side.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=200.0, help="delay added to every AWS call")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    results = measure(args.delay_ms, args.runs)
    print(f"{'operation':<22}{'in turn (ms)':>14}{'side by side (ms)':>20}   ({args.delay_ms:g} ms per AWS call)")
    for name, row in results.items():
        print(f"{name:<22}{row['sequential']:>14}{row['side_by_side']:>20}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "side_by_side.json").write_text(json.dumps(
        {"delay_ms_per_call": args.delay_ms, "runs": args.runs, "median_ms": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
