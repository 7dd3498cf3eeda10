"""Run checkov on infra/ and on the template `chalice package` emits.

Chalice writes the packaged template, so its skips cannot live in a file we edit: this
script adds them to each resource's Metadata (with the reason below) before the scan,
which is where checkov reads skips from, and where a reader of the scanned file sees them.

    python scripts/security_scan.py --checkov PATH_TO_CHECKOV
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent

# Checks that do not fit the packaged Chalice app, by resource type, each with its reason.
PACKAGED_SKIPS: Dict[str, Dict[str, str]] = {
    "AWS::Serverless::Function": {
        "CKV_AWS_115": "Reserved concurrency is taken from the account's unreserved pool; in accounts with the "
                       "default quota of 10 reserving any fails the deploy. One user calls this API.",
        "CKV_AWS_116": "Event handlers are idempotent and retried by Lambda's async retry; what a failure leaves "
                       "is converged by the next stopped event and by the 15-minute housekeeping job. The API "
                       "handler is synchronous, where a DLQ does not apply.",
        "CKV_AWS_117": "The functions only call AWS APIs. A VPC would need a NAT gateway or endpoints (cost) "
                       "and slows cold starts, with nothing inside it to protect.",
        "CKV_AWS_173": "The environment holds resource ids (instance, group, zone), no secrets; Lambda encrypts "
                       "it at rest with the AWS managed key.",
    },
    "AWS::Serverless::Api": {
        "CKV_AWS_120": "Answers are per caller and must show the instance's current state; a cache would serve "
                       "stale state and could mix callers.",
        "CKV_AWS_73": "X-Ray tracing costs money per trace for a single-user tool; Lambda logs record each call.",
        "CKV_AWS_76": "Access logging needs an account-wide API Gateway CloudWatch role that a one-step deploy "
                      "should not change; the Lambda logs record each request.",
    },
}


def annotate(template: Dict) -> Dict:
    """Add the skips (with reasons) to the packaged template's resources."""
    for resource in template.get("Resources", {}).values():
        skips = PACKAGED_SKIPS.get(resource.get("Type", ""))
        if skips:
            metadata = resource.setdefault("Metadata", {})
            metadata.setdefault("checkov", {}).setdefault("skip", []).extend(
                {"id": check, "comment": reason} for check, reason in skips.items())
    return template


def package(out: Path) -> Path:
    """Run `chalice package` for the dev stage; returns the SAM template's path."""
    chalice = Path(sys.executable).parent / "chalice"
    env = {**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    subprocess.run([str(chalice), "package", "--stage", "dev", str(out)], cwd=str(ROOT), env=env, check=True)
    return out / "sam.json"


def scan(checkov: str, args: List[str]) -> int:
    command = [checkov, *args, "--framework", "cloudformation", "--skip-download", "--compact", "--quiet"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command).returncode


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkov", default="checkov", help="the checkov executable")
    args = parser.parse_args(argv)
    failed = scan(args.checkov, ["-d", str(ROOT / "infra")])
    with tempfile.TemporaryDirectory() as out:
        template = package(Path(out))
        annotated = Path(out) / "sam.checkov.json"
        annotated.write_text(json.dumps(annotate(json.loads(template.read_text())), indent=1))
        failed |= scan(args.checkov, ["-f", str(annotated)])
    print("security scan: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
