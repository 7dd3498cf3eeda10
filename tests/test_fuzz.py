"""Property-based: any body up to the size limit gives 200, 400, 413 or 415, never a 500, and a 4xx changes nothing."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import app
from chalicelib.errors import InvalidRequestError
from chalicelib.payload import MAX_BODY_BYTES, parse_body
from tests.conftest import Devbox

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
START_FIELDS = st.fixed_dictionaries({}, optional={
    "instance_type": st.none() | st.text(max_size=15) | st.integers() | st.sampled_from(["t3.large", "m6i.xlarge"]),
    "rebuild": st.none() | st.booleans() | st.text(max_size=5) | st.integers(),
})
BODIES = st.one_of(
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.text(max_size=200),
    JSON.map(json.dumps),
    START_FIELDS.map(json.dumps),
    st.integers(min_value=1, max_value=MAX_BODY_BYTES // 2).map(lambda n: "[" * n),
    st.integers(min_value=1, max_value=MAX_BODY_BYTES // 6).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(min_value=MAX_BODY_BYTES - 8, max_value=MAX_BODY_BYTES + 8).map(lambda n: " " * (n - 2) + "{}"),
)


@given(BODIES)
def test_the_parser_answers_every_body_with_a_dict_or_a_client_error(raw):
    try:
        parsed = parse_body(raw, allowed_fields=("instance_type", "rebuild"))
    except InvalidRequestError as err:
        assert err.status_code in (400, 413)
    else:
        assert isinstance(parsed, dict)


def test_two_thousand_nested_brackets_are_a_400():
    with pytest.raises(InvalidRequestError, match="nested too deeply") as caught:
        parse_body("[" * 2000, allowed_fields=())
    assert caught.value.status_code == 400


def event(path, body, content_type="application/json"):
    return {
        "resource": path, "path": path, "httpMethod": "POST", "headers": {"content-type": content_type},
        "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
        "requestContext": {"httpMethod": "POST", "resourcePath": path, "path": f"/api{path}",
                           "identity": {"sourceIp": "203.0.113.7"}},
        "body": body, "isBase64Encoded": False,
    }


def snapshot(box):
    return ([(i["InstanceId"], i["State"]["Name"], i["InstanceType"]) for i in box.instances()],
            box.rule_cidrs(), [v["VolumeId"] for v in box.volumes()])


@pytest.fixture(scope="module")
def fuzz_box():
    """One stopped box for every example (moto set up once; each example checks what it changed)."""
    import os

    from moto import mock_aws

    from chalicelib import aws

    saved = dict(os.environ)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    with mock_aws():
        aws.reset_clients()
        box = Devbox()
        box.launch()
        box.stop()
        os.environ.update(box.env(ALLOWED_INSTANCE_TYPES="t3.large,m6i.xlarge"))
        yield box
    aws.reset_clients()
    os.environ.clear()
    os.environ.update(saved)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/start", "/stop"]), body=BODIES,
       content_type=st.sampled_from(["application/json", "application/json", "text/plain"]))
def test_routes_answer_any_body_without_a_500_and_a_4xx_changes_nothing(fuzz_box, path, body, content_type):
    before = snapshot(fuzz_box)
    answer = app(event(path, body, content_type), None)
    assert answer["statusCode"] in (200, 400, 413, 415), (answer["statusCode"], answer["body"][:300])
    if answer["statusCode"] != 200:
        assert snapshot(fuzz_box) == before
    elif fuzz_box.current()["State"]["Name"] != "stopped" or fuzz_box.rules():
        # Put the box back the way every example expects it: stopped, nobody let in.
        fuzz_box.ec2.stop_instances(InstanceIds=[fuzz_box.instance_id])
        for rule in fuzz_box.rules():
            fuzz_box.ec2.revoke_security_group_ingress(GroupId=fuzz_box.group_id,
                                                       SecurityGroupRuleIds=[rule["SecurityGroupRuleId"]])
