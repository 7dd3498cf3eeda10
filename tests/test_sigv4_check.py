"""The local SigV4 check: botocore's and requests-aws4auth's signatures pass; the rest gets API Gateway's refusal."""
import json
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Dict, Optional
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from devbox import sigv4_check
from devbox.sigv4_check import (
    INCOMPLETE,
    INVALID_SIGNATURE,
    MISMATCH_MESSAGE,
    MISSING_TOKEN,
    UNRECOGNIZED_CLIENT,
    LocalIdentity,
    SignatureRefused,
    SignedRequest,
    key_table,
    load_identities,
    request_identity,
    verify,
)

REGION = "us-east-1"
HOST = "127.0.0.1:8000"
ALICE = LocalIdentity("AKIALOCALALICE000001", "alice-secret", "alice")
BOB = LocalIdentity("AKIALOCALBOB00000002", "bob-secret", "bob")
CAROL = LocalIdentity("AKIALOCALCAROL000003", "carol-secret", "carol")
KEYS = key_table([ALICE, BOB, CAROL])


def signed(identity: LocalIdentity, method: str = "POST", target: str = "/start", body: bytes = b"{}",
           secret: Optional[str] = None, region: str = REGION, service: str = "execute-api",
           token: Optional[str] = None) -> SignedRequest:
    """A request as botocore's SigV4Auth signs it (as the devbox client and benchmarks do)."""
    request = AWSRequest(method=method, url=f"http://{HOST}{target}", data=body,
                         headers={"Content-Type": "application/json"})
    credentials = Credentials(identity.access_key, secret or identity.secret_key, token)
    SigV4Auth(credentials, service, region).add_auth(request)
    headers = {"Host": HOST, **dict(request.headers.items())}
    return SignedRequest(method, target, headers, body)


