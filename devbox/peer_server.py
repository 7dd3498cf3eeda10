"""The local stack's API server: `chalice local`, with API Gateway's SigV4 check and caller identity.

It is Chalice's own local server and gateway (routes, stage environment variables, errors), with
two things API Gateway does that `chalice local` does not:

- a route with an IAMAuthorizer admits only a request signed with a known local access key
  (devbox.sigv4_check); anything else gets API Gateway's 403 and never reaches the app;
- requestContext.identity carries the signer (accessKey, userArn, accountId, caller, user) and
  the TCP peer's address as sourceIp, so callers that bind distinct loopback addresses
  (127.0.0.2, 127.0.0.3, ...) look like many callers, as they would on AWS.

    python -m devbox.peer_server --project-dir DIR --port PORT [--identities FILE]
"""
import argparse
import functools
import logging
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from devbox.sigv4_check import (
    KeyTable,
    SignatureRefused,
    SignedRequest,
    key_table,
    load_identities,
    request_identity,
    verify,
)

Clock = Callable[[], datetime]
# Not under "devbox": that is the app's logger, which Chalice holds at ERROR unless debug is on.
LOG = logging.getLogger("local_api_gateway")
READY = "devbox API server listening on"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def make_server(app: Any, config: Any, host: str, port: int, keys: KeyTable, region: str,
                clock: Clock = _utc_now) -> Any:
    """Chalice's LocalDevServer for the app, bound to host:port, checking signatures with keys."""
    from chalice import IAMAuthorizer, local

    class SigV4Authorizer(local.LocalGatewayAuthorizer):
        """Where API Gateway checks IAM auth: after the route matched, before the integration runs."""

        def __init__(self, app_object: Any, source_ip: str) -> None:
            super().__init__(app_object)
            self.source_ip = source_ip

        def authorize(self, raw_path: str, lambda_event: Dict[str, Any], lambda_context: Any) -> Tuple[Any, Any]:
            route = self._route_for_event(lambda_event)
            if route is None or not isinstance(route.authorizer, IAMAuthorizer):
                lambda_event["requestContext"]["identity"] = request_identity(
                    None, self.source_ip, lambda_event["headers"].get("user-agent"))
                return super().authorize(raw_path, lambda_event, lambda_context)
            headers = lambda_event["headers"]
            request = SignedRequest(lambda_event["requestContext"]["httpMethod"], raw_path, headers,
                                    _body_bytes(lambda_event))
            try:
                identity = verify(request, keys, clock(), region)
            except SignatureRefused as refused:
                LOG.info("refused %s %s from %s: %s: %s", request.method, raw_path, self.source_ip,
                         refused.error_type, refused.message.splitlines()[0])
                raise local.ForbiddenError({"x-amzn-RequestId": lambda_context.aws_request_id,
                                            "x-amzn-ErrorType": refused.error_type}, refused.body()) from None
            LOG.info("signed %s %s by %s (%s) from %s", request.method, raw_path, identity.user_arn,
                     identity.access_key, self.source_ip)
            lambda_event["requestContext"]["identity"] = request_identity(identity, self.source_ip,
                                                                          headers.get("user-agent"))
            return lambda_event, lambda_context

    class SigV4Handler(local.ChaliceRequestHandler):
        def __init__(self, request: Any, client_address: Any, server: Any, app_object: Any, config: Any) -> None:
            self.local_gateway = local.LocalGateway(app_object, config)
            # One handler (and gateway) per connection: the peer's address is this connection's.
            self.local_gateway._authorizer = SigV4Authorizer(app_object, client_address[0])
            local.BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    # The IAMAuthorizer warning of chalice's local mode no longer holds: this server checks it.
    warnings.filterwarnings("ignore", message="IAMAuthorizer is not a supported in local mode")
    server = local.create_local_server(app, config, host, port)
    server.server.RequestHandlerClass = functools.partial(SigV4Handler, app_object=app, config=config)
    # socketserver listens with a backlog of 5: a burst of callers (the load test) got connections
    # reset. Listening again on a bound socket only sets the new backlog.
    server.server.socket.listen(128)
    return server


def _body_bytes(lambda_event: Dict[str, Any]) -> bytes:
    import base64

    body = lambda_event.get("body")
    if body is None:
        return b""
    if lambda_event.get("isBase64Encoded"):
        return base64.b64decode(body)
    return body if isinstance(body, bytes) else str(body).encode()


def serve(project_dir: str, host: str, port: int, stage: str, keys: KeyTable, region: str) -> None:
    """Serve the project's app until interrupted."""
    from chalice.cli.factory import CLIFactory

    # Like `chalice local`: the stage's environment_variables go into this process's environment.
    factory = CLIFactory(project_dir=project_dir, environ=os.environ)
    config = factory.create_config_obj(chalice_stage_name=stage)
    try:
        server = make_server(config.chalice_app, config, host, port, keys, region)
    except OSError as err:
        # Most often the port is taken: one line that the local stack quotes.
        raise SystemExit(f"devbox API server: cannot listen on {host}:{port}: {err}") from None
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    LOG.setLevel(logging.INFO)
    # Printed once the port is bound: the local stack waits for this line, not just for the
    # port to answer (another process may hold it).
    print(f"{READY} http://{host}:{port} (SigV4 checked for {len(keys)} local key(s))", flush=True)
    server.server.serve_forever()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stage", default="local")
    parser.add_argument("--region", default=None, help="region of the signatures (default: the local stack's)")
    parser.add_argument("--identities", type=Path, default=None,
                        help="JSON list of local identities (default: the local stack's one key pair)")
    args = parser.parse_args(argv)
    from devbox.local import LOCAL_IDENTITIES, REGION

    identities = load_identities(args.identities.read_text()) if args.identities else list(LOCAL_IDENTITIES)
    try:
        serve(args.project_dir, args.host, args.port, args.stage, key_table(identities), args.region or REGION)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
