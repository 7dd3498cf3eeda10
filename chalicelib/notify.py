"""Notifications to the user (SNS), for events they should hear about without asking."""
import json
from typing import TYPE_CHECKING, Any, Dict

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import aws_failure

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
else:
    SNSClient = Any


def publish(sns: SNSClient, topic_arn: str, subject: str, details: Dict[str, Any]) -> None:
    """Publish one message: a readable subject and the details as JSON."""
    try:
        sns.publish(TopicArn=topic_arn, Subject=subject[:100], Message=json.dumps(details, indent=2, sort_keys=True))
    except (ClientError, BotoCoreError) as err:
        raise aws_failure(err, "publish the notification") from err
