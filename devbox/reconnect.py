"""Whether a person asked for the box: a background reconnect does not restart a box stopped for idleness.

VS Code Remote-SSH and JetBrains Gateway reconnect on their own when a laptop wakes up or the
network returns. Through `devbox proxy` each reconnect would call /start, so a box that its
idle watcher stopped would be started again by nobody's intent, run until the watcher stops it,
and the loop would repeat. So the proxy starts a box stopped for idleness only when a person
asked for it:

- it runs from a terminal: the ProxyCommand of an ssh typed by hand inherits that terminal as
  its controlling terminal, while the ssh an IDE spawns in the background has none;
- `devbox start` ran for the same API within the cooldown (a marker file records when);
- the idle stop is older than the cooldown: someone coming back, not a reconnect loop.

A box stopped by a user, by the max-runtime job or by the spot service is started as before.
"""
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from devbox.api import EXIT_CONFLICT, CliError, printable

DEFAULT_IDLE_COOLDOWN = 60.0  # minutes
MAX_IDLE_COOLDOWN = 10080.0  # a week, in minutes
STATE_HOME_ENV = "XDG_STATE_HOME"
# A marker written by a laptop whose clock ran ahead proves nothing about now.
_CLOCK_SLACK = timedelta(minutes=1)
_STAMP = "%Y-%m-%dT%H:%M:%SZ"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(timezone.utc)


def has_controlling_terminal() -> bool:
    """True when this process has a controlling terminal (opening /dev/tty succeeds)."""
    try:
        descriptor = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        # ENXIO: no controlling terminal; ENOENT/EACCES: no usable /dev/tty, which is no terminal either.
        return False
    os.close(descriptor)
    return True


def marker_path(url: str, environ: Optional[Mapping[str, str]] = None) -> Path:
    """Where `devbox start` records when it last started the box behind url ($XDG_STATE_HOME/devbox/...)."""
    environ = os.environ if environ is None else environ
    # XDG: a relative $XDG_STATE_HOME is invalid and must be ignored.
    base = environ.get(STATE_HOME_ENV, "")
    state_home = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    # One marker per API: a start of another deployment says nothing about this box.
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return state_home / "devbox" / f"started-{digest}"


def record_start(url: str, now: Optional[datetime] = None, environ: Optional[Mapping[str, str]] = None) -> None:
    """Note that a person started the box behind url now (best effort)."""
    path = marker_path(url, environ)
    stamp = (now or utc_now()).astimezone(timezone.utc).strftime(_STAMP)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(f"{stamp} {url.rstrip('/')}\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        # A read-only home must not fail the start itself; the guard then relies on the terminal.
        pass


def last_start(url: str, environ: Optional[Mapping[str, str]] = None) -> Optional[datetime]:
    """When `devbox start` last started the box behind url, or None (never, or the marker is unreadable)."""
    try:
        words = marker_path(url, environ).read_text(encoding="utf-8").split()
        return datetime.strptime(words[0], _STAMP).replace(tzinfo=timezone.utc)
    except (OSError, UnicodeError, ValueError, IndexError):
        return None


def parse_utc(value: Any) -> Optional[datetime]:
    """A status time ("YYYY-MM-DDTHH:MM:SSZ", or any ISO 8601 time with an offset) as UTC; None if not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def age_text(delta: timedelta) -> str:
    """How long ago, in words: "just now", "14 min ago", "2 h 05 min ago", "3 days ago"."""
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "just now"
    if minutes < 120:
        return f"{minutes} min ago"
    if minutes < 2 * 1440:
        return f"{minutes // 60} h {minutes % 60:02d} min ago"
    return f"{minutes // 1440} days ago"


@dataclass(frozen=True)
class ReconnectPlan:
    """Whether the proxy may call /start, and why; refusal is the one line ssh shows when it may not."""

    start: bool
    why: str
    refusal: Optional[str] = None


def person_asked(
    now: datetime, cooldown: timedelta, from_terminal: bool, started: Optional[datetime]
) -> Optional[str]:
    """Why a person asked for the box, or None when nothing says so; decided without the API."""
    if from_terminal:
        return "run from a terminal"
    if started is not None and -_CLOCK_SLACK <= now - started < cooldown:
        return "`devbox start` ran recently"
    return None


def plan_reconnect(status: Dict[str, Any], now: datetime, cooldown: timedelta) -> ReconnectPlan:
    """What a reconnect nobody asked for may do to the box this status describes."""
    if status.get("state") != "stopped" or status.get("stopped_by") != "idle":
        return ReconnectPlan(True, "not stopped for idleness")
    stopped_at = parse_utc(status.get("stopped_at"))
    if stopped_at is not None and now - stopped_at >= cooldown:
        return ReconnectPlan(True, "the idle stop is older than the cooldown")
    # An idle stop of unknown time counts as a recent one: restarting costs money, waiting costs a command.
    return ReconnectPlan(False, "a background reconnect within the cooldown", refusal_line(status, stopped_at, now))


def refusal_line(status: Dict[str, Any], stopped_at: Optional[datetime], now: datetime) -> str:
    """Why the box is stopped, since when, and the command that starts it: one line."""
    if stopped_at is None:
        raw = status.get("stopped_at")
        when = f"at {printable(raw)}" if raw not in (None, "") else "(time unknown)"
    else:
        shown = stopped_at.strftime("%H:%M UTC" if stopped_at.date() == now.date() else "%Y-%m-%d %H:%M UTC")
        when = f"at {shown} ({age_text(max(now - stopped_at, timedelta(0)))})"
    return (f"the box stopped itself for idleness {when}; not restarting it for a background reconnect."
            " Start it with `devbox start` (or ssh from a terminal)")


@dataclass(frozen=True)
class ReconnectGuard:
    """The proxy's check before /start; the terminal test, the marker and the clock are injectable."""

    url: str
    cooldown_minutes: float = DEFAULT_IDLE_COOLDOWN
    from_terminal: Callable[[], bool] = has_controlling_terminal
    started: Callable[[str], Optional[datetime]] = last_start
    clock: Clock = utc_now

    def check(self, read_status: Callable[[], Dict[str, Any]]) -> ReconnectPlan:
        """The plan for this connect; the status is read only when neither the terminal nor the marker decides."""
        if self.cooldown_minutes <= 0:
            return ReconnectPlan(True, "the guard is off (--idle-cooldown 0)")
        now = self.clock()
        cooldown = timedelta(minutes=self.cooldown_minutes)
        why = person_asked(now, cooldown, self.from_terminal(), self.started(self.url))
        if why is not None:
            return ReconnectPlan(True, why)
        return plan_reconnect(read_status(), now, cooldown)

    def enforce(self, read_status: Callable[[], Dict[str, Any]]) -> None:
        """Raise the one-line refusal when this connect may not start the box."""
        plan = self.check(read_status)
        if not plan.start:
            raise CliError(plan.refusal or plan.why, EXIT_CONFLICT)
