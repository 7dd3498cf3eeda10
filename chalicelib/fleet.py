"""A box per caller (FLEET=true): who the caller is, the name of their box, its own security group, the fleet's claims.

The owner is the IAM identity API Gateway's authorizer verified (``requestContext.identity.userArn``),
never anything the caller sends. A box's resources carry two tags: ``devbox:box`` =
``<BOX_NAME>/<slug>`` (the deployment's name, then the owner's DNS-safe slug; a single-box name has
no ``/``, so the policy's ``<BOX_NAME>/*`` names this fleet's boxes and nothing else) and
``devbox:owner`` = the full identity. Reads find the caller's box by the owner tag, so the slug
is settled once, when the box is claimed.

Claims live in one item of a DynamoDB table: the set of the fleet's slugs and each slug's owner.
One conditional UpdateItem claims a slug and counts it against MAX_BOXES; DynamoDB applies a
conditional write to one item atomically ("Condition expressions", Amazon DynamoDB Developer
Guide), so starts at once can neither pass the limit nor give one slug to two owners.
"""
import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import access, box
from chalicelib.config import Config
from chalicelib.errors import (BoxNotFoundError, DevboxError, FleetFullError, ForbiddenError, InvalidRequestError,
                               StateConflictError, UpstreamError, aws_failure)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
else:
    DynamoDBClient = Any
    EC2Client = Any

OWNER_TAG = box.OWNER_TAG
# Put on a box's group (REMOVING_TAG) and its claim (REMOVING_ATTRIBUTE + name) by `devbox destroy --box`
# before it ends anything: the owner's starts are refused until the claim is released.
REMOVING_TAG = "devbox:removing"
REMOVING_ATTRIBUTE = "removing:"
FLEET_ITEM = "fleet"
SLUG_LIMIT = 40
_HASH_LENGTH = 8
_SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# EC2 tag values hold at most 256 characters: a longer identity cannot be an owner tag.
_TAG_VALUE_LIMIT = 256
_ASSUMED_ROLE = re.compile(r"^arn:(?P<partition>[a-z-]+):sts::(?P<account>\d{12}):assumed-role/(?P<role>[^/]+)/(?P<session>.+)$")


@dataclass(frozen=True)
class FleetBox:
    """One box of the fleet as a request sees it: its names, owner, group and the config scoped to it."""

    slug: str
    tag: str
    owner: str
    group_id: str
    config: Config
    # When an admin's `devbox destroy --box` began removing the box (the group's REMOVING_TAG), or "".
    removing: str = ""


def owner_of(identity: Optional[Mapping[str, Any]], config: Config) -> str:
    """The caller's owner key from API Gateway's verified identity (OWNER_KEY=role: the role, not the session).

    ``userArn`` is "the Amazon Resource Name (ARN) of the effective user identified after authentication"
    ($context.identity.userArn, API Gateway's variables for data transformations); for an assumed role it
    is arn:aws:sts::<account>:assumed-role/<role>/<session> (IAM User Guide, "IAM identifiers").
    """
    arn = (identity or {}).get("userArn")
    if not isinstance(arn, str) or not arn.startswith("arn:"):
        raise ForbiddenError("the request carries no IAM identity; sign it with IAM credentials (SigV4)")
    if config.owner_key == "role":
        assumed = _ASSUMED_ROLE.match(arn)
        if assumed:
            arn = f"arn:{assumed['partition']}:sts::{assumed['account']}:assumed-role/{assumed['role']}"
    if len(arn) > _TAG_VALUE_LIMIT:
        raise ForbiddenError(f"the caller's identity is longer than {_TAG_VALUE_LIMIT} characters, "
                             "which an EC2 tag cannot hold; use a shorter user or session name")
    return arn


def check_allowed(config: Config, owner: str) -> None:
    """403 unless ALLOWED_OWNERS is empty or one of its patterns matches the owner."""
    if config.allowed_owners and not matches(config.allowed_owners, owner):
        raise ForbiddenError("this identity may not have a box in this deployment (ALLOWED_OWNERS); "
                             "ask the deployment's admins to add it")


