"""End to end: a burst of concurrent callers against the real local server and moto server."""
import tempfile
from pathlib import Path

import pytest

from benchmarks.load import run_load
from devbox.local import LocalStack

pytestmark = pytest.mark.e2e


def test_burst_of_many_callers_ends_with_exactly_their_rules():
    with tempfile.TemporaryDirectory(prefix="devbox-load-test-") as workdir:
        with LocalStack(Path(workdir), say=lambda _: None, peer_source_ip=True,
                        extra_app_env={"RULE_QUOTA": "1000"}) as stack:
            report = run_load(stack, callers=12, requests=60, concurrency=8)
    assert report["errors"] == 0, report["error_samples"]
    assert report["statuses"] == {"200": 60}
    assert report["final_rules_as_expected"], (report["unexpected_rules"], report["missing_rules"])
    assert report["final_rules"] == 24
