"""SigV4 checked the way API Gateway checks it on an IAM-authorized route, for the local stack.

`chalice local` admits unsigned calls, so a script that forgot to sign works on a laptop and
fails on AWS. The local stack's API server calls `verify` before a route with an IAMAuthorizer
runs: it recomputes the signature from the request as it arrived and answers a refusal with API
Gateway's status, `x-amzn-ErrorType` and `{"message": ...}` body. It knows the secret of each
local access key (a key table of LocalIdentity), as IAM knows every key of the account.

Not modelled: IAM policies (every known key may invoke), presigned URLs (the query-string form of
SigV4; the devbox client signs headers), and STS session tokens beyond an exact match.
"""
import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "execute-api"
TERMINATOR = "aws4_request"
# AWS refuses a request signed more than 5 minutes before or after its own clock.
MAX_SKEW = timedelta(minutes=5)
# moto's default account: the local stack's resources live there.
LOCAL_ACCOUNT = "123456789012"
AMZ_DATE = "%Y%m%dT%H%M%SZ"

# x-amzn-ErrorType values API Gateway sends with each kind of refusal.
MISSING_TOKEN = "MissingAuthenticationTokenException"
INCOMPLETE = "IncompleteSignatureException"
INVALID_SIGNATURE = "InvalidSignatureException"
UNRECOGNIZED_CLIENT = "UnrecognizedClientException"

MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret "
    "Access Key and signing method. Consult the service documentation for details."
)


@dataclass(frozen=True)
class LocalIdentity:
    """A local IAM user and its access key pair."""

    access_key: str
    secret_key: str
    user_name: str
    account: str = LOCAL_ACCOUNT
    session_token: Optional[str] = None

    @property
    def user_arn(self) -> str:
        return f"arn:aws:iam::{self.account}:user/{self.user_name}"

    @property
    def user_id(self) -> str:
        """A stable IAM-style unique id (AIDA + 17 characters), as `caller` and `user` show it."""
        digest = hashlib.sha256(f"{self.account}:{self.user_name}".encode()).digest()
        return "AIDA" + base64.b32encode(digest).decode()[:17]

    def as_dict(self) -> Dict[str, Optional[str]]:
        return {"access_key": self.access_key, "secret_key": self.secret_key, "user_name": self.user_name,
                "account": self.account, "session_token": self.session_token}


KeyTable = Mapping[str, LocalIdentity]


def key_table(identities: Iterable[LocalIdentity]) -> Dict[str, LocalIdentity]:
    """The identities by access key; an access key may belong to one identity only."""
    table: Dict[str, LocalIdentity] = {}
    for identity in identities:
        if identity.access_key in table:
            raise ValueError(f"access key {identity.access_key!r} is given to two local identities")
        table[identity.access_key] = identity
    return table


def load_identities(text: str) -> List[LocalIdentity]:
    """Identities from the JSON list that LocalIdentity.as_dict items make."""
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("the identities file must hold a JSON list")
    return [LocalIdentity(**item) for item in items]


class SignatureRefused(Exception):
    """API Gateway's refusal of a request on an IAM-authorized route: 403, an error type, a message."""

    status = 403

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def body(self) -> bytes:
        """The response body, spaced as API Gateway spaces it."""
        return json.dumps({"message": self.message}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedRequest:
    """What the check reads: the request line's method and target, the headers, the body bytes."""

    method: str
    target: str  # path and query string, as sent (still percent-encoded)
    headers: Mapping[str, str]
    body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True)
class _Authorization:
    credential: str
    signed_headers: Tuple[str, ...]
    signature: str


def verify(request: SignedRequest, keys: KeyTable, now: datetime, region: str,
           service: str = SERVICE) -> LocalIdentity:
    """The identity that signed the request, or SignatureRefused with API Gateway's error."""
    header = request.header("Authorization")
    if header is None:
        raise SignatureRefused(MISSING_TOKEN, "Missing Authentication Token")
    authorization = _parse_authorization(header, request)
    access_key, scope_date, scope_region, scope_service, terminator = _credential_parts(authorization.credential)
    amz_date, signed_at = _request_date(request)
    if scope_date != amz_date[:8]:
        raise SignatureRefused(INVALID_SIGNATURE, "Date in Credential scope does not match YYYYMMDD from ISO-8601 "
                               f"version of date from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.")
    if scope_region != region:
        raise SignatureRefused(INVALID_SIGNATURE,
                               f"Credential should be scoped to a valid region, not '{scope_region}'. ")
    if scope_service != service:
        raise SignatureRefused(INVALID_SIGNATURE, f"Credential should be scoped to correct service: '{service}'. ")
    if terminator != TERMINATOR:
        raise SignatureRefused(INVALID_SIGNATURE, "Credential should be scoped with a valid terminator: "
                               f"'{TERMINATOR}', not '{terminator}'. ")
    _check_clock(amz_date, signed_at, now)
    identity = keys.get(access_key)
    token = request.header("X-Amz-Security-Token")
    if identity is None or token != identity.session_token:
        raise SignatureRefused(UNRECOGNIZED_CLIENT, "The security token included in the request is invalid.")
    if "host" not in authorization.signed_headers:
        raise SignatureRefused(INVALID_SIGNATURE, "'Host' or ':authority' must be a 'SignedHeader' in the AWS "
                               "Authorization.")
    canonical = canonical_request(request, authorization.signed_headers)
    to_sign = string_to_sign(amz_date, f"{scope_date}/{region}/{service}/{TERMINATOR}", canonical)
    expected = signature(identity.secret_key, scope_date, region, service, to_sign)
    if not hmac.compare_digest(expected, authorization.signature):
        raise SignatureRefused(INVALID_SIGNATURE, f"{MISMATCH_MESSAGE}\n\nThe Canonical String for this request "
                               f"should have been\n'{canonical}'\n\nThe String-to-Sign should have been\n'{to_sign}'\n")
    return identity