def is_admin(config: Config, owner: str) -> bool:
    return matches(config.admin_owners, owner)


def matches(patterns: Sequence[str], owner: str) -> bool:
    """True when a glob pattern matches the identity (case-sensitive, as IAM's ARNs are)."""
    return any(fnmatch.fnmatchcase(owner, pattern) for pattern in patterns)


def slug_of(owner: str, key: Optional[str] = None) -> str:
    """The DNS-safe name of the owner's box: lower case, at most 40 characters.

    The readable part is the user name, the role session name (or the role with OWNER_KEY=role).
    A short hash of the whole identity is added when the name had to be cut; with ``key`` (the
    fleet's secret salt, when another owner holds the plain name) the hash is keyed, so nobody
    who can pick a session name can take both names of a victim in advance.
    """
    tail = owner.split(":", 5)[-1]
    assumed = _ASSUMED_ROLE.match(owner)
    readable = assumed["session"] if assumed else tail.rsplit("/", 1)[-1]
    plain = re.sub(r"[^a-z0-9]+", "-", readable.lower()).strip("-") or "box"
    if len(plain) <= SLUG_LIMIT and key is None:
        return plain
    if key is None:
        digest = hashlib.sha256(owner.encode()).hexdigest()[:_HASH_LENGTH]
    else:
        digest = hmac.new(key.encode(), owner.encode(), hashlib.sha256).hexdigest()[:_HASH_LENGTH]
    return f"{plain[:SLUG_LIMIT - _HASH_LENGTH - 1].rstrip('-')}-{digest}"


def check_slug(name: Any) -> str:
    """A box name from a path, checked: 400 for anything that cannot be a box's name."""
    if not isinstance(name, str) or not _SLUG.match(name):
        raise InvalidRequestError("a box name is a DNS label: lower-case letters, digits and hyphens, "
                                  f"at most {SLUG_LIMIT} characters")
    return name


def box_tag(config: Config, slug: str) -> str:
    return f"{config.box_name}/{slug}"


def scoped(config: Config, slug: str, group_id: str) -> Config:
    """The deployment's config for one box: its own group, its own record <slug>.DOMAIN_NAME."""
    domain = f"{slug}.{config.domain_name}" if config.domain_name else None
    return replace(config, security_group_id=group_id, domain_name=domain)


def _fleet_box(config: Config, group: Mapping[str, Any]) -> FleetBox:
    tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
    tag = tags.get(box.BOX_TAG, "")
    slug = tag.split("/", 1)[1] if tag.startswith(f"{config.box_name}/") else ""
    group_id = str(group["GroupId"])
    return FleetBox(slug, tag, tags.get(OWNER_TAG, ""), group_id, scoped(config, slug, group_id),
                    tags.get(REMOVING_TAG, ""))


# --- security groups: one per box, found by tag --------------------------------------------


def literal(value: str) -> str:
    """A filter value that matches exactly this text: EC2 reads * and ? in filter values as wildcards, and
    "use a backslash to escape special characters" (EC2 API reference, Filter); an IAM user's path may
    hold any of them."""
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def fleet_filter(config: Config) -> str:
    """The filter value of every box of this fleet: its name, escaped, then the wildcard."""
    return f"{literal(config.box_name)}/*"


def find_groups(ec2: EC2Client, config: Config, owner: Optional[str] = None,
                slug: Optional[str] = None) -> List[Dict[str, Any]]:
    """The fleet's box groups (with their inbound permissions), by owner, by name, or all (one call, paged).

    By owner, only groups whose owner tag is exactly the owner are returned, whatever EC2's filter matched.
    """
    name = literal(box_tag(config, slug)) if slug else fleet_filter(config)
    filters = [{"Name": f"tag:{box.BOX_TAG}", "Values": [name]}]
    if owner is not None:
        filters.append({"Name": f"tag:{OWNER_TAG}", "Values": [literal(owner)]})
    kwargs: Dict[str, Any] = {"Filters": filters, "MaxResults": 1000}
    found: List[Dict[str, Any]] = []
    try:
        while True:
            page = ec2.describe_security_groups(**kwargs)
            found.extend(page.get("SecurityGroups", []))
            token = page.get("NextToken")
            if not token:
                return [g for g in found if owner is None or _fleet_box(config, g).owner == owner]
            kwargs["NextToken"] = token
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "find the fleet's security groups") from err


