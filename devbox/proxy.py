"""`devbox proxy`: ssh's ProxyCommand. Starts the devbox, waits for its SSH port, relays bytes.

Before /start it asks devbox.reconnect whether this connect may start a box stopped for
idleness: an IDE reconnecting in the background may not, a person may.

stdout carries the SSH stream itself, so progress and errors go to stderr only. The relay
is binary and unbuffered (os.read/os.write on the raw descriptors) and half-closes each
direction on its own, as `nc -N` does: ssh's EOF reaches the server as a FIN, and the
server's FIN reaches ssh as the end of the proxy's stdout.
"""
import os
import select
import socket
from dataclasses import replace
from typing import Any, List, Optional

from devbox.api import EXIT_UNREACHABLE, CliError
from devbox.progress import SSH_CONNECT_TIMEOUT, Progress, WaitOptions, note_start, wait_until_ready
from devbox.reconnect import ReconnectGuard

# For tests only: connect here (e.g. 127.0.0.1) instead of the address in the status,
# which under moto is a made-up IP.
HOST_OVERRIDE_ENV = "DEVBOX_SSH_HOST_OVERRIDE"
BUFFER_SIZE = 65536


def run_proxy(
    api: Any,
    options: WaitOptions,
    progress: Optional[Progress] = None,
    in_fd: int = 0,
    out_fd: int = 1,
    guard: Optional[ReconnectGuard] = None,
) -> int:
    """Start the devbox (refreshing access for this IP), wait for SSH, then relay in_fd/out_fd over it.

    A box with no instance, or one the spot service stopped, gets a new instance from /start
    (which says so on stderr); the wait then follows that instance. With a guard, a box stopped
    for idleness is started only when a person asked (see devbox.reconnect); otherwise the
    proxy ends with one line saying why, before any /start.
    """
    if guard is not None:
        guard.enforce(api.status)
    progress = progress or Progress(quiet_until_waiting=True)
    with progress:
        # /start is idempotent and lets the caller's current IP in, even when already running.
        note_start(progress, api.start())
        # The proxy connects to the IP itself, so the DNS record is nobody's concern here.
        ready = wait_until_ready(api, replace(options, dns_check=False), progress, keep_connection=True)
    connection = ready.connection or open_connection(ready.host, options.ssh_port)
    with connection:
        relay(connection, in_fd, out_fd)
    return 0


def open_connection(host: str, port: int, timeout: float = SSH_CONNECT_TIMEOUT) -> socket.socket:
    """A connected TCP socket to host:port, or a CliError naming the address."""
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise CliError(f"cannot connect to the devbox at {host}:{port}: {reason}", EXIT_UNREACHABLE) from None
    connection.settimeout(None)
    return connection


def relay(connection: socket.socket, in_fd: int = 0, out_fd: int = 1) -> None:
    """Copy in_fd to the socket and the socket to out_fd until both directions have ended.

    out_fd is closed when the server ends its side, so the reader sees end of file.
    """
    # Interactive keystrokes should not wait for Nagle's algorithm; ssh sets this on sockets it owns.
    try:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    sending = receiving = True
    try:
        while sending or receiving:
            watched: List[Any] = ([in_fd] if sending else []) + ([connection] if receiving else [])
            readable, _, _ = select.select(watched, [], [])
            if sending and in_fd in readable:
                data = os.read(in_fd, BUFFER_SIZE)
                if data:
                    connection.sendall(data)
                else:
                    sending = False
                    _half_close(connection)
            if receiving and connection in readable:
                data = connection.recv(BUFFER_SIZE)
                if data:
                    _write_all(out_fd, data)
                else:
                    receiving = False
                    os.close(out_fd)
    except (BrokenPipeError, ConnectionResetError):
        # One end went away without a goodbye: nobody is left to relay for.
        return


def _half_close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        # Already reset by the peer; the receiving side will notice on its own.
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
