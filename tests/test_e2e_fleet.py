"""End to end: a fleet on the local stack (moto server over HTTP, the API server with its SigV4 check)."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from devbox import fleetdemo
from devbox.local import LocalStack, free_port
from devbox.sigv4_check import LocalIdentity
from tests.conftest import at_once

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_fleet_demo_with_three_owners_passes():
    done = subprocess.run(
        [sys.executable, "-m", "devbox", "local", "--demo", "--owners", "3", "--port", str(free_port()),
         "--moto-port", str(free_port())],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    assert "demo passed" in done.stdout
    assert "FAIL" not in done.stdout


@pytest.fixture(scope="module")
def fleet_stack():
    owners = [LocalIdentity(f"AKIALOCALRACE{n:07d}", f"secret-{n}", f"racer{n:02d}") for n in range(22)]
    admin = LocalIdentity("AKIALOCALADMIN999999", "admin-secret", "ops")
    with tempfile.TemporaryDirectory(prefix="devbox-fleet-e2e-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None, identities=owners + [admin],
                        extra_app_env={**fleetdemo.fleet_settings(admin), "MAX_BOXES": "21"}) as stack:
            yield stack, owners, admin


def _post(stack: LocalStack, identity: LocalIdentity, path: str) -> requests.Response:
    return requests.post(stack.url + path, auth=stack.auth(identity), json={}, timeout=60)


def test_one_owners_8_first_starts_give_one_box_then_21_owners_for_20_places_get_20_boxes_and_one_409(fleet_stack):
    stack, owners, admin = fleet_stack
    view = fleetdemo.FleetView(stack)
    same = owners[21]
    answers = at_once([lambda: _post(stack, same, "/start") for _ in range(8)])
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert {a.json()["box"] for a in answers} == {"racer21"}
    assert len(view.instances("racer21")) == 1 and view.group("racer21") is not None
    # MAX_BOXES=21 and racer21 holds one: 21 owners at once for the 20 places left.
    answers = at_once([lambda o=o: _post(stack, o, "/start") for o in owners[:21]])
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 20 + [409], [a.text for a in answers if a.status_code != 200]
    refused = next(a for a in answers if a.status_code == 409)
    assert "MAX_BOXES" in refused.json()["Message"]
    listed = requests.get(stack.url + "/boxes", auth=stack.auth(admin), timeout=60).json()
    assert (listed["count"], listed["max_boxes"]) == (21, 21)
    groups = stack.aws("ec2").describe_security_groups(
        Filters=[{"Name": "tag:devbox:box", "Values": [f"{view.fleet}/*"]}])["SecurityGroups"]
    assert len(groups) == 21
    refused_owner = next(o for o, a in zip(owners[:21], answers) if a.status_code == 409)
    assert view.group(refused_owner.user_name) is None and view.instances(refused_owner.user_name) == []
