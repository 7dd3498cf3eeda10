"""The local stack's stand-in for AWS: moto's server, plus two things AWS does that moto does not.

This process serves moto over HTTP as ``python -m moto.server`` does, and adds:

- the spot service: one endpoint stops an instance and records EC2's state reason for a spot
  interruption (``Server.SpotInstanceShutdown``), so the app sees what it would see on AWS;
- idempotency tokens: EC2 answers a RunInstances or CreateVolume call that repeats a
  ClientToken with the answer of the first call and creates nothing ("Ensuring idempotency in
  Amazon EC2 API requests"); moto ignores the token. The app relies on it when concurrent
  first starts race, so the local stack honours it.
- atomic writes: DynamoDB applies a conditional write to one item atomically, and EC2 creates one
  security group of a name per VPC; moto checks, then writes, so two calls at once could both
  pass. Writes to DynamoDB and CreateSecurityGroup calls are served one at a time here.

    python -m devbox.fakeaws --port PORT        (loopback only)
    POST /_devbox/spot-interruption  {"instance_id": "i-..."}   -> 200 {"stopped": "i-..."}
"""
import argparse
import io
import json
import sys
import threading
from urllib.parse import parse_qs
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

INTERRUPT_PATH = "/_devbox/spot-interruption"
SPOT_SHUTDOWN = ("Server.SpotInstanceShutdown: Spot Instance shutdown due to lack of capacity",
                 "Server.SpotInstanceShutdown")
StartResponse = Callable[[str, List[Tuple[str, str]]], Any]
WsgiApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]


def interrupt(instance_id: str, region: str) -> None:
    """Stop the instance as the spot service does when it reclaims capacity."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    backend.stop_instances([instance_id])
    backend.get_instance(instance_id).state_reason = StateReason(*SPOT_SHUTDOWN)


IDEMPOTENT_ACTIONS = ("RunInstances", "CreateVolume")
SERIALIZED_EC2_ACTIONS = ("CreateSecurityGroup",)
SERIALIZED_DYNAMODB = ("PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem")


class SpotService:
    """WSGI middleware in front of moto's application: the interruption endpoint and EC2's client tokens."""

    def __init__(self, app: WsgiApp, region: str) -> None:
        self.app = app
        self.region = region
        self.answers: Dict[Tuple[str, str], Tuple[str, List[Tuple[str, str]], bytes]] = {}
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != INTERRUPT_PATH:
            return self._with_client_token(environ, start_response)
        status, body = self._interrupt(environ)
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    def _with_client_token(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
        if target.startswith("DynamoDB_") and target.split(".")[-1] in SERIALIZED_DYNAMODB:
            return self._one_at_a_time(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        form = parse_qs(body.decode("utf-8", "replace"))
        action, token = form.get("Action", [""])[0], form.get("ClientToken", [""])[0]
        if action in SERIALIZED_EC2_ACTIONS:
            return self._one_at_a_time(environ, start_response)
        if action not in IDEMPOTENT_ACTIONS or not token:
            return self.app(environ, start_response)
        with self.lock:
            # One call per token at a time; a success is remembered and given to every repeat.
            answer = self.answers.get((action, token))
            if answer is None:
                captured: Dict[str, Any] = {}

                def capture(status: str, headers: List[Tuple[str, str]], *_: Any) -> Any:
                    captured.update(status=status, headers=list(headers))
                    return lambda data: None

                content = b"".join(self.app(environ, capture))
                answer = (captured["status"], captured["headers"], content)
                if answer[0].startswith("2"):
                    self.answers[(action, token)] = answer
        start_response(answer[0], answer[1])
        return [answer[2]]

    def _one_at_a_time(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        with self.write_lock:
            # The whole answer is produced under the lock: moto does its work while it is read.
            return [b"".join(self.app(environ, start_response))]

    def _interrupt(self, environ: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        if environ.get("REQUEST_METHOD") != "POST":
            return "405 Method Not Allowed", {"error": "POST only"}
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            instance_id = json.loads(environ["wsgi.input"].read(length) or b"{}")["instance_id"]
            interrupt(str(instance_id), self.region)
        except (ValueError, KeyError, TypeError) as err:
            return "400 Bad Request", {"error": f"expected {{\"instance_id\": \"i-...\"}}: {err}"}
        except Exception as err:  # moto's own "no such instance" and the like
            return "404 Not Found", {"error": f"{type(err).__name__}: {err}"}
        return "200 OK", {"stopped": instance_id, "reason": SPOT_SHUTDOWN[1]}


def main(argv: Optional[List[str]] = None) -> int:
    """Serve moto and the spot service on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args(argv)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = SpotService(DomainDispatcherApplication(create_backend_app), args.region)
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"fake AWS (moto + spot service) on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