def rules_of(group: Mapping[str, Any]) -> List[access.IngressRule]:
    """The group's inbound rules from DescribeSecurityGroups (no rule ids: for reading, not revoking)."""
    rules = []
    for permission in group.get("IpPermissions", []):
        for key, cidr_key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
            for item in permission.get(key, []):
                rules.append(access.IngressRule(
                    rule_id="", protocol=str(permission.get("IpProtocol", "")),
                    from_port=int(permission.get("FromPort", -1)), to_port=int(permission.get("ToPort", -1)),
                    cidr=str(item.get(cidr_key, "")), description=str(item.get("Description", "") or "")))
    return rules


def one_box(config: Config, groups: Sequence[Mapping[str, Any]]) -> Optional[FleetBox]:
    """The box of these groups (an owner has one); the oldest claim wins if tags were copied by hand."""
    boxes = sorted((_fleet_box(config, g) for g in groups), key=lambda b: b.group_id)
    boxes = [b for b in boxes if b.slug]
    return boxes[0] if boxes else None


def create_group(ec2: EC2Client, config: Config, slug: str, owner: str) -> str:
    """The box's own security group in the VPC of the deployment's group: no inbound rules.

    Group names are unique within a VPC, so of starts at once one creates it and the others
    find it (InvalidGroup.Duplicate).
    """
    vpc = config.vpc_id
    if not vpc:
        # Recorded by `devbox deploy` (VPC_ID); older records: the VPC of the deployment's group.
        try:
            vpc = ec2.describe_security_groups(GroupIds=[config.security_group_id])["SecurityGroups"][0].get("VpcId")
        except (ClientError, BotoCoreError) as err:
            raise aws_failure(err, "read the deployment's security group (for its VPC)") from err
    # CreateSecurityGroup (API reference): names are unique within a VPC, case-insensitively, may hold
    # ":" and "/", and may not start with "sg-". The box tag's "/" keeps names of two fleets apart
    # (dev + box-alice, dev-box + alice); two fleets named alike but for case clash in one VPC.
    name = f"devbox:{box_tag(config, slug)}"
    tags = [{"Key": box.BOX_TAG, "Value": box_tag(config, slug)}, {"Key": OWNER_TAG, "Value": owner},
            {"Key": "Name", "Value": name}]
    try:
        created = ec2.create_security_group(
            GroupName=name, Description=f"devbox {slug}: SSH from its owner's addresses only",
            **({"VpcId": vpc} if vpc else {}), TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])
        return str(created["GroupId"])
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "InvalidGroup.Duplicate":
            raise aws_failure(err, f"create the security group of the box {slug}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"create the security group of the box {slug}") from err
    for group in find_groups(ec2, config, slug=slug):
        if _fleet_box(config, group).owner == owner:
            return str(group["GroupId"])
    raise UpstreamError(f"a security group named {name} exists but is not the box's; rename or remove it")


# --- claims: the fleet's slugs and their owners, in one DynamoDB item ------------------------


def claim(ddb: DynamoDBClient, config: Config, slug: str, owner: str) -> Optional[Dict[str, Any]]:
    """Claim the slug for the owner within MAX_BOXES: None when claimed; the claims item when another owner holds it.

    Idempotent: the owner's own claim succeeds again (a string set holds the slug once), so
    an owner's starts at once all pass. Past MAX_BOXES: 409. The first claim also sets the
    fleet's secret salt (for keyed names after a collision).
    """
    assert config.boxes_table
    # A failed condition is read back (strongly consistent: DynamoDB Developer Guide, "Read consistency") to tell
    # why; a name released in between is tried again.
    for _ in range(3):
        try:
            ddb.update_item(
                TableName=config.boxes_table, Key={"id": {"S": FLEET_ITEM}},
                UpdateExpression="ADD boxes :slugs SET #owner = :owner, salt = if_not_exists(salt, :salt)",
                ConditionExpression="(attribute_not_exists(#owner) OR #owner = :owner) AND "
                                    "(attribute_not_exists(boxes) OR contains(boxes, :slug) OR size(boxes) < :max)"
                                    " AND attribute_not_exists(#removing)",
                ExpressionAttributeNames={"#owner": f"owner:{slug}", "#removing": f"{REMOVING_ATTRIBUTE}{slug}"},
                ExpressionAttributeValues={":slugs": {"SS": [slug]}, ":slug": {"S": slug}, ":owner": {"S": owner},
                                           ":max": {"N": str(config.max_boxes)},
                                           ":salt": {"S": secrets.token_hex(16)}},
            )
            return None
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise aws_failure(err, "claim a box in the fleet's table") from err
        except BotoCoreError as err:
            raise aws_failure(err, "claim a box in the fleet's table") from err
        item = read_claims(ddb, config)
        holder = item.get(f"owner:{slug}", {}).get("S")
        if holder is not None and holder != owner:
            return item
        removing = item.get(f"{REMOVING_ATTRIBUTE}{slug}", {}).get("S")
        if removing is not None:
            raise being_removed(slug, removing)
        names = item.get("boxes", {}).get("SS", [])
        if slug not in names and len(names) >= config.max_boxes:
            raise FleetFullError(f"the fleet holds its limit of {config.max_boxes} boxes (MAX_BOXES); "
                                 "an admin can remove a box (`devbox destroy --box NAME`) or raise MAX_BOXES")
    raise UpstreamError("the fleet's claims kept changing while this box was claimed; try again")


def being_removed(slug: str, since: str) -> StateConflictError:
    return StateConflictError(
        f"the box {slug} is being removed by an admin (`devbox destroy --box {slug}`, begun {since}); once that"
        " has finished (a run that was cut off must be run again by the admin), `devbox start` gives you a new box")


def read_claims(ddb: DynamoDBClient, config: Config) -> Dict[str, Any]:
    """The fleet's claims item (strongly consistent), {} when there is none yet."""
    assert config.boxes_table
    try:
        answer = ddb.get_item(TableName=config.boxes_table, Key={"id": {"S": FLEET_ITEM}}, ConsistentRead=True)
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "read the fleet's table") from err
    return dict(answer.get("Item") or {})


