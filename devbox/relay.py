"""The relay: EC2 state changes in moto delivered to the app's event handlers.

On AWS, EventBridge calls on_running/on_stopped when the instance changes state; moto
sends no events. This process polls the instance's state in moto and, on each change,
calls the app's handler with the event EventBridge would send. It runs the app's own
code, with the same environment `chalice local` has.

    python -m devbox.relay --project-dir DIR   (env: AWS_ENDPOINT_URL, INSTANCE_ID, ...)
"""
import argparse
import importlib.util
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

EVENT_STATES = ("running", "stopped", "terminated")


def load_app(project: Path) -> ModuleType:
    """Import the project's app.py."""
    sys.path.insert(0, str(project))
    spec = importlib.util.spec_from_file_location("devbox_relay_app", project / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_change_event(instance_id: str, state: str, region: str) -> Dict[str, Any]:
    """The event EventBridge sends for an EC2 state change."""
    return {
        "version": "0",
        "id": f"relay-{time.time_ns()}",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:ec2:{region}:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


class Relay:
    """Polls one instance's state and calls a handler on each change."""

    def __init__(self, describe_state: Callable[[], str], handlers: Dict[str, Callable[[Dict[str, Any], Any], Any]],
                 make_event: Callable[[str], Dict[str, Any]], say: Callable[[str], None]) -> None:
        self.describe_state = describe_state
        self.handlers = handlers
        self.make_event = make_event
        self.say = say
        self.last_state: Optional[str] = None

    def poll_once(self) -> Optional[str]:
        """Deliver an event if the state changed since the last poll; returns the state delivered."""
        state = self.describe_state()
        if state == self.last_state:
            return None
        first = self.last_state is None
        self.last_state = state
        handler = self.handlers.get(state)
        if first or handler is None:
            return None
        handler(self.make_event(state), None)
        self.say(f"relay: delivered '{state}' to the app's event handler")
        return state


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", required=True, type=Path)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between polls")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def say(text: str) -> None:
        print(text, flush=True)

    import boto3

    app = load_app(args.project_dir)
    instance_id = os.environ["INSTANCE_ID"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    ec2 = boto3.client("ec2", region_name=region)

    def describe_state() -> str:
        found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return str(found["State"]["Name"])

    relay = Relay(describe_state, {"running": app.on_running, "stopped": app.on_stopped,
                                   "terminated": app.on_stopped},
                  lambda state: state_change_event(instance_id, state, region), say)
    relay.poll_once()
    say(f"relay: watching {instance_id} (state {relay.last_state})")
    while True:
        time.sleep(args.interval)
        try:
            relay.poll_once()
        except KeyboardInterrupt:
            return 0
        except Exception as err:  # keep relaying; a handler failure is what Lambda would log and retry
            say(f"relay: error: {type(err).__name__}: {err}")
            # Deliver the same state again on the next poll, as Lambda's async retry would.
            relay.last_state = "retry"


if __name__ == "__main__":
    sys.exit(main())
