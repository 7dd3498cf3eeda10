"""End to end: the local stack checks SigV4 as API Gateway does (real moto server, API server, curl, CLI)."""
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import requests

from devbox.local import LOCAL_IDENTITIES, LocalStack, wait_until
from devbox.sigv4_check import LocalIdentity

pytestmark = pytest.mark.e2e
ALICE = LocalIdentity("AKIALOCALALICE000001", "alice-secret", "alice")
BOB = LocalIdentity("AKIALOCALBOB00000002", "bob-secret", "bob")
MISSING_TOKEN = {"message": "Missing Authentication Token"}


@pytest.fixture(scope="module")
def stack():
    with tempfile.TemporaryDirectory(prefix="devbox-e2e-signing-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None, identities=[*LOCAL_IDENTITIES, ALICE, BOB]) as running:
            yield running


def devbox(env, *args):
    return subprocess.run([sys.executable, "-m", "devbox", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("method, path", [("GET", "/status"), ("POST", "/start"), ("POST", "/stop")])
def test_unsigned_requests_get_api_gateways_403_and_change_nothing(stack, method, path):
    answer = requests.request(method, stack.url + path, json={} if method == "POST" else None, timeout=30)
    assert answer.status_code == 403
    assert answer.json() == MISSING_TOKEN
    assert answer.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    assert stack.current() is None
    assert stack.access_rules() == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_unsigned_curl_gets_403_missing_authentication_token(stack):
    done = subprocess.run(["curl", "-sS", "-X", "POST", "-w", "\n%{http_code}", stack.url + "/start"],
                          capture_output=True, text=True, timeout=30)
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body) == MISSING_TOKEN
    assert stack.current() is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_signing_with_a_wrong_secret_gets_signature_mismatch(stack):
    done = subprocess.run(["curl", "-sS", "--aws-sigv4", "aws:amz:us-east-1:execute-api",
                           "--user", f"{ALICE.access_key}:not-the-secret", "-w", "\n%{http_code}",
                           stack.url + "/status"], capture_output=True, text=True, timeout=30)
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body)["message"].startswith(
        "The request signature we calculated does not match the signature you provided.")


def test_cli_signs_as_the_stacks_identity_and_works(stack):
    done = devbox(stack.client_env(), "status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["box"] == "devbox-local"
    # The API server names the signer of each call it admits.
    assert wait_until(lambda: f"by {LOCAL_IDENTITIES[0].user_arn} ({LOCAL_IDENTITIES[0].access_key})"
                      in (stack.workdir / "api.log").read_text(), timeout=5)


def test_cli_as_another_local_identity_is_that_identity(stack):
    done = devbox(stack.client_env(BOB), "status")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: f"by {BOB.user_arn} ({BOB.access_key})" in (stack.workdir / "api.log").read_text(),
                      timeout=5)


def test_cli_with_a_wrong_secret_exits_with_the_auth_code(stack):
    env = {**stack.client_env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    done = devbox(env, "status")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "signature" in done.stderr.lower()
    assert "Traceback" not in done.stderr


def test_cli_with_an_unknown_key_exits_with_the_auth_code(stack):
    env = {**stack.client_env(), "AWS_ACCESS_KEY_ID": "AKIANOTKNOWN00000000"}
    done = devbox(env, "status")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


def test_requests_aws4auth_script_works(stack):
    script = textwrap.dedent("""
        import os, sys
        import requests
        from requests_aws4auth import AWS4Auth
        auth = AWS4Auth(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], "us-east-1",
                        "execute-api")
        answer = requests.get(os.environ["DEVBOX_URL"] + "/status", auth=auth, timeout=30)
        print(answer.status_code, answer.json()["box"])
    """)
    done = subprocess.run([sys.executable, "-c", script], env=stack.client_env(ALICE), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "devbox-local"]


def test_stack_auth_helper_signs_for_requests(stack):
    answer = requests.get(stack.url + "/status", auth=stack.auth(ALICE), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["box"] == "devbox-local"
