"""The local stack's stand-in for AWS: moto's server, plus what AWS's spot service does by itself.

moto answers the AWS APIs but nothing in it ever interrupts a spot instance. This process
serves moto over HTTP exactly as ``python -m moto.server`` does, and adds one endpoint that
plays the spot service: it stops an instance and records EC2's state reason for a spot
interruption (``Server.SpotInstanceShutdown``), so the app sees what it would see on AWS.

    python -m devbox.fakeaws --port PORT        (loopback only)
    POST /_devbox/spot-interruption  {"instance_id": "i-..."}   -> 200 {"stopped": "i-..."}
"""
import argparse
import json
import sys
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


class SpotService:
    """WSGI middleware: the interruption endpoint in front of moto's application."""

    def __init__(self, app: WsgiApp, region: str) -> None:
        self.app = app
        self.region = region

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != INTERRUPT_PATH:
            return self.app(environ, start_response)
        status, body = self._interrupt(environ)
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

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