def claim_box(ec2: EC2Client, ddb: DynamoDBClient, config: Config, owner: str) -> FleetBox:
    """The owner's first start: claim a slug (the plain one, else the hashed one), then create the group."""
    slug = slug_of(owner)
    taken = claim(ddb, config, slug, owner)
    if taken is not None:
        salt = taken.get("salt", {}).get("S") or ""
        slug = slug_of(owner, key=salt)
        if claim(ddb, config, slug, owner) is not None:
            raise UpstreamError("the box names derived from this identity are both held by other owners")
    group_id = create_group(ec2, config, slug, owner)
    return FleetBox(slug, box_tag(config, slug), owner, group_id, scoped(config, slug, group_id))


# --- costs: what each box's stopped sessions cost this month --------------------------------


def month_key(when: datetime) -> str:
    return f"cost:{when.strftime('%Y-%m')}"


def month_start(when: datetime) -> datetime:
    return when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def split_by_month(start: datetime, end: datetime, price: float) -> Dict[str, float]:
    """A session's cost (price per hour from start to end) by the months it ran in."""
    costs: Dict[str, float] = {}
    while start < end:
        following = (month_start(start) + timedelta(days=32)).replace(day=1)
        until = min(end, following)
        costs[month_key(start)] = round(costs.get(month_key(start), 0.0) + price * (until - start).total_seconds()
                                        / 3600, 6)
        start = until
    return costs


