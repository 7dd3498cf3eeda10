"""One JSON log line per request, event and scheduled run: what ran, for whom, how it ended, what it cost.

Chalice sets its logger to ERROR unless ``debug`` is on, which would drop every info and warning
line on AWS; ``LOG_LEVEL`` (default INFO) sets it at the start of each invocation. The line
carries the operation, box, instance, caller address, outcome, the AWS calls made (counted by a
botocore hook on the app's clients) and the duration; a failure adds its code and the AWS error
code, never credentials, signatures or request headers.
"""
import json
import logging
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

from chalicelib.errors import DevboxError

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_current: ContextVar[Optional["Operation"]] = ContextVar("devbox_operation", default=None)


@dataclass
class Operation:
    """What one invocation did, filled in as it runs."""

    name: str
    caller: Optional[str] = None
    box: Optional[str] = None
    instance: Optional[str] = None
    outcome: str = "ok"
    status: Optional[int] = None
    error: Optional[Dict[str, Any]] = None
    calls: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def answered(self, document: Mapping[str, Any]) -> None:
        """Record what a route answered with."""
        self.status = 200
        self.box = self.box or document.get("box")
        self.instance = document.get("instance_id") or self.instance
        self.outcome = str(document.get("action") or document.get("state") or "ok")

    def failed(self, err: Exception) -> None:
        """Record a failure: the project's own code and status, and AWS's code when AWS refused."""
        if isinstance(err, DevboxError):
            self.status = err.status_code
            self.outcome = "refused" if err.status_code < 500 else "failed"
            self.error = {"code": err.code, "message": err.message[:300]}
            if err.aws_code:
                self.error["aws_code"] = err.aws_code
        else:
            self.outcome = "error"
            self.error = {"code": type(err).__name__}

    def record(self) -> Dict[str, Any]:
        """The log line's fields."""
        line: Dict[str, Any] = {
            "operation": self.name, "box": self.box, "instance": self.instance, "caller": self.caller,
            "outcome": self.outcome, "status": self.status, "aws_calls": len(self.calls), "calls": self.calls,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
        }
        if self.error:
            line["error"] = self.error
        return line


def configure(logger: logging.Logger, env: Optional[Mapping[str, str]] = None) -> None:
    """Set the logger's level from LOG_LEVEL (an unknown value keeps INFO and says so)."""
    raw = (os.environ if env is None else env).get("LOG_LEVEL", "").strip().upper() or "INFO"
    logger.setLevel(_LEVELS.get(raw, logging.INFO))
    if raw not in _LEVELS:
        logger.warning("LOG_LEVEL %r is not one of %s; using INFO", raw[:20], ", ".join(_LEVELS))


@contextmanager
def operation(logger: logging.Logger, name: str, **fields: Any) -> Iterator[Operation]:
    """Run one invocation, then log its line (an exception is recorded, then raised on)."""
    op = Operation(name, **fields)
    token = _current.set(op)
    try:
        yield op
    except Exception as err:
        op.failed(err)
        raise
    finally:
        _current.reset(token)
        level = logging.ERROR if op.outcome in ("failed", "error") else logging.INFO
        logger.log(level, json.dumps(op.record(), sort_keys=True, default=str))


def count_call(model: Any, **_: Any) -> None:
    """botocore before-call hook: the operation under way made this AWS call."""
    op = _current.get()
    if op is not None:
        op.calls.append(str(model.name))
