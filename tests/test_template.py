"""The CloudFormation template: cfn-lint clean, plain YAML, and the shape the app relies on."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from devbox.stack import TEMPLATE_PATH, render_template

USER_DATA = "#!/bin/bash\necho 'stop after ${IdleMinutes} idle minutes' > /etc/devbox-idle\n"


def cfn_lint(path: Path) -> "subprocess.CompletedProcess[str]":
    """Run the cfn-lint command (a dev requirement, so its absence is a failure)."""
    beside = Path(sys.executable).parent / "cfn-lint"
    command = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert command, "cfn-lint is not installed: pip install -r requirements-dev.txt"
    return subprocess.run([command, str(path)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def template() -> Dict[str, Any]:
    return yaml.safe_load(TEMPLATE_PATH.read_text())


def launch_data(template: Dict[str, Any]) -> Dict[str, Any]:
    return template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]


def test_template_file_passes_cfn_lint() -> None:
    result = cfn_lint(TEMPLATE_PATH)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_rendered_template_with_user_data_passes_cfn_lint(tmp_path: Path) -> None:
    rendered = tmp_path / "devbox.json"
    rendered.write_text(render_template(USER_DATA))
    result = cfn_lint(rendered)
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_naming_an_unknown_parameter_fails_cfn_lint(tmp_path: Path) -> None:
    rendered = tmp_path / "devbox.json"
    rendered.write_text(render_template("#!/bin/bash\necho ${NoSuchParameter}\n"))
    result = cfn_lint(rendered)
    assert result.returncode != 0
    assert "NoSuchParameter" in result.stdout


def test_template_without_user_data_is_the_file_unchanged() -> None:
    assert render_template(None) == TEMPLATE_PATH.read_text()
    assert "UserData" not in TEMPLATE_PATH.read_text()


def test_user_data_goes_into_the_launch_template_as_base64_sub() -> None:
    rendered = json.loads(render_template(USER_DATA))
    assert launch_data(rendered)["UserData"] == {"Fn::Base64": {"Fn::Sub": USER_DATA}}


def test_template_uses_no_short_form_tags() -> None:
    # yaml.safe_load would refuse !Ref and friends; no "!" at all keeps it obvious.
    assert "!" not in TEMPLATE_PATH.read_text()


def test_template_leaves_the_market_to_the_service_and_a_shutdown_stops(template: Dict[str, Any]) -> None:
    from chalicelib.box import SPOT_MARKET

    # RunInstances cannot turn a template's spot market into on-demand, and the fallback needs that.
    assert "InstanceMarketOptions" not in launch_data(template)
    assert SPOT_MARKET["SpotOptions"] == {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}
    assert launch_data(template)["InstanceInitiatedShutdownBehavior"] == "stop"


def test_instance_requires_imdsv2_and_an_encrypted_gp3_root(template: Dict[str, Any]) -> None:
    data = launch_data(template)
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    # The boot script reads its data volume's id from the instance's tags in the metadata.
    assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True
    assert root["Ebs"]["VolumeType"] == "gp3"
    assert root["Ebs"]["VolumeSize"] == {"Ref": "RootVolumeSize"}


def test_template_defines_no_instance(template: Dict[str, Any]) -> None:
    # The service launches the box's instances; a stack update or delete never touches one.
    assert not [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::Instance"]


def test_security_group_lets_nobody_in(template: Dict[str, Any]) -> None:
    group = template["Resources"]["SecurityGroup"]["Properties"]
    assert "SecurityGroupIngress" not in group
    assert not [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]


def test_image_is_resolved_by_ec2_at_each_launch_from_the_public_ubuntu_lts_parameter(template: Dict[str, Any]) -> None:
    image = template["Parameters"]["ImageParameter"]
    assert image["Type"] == "String"
    assert image["Default"] == "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    # Not an SSM-typed parameter: CloudFormation would re-read it on every stack update.
    assert launch_data(template)["ImageId"] == {"Fn::Sub": "resolve:ssm:${ImageParameter}"}


def test_outputs_are_exactly_what_the_app_reads(template: Dict[str, Any]) -> None:
    from devbox.stack import OUTPUT_KEYS

    assert tuple(template["Outputs"]) == OUTPUT_KEYS
    assert OUTPUT_KEYS == ("BoxName", "LaunchTemplateId", "SecurityGroupId", "SubnetIds", "KmsKeyId", "HostedZoneId",
                           "DomainName", "BoxesTable", "InstanceRoleArn")
    # moto empties every output when one reads Zone.NameServers.
    assert "NameServers" not in json.dumps(template["Outputs"])


def test_hosted_zone_is_created_only_when_asked(template: Dict[str, Any]) -> None:
    assert template["Resources"]["Zone"]["Condition"] == "CreateZone"
    assert template["Outputs"]["HostedZoneId"]["Value"] == {"Fn::If": ["CreateZone", {"Ref": "Zone"}, {"Ref": "HostedZoneId"}]}


def test_every_checkov_skip_gives_a_reason(template: Dict[str, Any]) -> None:
    skips = [
        skip
        for resource in template["Resources"].values()
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert skips, "the launch template's public address is expected to be skipped with a reason"
    assert all(skip["id"].startswith("CKV") and len(skip.get("comment", "")) > 20 for skip in skips)
