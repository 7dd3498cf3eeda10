"""Waiting for the devbox: poll its status until it runs, its DNS record and SSH port answer.

Progress goes to stderr only (the proxy's stdout carries the SSH stream): on a terminal one
line is redrawn with a spinner, otherwise each step is printed once.

The box is a name whose instances come and go: after a relaunch (a spot interruption, a
resize of a spot box, a rebuild) the status names the new instance, and a status without
one ("none") while waiting means the instance /start launched is already gone.
"""
import ipaddress
import re
import socket
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, TextIO, Type, Union

from devbox.api import EXIT_CONFLICT, EXIT_TIMEOUT, ApiError, CliError, malformed_status, printable, status_text

POLL_INTERVAL = 2.0
DEFAULT_WAIT_TIMEOUT = 300.0
# Each SSH probe waits this long at most: a security group drops packets, so a closed
# door looks like silence rather than a refusal.
SSH_CONNECT_TIMEOUT = 3.0
# A poll that fails for a reason that passes (timeout, 5xx) is retried this many times in a row.
MAX_STATUS_FAILURES = 3
FINAL_STATES = ("terminated", "shutting-down")
# The status of a box with no instance. Right after a launch, EC2's describe calls may not list
# the new instance for a moment (its API is eventually consistent): "none" before any instance
# was seen ends the wait only after this many seconds.
NO_INSTANCE = "none"
NO_INSTANCE_GRACE = 10.0
# EC2's state reason when a start fails on an encrypted volume whose KMS key it may not use
# ("Client.InternalError: Client error on launch"; AWS lists it under "instance terminates immediately").
KMS_REFUSAL = "Client.InternalError"
_SPINNER = "|/-\\"
_TICK = 0.1
# Names EC2 itself hands out: they follow the address, so there is no record to wait for.
_EC2_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".compute.internal")
# One label of a host name; a leading "-" is refused, since the name may end up as an ssh argument.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})")

Resolver = Callable[..., List[Any]]
Connector = Callable[..., socket.socket]


class StatusSource(Protocol):
    """Anything that answers the devbox status document (the API client, a test double)."""

    def status(self) -> Dict[str, Any]: ...


