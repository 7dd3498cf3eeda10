"""The watcher's devbox:idle tag: its own SigV4 signing checked against botocore's, and the whole
call (IMDSv2 token, instance id, region, role credentials, CreateTags) against a local fake
instance metadata service and a fake EC2 endpoint that checks the signature with botocore."""
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qsl

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.test_idle_watch import NOW, watch

INSTANCE = "i-0123456789abcdef0"
REGION = "eu-west-1"
ROLE = "devbox-InstanceRole-1A2B3C4D5E6F"
KEYS = {"Code": "Success", "LastUpdated": "2025-06-15T14:00:00Z", "Type": "AWS-HMAC",
        "AccessKeyId": "ASIAEXAMPLEEXAMPLE00", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "Token": "IQoJb3JpZ2luX2VjEXAMPLE//////////tokenEXAMPLE==", "Expiration": "2025-06-15T20:00:00Z"}
IMDS_TOKEN = "AQAEAExampleImdsToken=="
OK_ANSWER = (200, b'<?xml version="1.0" encoding="UTF-8"?>\n<CreateTagsResponse xmlns="http://ec2.amazonaws.com/doc/'
                  b'2016-11-15/"><requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId><return>true</return>'
                  b'</CreateTagsResponse>')
REFUSED = (403, b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code>'
                b'<Message>You are not authorized to perform this operation.</Message></Error></Errors>'
                b'<RequestID>b4d5EXAMPLE</RequestID></Response>')


def botocore_authorization(method: str, url: str, headers: Dict[str, str], body: bytes, key_id: str, secret: str,
                           token: Optional[str], region: str, service: str, amz_date: str,
                           monkeypatch: pytest.MonkeyPatch) -> str:
    """The Authorization header botocore's SigV4Auth gives the same request at the same time."""
    signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *args, **kwargs: signed_at.replace(tzinfo=None))
    request = AWSRequest(method=method, url=url, data=body, headers=headers)
    SigV4Auth(Credentials(key_id, secret, token), service, region).add_auth(request)
    return str(request.headers["Authorization"])


# --- signing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, region, service, token, body, headers", [
    ("https://ec2.eu-west-1.amazonaws.com/", "eu-west-1", "ec2", KEYS["Token"], b"Action=CreateTags&Version=2016-11-15",
     {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}),
    ("https://ec2.us-east-1.amazonaws.com:443/", "us-east-1", "ec2", None, b"Action=DescribeTags",
     {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}),
    ("http://127.0.0.1:8123/", "cn-north-1", "ec2", "t", b"", {}),
    ("https://example.execute-api.eu-central-1.amazonaws.com/api/start-box", "eu-central-1", "execute-api", None,
     b'{"wait": true}', {"Content-Type": "application/json", "X-Devbox-Note": "  two   spaces  "}),
])
def test_signature_is_the_one_botocore_computes(monkeypatch: pytest.MonkeyPatch, url: str, region: str, service: str,
                                                 token: Optional[str], body: bytes, headers: Dict[str, str]) -> None:
    signed = watch.sign_v4("POST", url, headers, body, KEYS["AccessKeyId"], KEYS["SecretAccessKey"], token, region,
                           service, NOW)
    assert signed["X-Amz-Date"] == "20250615T150640Z"
    assert signed.get("X-Amz-Security-Token") == token
    expected = botocore_authorization("POST", url, headers, body, KEYS["AccessKeyId"], KEYS["SecretAccessKey"], token,
                                      region, service, signed["X-Amz-Date"], monkeypatch)
    assert signed["Authorization"] == expected


def test_signature_changes_with_the_body_the_time_and_the_secret() -> None:
    def sign(body: bytes = b"a", when: float = NOW, secret: str = "s") -> str:
        return watch.sign_v4("POST", "https://ec2.eu-west-1.amazonaws.com/", {}, body, "AKID", secret, None,
                             REGION, "ec2", when)["Authorization"]

    assert len({sign(), sign(body=b"b"), sign(when=NOW + 1), sign(secret="t")}) == 4


