"""The relay: EC2 state changes in moto delivered to the app's event handlers.

On AWS, EventBridge calls on_running/on_stopped when an instance changes state; moto
sends no events. This process polls the states of the box's instances (found by their
devbox:box tag, as the app finds them; with FLEET=true, every box of the fleet) and, on each change, calls the app's handler with
the event EventBridge would send. It runs the app's own code, with the same environment
`chalice local` has.

    python -m devbox.relay --project-dir DIR   (env: AWS_ENDPOINT_URL, BOX_NAME, ...)
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
from typing import Any, Callable, Dict, List, Optional, Tuple

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
    """Polls the states of the box's instances and calls a handler on each change.

    The first poll only records what exists. An instance that appears later is new (launched
    by a start or relaunch): it is taken to have been pending, so its first state is delivered.
    """

    def __init__(self, describe_states: Callable[[], Dict[str, str]],
                 handlers: Dict[str, Callable[[Dict[str, Any], Any], Any]],
                 make_event: Callable[[str, str], Dict[str, Any]], say: Callable[[str], None]) -> None:
        self.describe_states = describe_states
        self.handlers = handlers
        self.make_event = make_event
        self.say = say
        self.last_states: Optional[Dict[str, str]] = None

    def poll_once(self) -> List[Tuple[str, str]]:
        """Deliver an event for each instance whose state changed; returns (instance, state) delivered."""
        states = self.describe_states()
        if self.last_states is None:
            self.last_states = dict(states)
            return []
        delivered = []
        for instance_id, state in sorted(states.items()):
            if state == self.last_states.get(instance_id, "pending"):
                continue
            handler = self.handlers.get(state)
            if handler is not None:
                # Recorded only after the handler succeeded: a failure is delivered again next poll.
                handler(self.make_event(instance_id, state), None)
                self.say(f"relay: delivered '{state}' of {instance_id} to the app's event handler")
                delivered.append((instance_id, state))
            self.last_states[instance_id] = state
        return delivered


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
    # A fleet's boxes are <BOX_NAME>/<owner>: EC2's tag filter takes the wildcard.
    fleet = os.environ.get("FLEET", "").strip().lower() in ("true", "yes", "1", "on")
    box_name = os.environ["BOX_NAME"] + ("/*" if fleet else "")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    ec2 = boto3.client("ec2", region_name=region)

    def describe_states() -> Dict[str, str]:
        # The box's instances, found by tag as the app finds them.
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:devbox:box", "Values": [box_name]}])
        return {i["InstanceId"]: str(i["State"]["Name"])
                for page in pages for r in page["Reservations"] for i in r["Instances"]}

    relay = Relay(describe_states, {"running": app.on_running, "stopped": app.on_stopped,
                                    "terminated": app.on_stopped},
                  lambda instance_id, state: state_change_event(instance_id, state, region), say)
    relay.poll_once()
    say(f"relay: watching the instances of box {box_name} ({len(relay.last_states or {})} now)")
    while True:
        time.sleep(args.interval)
        try:
            relay.poll_once()
        except KeyboardInterrupt:
            return 0
        except Exception as err:  # keep relaying; a handler failure is what Lambda would log and retry
            say(f"relay: error: {type(err).__name__}: {err}")


if __name__ == "__main__":
    sys.exit(main())
