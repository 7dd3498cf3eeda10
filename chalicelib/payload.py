"""Request bodies: small JSON objects with known fields only."""
import json
from datetime import datetime, timezone
from typing import Any, Collection, Dict, Optional, Union

from chalicelib.errors import InvalidRequestError, PayloadTooLargeError

MAX_BODY_BYTES = 4096


def parse_body(raw: Union[str, bytes, None], allowed_fields: Collection[str]) -> Dict[str, Any]:
    """Parse an optional JSON object body, refusing unknown fields and oversized input."""
    if raw is None or not raw.strip():
        return {}
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    except RecursionError:
        # Thousands of nested brackets fit in 4 KiB and exhaust the parser's recursion.
        raise InvalidRequestError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed_fields))
    if unknown:
        accepted = ", ".join(sorted(allowed_fields)) or "none"
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}; accepted fields: {accepted}")
    return body


def parse_event_time(value: Optional[str]) -> Optional[datetime]:
    """The time of an EventBridge event (ISO 8601, UTC), or None when absent or garbled."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
