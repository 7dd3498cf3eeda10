"""AWS clients: created on first use, cached, all sharing one botocore Config."""
from typing import Any, Dict

_clients: Dict[str, Any] = {}


def _boto_config() -> Any:
    from botocore.config import Config

    # Standard mode retries throttling and transient errors with backoff; the
    # connect/read timeouts keep a stuck call well inside API Gateway's 29 s.
    return Config(
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5,
        read_timeout=10,
        user_agent_extra="devbox",
    )


def client(service: str) -> Any:
    """Return the cached boto3 client for a service, creating it on first use."""
    found = _clients.get(service)
    if found is None:
        import boto3

        found = _clients[service] = boto3.session.Session().client(service, config=_boto_config())
    return found


def reset_clients() -> None:
    """Forget cached clients (tests point them at a fresh moto backend)."""
    _clients.clear()
