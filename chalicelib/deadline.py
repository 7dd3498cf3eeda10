"""One deadline per request, bounding every AWS call and retry it makes.

API Gateway gives up on a request after 29 s; a caller who got a 504 while the function went
on starting the box would not know what happened. Each request therefore gets one deadline
(``DEADLINE_SECONDS``). Before every HTTP attempt (botocore's ``before-send``) the remaining
time is checked: an attempt starts only when it can finish (its connect and read timeouts)
before the deadline, with one attempt's time held back for the clean-up a failure needs
(removing the access rule just added). Past that, the call raises ``DeadlineExceeded``: a 503.
"""
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

from chalicelib.errors import DevboxError

DEADLINE_SECONDS = 25.0
# Timeouts of one attempt (the clients' botocore Config): an attempt needs at most their sum.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0

_deadline: ContextVar[Optional[float]] = ContextVar("devbox_deadline", default=None)
_cleaning_up: ContextVar[bool] = ContextVar("devbox_cleaning_up", default=False)
_last_failure: ContextVar[Optional[str]] = ContextVar("devbox_last_failure", default=None)


class DeadlineExceeded(DevboxError):
    """The request ran out of time waiting on AWS."""

    status_code = 503
    code = "DeadlineExceeded"


def attempt_seconds() -> float:
    """The longest one HTTP attempt can take."""
    return CONNECT_TIMEOUT + READ_TIMEOUT


@contextmanager
def request_deadline(seconds: Optional[float] = None) -> Iterator[None]:
    """Bound the AWS calls made inside the block (the whole request) to one deadline."""
    token = _deadline.set(time.monotonic() + (DEADLINE_SECONDS if seconds is None else seconds))
    failure = _last_failure.set(None)
    try:
        yield
    finally:
        _last_failure.reset(failure)
        _deadline.reset(token)


@contextmanager
def cleanup() -> Iterator[None]:
    """Calls that undo a failed request's changes may use the time held back for them."""
    token = _cleaning_up.set(True)
    try:
        yield
    finally:
        _cleaning_up.reset(token)


def note_attempt(response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    """botocore needs-retry hook: remember how the last attempt failed (decides nothing)."""
    if caught_exception is not None:
        _last_failure.set(type(caught_exception).__name__)
    elif response is not None:
        code = (response[1] or {}).get("Error", {}).get("Code")
        if code:
            _last_failure.set(str(code))


def check_before_send(**_: Any) -> None:
    """botocore before-send hook: refuse an attempt that could not finish in time."""
    deadline = _deadline.get()
    if deadline is None:
        return
    reserve = 0.0 if _cleaning_up.get() else attempt_seconds()
    if deadline - time.monotonic() < attempt_seconds() + reserve:
        last = _last_failure.get()
        failure = DeadlineExceeded(
            "AWS did not answer in time" + (f" (its last answer: {last})" if last else "")
            + ": the request stopped before API Gateway's 29 s limit and removed the access it had just added; "
            "try again (a launch already under way is finished by the next start)"
        )
        failure.aws_code = last
        raise failure
