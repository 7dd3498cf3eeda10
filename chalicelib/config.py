"""Configuration: one frozen object built from the environment at request time."""
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from chalicelib.errors import ConfigError

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
_ZONE_ID = re.compile(r"^(/hostedzone/)?[A-Z0-9]{1,32}$")
# A DNS name of labels 1-63 long, 253 characters at most, no trailing dot needed.
_DOMAIN = re.compile(r"^(?=.{1,253}\.?$)([a-zA-Z0-9_]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}\.?$")


@dataclass(frozen=True)
class Config:
    """Settings of one devbox deployment."""

    instance_id: str
    security_group_id: str
    hosted_zone_id: Optional[str] = None
    domain_name: Optional[str] = None
    dns_ttl: int = 60
    ssh_port: int = 22

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
        return cls(
            instance_id=_required(env, "INSTANCE_ID", _INSTANCE_ID, "an EC2 instance id such as i-0123456789abcdef0"),
            security_group_id=_required(env, "SECURITY_GROUP_ID", _GROUP_ID, "a security group id such as sg-0123456789abcdef0"),
            hosted_zone_id=zone.rsplit("/", 1)[-1] if zone else None,
            domain_name=domain.rstrip(".").lower() if domain else None,
            dns_ttl=_integer(env, "DNS_TTL", 60, 0, 2147483647),
            ssh_port=_integer(env, "SSH_PORT", 22, 1, 65535),
        )


def _required(env: Mapping[str, str], name: str, pattern: "re.Pattern[str]", what: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: it must be {what}")
    if not pattern.match(value):
        raise ConfigError(f"{name} is malformed ({value!r}): it must be {what}")
    return value


def _optional(env: Mapping[str, str], name: str, pattern: "re.Pattern[str]", what: str) -> Optional[str]:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not pattern.match(value):
        raise ConfigError(f"{name} is malformed ({value!r}): it must be {what}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} is malformed ({raw!r}): it must be a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} is out of range ({value}): it must be between {low} and {high}")
    return value
