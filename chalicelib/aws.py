"""AWS clients: created on first use, cached, all sharing one botocore Config and two hooks."""
from typing import Any, Dict

from chalicelib import deadline, oplog

_clients: Dict[str, Any] = {}


def _boto_config() -> Any:
    from botocore.config import Config

    # Standard mode retries throttling and transient errors with backoff; each attempt is bounded
    # by these timeouts, and the request's deadline decides whether another attempt may start.
    return Config(
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=deadline.CONNECT_TIMEOUT,
        read_timeout=deadline.READ_TIMEOUT,
        user_agent_extra="devbox",
    )


def client(service: str) -> Any:
    """Return the cached boto3 client for a service, creating it on first use."""
    found = _clients.get(service)
    if found is None:
        import boto3

        found = boto3.session.Session().client(service, config=_boto_config())
        # Every call counts towards the operation's log line; every attempt must fit the deadline.
        found.meta.events.register("before-call", oplog.count_call)
        found.meta.events.register("before-send", deadline.check_before_send)
        found.meta.events.register("needs-retry", deadline.note_attempt)
        _clients[service] = found
    return found


def reset_clients() -> None:
    """Forget cached clients (tests point them at a fresh moto backend)."""
    _clients.clear()
