"""The API client against a real HTTP server on 127.0.0.1 answering canned responses.

FakeApi and its fixture live here and are imported by test_cli and test_proxy.
"""
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pytest

from devbox import api
from devbox.api import ApiError, CliError, DevboxApi

RUNNING: Dict[str, Any] = {
    "box": "devbox",
    "instance_id": "i-0123456789abcdef0",
    "state": "running",
    "instance_type": "t3.large",
    "market": "spot",
    "lifecycle": "spot",
    "availability_zone": "us-east-1a",
    "data_volume_id": "vol-0123456789abcdef0",
    "interrupted": False,
    "public_ip": "203.0.113.10",
    "dns_name": "ec2-203-0-113-10.compute-1.amazonaws.com",
    "launch_time": "2024-05-01T10:00:00+00:00",
    "allowed_ips": ["198.51.100.7/32"],
    "last_interruption": None,
}


def status_doc(**changes: Any) -> Dict[str, Any]:
    """A status document: a running spot box unless told otherwise."""
    return {**RUNNING, **changes}


def no_instance_doc(**changes: Any) -> Dict[str, Any]:
    """The status of a box without an instance: before its first start, or after its instance is gone."""
    return status_doc(instance_id=None, state="none", instance_type=None, market=None, lifecycle=None,
                      public_ip=None, dns_name=None, launch_time=None, **changes)


Body = Union[Dict[str, Any], bytes]


@dataclass
class Recorded:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes


class FakeApi:
    """An HTTP server on a free 127.0.0.1 port; each route answers its queued responses in turn.

    The last response of a route repeats. A response may carry a delay (seconds) before it.
    """

    def __init__(self) -> None:
        self.answers: Dict[Tuple[str, str], List[Tuple[int, Body, float]]] = {}
        self.requests: List[Recorded] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                route = path[len("/api"):] if path.startswith("/api/") else path
                with fake.lock:
                    fake.requests.append(Recorded(self.command, route, dict(self.headers.items()), body))
                    queue = fake.answers.get((self.command, route))
                    if queue:
                        status, payload, delay = queue.pop(0) if len(queue) > 1 else queue[0]
                    else:
                        status, payload, delay = 500, {"Code": "TestSetup", "Message": f"no answer for {route}"}, 0.0
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def answer(self, method: str, path: str, *responses: Union[Tuple[int, Body], Tuple[int, Body, float]]) -> None:
        """Queue the responses of a route: (status, body) or (status, body, delay)."""
        queue: List[Tuple[int, Body, float]] = []
        for response in responses:
            delay = float(response[2]) if len(response) > 2 else 0.0
            queue.append((response[0], response[1], delay))
        self.answers[(method, path)] = queue

    def calls(self) -> List[str]:
        """The requests received so far, as 'METHOD /path'."""
        with self.lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    server = FakeApi()
    yield server
    server.close()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment where botocore finds no credentials anywhere (and does not ask IMDS)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def client(url: str, timeout: float = 5.0) -> DevboxApi:
    return DevboxApi(url, api.make_auth(url), timeout=timeout)


def test_status_is_a_sigv4_signed_get_for_execute_api(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, RUNNING))

    assert client(fake_api.url).status() == RUNNING

    request = fake_api.requests[0]
    assert (request.method, request.path) == ("GET", "/status")
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=testing/")
    assert "/us-east-1/execute-api/aws4_request" in authorization
    assert "X-Amz-Date" in request.headers or "x-amz-date" in request.headers


def test_start_sends_the_instance_type_as_json(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))

    assert client(fake_api.url).start("t3.xlarge")["state"] == "pending"

    request = fake_api.requests[0]
    assert json.loads(request.body) == {"instance_type": "t3.xlarge"}
    assert request.headers["Content-Type"] == "application/json"


def test_start_without_a_type_sends_an_empty_object(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, RUNNING))

    client(fake_api.url).start()

    assert json.loads(fake_api.requests[0].body) == {}


def test_start_rebuild_sends_the_flag_alone_or_with_a_type(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending", action="relaunch", reason="rebuild")))
    devbox_api = client(fake_api.url)

    assert devbox_api.start(rebuild=True)["action"] == "relaunch"
    devbox_api.start("m6i.xlarge", rebuild=True)

    assert [json.loads(r.body) for r in fake_api.requests] == [
        {"rebuild": True}, {"instance_type": "m6i.xlarge", "rebuild": True}]


def test_the_no_instance_status_is_a_status_document(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, no_instance_doc()))

    assert client(fake_api.url).status()["state"] == "none"