class Progress:
    """One progress line on a stream: redrawn with a spinner on a terminal, one line per step otherwise."""

    def __init__(
        self,
        stream: Optional[TextIO] = None,
        interactive: Optional[bool] = None,
        quiet_until_waiting: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self._isatty(self.stream) if interactive is None else interactive
        # The proxy runs before every ssh session: say nothing when nothing had to be waited for.
        self.quiet_until_waiting = quiet_until_waiting
        self.sleep = sleep
        self.clock = clock
        self.waited = False
        self._text: Optional[str] = None
        self._since = clock()
        self._frame = 0
        self._drawn = False

    @staticmethod
    def _isatty(stream: TextIO) -> bool:
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def waiting(self, text: str) -> None:
        """Show the step being waited for (printed once, or redrawn with a spinner on a terminal)."""
        # Steps quote the server's fields and messages: none may reach the terminal as an escape sequence.
        text = printable(text)
        self.waited = True
        if text != self._text:
            self._text = text
            self._since = self.clock()
            if not self.interactive:
                self._write(f"devbox: waiting: {text}\n")
        if self.interactive:
            self._draw()

    def done(self, text: str) -> None:
        """Report a finished step on a line of its own."""
        self._text = None
        if self.quiet_until_waiting and not self.waited:
            return
        self.note(text)

    def note(self, text: str) -> None:
        """Print a line, whatever the mode."""
        self.clear()
        self._write(f"devbox: {printable(text)}\n")

    def pause(self, seconds: float) -> None:
        """Sleep between polls, keeping the spinner turning on a terminal."""
        if not (self.interactive and self._text):
            self.sleep(seconds)
            return
        end = self.clock() + seconds
        while True:
            left = end - self.clock()
            if left <= 0:
                return
            self.sleep(min(_TICK, left))
            self._draw()

    def clear(self) -> None:
        """Erase the spinner line, if one is drawn."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> None:
        # Whatever ends the wait (success, error, Ctrl-C), the next line starts clean.
        self.clear()

    def _draw(self) -> None:
        self._frame = (self._frame + 1) % len(_SPINNER)
        elapsed = max(0, int(self.clock() - self._since))
        self._write(f"\r\x1b[Kdevbox: {_SPINNER[self._frame]} {self._text} ({elapsed}s)")
        self._drawn = True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@dataclass(frozen=True)
class WaitOptions:
    """What readiness means and how long to wait for it."""

    timeout: float = DEFAULT_WAIT_TIMEOUT
    poll_interval: float = POLL_INTERVAL
    ssh_port: int = 22
    ssh_probe: bool = True
    dns_check: bool = True
    host_override: Optional[str] = None


@dataclass
class Ready:
    """A running devbox: its status, the address probed, its DNS name if seen in place, the kept socket."""

    status: Dict[str, Any]
    host: str
    connection: Optional[socket.socket] = None
    verified_name: Optional[str] = None


def is_managed_name(dns_name: Any) -> bool:
    """True when dns_name looks like the deployment's own domain rather than an EC2 name or an IP."""
    if not dns_name or not isinstance(dns_name, str):
        return False
    try:
        ipaddress.ip_address(dns_name)
        return False
    except ValueError:
        pass
    name = dns_name.rstrip(".").lower()
    return name != "localhost" and not name.endswith(_EC2_SUFFIXES)


def dns_in_place(name: str, address: str, resolve: Resolver = socket.getaddrinfo) -> bool:
    """True when name resolves (through the local resolver) to address among its answers."""
    try:
        answers = resolve(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return address in {answer[4][0] for answer in answers}


def status_state(status: Dict[str, Any]) -> str:
    """The status's state ("running", "stopped", "none", ...): text, or a malformed status."""
    state = status.get("state")
    if not isinstance(state, str) or not state:
        raise malformed_status("state", state, "a state such as running or stopped")
    return state


def status_public_ip(status: Dict[str, Any]) -> Optional[str]:
    """The status's public_ip: an IP address or None; anything else is a malformed status."""
    value = status.get("public_ip")
    if value is None or value == "":
        return None
    try:
        ipaddress.ip_address(value if isinstance(value, str) else "-")
    except ValueError:
        raise malformed_status("public_ip", value, "an IP address") from None
    return str(value)


def status_dns_name(status: Dict[str, Any]) -> Optional[str]:
    """The status's dns_name: a host name or None; anything else is a malformed status.

    It is connected to, written into the ssh config and passed to ssh as its destination, where
    a value starting with "-" would be read as an option.
    """
    value = status.get("dns_name")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not is_host_name(value):
        raise malformed_status("dns_name", value, "a DNS name")
    return value


def is_host_name(name: str) -> bool:
    """True for a syntactically valid DNS name (letters, digits, _ and -, dot-separated labels)."""
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    return len(name) <= 254 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def connect_host(status: Dict[str, Any], host_override: Optional[str] = None) -> str:
    """The address to open SSH connections to: the override, else the public IP, else the DNS name."""
    host = host_override or status_public_ip(status) or status_dns_name(status)
    if not host:
        raise CliError("the devbox runs without a public address (no public_ip or dns_name in its status)")
    return host


def placement(status: Dict[str, Any]) -> str:
    """The instance's type, market and zone as a phrase ("t3.large spot in us-east-1a"); missing parts left out."""
    # "lifecycle" is what servers from before "market" answered.
    market = status.get("market") or status.get("lifecycle")
    words = [printable(value) for value in (status.get("instance_type"), market) if value]
    zone = status.get("availability_zone")
    if zone:
        words += ["in", printable(zone)]
    return " ".join(words)


def describe(status: Dict[str, Any]) -> str:
    """A short phrase for a running instance: type, market, zone and address."""
    parts = [placement(status), printable(status.get("public_ip") or "")]
    return ", ".join(part for part in parts if part)


def instance_label(status: Dict[str, Any]) -> str:
    """"instance i-..." when the status names one, else "instance"."""
    instance_id = status.get("instance_id")
    return f"instance {printable(instance_id)}" if instance_id else "instance"


def start_report(answer: Dict[str, Any]) -> List[str]:
    """What /start did, as a line, then one line per capacity refusal met before the launch that worked.

    Empty for an answer without "action" (a server from before the box model).
    """
    action = answer.get("action")
    if not action:
        return []
    instance = printable(answer.get("instance_id") or "the instance")
    where = placement(answer)
    named = f"{instance} ({where})" if where else instance
    reason = printable(answer.get("reason") or "")
    volume = printable(answer.get("data_volume_id") or "")
    follows = f"; data volume {volume} follows it" if volume else "; the data volume follows it"
    if action == "none":
        line = f"{instance} is {reason or 'already ' + printable(answer.get('state'))}"
    elif action == "start":
        line = f"started {named}"
    elif action == "resize":
        line = f"resized and started {named}"
    elif action == "launch" and reason == "first start":
        # Not "created": a first start also finds a data volume kept by `devbox destroy`.
        line = f"first start: launched {named}" + (f" with data volume {volume} for /home" if volume else "")
    elif action in ("launch", "relaunch"):
        line = f"launched a new instance {named} because: {reason or action}{follows}"
    else:
        line = f"{printable(action)}: {named}" + (f" ({reason})" if reason else "")
    tried = answer.get("tried")
    entries = [tried] if isinstance(tried, str) else tried if isinstance(tried, list) else []
    return [line, *(f"  refused first: {printable(entry)}" for entry in entries if entry)]


def note_start(progress: "Progress", answer: Dict[str, Any]) -> None:
    """Tell on the progress stream what /start did, unless it found the box already up."""
    if answer.get("action") != "none":
        for line in start_report(answer):
            progress.note(line)


def _gone(instance_id: Optional[Any], state: str) -> CliError:
    """The wait's end when the box's instance no longer exists (or is on its way out)."""
    what = f"the devbox's instance {printable(instance_id)}" if instance_id else "the instance /start launched"
    how = "is gone (EC2 terminated it; " if state == NO_INSTANCE else f"is {printable(state)} ("
    return CliError(
        f"{what} {how}the spot service may have taken the capacity back at launch);"
        " `devbox start` launches a new one with the same data volume",
        EXIT_CONFLICT,
    )


def stopped_while_starting(status: Dict[str, Any]) -> str:
    """Why a start fell back to stopped, in EC2's words (its state reason), never a guess."""
    what = f"the devbox's {instance_label(status)} stopped again while starting"
    reason = status.get("state_reason")
    if reason is None or reason == "":
        return f"{what}; the API gave no reason (`devbox status` shows the box)"
    said = f"{what}; EC2's reason: {printable(reason)}"
    if isinstance(reason, str) and reason.startswith(KMS_REFUSAL):
        said += " (EC2 gives this reason, among others, when it may not use the volumes' KMS key: see KmsKeyId)"
    return said


class _Poller:
    """Status polls with a deadline, tolerating a few failures that pass."""

    def __init__(self, api: StatusSource, options: WaitOptions, progress: Progress, clock: Callable[[], float]) -> None:
        self.api = api
        self.options = options
        self.progress = progress
        self.clock = clock
        self.deadline = clock() + options.timeout
        self.failures = 0

    def status(self) -> Optional[Dict[str, Any]]:
        try:
            document = self.api.status()
        except ApiError as err:
            if not err.transient or self.failures >= MAX_STATUS_FAILURES:
                raise
            self.failures += 1
            self.progress.waiting(f"status unavailable, retrying ({err.message})")
            return None
        self.failures = 0
        return document

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def pause(self, waiting_for: str) -> None:
        left = self.remaining()
        if left <= 0:
            raise CliError(f"timed out after {self.options.timeout:g} s waiting for {waiting_for}", EXIT_TIMEOUT)
        self.progress.pause(min(self.options.poll_interval, left))


def wait_until_ready(
    api: StatusSource,
    options: WaitOptions,
    progress: Progress,
    *,
    keep_connection: bool = False,
    resolve: Resolver = socket.getaddrinfo,
    connect: Connector = socket.create_connection,
    clock: Callable[[], float] = time.monotonic,
) -> Ready:
    """Poll until the instance runs, its DNS record points at it and its SSH port accepts connections.

    The DNS step applies only to a managed domain, and neither it nor the SSH probe runs when
    switched off in the options. With keep_connection, the successful probe's socket is returned
    open (the proxy relays over it) instead of being closed.
    """
    poller = _Poller(api, options, progress, clock)
    began = clock()
    seen_starting = False
    # The last instance the status named: a relaunch replaces it, and "none" is about it.
    seen_instance: Optional[Any] = None
    reported: Set[str] = set()

    def once(step: str, text: str) -> None:
        if step not in reported:
            reported.add(step)
            progress.done(text)

    while True:
        waiting_for = "the devbox's status"
        status = poller.status()
        if status is not None:
            state = status_state(status)
            seen_instance = status_text(status, "instance_id") or seen_instance
            if state in FINAL_STATES:
                raise _gone(seen_instance, state)
            if state == NO_INSTANCE:
                if seen_instance or clock() - began >= NO_INSTANCE_GRACE:
                    raise _gone(seen_instance, state)
            elif state in ("pending", "running"):
                seen_starting = True
            elif state == "stopped" and seen_starting:
                if status.get("interrupted") is True:
                    raise CliError(
                        f"the spot service stopped the devbox's {instance_label(status)} while it was starting;"
                        " `devbox start` launches a new instance with the same data volume",
                        EXIT_CONFLICT,
                    )
                raise CliError(stopped_while_starting(status), EXIT_CONFLICT)
            if state == NO_INSTANCE:
                waiting_for = "the new instance to appear in the status"
                progress.waiting("instance launching")
            elif state != "running":
                waiting_for = f"the instance to run (it is {printable(state)})"
                progress.waiting(f"{instance_label(status)} {printable(state)}")
            else:
                once("running", f"{instance_label(status)} running ({describe(status)})")
                ready = _check_address(status, options, progress, poller, once, keep_connection, resolve, connect)
                if isinstance(ready, Ready):
                    return ready
                waiting_for = ready
        poller.pause(waiting_for)


def _check_address(
    status: Dict[str, Any],
    options: WaitOptions,
    progress: Progress,
    poller: _Poller,
    once: Callable[[str, str], None],
    keep_connection: bool,
    resolve: Resolver,
    connect: Connector,
) -> Union[Ready, str]:
    """The Ready result, or what is still being waited for."""
    host = connect_host(status, options.host_override)
    dns_name, public_ip = status_dns_name(status), status_public_ip(status)
    # The record only matters for reaching the box: not when probes are off (local mode, where
    # the domain is made up) nor with an override, which means "not the real address".
    checks_dns = options.dns_check and options.ssh_probe and not options.host_override
    verified_name = None
    if checks_dns and public_ip and dns_name and is_managed_name(dns_name):
        if not dns_in_place(dns_name, public_ip, resolve):
            progress.waiting(f"DNS record {dns_name} -> {public_ip}")
            return f"the DNS record {dns_name} -> {public_ip}"
        once("dns", f"DNS record in place ({dns_name} -> {public_ip})")
        verified_name = dns_name
    if not options.ssh_probe:
        once("ssh", "DNS and SSH checks skipped (--no-ssh-probe)")
        return Ready(status, host)
    port = options.ssh_port
    try:
        connection = connect((host, port), timeout=max(0.1, min(SSH_CONNECT_TIMEOUT, poller.remaining())))
    except OSError:
        progress.waiting(f"SSH port {host}:{port}")
        return f"the SSH port {host}:{port}"
    once("ssh", f"SSH port reachable ({host}:{port})")
    if not keep_connection:
        connection.close()
        return Ready(status, host, verified_name=verified_name)
    connection.settimeout(None)
    return Ready(status, host, connection, verified_name)


def wait_until_stopped(
    api: StatusSource,
    options: WaitOptions,
    progress: Progress,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Dict[str, Any]:
    """Poll until the instance is stopped (or the box has none); returns its last status."""
    poller = _Poller(api, options, progress, clock)
    while True:
        status = poller.status()
        if status is not None:
            state = status_state(status)
            if state == "stopped":
                progress.done(f"{instance_label(status)} stopped")
                return status
            if state == NO_INSTANCE:
                progress.done("the box has no instance: nothing runs")
                return status
            if state in FINAL_STATES:
                raise CliError(f"the devbox's {instance_label(status)} is {printable(state)}, not stopped",
                               EXIT_CONFLICT)
            progress.waiting(f"{instance_label(status)} {printable(state)}")
        poller.pause("the instance to stop")
