"""`devbox local --demo --owners N`: a fleet on the local stack, each owner signing with their own key pair.

Every owner starts, checks and stops their own box with the real `devbox` command; the demo
checks after each step that the owners' boxes stay apart (own group, own record, own rules;
another's box answers 404), that an admin lists every box and stops one, and that the stopped
event of one box touches no other box.
"""
import json
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from devbox.local import LOCAL_DOMAIN, REGION, LocalStack, run_cli, wait_until
from devbox.sigv4_check import LocalIdentity

ADMIN_NAME = "devbox-admin"


def fleet_identities(owners: int) -> List[LocalIdentity]:
    """N owners (dev1..devN), then the admin; each with a key pair of its own."""
    made = [LocalIdentity(f"AKIALOCALOWNER{n:06d}", f"local-secret-of-dev{n}", f"dev{n}") for n in range(1, owners + 1)]
    return made + [LocalIdentity("AKIALOCALADMIN000001", "local-secret-of-the-admin", ADMIN_NAME)]


def fleet_settings(admin: LocalIdentity) -> Dict[str, str]:
    return {"FLEET": "true", "ADMIN_OWNERS": admin.user_arn, "MAX_BOXES": "20"}


class FleetView:
    """What the fake AWS holds for each box of the fleet (to check what the app did)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.fleet = stack.app_env["BOX_NAME"]

    def group(self, slug: str) -> Optional[Dict[str, Any]]:
        found = self.stack.aws("ec2").describe_security_groups(
            Filters=[{"Name": "tag:devbox:box", "Values": [f"{self.fleet}/{slug}"]}])["SecurityGroups"]
        return dict(found[0]) if len(found) == 1 else None

    def rules(self, slug: str) -> List[str]:
        group = self.group(slug)
        return sorted(r["CidrIp"] for p in (group or {}).get("IpPermissions", []) for r in p.get("IpRanges", []))

    def instances(self, slug: str) -> List[Dict[str, Any]]:
        reservations = self.stack.aws("ec2").describe_instances(
            Filters=[{"Name": "tag:devbox:box", "Values": [f"{self.fleet}/{slug}"]}])["Reservations"]
        return [i for r in reservations for i in r["Instances"] if i["State"]["Name"] != "terminated"]

    def state(self, slug: str) -> Optional[str]:
        found = self.instances(slug)
        return str(found[-1]["State"]["Name"]) if found else None

    def record(self, slug: str) -> Optional[str]:
        zone = self.stack.app_env.get("HOSTED_ZONE_ID")
        name = f"{slug}.{LOCAL_DOMAIN}"
        for record in self.stack.aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]:
            if record["Type"] == "A" and record["Name"].rstrip(".") == name:
                return str(record["ResourceRecords"][0]["Value"])
        return None


def _json_of(stack: LocalStack, args: List[str], identity: LocalIdentity) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "devbox", *args], env=stack.client_env(identity),
                          capture_output=True, text=True, timeout=120)
    try:
        found = json.loads(done.stdout)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def demo_fleet(stack: LocalStack, say: Callable[[str], None], owners: Sequence[LocalIdentity],
               admin: LocalIdentity) -> int:
    """Walk each owner's box through start, status and stop, checking isolation between them."""
    failures: List[str] = []
    view = FleetView(stack)
    slugs = [owner.user_name for owner in owners]

    def step(ok: bool, text: str) -> None:
        say(("  ok   " if ok else "  FAIL ") + text)
        if not ok:
            failures.append(text)

    def others(slug: str) -> List[str]:
        return [s for s in slugs if s != slug]

    say(f"\n1. {len(owners)} owners start their boxes, each signing as themselves (no box exists yet)")
    for owner, slug in zip(owners, slugs):
        step(run_cli(stack, ["start", "--wait", "--timeout", "60", "--no-ssh-probe"], say, owner) == 0,
             f"{slug}: devbox start exits 0")
        group = view.group(slug)
        tags = {t["Key"]: t["Value"] for t in (group or {}).get("Tags", [])}
        step(group is not None and tags.get("devbox:owner") == owner.user_arn,
             f"{slug}: a security group of its own, tagged with its owner {owner.user_arn}")
        step(wait_until(lambda: view.rules(slug) == ["127.0.0.1/32", "127.0.0.1/32"]),
             f"{slug}: its group lets in its owner's address only: {view.rules(slug)}")
        step(wait_until(lambda: view.record(slug) is not None),
             f"{slug}: {slug}.{LOCAL_DOMAIN} has an A record -> {view.record(slug)}")
    step(len({(view.group(s) or {}).get("GroupId") for s in slugs}) == len(slugs), "every box has a different group")
    step(stack.access_rules() == [], "the deployment's shared group lets nobody in")

    say("\n2. each owner sees their own box only")
    for owner, slug in zip(owners, slugs):
        status = _json_of(stack, ["status", "--json"], owner)
        step(status.get("box") == slug and status.get("owner") == owner.user_arn and status.get("state") == "running",
             f"{slug}: devbox status names its own box, running")
    def refused(args: List[str], identity: LocalIdentity, status: str) -> bool:
        said: List[str] = []

        def both(text: str) -> None:
            said.append(text)
            say(text)

        return run_cli(stack, args, both, identity) != 0 and any(f"HTTP {status}" in line for line in said)

    if len(owners) > 1:
        first, second = owners[0], slugs[1]
        step(refused(["stop", "--box", second], first, "404"),
             f"{slugs[0]} may not stop {second}'s box (404, as for a box that does not exist)")
        step(view.state(second) == "running", f"{second}'s box is still running")
        step(refused(["boxes"], first, "403"), f"{slugs[0]} is no admin: devbox boxes is refused (403)")

    say("\n3. the admin lists every box")
    listed = _json_of(stack, ["boxes", "--json"], admin)
    rows = {str(row.get("box")): row for row in listed.get("boxes", []) if isinstance(row, dict)}
    step(sorted(rows) == sorted(slugs) and all(rows[s].get("owner") == o.user_arn for s, o in zip(slugs, owners)),
         f"devbox boxes lists {len(slugs)} boxes with their owners")
    step(run_cli(stack, ["boxes"], say, admin) == 0, "devbox boxes prints the table")

    say(f"\n4. {slugs[0]} stops their box: only its rules and record go")
    step(run_cli(stack, ["stop", "--wait", "--timeout", "60"], say, owners[0]) == 0, f"{slugs[0]}: devbox stop exits 0")
    step(wait_until(lambda: view.rules(slugs[0]) == [] and view.record(slugs[0]) is None),
         f"{slugs[0]}: rules revoked and record deleted by the stopped event")
    step(all(view.rules(s) == ["127.0.0.1/32", "127.0.0.1/32"] and view.record(s) is not None for s in others(slugs[0])),
         "every other box keeps its rules and its record")

    if len(owners) > 1:
        say(f"\n5. the admin stops {slugs[1]}'s box")
        step(run_cli(stack, ["stop", "--box", slugs[1]], say, admin) == 0, f"devbox stop --box {slugs[1]} exits 0")
        step(wait_until(lambda: view.state(slugs[1]) == "stopped" and view.record(slugs[1]) is None),
             f"{slugs[1]}'s box is stopped and its record deleted")

    say("\n6. the other owners stop their boxes")
    for owner, slug in list(zip(owners, slugs))[2:]:
        step(run_cli(stack, ["stop", "--wait", "--timeout", "60"], say, owner) == 0, f"{slug}: devbox stop exits 0")
    step(wait_until(lambda: all(view.state(s) == "stopped" and view.rules(s) == [] for s in slugs)),
         "every box is stopped with no access rule left")
    if stack.relay is not None and stack.relay.errors:
        step(False, f"the relay reported errors: {stack.relay.errors}")
    say("\ndemo " + ("passed" if not failures else f"FAILED: {len(failures)} step(s)"))
    return 0 if not failures else 1


def print_credentials(stack: LocalStack, say: Callable[[str], None], identities: Sequence[LocalIdentity]) -> None:
    """How to call the fleet as each local identity."""
    for identity in identities:
        say(f"  as {identity.user_name}: DEVBOX_URL={stack.url} AWS_ACCESS_KEY_ID={identity.access_key} "
            f"AWS_SECRET_ACCESS_KEY={identity.secret_key} AWS_DEFAULT_REGION={REGION} devbox status")
