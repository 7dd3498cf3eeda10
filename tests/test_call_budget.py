"""How many AWS calls each operation makes (each is latency and API quota)."""
from tests.conftest import state_event


def test_status_makes_at_most_two_calls(api, aws_calls):
    api.http.get("/status")
    assert aws_calls.calls == ["DescribeInstances", "DescribeSecurityGroupRules"]


def test_warm_start_makes_two_calls(api, aws_calls, caller_ip):
    caller_ip("203.0.113.7")
    api.http.post("/start")
    aws_calls.reset()
    assert api.http.post("/start").status_code == 200
    assert len(aws_calls.calls) <= 3
    assert aws_calls.calls == ["DescribeInstances", "DescribeSecurityGroupRules"]


def test_cold_start_makes_four_calls(stopped_devbox, make_client, aws_calls, caller_ip):
    caller_ip("203.0.113.7")
    make_client(stopped_devbox.env()).http.post("/start")
    assert aws_calls.calls == [
        "DescribeInstances", "DescribeSecurityGroupRules", "AuthorizeSecurityGroupIngress", "StartInstances",
    ]


def test_running_handler_makes_four_calls_for_a_spot_box(api, devbox, aws_calls):
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    assert aws_calls.calls == [
        "DescribeInstances", "ChangeResourceRecordSets", "DescribeSpotPriceHistory", "CreateTags",
    ]


def test_status_reads_cost_from_tags_without_extra_calls(api, devbox, aws_calls):
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    aws_calls.reset()
    doc = api.http.get("/status").json_body
    assert len(aws_calls.calls) == 2
    assert doc["spot_price_per_hour"] is not None


def test_stopped_handler_makes_at_most_five_calls(api, devbox, aws_calls):
    api.http.post("/start")
    api.lambda_.invoke("on_running", state_event(api, devbox.instance_id, "running"))
    devbox.stop()
    aws_calls.reset()
    api.lambda_.invoke("on_stopped", state_event(api, devbox.instance_id, "stopped"))
    assert aws_calls.calls == [
        "DescribeInstances", "DescribeSecurityGroupRules", "RevokeSecurityGroupIngress",
        "ListResourceRecordSets", "ChangeResourceRecordSets",
    ]


def test_first_start_makes_eight_calls(empty_box, make_client, aws_calls, caller_ip):
    caller_ip("203.0.113.7")
    make_client(empty_box.env()).http.post("/start")
    assert aws_calls.calls == [
        "DescribeInstances", "DescribeSecurityGroupRules", "AuthorizeSecurityGroupIngress",
        "DescribeVolumes", "DescribeSubnets", "RunInstances", "CreateVolume", "CreateTags",
    ]


def test_relaunch_after_an_interruption_launches_before_it_retires(devbox, make_client, aws_calls):
    devbox.interrupt()
    make_client(devbox.env()).http.post("/start")
    # On AWS a CancelSpotInstanceRequests comes before the terminate (moto's instances name no request).
    assert aws_calls.calls == [
        "DescribeInstances", "DescribeSecurityGroupRules", "AuthorizeSecurityGroupIngress",
        "RunInstances", "CreateTags", "DetachVolume", "TerminateInstances",
    ]


def test_running_handler_after_a_relaunch_moves_the_volume_in_two_more_calls(stopped_devbox, make_client, aws_calls):
    api = make_client(stopped_devbox.env())
    api.http.post("/start", body='{"rebuild": true}', headers={"Content-Type": "application/json"})
    aws_calls.reset()
    api.lambda_.invoke("on_running", state_event(api, stopped_devbox.instance_id, "running"))
    assert aws_calls.calls == [
        "DescribeInstances", "ChangeResourceRecordSets", "DescribeVolumes", "AttachVolume",
        "DescribeSpotPriceHistory", "CreateTags",
    ]


def test_status_makes_its_two_reads_side_by_side(api, monkeypatch):
    import threading

    from chalicelib import access, box

    both = threading.Barrier(2, timeout=5)
    reads = {"describe_box": box.describe_box, "describe_rules": access.describe_rules}

    def waits_for_the_other(name):
        def read(*args):
            both.wait()  # each read waits until the other has started: one after the other would time out
            return reads[name](*args)
        return read

    monkeypatch.setattr(box, "describe_box", waits_for_the_other("describe_box"))
    monkeypatch.setattr(access, "describe_rules", waits_for_the_other("describe_rules"))
    assert api.http.get("/status").status_code == 200
