"""Configuration: one frozen object built from the environment at request time.

A bad setting's answer names the variable and what it should look like, never its value (an ARN
would show the account id to any caller); the value goes to the logs.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from chalicelib.errors import ConfigError

log = logging.getLogger("devbox")

_BOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEMPLATE_ID = re.compile(r"^lt-[0-9a-f]{8,17}$")
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")
# A key ARN, not an alias: the IAM policy names the key, and grants follow the key.
_KMS_KEY = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[0-9a-f-]{36}$")
_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
_ZONE_ID = re.compile(r"^(/hostedzone/)?[A-Z0-9]{1,32}$")
# A DNS name of labels 1-63 long, 253 characters at most, no trailing dot needed.
_TOPIC = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
# Glob patterns on IAM identities (ARNs): fnmatch's * ? [ ] and the characters of ARNs.
_OWNER_PATTERN = re.compile(r"^[A-Za-z0-9:/_+=.,@*?\[\]!-]{1,512}$")
_DOMAIN = re.compile(r"^(?=.{1,253}\.?$)([a-zA-Z0-9_]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}\.?$")


@dataclass(frozen=True)
class Config:
    """Settings of one devbox deployment."""

    box_name: str
    launch_template_id: str
    security_group_id: str
    subnet_ids: Tuple[str, ...] = ()
    data_volume_gib: int = 50
    on_demand_fallback: bool = False
    kms_key_id: Optional[str] = None
    hosted_zone_id: Optional[str] = None
    domain_name: Optional[str] = None
    dns_ttl: int = 60
    ssh_port: int = 22
    access_ttl_hours: float = 12.0
    rule_quota: int = 60
    max_runtime_hours: Optional[float] = None
    notify_topic_arn: Optional[str] = None
    allowed_instance_types: Tuple[str, ...] = ()
    # A box per caller (FLEET=true): BOX_NAME then names the fleet, each box is <fleet>/<owner slug>.
    fleet: bool = False
    owner_key: str = "identity"
    allowed_owners: Tuple[str, ...] = ()
    admin_owners: Tuple[str, ...] = ()
    max_boxes: int = 20
    boxes_table: Optional[str] = None
    # Set per request for a fleet box (never from the environment): its owner, tagged on its instances.
    box_owner: Optional[str] = None
    vpc_id: Optional[str] = None

    @property
    def dns_managed(self) -> bool:
        """True when the app keeps an A record for the instance."""
        return bool(self.hosted_zone_id and self.domain_name)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Config":
        """Build the configuration from environment variables, naming any bad one."""
        env = os.environ if env is None else env
        zone = _optional(env, "HOSTED_ZONE_ID", _ZONE_ID, "a Route53 hosted zone id such as Z0123456789ABC")
        domain = _optional(env, "DOMAIN_NAME", _DOMAIN, "a DNS name such as devbox.example.com")
        if zone and not domain:
            raise ConfigError("DOMAIN_NAME must be set when HOSTED_ZONE_ID is set")
        if env.get("INSTANCE_ID", "").strip():
            # The one-instance model is gone: a stale setting must not be half-honoured.
            raise ConfigError(
                "INSTANCE_ID is no longer used: the box's instances are found by their devbox:box tag. "
                "Set BOX_NAME and LAUNCH_TEMPLATE_ID instead (`devbox deploy` records them) and remove INSTANCE_ID"
            )
        fleet = _boolean(env, "FLEET", False)
        table = _optional(env, "BOXES_TABLE", _TABLE, "a DynamoDB table name such as devbox-boxes")
        if fleet and not table:
            raise ConfigError("FLEET=true needs BOXES_TABLE, the stack's DynamoDB table (`devbox deploy` records it)")
        if fleet and zone and domain and len(domain.rstrip(".")) > 253 - 41:
            raise ConfigError("DOMAIN_NAME is too long for <owner>.DOMAIN_NAME records: at most 212 characters")
        owner_key = env.get("OWNER_KEY", "").strip().lower() or "identity"
        if owner_key not in ("identity", "role"):
            raise _malformed("OWNER_KEY", owner_key, "it must be identity (a box per user or role session) "
                             "or role (a box per role)")
        return cls(
            fleet=fleet,
            owner_key=owner_key,
            allowed_owners=_listed(env, "ALLOWED_OWNERS", _OWNER_PATTERN,
                                   "IAM identity patterns such as arn:aws:iam::123456789012:user/*"),
            admin_owners=_listed(env, "ADMIN_OWNERS", _OWNER_PATTERN,
                                 "IAM identity patterns such as arn:aws:iam::123456789012:user/alice"),
            max_boxes=_integer(env, "MAX_BOXES", 20, 1, 1000),
            boxes_table=table,
            box_name=_required(env, "BOX_NAME", _BOX_NAME, "a box name such as devbox (letters, digits, . _ -)"),
            launch_template_id=_required(env, "LAUNCH_TEMPLATE_ID", _TEMPLATE_ID,
                                         "a launch template id such as lt-0123456789abcdef0"),
            security_group_id=_required(env, "SECURITY_GROUP_ID", _GROUP_ID, "a security group id such as sg-0123456789abcdef0"),
            subnet_ids=_subnets(env, "SUBNET_IDS"),
            vpc_id=_optional(env, "VPC_ID", _VPC_ID, "a VPC id such as vpc-0123456789abcdef0"),
            data_volume_gib=_integer(env, "DATA_VOLUME_GIB", 50, 1, 16384),
            on_demand_fallback=_boolean(env, "ON_DEMAND_FALLBACK", False),
            kms_key_id=_optional(env, "KMS_KEY_ID", _KMS_KEY, "a KMS key ARN such as arn:aws:kms:eu-west-1:123456789012:key/..."),
            hosted_zone_id=zone.rsplit("/", 1)[-1] if zone else None,
            domain_name=domain.rstrip(".").lower() if domain else None,
            dns_ttl=_integer(env, "DNS_TTL", 60, 0, 2147483647),
            ssh_port=_integer(env, "SSH_PORT", 22, 1, 65535),
            access_ttl_hours=_hours(env, "ACCESS_TTL_HOURS", 12.0) or 12.0,
            # AWS counts at most 60 inbound rules per group and address family by default.
            rule_quota=_integer(env, "RULE_QUOTA", 60, 2, 1000),
            max_runtime_hours=_hours(env, "MAX_RUNTIME_HOURS", None),
            notify_topic_arn=_topic(env, "NOTIFY_TOPIC_ARN"),
            allowed_instance_types=_instance_types(env, "ALLOWED_INSTANCE_TYPES"),
        )


def _required(env: Mapping[str, str], name: str, pattern: "re.Pattern[str]", what: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: it must be {what}")
    if not pattern.match(value):
        raise _malformed(name, value, f"it must be {what}")
    return value


def _optional(env: Mapping[str, str], name: str, pattern: "re.Pattern[str]", what: str) -> Optional[str]:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not pattern.match(value):
        raise _malformed(name, value, f"it must be {what}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _malformed(name, raw, "it must be a whole number") from None
    if not low <= value <= high:
        raise _malformed(name, raw, f"it must be between {low} and {high}")
    return value


def _hours(env: Mapping[str, str], name: str, default: Optional[float]) -> Optional[float]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _malformed(name, raw, "it must be a number of hours") from None
    if not 0 < value <= 24 * 365:
        raise _malformed(name, raw, "it must be more than 0 and at most 8760 hours")
    return value


def _instance_types(env: Mapping[str, str], name: str) -> Tuple[str, ...]:
    return _listed(env, name, _INSTANCE_TYPE, "instance types such as t3.large,m6i.xlarge")


def _subnets(env: Mapping[str, str], name: str) -> Tuple[str, ...]:
    return _listed(env, name, _SUBNET_ID, "subnet ids such as subnet-0123456789abcdef0,subnet-...")


def _listed(env: Mapping[str, str], name: str, pattern: "re.Pattern[str]", what: str) -> Tuple[str, ...]:
    raw = env.get(name, "")
    values = tuple(v.strip() for v in raw.split(",") if v.strip())
    if any(not pattern.match(value) for value in values):
        raise _malformed(name, raw, f"it must be {what}")
    return values


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "yes", "1", "on"):
        return True
    if raw in ("false", "no", "0", "off"):
        return False
    raise _malformed(name, raw, "it must be true or false")


def _malformed(name: str, value: str, rule: str) -> ConfigError:
    # The value is logged (capped), not answered.
    log.error("configuration: %s is malformed: %r", name, value[:200])
    return ConfigError(f"{name} is malformed: {rule} (its value is in the logs)")


def _topic(env: Mapping[str, str], name: str) -> Optional[str]:
    arn = _optional(env, name, _TOPIC, "an SNS topic ARN")
    if arn is None:
        return None
    if arn.endswith(".fifo"):
        # Publish to a FIFO topic needs a MessageGroupId, which these notifications do not have.
        raise ConfigError(f"{name} names a FIFO topic: SNS refuses a publish to it without a message group id; "
                          "use a standard topic")
    topic_region = arn.split(":")[3]
    region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip()
    if region and topic_region != region:
        # The SNS client is the function's region's: a topic of another region is not found there.
        raise ConfigError(f"{name} names a topic in {topic_region}, but the function runs in {region}; "
                          f"use a topic in {region}")
    return arn