def signed_at(request: SignedRequest) -> datetime:
    return datetime.strptime(request.header("X-Amz-Date") or "", "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def refusal(request: SignedRequest, now: Optional[datetime] = None, keys=KEYS) -> SignatureRefused:
    with pytest.raises(SignatureRefused) as caught:
        verify(request, keys, now or signed_at(request), REGION)
    assert caught.value.status == 403
    return caught.value


def tampered(request: SignedRequest, **changes) -> SignedRequest:
    fields = {"method": request.method, "target": request.target, "headers": dict(request.headers),
              "body": request.body, **changes}
    return SignedRequest(**fields)


def test_request_signed_by_botocore_passes_and_names_its_signer():
    request = signed(BOB)
    assert verify(request, KEYS, signed_at(request), REGION) == BOB


def test_each_local_key_is_its_own_identity():
    for identity in (ALICE, BOB, CAROL):
        request = signed(identity, "GET", "/status", b"")
        assert verify(request, KEYS, signed_at(request), REGION) is identity


def test_request_dated_by_the_date_header_passes():
    request = AWSRequest(method="GET", url=f"http://{HOST}/status", headers={"Date": "Sun, 01 Mar 2026 10:00:00 GMT"})
    SigV4Auth(Credentials(ALICE.access_key, ALICE.secret_key), "execute-api", REGION).add_auth(request)
    assert "X-Amz-Date" not in request.headers
    checked = SignedRequest("GET", "/status", {"Host": HOST, **dict(request.headers.items())})
    # botocore rewrites the Date header to the signing time (RFC 2822 form).
    now = parsedate_to_datetime(request.headers["Date"])
    assert verify(checked, KEYS, now, REGION) == ALICE


def test_request_signed_by_requests_aws4auth_passes():
    import requests
    from requests_aws4auth import AWS4Auth

    prepared = requests.Request("POST", f"http://{HOST}/start", json={"instance_type": "t3.large"}).prepare()
    prepared = AWS4Auth(ALICE.access_key, ALICE.secret_key, REGION, "execute-api")(prepared)
    parts = urlsplit(prepared.url)
    request = SignedRequest("POST", parts.path, {"Host": HOST, **prepared.headers}, prepared.body)
    assert verify(request, KEYS, signed_at(request), REGION) == ALICE


def test_path_with_spaces_and_query_is_canonicalized_as_botocore_does():
    url_target = "/some%20path/x?b=2&a=1&a=0&c=x%20y"
    request = signed(ALICE, "GET", url_target, b"")
    assert verify(request, KEYS, signed_at(request), REGION) == ALICE
    botocore_request = AWSRequest(method="GET", url=f"http://{HOST}{url_target}",
                                  headers={"X-Amz-Date": request.header("X-Amz-Date")})
    signer = SigV4Auth(Credentials("k", "s"), "execute-api", REGION)
    names = ["host", "x-amz-date"]
    assert sigv4_check.canonical_request(tampered(request, body=b""), names) == signer.canonical_request(
        botocore_request)


def test_unsigned_request_gets_missing_authentication_token():
    refused = refusal(SignedRequest("GET", "/status", {"Host": HOST}), now=datetime.now(timezone.utc))
    assert refused.error_type == MISSING_TOKEN
    assert refused.body() == b'{"message":"Missing Authentication Token"}'


def test_wrong_secret_gets_signature_mismatch_with_the_canonical_request():
    refused = refusal(signed(ALICE, secret="not-alice-secret"))
    assert refused.error_type == INVALID_SIGNATURE
    assert refused.message.startswith(MISMATCH_MESSAGE)
    assert "The Canonical String for this request should have been\n'POST\n/start\n" in refused.message
    assert "The String-to-Sign should have been\n'AWS4-HMAC-SHA256\n" in refused.message
    assert json.loads(refused.body())["message"] == refused.message


def test_another_users_key_with_this_users_secret_is_refused():
    request = signed(LocalIdentity(BOB.access_key, ALICE.secret_key, "bob"))
    assert refusal(request).error_type == INVALID_SIGNATURE


@pytest.mark.parametrize("change", [
    {"body": b'{"instance_type": "m6i.xlarge"}'},
    {"target": "/stop"},
    {"target": "/start?rebuild=true"},
    {"method": "PUT"},
])
def test_tampered_request_is_refused(change):
    refused = refusal(tampered(signed(ALICE), **change))
    assert refused.error_type == INVALID_SIGNATURE
    assert refused.message.startswith(MISMATCH_MESSAGE)


def test_tampered_signed_header_is_refused():
    request = signed(ALICE)
    headers = dict(request.headers, Host="127.0.0.1:9999")
    assert refusal(tampered(request, headers=headers)).error_type == INVALID_SIGNATURE


def test_signature_older_than_five_minutes_has_expired():
    request = signed(ALICE)
    then = signed_at(request)
    now = then + timedelta(minutes=5, seconds=1)
    refused = refusal(request, now=now)
    stamp = request.header("X-Amz-Date")
    assert refused.error_type == INVALID_SIGNATURE
    assert refused.message == (f"Signature expired: {stamp} is now earlier than "
                               f"{(now - timedelta(minutes=5)):%Y%m%dT%H%M%SZ} ({now:%Y%m%dT%H%M%SZ} - 5 min.)")


def test_signature_within_five_minutes_either_way_passes():
    request = signed(ALICE)
    for skew in (timedelta(minutes=4, seconds=59), -timedelta(minutes=4, seconds=59)):
        assert verify(request, KEYS, signed_at(request) + skew, REGION) == ALICE


def test_signature_from_the_future_is_not_yet_current():
    request = signed(ALICE)
    now = signed_at(request) - timedelta(minutes=6)
    refused = refusal(request, now=now)
    assert refused.message.startswith(f"Signature not yet current: {request.header('X-Amz-Date')} is still later than ")
    assert refused.message.endswith(f"({now:%Y%m%dT%H%M%SZ} + 5 min.)")


def test_unknown_access_key_is_an_invalid_security_token():
    refused = refusal(signed(LocalIdentity("AKIANOTKNOWN00000000", "whatever", "mallory")))
    assert refused.error_type == UNRECOGNIZED_CLIENT
    assert refused.body() == b'{"message":"The security token included in the request is invalid."}'


def test_session_token_must_match_the_identitys():
    with_token = LocalIdentity("ASIALOCALSESSION0001", "session-secret", "dana", session_token="token-1")
    keys = key_table([with_token])
    request = signed(with_token, token="token-1")
    assert verify(request, keys, signed_at(request), REGION) == with_token
    assert refusal(signed(with_token, token="token-2"), keys=keys).error_type == UNRECOGNIZED_CLIENT
    assert refusal(signed(with_token), keys=keys).error_type == UNRECOGNIZED_CLIENT
    assert refusal(signed(ALICE, token="token-1")).error_type == UNRECOGNIZED_CLIENT


def test_credential_scoped_to_another_region_or_service_is_refused():
    refused = refusal(signed(ALICE, region="eu-west-1"))
    assert refused.message == "Credential should be scoped to a valid region, not 'eu-west-1'. "
    refused = refusal(signed(ALICE, service="ec2"))
    assert refused.message == "Credential should be scoped to correct service: 'execute-api'. "


def test_credential_date_must_match_the_request_date():
    request = signed(ALICE)
    headers = dict(request.headers)
    headers["Authorization"] = headers["Authorization"].replace(f"/{request.header('X-Amz-Date')[:8]}/", "/20200101/")
    refused = refusal(tampered(request, headers=headers))
    assert refused.message.startswith("Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                                      "date from HTTP: '20200101' != ")


def test_authorization_that_is_not_sigv4_is_an_incomplete_signature():
    request = SignedRequest("GET", "/status", {"Host": HOST, "Authorization": "Bearer abc.def"})
    refused = refusal(request, now=datetime.now(timezone.utc))
    assert refused.error_type == INCOMPLETE
    assert refused.message == ("'abc.def' not a valid key=value pair (missing equal-sign) in Authorization header: "
                               "'Bearer abc.def'.")
    request = SignedRequest("GET", "/status", {"Host": HOST, "Authorization": "abc.def"})
    refused = refusal(request, now=datetime.now(timezone.utc))
    assert refused.message == (
        "Authorization header requires 'Credential' parameter. Authorization header requires 'Signature' parameter. "
        "Authorization header requires 'SignedHeaders' parameter. Authorization header requires existence of "
        "either a 'X-Amz-Date' or a 'Date' header. Authorization=abc.def")


def test_host_must_be_signed():
    request = signed(ALICE)
    headers = dict(request.headers)
    headers["Authorization"] = headers["Authorization"].replace("SignedHeaders=", "SignedHeaders=x-unsigned;")
    headers["Authorization"] = headers["Authorization"].replace(";host;", ";").replace("=host;", "=")
    assert "host" not in headers["Authorization"].split("SignedHeaders=")[1].split(",")[0]
    refused = refusal(tampered(request, headers=headers))
    assert refused.message == "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."


def test_key_table_refuses_one_key_for_two_identities():
    with pytest.raises(ValueError, match="AKIALOCALALICE000001"):
        key_table([ALICE, LocalIdentity(ALICE.access_key, "other", "alice2")])


def test_identities_round_trip_through_json():
    text = json.dumps([identity.as_dict() for identity in (ALICE, BOB, CAROL)])
    assert load_identities(text) == [ALICE, BOB, CAROL]


def test_request_identity_is_api_gateways_for_an_iam_user():
    identity: Dict[str, Optional[str]] = request_identity(ALICE, "127.0.0.7", "devbox/0.1")
    assert identity["accessKey"] == ALICE.access_key
    assert identity["userArn"] == "arn:aws:iam::123456789012:user/alice"
    assert identity["accountId"] == "123456789012"
    assert identity["caller"] == identity["user"] == ALICE.user_id
    assert ALICE.user_id.startswith("AIDA") and len(ALICE.user_id) == 21
    assert identity["sourceIp"] == "127.0.0.7"
    assert identity["userAgent"] == "devbox/0.1"
    assert request_identity(None, "127.0.0.1", None)["accessKey"] is None
