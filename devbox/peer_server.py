"""`chalice local`, except that each request's sourceIp is the TCP peer's address.

`chalice local` reports every caller as 127.0.0.1. API Gateway reports the address the
connection came from; this server does the same, so a load test whose clients bind
distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) looks like many callers. It is
Chalice's own local server and gateway, with one handler attribute changed.
"""
import argparse
import functools
import logging
import sys
from typing import Any, List, Optional


def serve(project_dir: str, host: str, port: int, stage: str) -> None:
    """Serve the project's app until interrupted."""
    from chalice import local
    from chalice.cli.factory import CLIFactory

    class PeerAddressHandler(local.ChaliceRequestHandler):
        def __init__(self, request: Any, client_address: Any, server: Any, app_object: Any, config: Any) -> None:
            self.local_gateway = local.LocalGateway(app_object, config)
            # The converter reads this attribute when it builds requestContext.identity.
            self.local_gateway.event_converter.LOCAL_SOURCE_IP = client_address[0]  # type: ignore[misc]
            local.BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    import os

    # Like `chalice local`: the stage's environment_variables go into this process's environment.
    factory = CLIFactory(project_dir=project_dir, environ=os.environ)
    config = factory.create_config_obj(chalice_stage_name=stage)
    server = local.create_local_server(config.chalice_app, config, host, port)
    server.server.RequestHandlerClass = functools.partial(  # type: ignore[assignment]
        PeerAddressHandler, app_object=config.chalice_app, config=config)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    server.serve_forever()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stage", default="local")
    args = parser.parse_args(argv)
    try:
        serve(args.project_dir, args.host, args.port, args.stage)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
