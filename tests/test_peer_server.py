"""The local API server over real HTTP: API Gateway's SigV4 check before a Chalice app, and the identity passed on."""
import http.client
import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from chalice import Chalice, IAMAuthorizer
from chalice.config import Config

from devbox.peer_server import make_server
from devbox.sigv4_check import LocalIdentity, key_table

REGION = "us-east-1"
ALICE = LocalIdentity("AKIALOCALALICE000001", "alice-secret", "alice")
BOB = LocalIdentity("AKIALOCALBOB00000002", "bob-secret", "bob")


class Server:
    def __init__(self, app: Chalice, port: int, calls: List[str], clock_offset: List[timedelta]) -> None:
        self.app = app
        self.port = port
        self.calls = calls
        self.clock_offset = clock_offset

    def call(self, method: str, path: str, body: bytes = b"", signer: Optional[LocalIdentity] = None,
             source_ip: str = "127.0.0.1", secret: Optional[str] = None) -> Tuple[int, Dict[str, str], Any]:
        headers = {"Content-Type": "application/json"}
        if signer is not None:
            request = AWSRequest(method=method, url=f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers)
            SigV4Auth(Credentials(signer.access_key, secret or signer.secret_key), "execute-api",
                      REGION).add_auth(request)
            headers = dict(request.headers.items())
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source_ip, 0))
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
        finally:
            connection.close()


def echo_app(calls: List[str]) -> Chalice:
    app = Chalice(app_name="echo")
    iam = IAMAuthorizer()

    @app.route("/whoami", methods=["GET", "POST"], authorizer=iam)
    def whoami() -> Dict[str, Any]:
        calls.append("whoami")
        request = app.current_request
        return {"identity": request.context["identity"], "body": request.json_body if request.raw_body else None}

    @app.route("/open")
    def open_route() -> Dict[str, Any]:
        calls.append("open")
        return {"identity": app.current_request.context["identity"]}

    return app


@pytest.fixture
def server() -> Iterator[Server]:
    calls: List[str] = []
    offset = [timedelta(0)]
    app = echo_app(calls)

    def clock() -> datetime:
        return datetime.now(timezone.utc) + offset[0]

    local = make_server(app, Config.create(chalice_app=app, app_name="echo"), "127.0.0.1", 0,
                        key_table([ALICE, BOB]), REGION, clock=clock)
    thread = threading.Thread(target=local.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(app, local.server.server_address[1], calls, offset)
    finally:
        local.server.shutdown()
        local.server.server_close()
        thread.join(timeout=5)


def test_signed_call_reaches_the_app_with_the_signers_identity(server):
    status, _, doc = server.call("POST", "/whoami", b'{"x": 1}', signer=ALICE)
    assert status == 200, doc
    identity = doc["identity"]
    assert identity["accessKey"] == ALICE.access_key
    assert identity["userArn"] == "arn:aws:iam::123456789012:user/alice"
    assert identity["accountId"] == "123456789012"
    assert identity["caller"] == identity["user"] == ALICE.user_id
    assert identity["sourceIp"] == "127.0.0.1"
    assert doc["body"] == {"x": 1}


def test_each_local_identity_is_told_apart(server):
    assert server.call("GET", "/whoami", signer=BOB)[2]["identity"]["userArn"].endswith(":user/bob")
    assert server.call("GET", "/whoami", signer=ALICE)[2]["identity"]["userArn"].endswith(":user/alice")


def test_source_ip_is_the_connections_peer_address(server):
    status, _, doc = server.call("GET", "/whoami", signer=ALICE, source_ip="127.0.0.5")
    assert status == 200
    assert doc["identity"]["sourceIp"] == "127.0.0.5"


def test_unsigned_call_gets_api_gateways_403_and_never_reaches_the_app(server):
    status, headers, doc = server.call("POST", "/whoami", b"{}")
    assert status == 403
    assert doc == {"message": "Missing Authentication Token"}
    assert headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    assert server.calls == []


def test_wrong_secret_gets_signature_mismatch(server):
    status, headers, doc = server.call("GET", "/whoami", signer=ALICE, secret="guessed")
    assert status == 403
    assert headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    assert doc["message"].startswith("The request signature we calculated does not match the signature you provided.")
    assert server.calls == []


def test_call_signed_more_than_five_minutes_ago_has_expired(server):
    server.clock_offset[0] = timedelta(minutes=6)
    status, _, doc = server.call("GET", "/whoami", signer=ALICE)
    assert status == 403
    assert doc["message"].startswith("Signature expired: ")
    assert server.calls == []


def test_route_without_authorizer_is_open_and_has_no_signer(server):
    status, _, doc = server.call("GET", "/open")
    assert status == 200
    assert doc["identity"]["sourceIp"] == "127.0.0.1"
    assert doc["identity"]["accessKey"] is None


def test_unknown_path_is_refused_as_chalice_local_refuses_it(server):
    status, _, doc = server.call("GET", "/nowhere")
    assert status == 403
    assert doc == {"message": "Missing Authentication Token"}
