"""The service's own exceptions, each carrying the HTTP status a caller should see."""
import logging



class DevboxError(Exception):
    """Base class: a failure with a message a user can act on."""

    status_code = 500
    code = "DevboxError"
    # AWS's error code, when AWS refused the call behind this failure (for the logs).
    aws_code: "str | None" = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(DevboxError):
    """The deployment's configuration is missing or malformed."""

    code = "ConfigurationError"


class InvalidRequestError(DevboxError):
    """The request is malformed; nothing was changed."""

    status_code = 400
    code = "BadRequestError"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the service accepts."""

    status_code = 413
    code = "PayloadTooLargeError"


class StateConflictError(DevboxError):
    """The instance is in a state that does not allow the operation."""

    status_code = 409
    code = "ConflictError"


class QuotaError(DevboxError):
    """The security group has no room for another caller's rules."""

    status_code = 409
    code = "ConflictError"


class CapacityError(DevboxError):
    """AWS has no capacity for the instance right now."""

    status_code = 503
    code = "InsufficientCapacity"


class UpstreamError(DevboxError):
    """An AWS call failed in a way the caller can only retry."""

    status_code = 502
    code = "UpstreamError"


class InstanceNotFoundError(DevboxError):
    """The configured instance does not exist (in this account and region)."""

    status_code = 404
    code = "NotFoundError"


class ForbiddenError(DevboxError):
    """The caller may not do this (not an admin, or not among the fleet's owners)."""

    status_code = 403
    code = "Forbidden"


class BoxNotFoundError(DevboxError):
    """No such box for this caller (someone else's box answers the same: its existence is not confirmed)."""

    status_code = 404
    code = "NotFound"


class FleetFullError(DevboxError):
    """The fleet holds MAX_BOXES boxes already."""

    status_code = 409
    code = "ConflictError"


# Error codes AWS returns when it is overloaded or throttling, after botocore's
# own retries have run out: the caller can simply try again later.
_RETRYABLE = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "PriorRequestNotComplete",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
}


_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthorizationError"}


def aws_failure(err: Exception, action: str) -> DevboxError:
    """Turn a botocore failure into an error the caller can understand."""
    response = getattr(err, "response", None)
    if response is None:
        # EndpointConnectionError, timeouts: the call never got an answer.
        failure: DevboxError = UpstreamError(f"AWS could not be reached to {action}; try again shortly ({err})")
        failure.status_code = 503
        return failure
    code = response.get("Error", {}).get("Code", "Unknown")
    message = response.get("Error", {}).get("Message", "")
    if code in _DENIED:
        # AWS's text names the role, the account and an encoded authorization message: log it, do not return it.
        logging.getLogger("devbox").error("%s while trying to %s: %s", code, action, message)
        failure = UpstreamError(f"the service's IAM role may not {action} ({code}); check its policy (see the logs)")
    else:
        failure = UpstreamError(f"AWS refused to {action}: {code}: {message}".rstrip(": "))
    failure.aws_code = str(code)
    if code in _RETRYABLE:
        failure.status_code = 503
    return failure
