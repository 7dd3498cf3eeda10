"""The devbox API client: SigV4-signed HTTP calls and one error type carrying an exit code.

requests and botocore are imported when a client is built, not at import time, so that
`devbox --help` and argument errors answer at once.
"""
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import requests

# Exit codes of the `devbox` command, one per kind of failure a script may want to tell apart.
EXIT_OK = 0
EXIT_FAILURE = 1  # any other error answer (400, 413, 500, 502, ...) or local failure
EXIT_USAGE = 2  # bad arguments, no API URL (argparse uses 2 as well)
EXIT_AUTH = 3  # HTTP 403 (signature, permission) or no usable AWS credentials
EXIT_NOT_FOUND = 4  # HTTP 404: the configured instance does not exist
EXIT_CONFLICT = 5  # HTTP 409: the instance's state forbids the operation
EXIT_UNAVAILABLE = 6  # HTTP 503: no capacity for any allowed type, or AWS throttling; try again later
EXIT_UNREACHABLE = 7  # the API (or the devbox's SSH port) could not be reached
EXIT_TIMEOUT = 8  # the API did not answer in time, or a --wait ran out of time
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

DEFAULT_STAGE = "dev"
# API Gateway ends any integration after 29 s, so waiting longer only hides a hang.
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
URL_ENV = "DEVBOX_URL"
_EXECUTE_API_HOST = re.compile(r"\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_ERRNO_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
# A fleet's box name is a DNS label (it names the box's DNS record): lowercase, digits, inner hyphens.
_BOX_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# A body that is not the app's own error (an HTML page, a proxy's text) is cut short; the app's
# Message is kept longer, since a capacity error names every launch it tried.
_MAX_EXCERPT = 300
_MAX_MESSAGE = 1500


class CliError(Exception):
    """A failure reported as one line on stderr, ending the command with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ApiError(CliError):
    """The devbox API refused a call, failed, or could not be reached."""

    def __init__(self, message: str, exit_code: int, status: Optional[int] = None, code: Optional[str] = None,
                 detail: Optional[str] = None) -> None:
        super().__init__(message, exit_code)
        self.status = status
        self.code = code
        # For an error answer: the server's own Message (one printable line), to reword the error around it.
        self.detail = detail

    @property
    def transient(self) -> bool:
        """True when the same call may well succeed a few seconds later."""
        return self.exit_code in (EXIT_UNREACHABLE, EXIT_TIMEOUT) or (self.status or 0) >= 500


@dataclass(frozen=True)
class ApiUrl:
    """The API's base URL and where it was found: "--url", "$DEVBOX_URL" or a deployment record's path."""

    url: str
    source: str


def find_deployment_record(stage: str = DEFAULT_STAGE, start_dir: Optional[Path] = None) -> Optional[Path]:
    """The chalice deployment record .chalice/deployed/<stage>.json, here or in a parent folder."""
    here = (start_dir or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        record = folder / ".chalice" / "deployed" / f"{stage}.json"
        if record.is_file():
            return record
    return None


def find_deployed_url(stage: str = DEFAULT_STAGE, start_dir: Optional[Path] = None) -> Optional[str]:
    """The rest_api_url chalice recorded in .chalice/deployed/<stage>.json, here or in a parent folder."""
    record = find_deployment_record(stage, start_dir)
    return None if record is None else _rest_api_url(record)


def _rest_api_url(record: Path) -> str:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        resources = data["resources"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CliError(f"{record} is not a chalice deployment record ({err})", EXIT_USAGE) from None
    for resource in resources if isinstance(resources, list) else []:
        if isinstance(resource, dict) and resource.get("resource_type") == "rest_api" and resource.get("rest_api_url"):
            return str(resource["rest_api_url"])
    raise CliError(f"{record} records no rest_api_url: was the app deployed with `chalice deploy`?", EXIT_USAGE)


def locate_url(
    url: Optional[str] = None,
    stage: str = DEFAULT_STAGE,
    environ: Optional[Mapping[str, str]] = None,
    start_dir: Optional[Path] = None,
) -> Optional[ApiUrl]:
    """The API's URL and its source: --url, else $DEVBOX_URL, else the chalice deployment record; None if none.

    A URL that is found is checked (see check_url) whatever its source.
    """
    environ = os.environ if environ is None else environ
    if url:
        found = ApiUrl(url, "--url")
    elif environ.get(URL_ENV):
        found = ApiUrl(environ[URL_ENV], f"${URL_ENV}")
    else:
        record = find_deployment_record(stage, start_dir)
        if record is None:
            return None
        found = ApiUrl(_rest_api_url(record), str(record))
    check_url(found.url, found.source)
    return found


def resolve_url(
    url: Optional[str] = None,
    stage: str = DEFAULT_STAGE,
    environ: Optional[Mapping[str, str]] = None,
    start_dir: Optional[Path] = None,
) -> str:
    """The API's base URL: --url, else $DEVBOX_URL, else the chalice deployment record."""
    return require_url(url, stage, environ, start_dir).url


def require_url(
    url: Optional[str] = None,
    stage: str = DEFAULT_STAGE,
    environ: Optional[Mapping[str, str]] = None,
    start_dir: Optional[Path] = None,
) -> ApiUrl:
    """locate_url, with a usage error when no URL is found anywhere."""
    found = locate_url(url, stage, environ, start_dir)
    if found is None:
        raise CliError(
            f"no devbox API URL: pass --url, set {URL_ENV}, or run from the project after `chalice deploy`"
            f" (looked for .chalice/deployed/{stage}.json)",
            EXIT_USAGE,
        )
    return found


def is_loopback_host(host: Optional[str]) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: addresses that never leave this machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # Only ::1 for IPv6: Python versions disagree on whether ::ffff:127.0.0.1 is loopback.
    return address.is_loopback if address.version == 4 else address == ipaddress.IPv6Address("::1")


def check_url(url: str, source: str = "--url") -> None:
    """Refuse an API URL the client must not sign requests for: not http(s), or plain http off this machine.

    A signed request carries the caller's access key id and, with temporary credentials, the
    session token: over plain http anyone on the path reads them. A deployment record can be
    planted in any repository, so its URL gets the same check as a typed one.
    """
    where = f"(from {printable(source)})"
    if any(char.isspace() or not char.isprintable() for char in url):
        raise CliError(f"the devbox API URL {where} holds spaces or control characters: {printable(url)}", EXIT_USAGE)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as err:
        raise CliError(f"the devbox API URL {where} is not a URL ({err}): {url}", EXIT_USAGE) from None
    if parts.scheme not in ("http", "https") or not host:
        raise CliError(f"the devbox API URL {where} must be https://host/...: {url!r}", EXIT_USAGE)
    if parts.scheme == "http" and not is_loopback_host(host):
        raise CliError(
            f"refusing to sign requests for {url} {where}: plain http would show your AWS access key id and"
            " session token to the network; use its https URL (http is allowed only for 127.0.0.1, ::1 and"
            " localhost)",
            EXIT_USAGE,
        )


def region_from_url(url: str) -> Optional[str]:
    """The region in an execute-api host name (https://ID.execute-api.REGION.amazonaws.com/...)."""
    match = _EXECUTE_API_HOST.search(urlsplit(url).hostname or "")
    return match.group(1) if match else None


def make_auth(url: str, profile: Optional[str] = None, region: Optional[str] = None) -> Any:
    """A requests auth object signing execute-api calls with the session's (refreshable) credentials."""
    import botocore.exceptions
    import botocore.session
    from requests_aws4auth import AWS4Auth

    try:
        session = botocore.session.Session(profile=profile)
        credentials = session.get_credentials()
        session_region = session.get_config_variable("region")
    except botocore.exceptions.ProfileNotFound:
        raise CliError(
            f"the AWS profile {profile!r} is not configured (see `aws configure list-profiles`)", EXIT_AUTH
        ) from None
    except botocore.exceptions.BotoCoreError as err:
        raise CliError(f"AWS credentials could not be loaded: {_one_line(str(err))}", EXIT_AUTH) from None
    if credentials is None:
        raise CliError(
            "no AWS credentials found: pass --profile, set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
            " or log in with `aws sso login`",
            EXIT_AUTH,
        )
    # The signature only verifies in the API's own region, whatever the profile's default is.
    signing_region = region or region_from_url(url) or session_region
    if not signing_region:
        if is_loopback_host(urlsplit(url).hostname):
            # `chalice local` checks no signature; any region makes a well-formed one.
            signing_region = "us-east-1"
        else:
            raise CliError("no AWS region to sign with: pass --region or set AWS_DEFAULT_REGION", EXIT_USAGE)
    return AWS4Auth(region=signing_region, service="execute-api", refreshable_credentials=credentials)


def check_box_name(name: str) -> str:
    """name if it is a fleet box name (a DNS label: a-z, 0-9 and inner hyphens, 1-63 characters); else a usage error."""
    if not isinstance(name, str) or not _BOX_NAME.match(name):
        raise CliError(
            f"not a box name: {_kind(name)} (a box name is 1-63 lowercase letters, digits and hyphens,"
            " not starting or ending with a hyphen)",
            EXIT_USAGE,
        )
    return name


class DevboxApi:
    """The routes of the devbox API: GET /status, POST /start, POST /stop; for a fleet's admins GET /boxes and
    POST /boxes/NAME/stop."""

    def __init__(
        self,
        url: str,
        auth: Any,
        timeout: float = DEFAULT_TIMEOUT,
        session: Optional["requests.Session"] = None,
        source: str = "the caller",
    ) -> None:
        import requests

        check_url(url, source)
        self.url = url.rstrip("/")
        self.source = source
        self.auth = auth
        self.timeout = timeout
        self.session = session or requests.Session()

    @classmethod
    def connect(
        cls,
        url: Optional[str] = None,
        profile: Optional[str] = None,
        region: Optional[str] = None,
        stage: str = DEFAULT_STAGE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> "DevboxApi":
        """A client for the API found from the options, signing with the profile's credentials."""
        found = require_url(url, stage)
        return cls(found.url, make_auth(found.url, profile, region), timeout, source=found.source)

    def status(self) -> Dict[str, Any]:
        """The instance's status document."""
        return self._call("GET", "/status")

    def start(self, instance_type: Optional[str] = None, rebuild: bool = False) -> Dict[str, Any]:
        """Let the caller's IP in and get the box running: optionally as another type, or on a new instance."""
        body: Dict[str, Any] = {}
        if instance_type:
            body["instance_type"] = instance_type
        if rebuild:
            body["rebuild"] = True
        return self._call("POST", "/start", body)

    def stop(self) -> Dict[str, Any]:
        """Stop the instance (a no-op when it is already stopped)."""
        return self._call("POST", "/stop", {})

    def boxes(self) -> Dict[str, Any]:
        """A fleet's boxes, for its admins: {"boxes": [...], "count": N, "max_boxes": M} (types not checked here)."""
        return self._call("GET", "/boxes", expect="boxes", what="a box listing")

    def stop_box(self, name: str) -> Dict[str, Any]:
        """Stop another's box of the fleet (admins only); its status document, with its "owner".

        A name that is not a box name is refused before any request is made.
        """
        return self._call("POST", f"/boxes/{quote(check_box_name(name), safe='')}/stop", {})

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None, expect: str = "state",
              what: str = "a status document") -> Dict[str, Any]:
        import botocore.exceptions
        import requests

        url = self.url + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self.session.request(
                method,
                url,
                # Serialised here so the signed body is byte for byte the one sent.
                data=None if body is None else json.dumps(body).encode(),
                headers=headers,
                auth=self.auth,
                timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout),
                allow_redirects=False,
            )
        except requests.Timeout:
            # Checked before ConnectionError: ConnectTimeout is both.
            raise ApiError(f"the devbox API did not answer within {self.timeout:g} s ({url})", EXIT_TIMEOUT) from None
        except requests.ConnectionError as err:
            reason = _connection_reason(err)
            raise ApiError(f"cannot reach the devbox API at {url}: {reason}", EXIT_UNREACHABLE) from None
        except botocore.exceptions.BotoCoreError as err:
            # Refreshable credentials load lazily: an expired SSO token shows up while signing.
            raise ApiError(f"AWS credentials could not be loaded: {_one_line(str(err))}", EXIT_AUTH) from None
        if response.status_code >= 400:
            raise error_for_response(response.status_code, response.content, url)
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict) or expect not in document:
            raise ApiError(
                f"the devbox API answered HTTP {response.status_code} without {what} ({url}):"
                f" {_excerpt(response.content)}",
                EXIT_FAILURE,
                status=response.status_code,
            )
        return document


