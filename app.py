"""devbox: a box (a name, a data volume) whose EC2 spot instances run on demand; let the caller in, keep DNS in step."""
from typing import Any, Callable, Dict

from chalice import Chalice, IAMAuthorizer, Rate, Response
from chalice.app import Request

from chalicelib import deadline, fleet, fleet_service, oplog, service
from chalicelib.aws import client
from chalicelib.config import Config
from chalicelib.errors import BoxNotFoundError, DevboxError
from chalicelib.payload import parse_body, parse_event_time

app = Chalice(app_name="devbox")
iam = IAMAuthorizer()
STATE_CHANGE = {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]}
INTERRUPTIONS = ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"]


def _answer(name: str, operation: Callable[[Config], Dict[str, Any]]) -> Any:
    """Run a route's operation within the request deadline; the service's errors become JSON error responses."""
    oplog.configure(app.log)
    with oplog.operation(app.log, name, caller=_source_ip()) as op:
        try:
            with deadline.request_deadline():
                config = Config.from_env()
                op.box = config.box_name
                document = operation(config)
                if config.fleet and isinstance(document.get("box"), str):
                    # The log line names the caller's box, not just the fleet.
                    op.box = fleet.box_tag(config, document["box"])
        except DevboxError as err:
            op.failed(err)
            return Response(body={"Code": err.code, "Message": err.message}, status_code=err.status_code)
        op.answered(document)
        return document


def _event(name: str, instance_id: Any, handle: Callable[[Config], str]) -> None:
    """Run an event handler's operation and log its line; a failure is raised for Lambda to retry."""
    oplog.configure(app.log)
    with oplog.operation(app.log, name, instance=instance_id) as op:
        config = Config.from_env()
        op.box = config.box_name
        op.outcome = handle(config)


def _request() -> Request:
    request = app.current_request
    assert request is not None, "only called while handling a request"
    return request


def _owner(config: Config) -> str:
    # Only API Gateway's verified identity names the owner; nothing the caller sends does.
    return fleet.owner_of(_request().context.get("identity"), config)


def _fleet_only(config: Config) -> None:
    if not config.fleet:
        raise BoxNotFoundError("this deployment has a single box (FLEET is not set): use /status, /start, /stop")


def _source_ip() -> Any:
    # Only API Gateway's view of the caller counts; X-Forwarded-For is caller-controlled.
    return (_request().context.get("identity") or {}).get("sourceIp")


@app.route("/status", methods=["GET"], authorizer=iam)
def status() -> Any:
    def run(config: Config) -> Dict[str, Any]:
        if config.fleet:
            return fleet_service.status(client("ec2"), config, _owner(config))
        return service.get_status(client("ec2"), config, config.box_name)

    return _answer("status", run)


@app.route("/start", methods=["POST"], authorizer=iam)
def start() -> Any:
    def run(config: Config) -> Dict[str, Any]:
        body = parse_body(_request().raw_body, allowed_fields=("instance_type", "rebuild"))
        if config.fleet:
            return fleet_service.start(client("ec2"), client("dynamodb"), config, _owner(config), _source_ip(),
                                       body.get("instance_type"), body.get("rebuild"))
        return service.start(client("ec2"), config, config.box_name, _source_ip(), body.get("instance_type"),
                             body.get("rebuild"))

    return _answer("start", run)


@app.route("/stop", methods=["POST"], authorizer=iam)
def stop() -> Any:
    def run(config: Config) -> Dict[str, Any]:
        parse_body(_request().raw_body, allowed_fields=())
        if config.fleet:
            return fleet_service.stop(client("ec2"), config, _owner(config))
        return service.stop(client("ec2"), config, config.box_name)

    return _answer("stop", run)


@app.route("/boxes", methods=["GET"], authorizer=iam)
def boxes() -> Any:
    def run(config: Config) -> Dict[str, Any]:
        _fleet_only(config)
        return fleet_service.list_boxes(client("ec2"), client("dynamodb"), config, _owner(config))

    return _answer("boxes", run)


@app.route("/boxes/{name}", methods=["GET"], authorizer=iam)
def box_status(name: str) -> Any:
    def run(config: Config) -> Dict[str, Any]:
        _fleet_only(config)
        return fleet_service.box_status(client("ec2"), config, _owner(config), name)

    return _answer("box_status", run)


@app.route("/boxes/{name}/stop", methods=["POST"], authorizer=iam)
def box_stop(name: str) -> Any:
    def run(config: Config) -> Dict[str, Any]:
        _fleet_only(config)
        parse_body(_request().raw_body, allowed_fields=())
        return fleet_service.box_stop(client("ec2"), config, _owner(config), name)

    return _answer("box_stop", run)


@app.on_cw_event({**STATE_CHANGE, "detail": {"state": ["running"]}}, name="on_running")
def on_running(event: Any) -> None:
    instance_id = event.detail.get("instance-id")

    def handle(config: Config) -> str:
        if config.fleet:
            return fleet_service.on_running(client, config, instance_id)
        return service.on_running(client, config, config.box_name, instance_id)

    _event("on_running", instance_id, handle)


@app.on_cw_event({**STATE_CHANGE, "detail": {"state": ["stopped", "terminated"]}}, name="on_stopped")
def on_stopped(event: Any) -> None:
    instance_id = event.detail.get("instance-id")

    def handle(config: Config) -> str:
        when = parse_event_time(event.time)
        if config.fleet:
            return fleet_service.on_stopped(client, config, instance_id, when)
        return service.on_stopped(client, config, config.box_name, instance_id, when)

    _event("on_stopped", instance_id, handle)


@app.on_cw_event({"source": ["aws.ec2"], "detail-type": INTERRUPTIONS}, name="on_interruption")
def on_interruption(event: Any) -> None:
    instance_id = event.detail.get("instance-id")

    def handle(config: Config) -> str:
        when = parse_event_time(event.time)
        if config.fleet:
            return fleet_service.on_interruption(client, config, instance_id, event.detail_type, event.detail, when)
        return service.on_interruption(client, config, config.box_name, instance_id, event.detail_type,
                                       event.detail, when)

    _event("on_interruption", instance_id, handle)


@app.schedule(Rate(15, unit=Rate.MINUTES), name="housekeeping")
def housekeeping(event: Any) -> None:
    def handle(config: Config) -> str:
        if config.fleet:
            return fleet_service.housekeeping(client, config)
        return service.housekeeping(client, config, config.box_name)

    _event("housekeeping", None, handle)
