"""devbox: a box (a name, a data volume) whose EC2 spot instances run on demand; let the caller in, keep DNS in step."""
from typing import Any, Callable, Dict

from chalice import Chalice, IAMAuthorizer, Rate, Response
from chalice.app import Request

from chalicelib import service
from chalicelib.aws import client
from chalicelib.config import Config
from chalicelib.errors import DevboxError
from chalicelib.payload import parse_body, parse_event_time

app = Chalice(app_name="devbox")
iam = IAMAuthorizer()
STATE_CHANGE = {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]}
INTERRUPTIONS = ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"]


def _answer(operation: Callable[[], Dict[str, Any]]) -> Any:
    """Run an operation, turning the service's errors into JSON error responses."""
    try:
        return operation()
    except DevboxError as err:
        if err.status_code >= 500:
            app.log.error("%s: %s", err.code, err.message)
        return Response(body={"Code": err.code, "Message": err.message}, status_code=err.status_code)


def _request() -> Request:
    request = app.current_request
    assert request is not None, "only called while handling a request"
    return request


def _source_ip() -> Any:
    # Only API Gateway's view of the caller counts; X-Forwarded-For is caller-controlled.
    return (_request().context.get("identity") or {}).get("sourceIp")


@app.route("/status", methods=["GET"], authorizer=iam)
def status() -> Any:
    def run() -> Dict[str, Any]:
        config = Config.from_env()
        return service.get_status(client("ec2"), config, config.box_name)

    return _answer(run)


@app.route("/start", methods=["POST"], authorizer=iam)
def start() -> Any:
    def run() -> Dict[str, Any]:
        body = parse_body(_request().raw_body, allowed_fields=("instance_type", "rebuild"))
        config = Config.from_env()
        return service.start(client("ec2"), config, config.box_name, _source_ip(), body.get("instance_type"),
                             body.get("rebuild"))

    return _answer(run)


@app.route("/stop", methods=["POST"], authorizer=iam)
def stop() -> Any:
    def run() -> Dict[str, Any]:
        parse_body(_request().raw_body, allowed_fields=())
        config = Config.from_env()
        return service.stop(client("ec2"), config, config.box_name)

    return _answer(run)


@app.on_cw_event({**STATE_CHANGE, "detail": {"state": ["running"]}}, name="on_running")
def on_running(event: Any) -> None:
    config = Config.from_env()
    outcome = service.on_running(client, config, config.box_name, event.detail.get("instance-id"))
    app.log.info("running event: %s", outcome)


@app.on_cw_event({**STATE_CHANGE, "detail": {"state": ["stopped", "terminated"]}}, name="on_stopped")
def on_stopped(event: Any) -> None:
    config = Config.from_env()
    outcome = service.on_stopped(client, config, config.box_name, event.detail.get("instance-id"),
                                 parse_event_time(event.time))
    app.log.info("stopped event: %s", outcome)


@app.on_cw_event({"source": ["aws.ec2"], "detail-type": INTERRUPTIONS}, name="on_interruption")
def on_interruption(event: Any) -> None:
    config = Config.from_env()
    outcome = service.on_interruption(client, config, config.box_name, event.detail.get("instance-id"),
                                      event.detail_type, event.detail, parse_event_time(event.time))
    app.log.info("interruption event: %s", outcome)


@app.schedule(Rate(15, unit=Rate.MINUTES), name="housekeeping")
def housekeeping(event: Any) -> None:
    config = Config.from_env()
    app.log.info("housekeeping: %s", service.housekeeping(client, config, config.box_name))
