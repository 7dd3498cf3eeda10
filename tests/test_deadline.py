"""The request deadline: an AWS endpoint that accepts and never answers gives a 503 in time, with nothing left behind."""
import socket
import threading
import time

import pytest

from chalicelib import aws, deadline


@pytest.fixture
def black_hole():
    """A local TCP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for connection in held:
        connection.close()
    server.close()


@pytest.fixture
def short_deadline(monkeypatch):
    """The production logic with test-sized numbers: a 4 s deadline, 0.3 s connect + 0.7 s read per attempt."""
    monkeypatch.setattr(deadline, "DEADLINE_SECONDS", 4.0)
    monkeypatch.setattr(deadline, "CONNECT_TIMEOUT", 0.3)
    monkeypatch.setattr(deadline, "READ_TIMEOUT", 0.7)
    aws.reset_clients()


def send_to(url, service, operation):
    """Send one operation of the app's client to another endpoint (the rest still goes to moto)."""
    def redirect(request, **_):
        request.url = url + "/"

    meta = aws.client(service).meta
    meta.events.register(f"before-sign.{meta.service_model.service_id.hyphenize()}.{operation}", redirect)


def test_a_stalled_start_answers_503_before_the_deadline_and_removes_the_new_rule(
        stopped_devbox, make_client, caller_ip, black_hole, short_deadline):
    caller_ip("203.0.113.7")
    api = make_client(stopped_devbox.env())
    send_to(black_hole, "ec2", "StartInstances")
    started = time.monotonic()
    response = api.http.post("/start")
    took = time.monotonic() - started
    assert response.status_code == 503
    assert response.json_body["Code"] == "DeadlineExceeded"
    assert "ReadTimeoutError" in response.json_body["Message"]
    assert took < deadline.DEADLINE_SECONDS + 0.5
    assert stopped_devbox.rules() == [] and stopped_devbox.state() == "stopped"


def test_a_stalled_status_answers_503_in_time(devbox, make_client, black_hole, short_deadline):
    api = make_client(devbox.env())
    send_to(black_hole, "ec2", "DescribeSecurityGroupRules")
    started = time.monotonic()
    response = api.http.get("/status")
    assert response.status_code == 503
    assert time.monotonic() - started < deadline.DEADLINE_SECONDS + 0.5


def test_without_a_stall_the_deadline_changes_nothing(stopped_devbox, make_client, short_deadline):
    assert make_client(stopped_devbox.env()).http.post("/start").status_code == 200