def error_for_response(status: int, content: bytes, url: str) -> ApiError:
    """The ApiError for an error answer: the server's Message and an exit code for its status."""
    code, message = _error_fields(content)
    detail = message or _excerpt(content) or "no details given"
    if status == 403:
        hint = ""
        if "missing authentication token" in detail.lower():
            # API Gateway's answer for a path it does not know, signed or not.
            hint = "; check the URL (it ends with the stage, e.g. .../api)"
        return ApiError(f"access denied by the devbox API (HTTP 403): {detail}{hint}", EXIT_AUTH, status, code,
                        detail)
    if status == 404:
        return ApiError(f"no devbox (HTTP 404): {detail}", EXIT_NOT_FOUND, status, code, detail)
    if status == 409:
        return ApiError(f"conflict (HTTP 409): {detail}", EXIT_CONFLICT, status, code, detail)
    if status == 503:
        return ApiError(f"unavailable, try again later (HTTP 503): {detail}", EXIT_UNAVAILABLE, status, code, detail)
    what = "refused the request" if status < 500 else "failed"
    label = f"HTTP {status} {code}" if code else f"HTTP {status}"
    return ApiError(f"the devbox API {what} ({label}): {detail} ({url})", EXIT_FAILURE, status, code, detail)


def _error_fields(content: bytes) -> Tuple[Optional[str], Optional[str]]:
    try:
        body = json.loads(content)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    # The app answers {"Code", "Message"}; API Gateway's own errors use {"message"}.
    code = body.get("Code")
    message = body.get("Message") or body.get("message")
    return (_one_line(str(code)) if code else None), (_one_line(str(message), _MAX_MESSAGE) if message else None)