def add_session_cost(ddb: DynamoDBClient, config: Config, slug: str, session: str,
                     costs: Mapping[str, float]) -> bool:
    """Add a stopped session's estimated cost to each month it ran in; a repeated event adds nothing."""
    assert config.boxes_table
    if not costs:
        return False
    names = {f"#m{n}": key for n, key in enumerate(sorted(costs))}
    values: Dict[str, Any] = {f":c{n}": {"N": f"{costs[key]:.6f}"} for n, key in enumerate(sorted(costs))}
    values[":session"] = {"S": session}
    try:
        ddb.update_item(
            TableName=config.boxes_table, Key={"id": {"S": f"box:{slug}"}},
            UpdateExpression="ADD " + ", ".join(f"#m{n} :c{n}" for n in range(len(costs)))
                             + " SET last_session = :session",
            ConditionExpression="attribute_not_exists(last_session) OR last_session <> :session",
            ExpressionAttributeNames=names, ExpressionAttributeValues=values,
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise aws_failure(err, "record the session's cost") from err
    except BotoCoreError as err:
        raise aws_failure(err, "record the session's cost") from err
    return True


@dataclass(frozen=True)
class Ledger:
    """The table read whole: each box's recorded cost this month, and the claimed names with their owners."""

    costs: Dict[str, float]
    claims: Dict[str, str]
    # The names an admin's `devbox destroy --box` is removing, with when it began.
    removing: Dict[str, str] = field(default_factory=dict)


def read_ledger(ddb: DynamoDBClient, config: Config, when: datetime) -> Ledger:
    """One Scan (paged): the table holds the claims item and an item per box."""
    assert config.boxes_table
    costs: Dict[str, float] = {}
    claims: Dict[str, str] = {}
    removing: Dict[str, str] = {}
    kwargs: Dict[str, Any] = {"TableName": config.boxes_table}
    key = month_key(when)
    try:
        while True:
            page = ddb.scan(**kwargs)
            for item in page.get("Items", []):
                name = item.get("id", {}).get("S", "")
                if name.startswith("box:") and key in item:
                    costs[name[4:]] = float(item[key]["N"])
                elif name == FLEET_ITEM:
                    claims = {slug: item.get(f"owner:{slug}", {}).get("S", "")
                              for slug in item.get("boxes", {}).get("SS", [])}
                    removing = {key[len(REMOVING_ATTRIBUTE):]: str(value.get("S", "")) for key, value in item.items()
                                if key.startswith(REMOVING_ATTRIBUTE)}
            if not page.get("LastEvaluatedKey"):
                return Ledger(costs, claims, removing)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "read the fleet's table") from err


def instance_box(config: Config, found: Mapping[str, Any]) -> Optional[str]:
    """The slug of the fleet box an instance belongs to, or None when it is not this fleet's."""
    tag = next((t["Value"] for t in found.get("Tags", []) if t["Key"] == box.BOX_TAG), "")
    prefix = f"{config.box_name}/"
    if not tag.startswith(prefix):
        return None
    slug = tag[len(prefix):]
    return slug if _SLUG.match(slug) else None


def describe_instance(ec2: EC2Client, instance_id: Optional[str]) -> Optional[Dict[str, Any]]:
    """One instance by id, or None when EC2 does not know it."""
    if not instance_id:
        return None
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            return None
        raise aws_failure(err, f"describe {instance_id}") from err
    except BotoCoreError as err:
        raise aws_failure(err, f"describe {instance_id}") from err
    for reservation in reservations:
        for found in reservation.get("Instances", []):
            return dict(found)
    return None


def not_found(slug: str) -> DevboxError:
    return BoxNotFoundError(f"no box named {slug} for this caller")


def groups_by_slug(config: Config, groups: Sequence[Mapping[str, Any]]) -> Dict[str, FleetBox]:
    found: Dict[str, FleetBox] = {}
    for group in sorted(groups, key=lambda g: str(g["GroupId"])):
        item = _fleet_box(config, group)
        if item.slug and item.slug not in found:
            found[item.slug] = item
    return found


def fleet_instances(ec2: EC2Client, config: Config) -> Dict[str, Tuple[Dict[str, Any], ...]]:
    """Every instance of the fleet's boxes, by slug (one DescribeInstances, paged)."""
    view = box.describe_box(ec2, fleet_filter(config))
    by_slug: Dict[str, List[Dict[str, Any]]] = {}
    for found in view.instances:
        slug = instance_box(config, found)
        if slug:
            by_slug.setdefault(slug, []).append(found)
    return {slug: tuple(items) for slug, items in by_slug.items()}