def test_stop_posts_to_stop(fake_api: FakeApi) -> None:
    fake_api.answer("POST", "/stop", (200, status_doc(state="stopping")))

    assert client(fake_api.url).stop()["state"] == "stopping"
    assert fake_api.calls() == ["POST /stop"]


@pytest.mark.parametrize(
    "status, body, exit_code, expected",
    [
        (403, {"message": "The security token included in the request is invalid."}, api.EXIT_AUTH,
         "access denied by the devbox API (HTTP 403): The security token included in the request is invalid."),
        (404, {"Code": "NotFoundError", "Message": "instance i-0123456789abcdef0 does not exist"}, api.EXIT_NOT_FOUND,
         "no devbox (HTTP 404): instance i-0123456789abcdef0 does not exist"),
        (409, {"Code": "ConflictError", "Message": "the instance is stopping; start it once it has stopped"},
         api.EXIT_CONFLICT, "conflict (HTTP 409): the instance is stopping; start it once it has stopped"),
        (503, {"Code": "InsufficientCapacity", "Message": "no spot capacity for t3.large in us-east-1a"},
         api.EXIT_UNAVAILABLE, "unavailable, try again later (HTTP 503): no spot capacity for t3.large in us-east-1a"),
        (400, {"Code": "BadRequestError", "Message": "unknown field(s) colour"}, api.EXIT_FAILURE,
         "the devbox API refused the request (HTTP 400 BadRequestError): unknown field(s) colour"),
        (502, {"Code": "UpstreamError", "Message": "AWS refused to start: Unknown"}, api.EXIT_FAILURE,
         "the devbox API failed (HTTP 502 UpstreamError): AWS refused to start: Unknown"),
        (500, b"<html>\n  Internal Server Error\n</html>", api.EXIT_FAILURE,
         "the devbox API failed (HTTP 500): <html> Internal Server Error </html>"),
    ],
)
def test_error_answers_become_one_line_errors_with_exit_codes(
    fake_api: FakeApi, status: int, body: Body, exit_code: int, expected: str
) -> None:
    fake_api.answer("GET", "/status", (status, body))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert caught.value.exit_code == exit_code
    assert caught.value.status == status
    assert caught.value.message.startswith(expected)
    assert "\n" not in caught.value.message


def test_unknown_path_403_hints_at_the_url(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (403, {"message": "Missing Authentication Token"}))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert "check the URL" in caught.value.message


def test_long_error_messages_are_cut_to_one_line(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (409, {"Message": "word\n" * 1000}))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert len(caught.value.message) < 1600
    assert caught.value.message.endswith("...")
    assert "\n" not in caught.value.message


def test_a_body_that_is_not_the_apps_error_is_cut_shorter(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (502, b"<html>" + b"x" * 2000 + b"</html>"))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert len(caught.value.message) < 400


def test_a_capacity_refusal_keeps_every_launch_it_tried(fake_api: FakeApi) -> None:
    tried = "; ".join(f"{kind} spot in subnet-0123456789abcdef{n}: InsufficientInstanceCapacity"
                      for kind in ("t3.large", "m6i.large", "m7i.large") for n in range(3))
    message = (f"AWS has no capacity for the box right now; tried {tried}."
               " Nothing was changed: try again in a few minutes")
    fake_api.answer("POST", "/start", (503, {"Code": "InsufficientCapacity", "Message": message}))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).start()

    assert caught.value.exit_code == api.EXIT_UNAVAILABLE
    assert caught.value.message == f"unavailable, try again later (HTTP 503): {message}"


def test_control_characters_in_error_messages_are_shown_escaped(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (409, {"Code": "Conflict\x1b[2J", "Message": "stop\x1b]0;pwned\x07 it\u202e"}))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert caught.value.message == "conflict (HTTP 409): stop\\x1b]0;pwned\\x07 it\\u202e"
    assert caught.value.code == "Conflict\\x1b[2J"
    assert caught.value.message.isprintable()


def test_an_answer_without_a_status_document_is_an_error(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, {"hello": "world"}))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url).status()

    assert "without a status document" in caught.value.message
    assert caught.value.exit_code == api.EXIT_FAILURE


def test_unreachable_api_names_the_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/"

    with pytest.raises(ApiError) as caught:
        client(url).status()

    assert caught.value.exit_code == api.EXIT_UNREACHABLE
    assert caught.value.message == f"cannot reach the devbox API at {url}status: Connection refused"
    assert caught.value.transient