def _excerpt(content: bytes) -> str:
    return _one_line(content.decode("utf-8", errors="replace"))


def printable(value: Any) -> str:
    """value as text that is safe on a terminal: control and format characters are shown escaped.

    Status fields come from instance tags and error messages from the server; an escape
    sequence in either must not reach the user's terminal as one.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def status_text(status: Mapping[str, Any], field: str) -> Optional[str]:
    """status[field] as text, None when absent, null or empty; any other type is a malformed status."""
    value = status.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise malformed_status(field, value)
    return value


def malformed_status(field: str, value: Any, expected: str = "text", document: str = "status") -> ApiError:
    """The error for a status field the client cannot use: names the field, what it holds, what was expected.

    document names what was malformed when it is not a status (e.g. "box listing").
    """
    return ApiError(
        f"the devbox API answered a malformed {document}: {field} is {_kind(value)}, not {expected}", EXIT_FAILURE
    )


def _kind(value: Any) -> str:
    if isinstance(value, str):
        shown = printable(value)
        return "'" + (shown if len(shown) <= 60 else shown[:57] + "...") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _one_line(text: str, limit: int = _MAX_EXCERPT) -> str:
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _connection_reason(err: Exception) -> str:
    # requests wraps the OS error three levels deep; the errno text is what a person needs.
    text = str(err)
    match = _ERRNO_REASON.search(text)
    if match:
        return match.group(1).strip()
    if "SSL" in text or "certificate" in text.lower():
        return "TLS error: " + _one_line(text)
    return _one_line(text) or type(err).__name__