def test_host_keeps_a_port_that_is_not_the_default() -> None:
    assert watch.sign_v4("GET", "http://127.0.0.1:8123/", {}, b"", "A", "s", None, REGION, "ec2", NOW)["Host"] == \
        "127.0.0.1:8123"
    assert watch.sign_v4("GET", "https://EC2.eu-west-1.amazonaws.com:443/", {}, b"", "A", "s", None, REGION, "ec2",
                         NOW)["Host"] == "ec2.eu-west-1.amazonaws.com"


@pytest.mark.parametrize("url", ["https://ec2.eu-west-1.amazonaws.com/?Action=CreateTags", "/no/host"])
def test_a_url_the_signer_does_not_handle_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="sign_v4 signs a URL with a host and no query"):
        watch.sign_v4("GET", url, {}, b"", "A", "s", None, REGION, "ec2", NOW)


# --- a fake instance metadata service and EC2 -----------------------------------------------------


class FakeAws:
    """IMDSv2 and EC2's Query API on two local ports; EC2 checks each signature as AWS would, with botocore."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.role: Optional[str] = ROLE
        self.region = REGION
        self.ec2_answer: Tuple[int, bytes] = OK_ANSWER
        self.imds_calls: List[Tuple[str, str, Dict[str, str]]] = []  # header names in lower case
        self.creates: List[Dict[str, str]] = []
        self.bad_signatures = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                fake.imds_calls.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self.answer(200, IMDS_TOKEN.encode())
                else:
                    self.answer(400, b"")

            def do_GET(self) -> None:
                fake.imds_calls.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
                    self.answer(401, b"")  # IMDSv2 only, as the launch template sets HttpTokens: required
                    return
                pages = {"instance-id": INSTANCE, "placement/region": fake.region, "services/domain": "amazonaws.com"}
                if fake.role:
                    pages["iam/security-credentials/"] = fake.role
                    pages[f"iam/security-credentials/{fake.role}"] = json.dumps(KEYS)
                page = pages.get(self.path.removeprefix("/latest/meta-data/"))
                self.answer(200, page.encode()) if page is not None else self.answer(404, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
                expected = botocore_authorization("POST", url, {"Content-Type": self.headers["Content-Type"]}, body,
                                                  KEYS["AccessKeyId"], KEYS["SecretAccessKey"],
                                                  self.headers.get("X-Amz-Security-Token"), fake.region, "ec2",
                                                  self.headers["X-Amz-Date"], fake.monkeypatch)
                if self.headers.get("Authorization") != expected or \
                        self.headers.get("X-Amz-Security-Token") != KEYS["Token"]:
                    fake.bad_signatures += 1
                    self.answer(403, b"<Response><Errors><Error><Code>SignatureDoesNotMatch</Code></Error></Errors>"
                                     b"</Response>")
                    return
                fake.creates.append(dict(parse_qsl(body.decode(), strict_parsing=True)))
                self.answer(*fake.ec2_answer)

        self.imds = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.ec2 = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.threads = [threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
                        for server in (self.imds, self.ec2)]
        for thread in self.threads:
            thread.start()

    @property
    def imds_url(self) -> str:
        return f"http://127.0.0.1:{self.imds.server_address[1]}"

    @property
    def ec2_url(self) -> str:
        return f"http://127.0.0.1:{self.ec2.server_address[1]}/"

    def close(self) -> None:
        for server in (self.imds, self.ec2):
            if server.socket.fileno() != -1:
                server.shutdown()
                server.server_close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    fake = FakeAws(monkeypatch)
    yield fake
    fake.close()


def tag(aws: FakeAws, value: str = "idle since 2025-06-15T15:06:40Z, stops at 2025-06-15T15:36:40Z") -> None:
    watch.tag_self(value, aws.imds_url, aws.ec2_url, clock=lambda: NOW)


def test_the_instance_tags_itself_devbox_idle_with_its_role_credentials(aws: FakeAws) -> None:
    tag(aws)
    assert aws.bad_signatures == 0
    assert aws.creates == [{"Action": "CreateTags", "Version": "2016-11-15", "ResourceId.1": INSTANCE,
                            "Tag.1.Key": "devbox:idle",
                            "Tag.1.Value": "idle since 2025-06-15T15:06:40Z, stops at 2025-06-15T15:36:40Z"}]


def test_metadata_is_read_with_an_imdsv2_session_token(aws: FakeAws) -> None:
    tag(aws)
    method, path, headers = aws.imds_calls[0]
    assert (method, path) == ("PUT", "/latest/api/token")
    assert 0 < int(headers["x-aws-ec2-metadata-token-ttl-seconds"]) <= 21600
    assert all(headers.get("x-aws-ec2-metadata-token") == IMDS_TOKEN for method, _, headers in aws.imds_calls[1:])
    assert [path for _, path, _ in aws.imds_calls[1:]] == [
        "/latest/meta-data/instance-id", "/latest/meta-data/placement/region", "/latest/meta-data/services/domain",
        "/latest/meta-data/iam/security-credentials/", f"/latest/meta-data/iam/security-credentials/{ROLE}"]


@pytest.mark.parametrize("value", ["busy: ssh session", "busy: devbox-keep until 2025-06-15T17:06:40Z",
                                   "busy: load above 1", "auto-stop off", "idle since x, stops at y & z=1+2 %20 é"])
def test_tag_values_arrive_as_written(aws: FakeAws, value: str) -> None:
    tag(aws, value)
    assert aws.creates[-1]["Tag.1.Value"] == value
    assert aws.bad_signatures == 0


def test_an_instance_without_a_profile_gets_a_tag_error_naming_the_fix(aws: FakeAws) -> None:
    aws.role = None
    with pytest.raises(watch.TagError, match=r"no instance profile.*devbox start --rebuild"):
        tag(aws)
    assert aws.creates == []


def test_an_ec2_refusal_is_a_tag_error_with_its_code_and_message(aws: FakeAws) -> None:
    aws.ec2_answer = REFUSED
    with pytest.raises(watch.TagError) as caught:
        tag(aws)
    assert str(caught.value) == ("EC2 refused (HTTP 403): UnauthorizedOperation: "
                                 "You are not authorized to perform this operation.")


def test_an_unreachable_metadata_service_is_a_tag_error(aws: FakeAws) -> None:
    url = aws.imds_url
    aws.close()
    with pytest.raises(watch.TagError, match="no answer from the instance metadata service"):
        watch.tag_self("busy: ssh session", url, aws.ec2_url, clock=lambda: NOW)


def test_a_region_that_would_not_make_an_endpoint_name_is_refused(aws: FakeAws) -> None:
    aws.region = "eu-west-1.evil.example/x?"
    with pytest.raises(watch.TagError, match="unexpected instance metadata"):
        tag(aws)
    assert aws.creates == []


def test_a_failed_write_through_main_is_logged_and_retried_later_not_every_minute(
        aws: FakeAws, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_idle_watch import Box

    box = Box(tmp_path)
    aws.ec2_answer = REFUSED

    def run(now: float) -> int:
        args = box.args(tcp="tcp-ssh-ipv4") + ["--imds-url", aws.imds_url, "--ec2-url", aws.ec2_url]
        return int(watch.main(args, {}, runner=box.run, clock=lambda: now))

    assert run(NOW) == 0
    assert "cannot tag devbox:idle='busy: ssh session': EC2 refused (HTTP 403): UnauthorizedOperation" in \
        capsys.readouterr().err
    assert run(NOW + 60) == 0
    assert len(aws.creates) == 1
    aws.ec2_answer = OK_ANSWER
    assert run(NOW + 10 * 60) == 0
    assert len(aws.creates) == 2
    assert "tagged devbox:idle=busy: ssh session" in capsys.readouterr().out
    assert run(NOW + 20 * 60) == 0
    assert len(aws.creates) == 2
    assert aws.bad_signatures == 0