def test_slow_api_times_out(fake_api: FakeApi) -> None:
    fake_api.answer("GET", "/status", (200, RUNNING, 2.0))

    with pytest.raises(ApiError) as caught:
        client(fake_api.url, timeout=0.2).status()

    assert caught.value.exit_code == api.EXIT_TIMEOUT
    assert "did not answer within 0.2 s" in caught.value.message


def test_missing_credentials_are_reported_before_any_call(fake_api: FakeApi, no_credentials: None) -> None:
    with pytest.raises(CliError) as caught:
        DevboxApi.connect(url=fake_api.url)

    assert caught.value.exit_code == api.EXIT_AUTH
    assert caught.value.message.startswith("no AWS credentials found")
    assert fake_api.requests == []


def test_unknown_profile_is_named(fake_api: FakeApi, no_credentials: None) -> None:
    with pytest.raises(CliError) as caught:
        DevboxApi.connect(url=fake_api.url, profile="nonesuch")

    assert caught.value.exit_code == api.EXIT_AUTH
    assert "'nonesuch'" in caught.value.message


def test_signing_region_comes_from_an_execute_api_url() -> None:
    assert api.region_from_url("https://abc123.execute-api.eu-west-3.amazonaws.com/api/") == "eu-west-3"
    assert api.region_from_url("https://abc123.execute-api.cn-north-1.amazonaws.com.cn/api/") == "cn-north-1"
    assert api.region_from_url("http://127.0.0.1:8000/") is None

    auth = api.make_auth("https://abc123.execute-api.eu-west-3.amazonaws.com/api/")

    assert auth.region == "eu-west-3"  # AWS_DEFAULT_REGION is us-east-1 in the tests


def test_explicit_region_wins_over_the_url() -> None:
    auth = api.make_auth("https://abc123.execute-api.eu-west-3.amazonaws.com/api/", region="ap-south-1")

    assert auth.region == "ap-south-1"


def test_url_option_wins_over_environment(tmp_path: Path) -> None:
    env = {"DEVBOX_URL": "https://from-env.example.com/api/"}

    chosen = api.resolve_url("https://from-option.example.com/api/", environ=env)

    assert chosen == "https://from-option.example.com/api/"
    assert api.resolve_url(None, environ=env) == "https://from-env.example.com/api/"


def test_url_falls_back_to_the_chalice_deployment_record_in_a_parent_folder(tmp_path: Path) -> None:
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    (deployed / "prod.json").write_text(json.dumps({
        "resources": [
            {"name": "api_handler", "resource_type": "lambda_function", "lambda_arn": "arn:aws:lambda:..."},
            {"name": "rest_api", "resource_type": "rest_api", "rest_api_id": "abc123",
             "rest_api_url": "https://abc123.execute-api.us-east-1.amazonaws.com/api/"},
        ],
        "schema_version": "2.0",
    }))
    below = tmp_path / "src" / "deeper"
    below.mkdir(parents=True)

    found = api.resolve_url(None, stage="prod", environ={}, start_dir=below)

    assert found == "https://abc123.execute-api.us-east-1.amazonaws.com/api/"


def test_no_url_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(CliError) as caught:
        api.resolve_url(None, environ={}, start_dir=tmp_path)

    assert caught.value.exit_code == api.EXIT_USAGE
    assert "--url" in caught.value.message and "DEVBOX_URL" in caught.value.message


def test_a_record_without_rest_api_is_reported(tmp_path: Path) -> None:
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    (deployed / "dev.json").write_text(json.dumps({"resources": [], "schema_version": "2.0"}))

    with pytest.raises(CliError) as caught:
        api.resolve_url(None, environ={}, start_dir=tmp_path)

    assert "records no rest_api_url" in caught.value.message


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(CliError) as caught:
        api.resolve_url("ftp://example.com/api", environ={})

    assert caught.value.exit_code == api.EXIT_USAGE


@pytest.mark.parametrize("status, transient", [(502, True), (503, True), (409, False), (403, False)])
def test_only_server_side_failures_are_transient(status: int, transient: bool) -> None:
    error = api.error_for_response(status, b"{}", "http://x/status")

    assert error.transient is transient