def _parse_authorization(header: str, request: SignedRequest) -> _Authorization:
    algorithm, _, rest = header.strip().partition(" ")
    params: Dict[str, str] = {}
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        name, equals, value = part.partition("=")
        if not equals:
            raise SignatureRefused(INCOMPLETE, f"'{part}' not a valid key=value pair (missing equal-sign) in "
                                   f"Authorization header: '{header}'.")
        params[name.strip()] = value.strip()
    missing = [f"Authorization header requires '{name}' parameter." for name in ("Credential", "Signature",
                                                                                   "SignedHeaders")
               if name not in params]
    if request.header("X-Amz-Date") is None and request.header("Date") is None:
        missing.append("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
    if missing:
        raise SignatureRefused(INCOMPLETE, " ".join(missing) + f" Authorization={header}")
    if algorithm != ALGORITHM:
        # The parameters are all there but not for SigV4 (local wording: no AWS message was found for this).
        raise SignatureRefused(INCOMPLETE, f"Unsupported Authorization Type: '{algorithm}'; "
                               f"API Gateway accepts {ALGORITHM}.")
    names = tuple(params["SignedHeaders"].lower().split(";"))
    return _Authorization(params["Credential"], names, params["Signature"])


def _credential_parts(credential: str) -> Tuple[str, str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5:
        raise SignatureRefused(INCOMPLETE, "Credential must have exactly 5 slash-delimited elements, e.g. "
                               f"keyid/date/region/service/term, got '{credential}'")
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def _request_date(request: SignedRequest) -> Tuple[str, datetime]:
    """The signing time as SigV4 writes it (X-Amz-Date, else the Date header) and as a datetime."""
    amz_date = request.header("X-Amz-Date")
    if amz_date is not None:
        try:
            signed_at = datetime.strptime(amz_date.strip(), AMZ_DATE).replace(tzinfo=timezone.utc)
        except ValueError:
            raise SignatureRefused(INCOMPLETE, f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'. "
                                   "See http://en.wikipedia.org/wiki/ISO_8601") from None
        return amz_date.strip(), signed_at
    date = request.header("Date") or ""
    try:
        signed_at = parsedate_to_datetime(date).astimezone(timezone.utc)
    except (TypeError, ValueError):
        raise SignatureRefused(INCOMPLETE, f"Date must be in ISO-8601 'basic format'. Got '{date}'. "
                               "See http://en.wikipedia.org/wiki/ISO_8601") from None
    return signed_at.strftime(AMZ_DATE), signed_at


def _check_clock(amz_date: str, signed_at: datetime, now: datetime) -> None:
    now = now.astimezone(timezone.utc)
    stamp = now.strftime(AMZ_DATE)
    if signed_at < now - MAX_SKEW:
        raise SignatureRefused(INVALID_SIGNATURE, f"Signature expired: {amz_date} is now earlier than "
                               f"{(now - MAX_SKEW).strftime(AMZ_DATE)} ({stamp} - 5 min.)")
    if signed_at > now + MAX_SKEW:
        raise SignatureRefused(INVALID_SIGNATURE, f"Signature not yet current: {amz_date} is still later than "
                               f"{(now + MAX_SKEW).strftime(AMZ_DATE)} ({stamp} + 5 min.)")


def canonical_request(request: SignedRequest, signed_headers: Iterable[str]) -> str:
    """SigV4's canonical request for the request as it arrived, over the headers the caller signed."""
    from botocore.utils import normalize_url_path

    parts = urlsplit(request.target)
    # Services other than S3 normalize the path and encode it once more: a caller that sent
    # "/a%20b" signed "/a%2520b", as botocore's SigV4Auth does.
    path = quote(normalize_url_path(parts.path), safe="/~")
    pairs = []
    for item in parts.query.split("&") if parts.query else []:
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    query = "&".join(f"{key}={value}" for key, value in sorted(pairs))
    names = list(signed_headers)
    lines = [f"{name}:{_header_value(request, name)}" for name in names]
    payload = hashlib.sha256(request.body).hexdigest()
    return "\n".join([request.method.upper(), path, query, "\n".join(lines) + "\n", ";".join(names), payload])


def _header_value(request: SignedRequest, name: str) -> str:
    values = [v for k, v in request.headers.items() if k.lower() == name]
    # SigV4 trims each value and collapses runs of spaces; repeated headers are joined by commas.
    return ",".join(" ".join(value.split()) for value in values)


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    """SigV4's string to sign."""
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def signature(secret_key: str, date: str, region: str, service: str, to_sign: str) -> str:
    """The hex HMAC-SHA256 signature of to_sign with the key derived for date/region/service."""
    key = f"AWS4{secret_key}".encode()
    for part in (date, region, service, TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def request_identity(identity: Optional[LocalIdentity], source_ip: str,
                     user_agent: Optional[str]) -> Dict[str, Optional[str]]:
    """requestContext.identity as API Gateway fills it for an IAM user's call (or an unauthenticated one)."""
    return {
        "cognitoIdentityPoolId": None,
        "accountId": identity.account if identity else None,
        "cognitoIdentityId": None,
        "caller": identity.user_id if identity else None,
        "sourceIp": source_ip,
        "principalOrgId": None,
        "accessKey": identity.access_key if identity else None,
        "cognitoAuthenticationType": None,
        "cognitoAuthenticationProvider": None,
        "userArn": identity.user_arn if identity else None,
        "userAgent": user_agent,
        "user": identity.user_id if identity else None,
    }
