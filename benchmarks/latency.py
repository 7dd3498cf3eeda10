"""Latency of GET /status and a warm POST /start: their two reads one after the other, and side by side.

    python -m benchmarks.latency [--delay-ms 200] [--runs 9] [--output benchmarks/results/latency.json]

The app runs in-process (Chalice's test client) with its boto3 clients pointed, by
AWS_ENDPOINT_URL, at a small HTTP proxy on loopback that holds every request for a fixed delay
and then forwards it to a moto server: the delay stands for AWS's round trip. The proxy, rather
than a botocore hook that sleeps in-process (benchmarks/side_by_side.py), puts the real HTTP path
between the two reads: two requests from one client must overlap on two pooled connections, and
the proxy counts the calls each operation made, so the number measured is the two-read path.

"Before" runs the same code with service._side_by_side replaced by a helper that makes the two
reads in turn; the modes alternate run by run so drift in the machine's load hits both alike.
"""
import argparse
import http.client
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAKE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
CALLER = "203.0.113.7"
OPERATIONS = ("GET /status", "POST /start (warm)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DelayProxy(ThreadingHTTPServer):
    """Loopback HTTP proxy: holds each request for ``delay`` seconds, then forwards it to the upstream port."""

    daemon_threads = True

    def __init__(self, upstream_port: int, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _Relay)
        self.upstream_port = upstream_port
        self.delay = delay
        self.calls: List[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_calls(self) -> List[str]:
        """The AWS actions forwarded since the last take, in the order they arrived."""
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DelayProxy

    def do_POST(self) -> None:
        self._relay()

    def do_GET(self) -> None:
        self._relay()

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.calls.append(parse_qs(body.decode("utf-8", "replace")).get("Action", ["?"])[0])
        time.sleep(self.server.delay)
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            content = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "content-length", "transfer-encoding", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *_: Any) -> None:
        pass


def _in_turn(first: Callable[[], Any], second: Callable[[], Any]) -> Tuple[Any, Any]:
    """The reads as they were made before: the second starts when the first has answered."""
    return first(), second()


def measure(delay_ms: float, runs: int) -> Dict[str, Any]:
    """Median and spread, in ms, of each operation with its reads in turn and side by side."""
    os.environ.update(FAKE)
    sys.path.insert(0, str(ROOT))
    from chalice.local import LambdaEventConverter
    from chalice.test import Client
    from moto.server import ThreadedMotoServer

    from chalicelib import aws, service
    from tests.conftest import Devbox, write_project

    # moto's server logs every request through werkzeug's logger; the table is the output here.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    proxy = DelayProxy(moto_port, delay_ms / 1000)
    threading.Thread(target=proxy.serve_forever, name="delay-proxy", daemon=True).start()
    source_ip = LambdaEventConverter.LOCAL_SOURCE_IP
    parallel = service._side_by_side
    previous_endpoint = os.environ.get("AWS_ENDPOINT_URL")
    samples: Dict[str, Dict[str, List[float]]] = {name: {"sequential": [], "side_by_side": []} for name in OPERATIONS}
    calls: Dict[str, List[str]] = {}
    try:
        # The box and its group are made straight in moto; only the app's calls go through the proxy.
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{moto_port}"
        box = Devbox(with_dns=False)
        box.launch()
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        aws.reset_clients()
        from app import app

        with tempfile.TemporaryDirectory() as workdir:
            client = Client(app, stage_name="dev", project_dir=str(write_project(Path(workdir), box.env(
                LOG_LEVEL="WARNING"))))
            LambdaEventConverter.LOCAL_SOURCE_IP = CALLER
            # Chalice warns on every request that it does not enforce IAM locally; known and beside the point.
            warnings.filterwarnings("ignore", message="IAMAuthorizer is not a supported", category=UserWarning)
            requests: Dict[str, Callable[[], Any]] = {"GET /status": lambda: client.http.get("/status"),
                                                      "POST /start (warm)": lambda: client.http.post("/start")}
            requests["POST /start (warm)"]()  # lets the caller in: every later start is warm, two reads
            for name in OPERATIONS:
                requests[name]()  # the first calls of each kind pay for connections and moto's first answers
            proxy.take_calls()
            for run in range(runs):
                modes = [("sequential", _in_turn), ("side_by_side", parallel)]
                for mode, helper in modes if run % 2 == 0 else modes[::-1]:
                    service._side_by_side = helper  # type: ignore[assignment]
                    for name in OPERATIONS:
                        started = time.perf_counter()
                        answer = requests[name]()
                        samples[name][mode].append((time.perf_counter() - started) * 1000)
                        made = proxy.take_calls()
                        if answer.status_code != 200:
                            raise RuntimeError(f"{name} answered {answer.status_code}: {answer.body!r}")
                        calls.setdefault(name, made)
                        if sorted(made) != sorted(calls[name]):
                            raise RuntimeError(f"{name} made {made}, not {calls[name]} as before: not the same path")
    finally:
        service._side_by_side = parallel  # type: ignore[assignment]
        LambdaEventConverter.LOCAL_SOURCE_IP = source_ip
        if previous_endpoint is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous_endpoint
        aws.reset_clients()
        proxy.shutdown()
        proxy.server_close()
        moto.stop()
    results: Dict[str, Any] = {}
    for name in OPERATIONS:
        row: Dict[str, Any] = {"aws_calls": sorted(calls[name])}
        for mode, values in samples[name].items():
            row[f"{mode}_ms"] = round(statistics.median(values), 1)
            row[f"{mode}_spread_ms"] = [round(min(values), 1), round(max(values), 1)]
        row["saved_ms"] = round(row["sequential_ms"] - row["side_by_side_ms"], 1)
        results[name] = row
    return results


def print_table(report: Dict[str, Any]) -> None:
    """The medians as aligned text."""
    print(f"{'operation':<22}{'AWS calls':>10}{'in turn (ms)':>15}{'side by side (ms)':>20}{'saved (ms)':>13}"
          f"   ({report['delay_ms_per_call']:g} ms per AWS call, median of {report['runs']})")
    for name, row in report["median_ms"].items():
        print(f"{name:<22}{len(row['aws_calls']):>10}{row['sequential_ms']:>15}{row['side_by_side_ms']:>20}"
              f"{row['saved_ms']:>13}")


def main(argv: Optional[List[str]] = None) -> int:
    """Measure, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=200.0, help="delay the proxy adds to every AWS call")
    parser.add_argument("--runs", type=int, default=9, help="runs of each operation in each mode")
    parser.add_argument("--output", default=str(RESULTS / "latency.json"))
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 2000 or not 1 <= args.runs <= 100:
        parser.error("--delay-ms 0-2000, --runs 1-100")
    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": "HTTP proxy on loopback holding each request, in front of a moto server; the app in-process",
        "delay_ms_per_call": args.delay_ms,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "median_ms": measure(args.delay_ms, args.runs),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