def test_requests_carry_a_timeout(fake_api: FakeApi) -> None:
    seen: List[Optional[Any]] = []
    devbox_api = client(fake_api.url, timeout=7.0)
    original = devbox_api.session.request

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("timeout"))
        return original(*args, **kwargs)

    devbox_api.session.request = spy  # type: ignore[method-assign]
    fake_api.answer("GET", "/status", (200, RUNNING))
    fake_api.answer("POST", "/start", (200, RUNNING))
    fake_api.answer("POST", "/stop", (200, RUNNING))

    devbox_api.status()
    devbox_api.start()
    devbox_api.stop()

    assert seen == [(5.0, 7.0)] * 3


# --- where the URL comes from, and which ones get signed requests (issue 11, item 10) ---------------------


@pytest.mark.parametrize("url", ["http://example.com/api/", "http://10.0.0.5:8000/api/", "http://[fe80::1]/api/",
                                 "http://localhost.example.com/", "http://127.0.0.1.nip.io/", "http://[::ffff:7f00:1]/",
                                 "http://0.0.0.0:8000/"])
def test_plain_http_off_loopback_is_refused_whatever_the_source(tmp_path: Path, url: str) -> None:
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    record = deployed / "dev.json"
    record.write_text(json.dumps({"resources": [{"resource_type": "rest_api", "rest_api_url": url}]}))

    for option, environ, source in ((url, {}, "--url"), (None, {"DEVBOX_URL": url}, "$DEVBOX_URL"),
                                    (None, {}, str(record))):
        with pytest.raises(CliError) as caught:
            api.resolve_url(option, environ=environ, start_dir=tmp_path)

        assert caught.value.exit_code == api.EXIT_USAGE
        assert caught.value.message.startswith(f"refusing to sign requests for {url} (from {source}): plain http")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/api/", "http://127.5.6.7/", "http://[::1]:8000/",
                                 "http://localhost:8000/api/", "http://LOCALHOST/", "https://example.com/api/"])
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    assert api.locate_url(url, environ={}) == api.ApiUrl(url, "--url")


@pytest.mark.parametrize("url", ["https://example.com/a b", "https://example.com/\x1b[2J", "https://exa\nmple.com/",
                                 "https://[::1/", "https://example.com:port/"])
def test_urls_with_spaces_control_characters_or_bad_syntax_are_usage_errors(url: str) -> None:
    with pytest.raises(CliError) as caught:
        api.resolve_url(url, environ={})

    assert caught.value.exit_code == api.EXIT_USAGE
    assert caught.value.message.isprintable()


def test_the_source_of_the_url_is_named(tmp_path: Path) -> None:
    url = "https://abc123.execute-api.us-east-1.amazonaws.com/api/"
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    (deployed / "dev.json").write_text(json.dumps({"resources": [{"resource_type": "rest_api", "rest_api_url": url}]}))
    env = {"DEVBOX_URL": "https://env.example.com/api/"}

    assert api.locate_url("https://a.example.com/", environ=env) == api.ApiUrl("https://a.example.com/", "--url")
    assert api.locate_url(None, environ=env) == api.ApiUrl("https://env.example.com/api/", "$DEVBOX_URL")
    from_record = api.ApiUrl(url, str(deployed / "dev.json"))
    assert api.locate_url(None, environ={}, start_dir=tmp_path) == from_record
    assert api.locate_url(None, environ={}, start_dir=tmp_path / ".chalice") == from_record


def test_a_client_made_by_hand_refuses_plain_http_too() -> None:
    with pytest.raises(CliError) as caught:
        DevboxApi("http://example.com/api/", auth=None)

    assert caught.value.exit_code == api.EXIT_USAGE


@pytest.mark.parametrize(
    "value, shown",
    [({"a": 1}, "an object"), ([1], "a list"), (True, "true"), (5, "the number 5"), (None, "null"),
     ("x\x1b[2J" + "y" * 100, "'x\\x1b[2J" + "y" * 49 + "...'")],
)
def test_a_malformed_status_field_is_named_with_what_it_holds(value: Any, shown: str) -> None:
    error = api.malformed_status("dns_name", value, "a DNS name")

    assert error.message == f"the devbox API answered a malformed status: dns_name is {shown}, not a DNS name"
    assert error.exit_code == api.EXIT_FAILURE


def test_status_text_takes_text_and_absence_and_refuses_other_types() -> None:
    assert api.status_text({"box": "devbox"}, "box") == "devbox"
    assert api.status_text({"box": ""}, "box") is None
    assert api.status_text({}, "box") is None
    with pytest.raises(ApiError) as caught:
        api.status_text({"box": ["devbox"]}, "box")
    assert caught.value.message == "the devbox API answered a malformed status: box is a list, not text"
