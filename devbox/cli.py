"""The `devbox` command: start, stop and inspect the devbox, and reach it over SSH.

The box is a name with a data volume (/home) and disposable instances: `devbox start` may
start the stopped instance, or launch a new one (first start, spot interruption, resize of a
spot box, --rebuild) that takes the data volume over; it says which, and why.

In fleet mode (one box per owner) a deployment's ADMIN_OWNERS may also see every box
(`devbox boxes`) and stop another's (`devbox stop --box NAME`).

Every subcommand accepts --profile/--region/--url (and --stage, which picks the chalice
deployment record used when no URL is given). `main()` returns the exit code; failures
print one line on stderr (exit codes: see devbox.api.EXIT_*).

Every string the server supplies (status fields, error messages) is printed through
devbox.api.printable: a control character in it is shown escaped, never sent to the terminal
as one. --json output is JSON, whose encoder escapes them as well.
"""
import argparse
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from devbox.api import (
    DEFAULT_STAGE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    URL_ENV,
    ApiError,
    ApiUrl,
    CliError,
    DevboxApi,
    check_box_name,
    locate_url,
    make_auth,
    malformed_status,
    printable,
)
from devbox.progress import (
    Progress,
    Ready,
    WaitOptions,
    note_start,
    start_report,
    wait_until_ready,
    wait_until_stopped,
)
from devbox.proxy import HOST_OVERRIDE_ENV
from devbox.reconnect import DEFAULT_IDLE_COOLDOWN, MAX_IDLE_COOLDOWN, age_text, parse_utc, record_start

Handler = Callable[[argparse.Namespace], int]

# Commands implemented in other modules: (module, function adding its arguments, function running it, help).
DELEGATED = {
    "local": ("devbox.local", "add_arguments", "run", "run the devbox service locally (chalice local + moto)"),
    "deploy": ("devbox.deploy", "add_deploy_arguments", "run_deploy",
               "deploy the devbox stack and API (--fleet: a box per IAM identity)"),
    "destroy": ("devbox.deploy", "add_destroy_arguments", "run_destroy",
                "remove the devbox stack and API, with every box of a fleet (--box NAME: one box)"),
}
_COMMON_WITH_VALUE = ("--profile", "--region", "--url", "--stage")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
# ssh-config asks the API for the DNS name; it should not hang on a slow network.
SSH_CONFIG_STATUS_TIMEOUT = 10.0
# What each stopped_by of the status means.
STOP_REASONS = {
    "idle": "idle (the box's idle watcher shut it down)",
    "user": "user (a stop through the API, `devbox stop`, or the EC2 console)",
    "max-runtime": "max-runtime (it ran longer than MAX_RUNTIME_HOURS)",
    "spot": "spot (the spot service took the capacity back)",
}
ADMIN_ONLY = "only the deployment's ADMIN_OWNERS may list or stop others' boxes"
BOXES_HEADER = ("BOX", "OWNER", "STATE", "TYPE", "UPTIME", "COST THIS MONTH")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the devbox command with argv (default: sys.argv[1:]); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_requested_command(args_list))
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exit_request:
            # argparse exits on --help (0) and on bad arguments (2, message already printed).
            return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
        handler: Optional[Handler] = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return handler(args)
    except CliError as err:
        print(f"devbox: {printable(err.message)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("devbox: interrupted; the devbox keeps whatever state it has reached", file=sys.stderr)
        return EXIT_INTERRUPTED


def _requested_command(argv: Sequence[str]) -> Optional[str]:
    # The first word that is neither an option nor an option's value.
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _COMMON_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(requested: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; the arguments of a delegated command are loaded only when it is requested."""
    parser = argparse.ArgumentParser(
        prog="devbox", description="Start an EC2 spot devbox on demand and reach it over SSH."
    )
    _add_common(parser, top_level=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    status = _command(commands, "status", "show the box: its instance, data volume, state and address", cmd_status)
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument("-v", "--verbose", action="store_true",
                        help="also show the API URL and where it came from (--url, $DEVBOX_URL or a file)")

    start = _command(commands, "start", "start the devbox and let this IP in over SSH", cmd_start)
    start.add_argument("--type", dest="instance_type", type=_instance_type, metavar="INSTANCE_TYPE",
                       help="run as this instance type (e.g. t3.large)")
    start.add_argument("--rebuild", action="store_true",
                       help="on a stopped box: replace its instance with a new one from the launch template's"
                            " latest version (same type unless --type); /home (the data volume) is kept,"
                            " everything else on the old root disk is not")
    start.add_argument("--wait", action="store_true", help="wait until the devbox runs and its SSH port answers")
    _add_wait_options(start, probe_switch=True)
    start.add_argument("--json", action="store_true", help="print the final status document as JSON")

    stop = _command(commands, "stop", "stop the devbox", cmd_stop)
    stop.add_argument("--box", type=_box_name, metavar="NAME",
                      help="fleet admins: stop this box of the fleet (see `devbox boxes`) instead of your own")
    stop.add_argument("--wait", action="store_true", help="wait until the instance is stopped (not with --box)")
    _add_timing_options(stop)
    stop.add_argument("--json", action="store_true", help="print the final status document as JSON")

    boxes = _command(commands, "boxes", "fleet admins: list every box of the fleet, its owner, state and cost",
                     cmd_boxes)
    boxes.add_argument("--json", action="store_true", help="print the box listing as JSON")

    config = _command(commands, "ssh-config", "write a `Host devbox` block into ~/.ssh/config", cmd_ssh_config)
    config.add_argument("--host", default="devbox", metavar="NAME",
                        help="the alias to type after ssh (default: devbox)")
    config.add_argument("--user", metavar="USER", help="the login user on the devbox (e.g. ec2-user, ubuntu)")
    config.add_argument("--identity", metavar="FILE", help="the private key to log in with")
    config.add_argument("--config", default="~/.ssh/config", metavar="PATH",
                        help="the ssh config file (default: ~/.ssh/config)")
    config.add_argument("--port", type=_port, default=22, help="the devbox's SSH port (default: 22)")
    config.add_argument("--hostname", metavar="NAME",
                        help="HostName to write (default: the managed DNS name from the status, else the alias)")
    _add_idle_cooldown(config)
    config.add_argument("--vscode", action="store_true",
                        help="also set remote.SSH.connectTimeout to 120 s in VS Code's user settings, so that"
                             " VS Code waits for a stopped box to start")
    config.add_argument("--vscode-settings", metavar="PATH",
                        help="VS Code's settings.json (implies --vscode; default: the user settings of this system)")

    ssh = _command(commands, "ssh", "start the devbox if needed, wait for it, then run ssh", cmd_ssh)
    ssh.add_argument("--host", metavar="NAME",
                     help="ssh to this alias of your ssh config instead of the devbox's address")
    _add_wait_options(ssh, probe_switch=False)
    ssh.add_argument("ssh_args", nargs="*", metavar="-- ARGS", help="more arguments for ssh (options, a command)")

    proxy = _command(commands, "proxy", "ssh ProxyCommand: start, wait, then relay stdin/stdout to SSH", cmd_proxy)
    _add_wait_options(proxy, probe_switch=True, dns_switch=False)
    _add_idle_cooldown(proxy)
    proxy.add_argument("--host-override", metavar="HOST", default=os.environ.get(HOST_OVERRIDE_ENV) or None,
                       help=f"for tests: connect to HOST instead of the devbox's address (env {HOST_OVERRIDE_ENV})")

    code = _command(commands, "code", "start the devbox, wait for it, then open VS Code on it over Remote-SSH",
                    cmd_code)
    code.add_argument("path", nargs="?", metavar="PATH",
                      help="the folder to open on the box (default: the login user's home; relative to it if"
                           " relative)")
    code.add_argument("--host", default="devbox", metavar="NAME",
                      help="the alias of the box in your ssh config (default: devbox)")
    # No DNS wait: VS Code reaches the box through the alias's ProxyCommand, which connects to its IP.
    _add_wait_options(code, probe_switch=True, dns_switch=False)

    for name, (module, add_name, run_name, help_text) in DELEGATED.items():
        # Their own options may redefine the common ones (conflict_handler="resolve").
        sub = commands.add_parser(name, help=help_text, description=help_text, conflict_handler="resolve")
        _add_common(sub, top_level=False)
        if name == requested:
            loaded = _load_delegate(name, module)
            getattr(loaded, add_name)(sub)
            sub.set_defaults(handler=_delegate(loaded, run_name))
    return parser


def _load_delegate(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise CliError(
            f"`devbox {name}` is not available in this installation ({module} is missing)", EXIT_FAILURE
        ) from None


def _delegate(module: Any, function: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        outcome = getattr(module, function)(args)
        return int(outcome or 0)

    return run


def _command(commands: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    _add_common(sub, top_level=False)
    sub.set_defaults(handler=handler)
    return sub


def _add_common(parser: argparse.ArgumentParser, top_level: bool) -> None:
    # On subcommands the defaults are suppressed, so that `devbox --url X status` keeps X.
    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument("--profile", default=default(None), help="AWS profile whose credentials sign the calls")
    group.add_argument("--region", default=default(None), help="region of the API (default: from the URL or profile)")
    group.add_argument("--url", default=default(None),
                       help=f"the devbox API URL (default: ${URL_ENV}, else .chalice/deployed/STAGE.json)")
    group.add_argument("--stage", default=default(DEFAULT_STAGE),
                       help="chalice stage of the deployment record (default: dev)")


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_seconds, default=300.0, metavar="S",
                        help="give up waiting after S seconds (default: 300)")
    parser.add_argument("--poll-interval", type=_seconds, default=2.0, metavar="S",
                        help="seconds between status polls (default: 2)")


def _add_wait_options(parser: argparse.ArgumentParser, probe_switch: bool, dns_switch: bool = True) -> None:
    _add_timing_options(parser)
    parser.add_argument("--port", type=_port, default=22, help="the devbox's SSH port (default: 22)")
    if probe_switch:
        parser.add_argument("--no-ssh-probe", dest="ssh_probe", action="store_false",
                            help="do not wait for the SSH port (nor the DNS record): for local mode, where"
                                 " the address is made up")
    if dns_switch:
        parser.add_argument("--no-dns-check", dest="dns_check", action="store_false",
                            help="do not wait for the DNS record to point at the devbox")


def _add_idle_cooldown(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--idle-cooldown", type=_minutes, default=DEFAULT_IDLE_COOLDOWN, metavar="MIN",
                        help="a box stopped for idleness less than MIN minutes ago is started only by a person (ssh"
                             " from a terminal, or `devbox start` within MIN minutes), not by an IDE reconnecting"
                             f" in the background (default: {DEFAULT_IDLE_COOLDOWN:g}; 0 turns this off)")


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not 0 <= value <= MAX_IDLE_COOLDOWN:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_IDLE_COOLDOWN:g} minutes: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def _instance_type(text: str) -> str:
    if not _INSTANCE_TYPE.match(text):
        raise argparse.ArgumentTypeError(f"not an EC2 instance type such as t3.large: {text!r}")
    return text


def _box_name(text: str) -> str:
    try:
        return check_box_name(text)
    except CliError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def _api(args: argparse.Namespace, timeout: Optional[float] = None) -> DevboxApi:
    extra = {} if timeout is None else {"timeout": timeout}
    return DevboxApi.connect(args.url, args.profile, args.region, args.stage, **extra)


def _wait_options(args: argparse.Namespace) -> WaitOptions:
    return WaitOptions(
        timeout=args.timeout,
        poll_interval=args.poll_interval,
        ssh_port=getattr(args, "port", 22),
        ssh_probe=getattr(args, "ssh_probe", True),
        dns_check=getattr(args, "dns_check", True),
        host_override=getattr(args, "host_override", None),
    )


def _print_status(status: Dict[str, Any], as_json: bool, api: Optional[DevboxApi] = None) -> None:
    if as_json:
        # json.dumps escapes control characters (and all non-ASCII) itself.
        print(json.dumps(status, indent=2))
    else:
        _print_lines(format_status(status, api))


def _print_lines(text: str) -> None:
    # The last guard before the terminal: each line printable, so no field can forge another.
    for line in text.split("\n"):
        print(printable(line), flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    """devbox status: print the status table, or the document with --json."""
    api = _api(args)
    _print_status(api.status(), args.json, api if args.verbose else None)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """devbox start: start the devbox; with --wait, until it runs and answers on its SSH port."""
    api = _api(args)
    status = _start(api, args.instance_type, args.rebuild, report=not args.json)
    if args.wait:
        status = _wait_ready(api, _wait_options(args)).status
    _print_status(status, args.json)
    return 0


def _start(api: DevboxApi, instance_type: Optional[str] = None, rebuild: bool = False,
           report: bool = True) -> Dict[str, Any]:
    """A start a person asked for: /start, noted for the proxy's reconnect guard, and what it did."""
    status = api.start(instance_type, rebuild=rebuild)
    record_start(api.url)
    if report:
        # Said before any wait: a relaunch means a new root disk, worth knowing at once.
        for line in start_report(status):
            _print_lines(line)
    return status


def _wait_ready(api: DevboxApi, options: WaitOptions) -> Ready:
    with Progress() as progress:
        return wait_until_ready(api, options, progress)


def cmd_stop(args: argparse.Namespace) -> int:
    """devbox stop: stop the devbox; with --wait, until it is stopped. With --box, a fleet admin stops that box."""
    if getattr(args, "box", None) is not None:
        return _stop_box(args)
    api = _api(args)
    status = api.stop()
    if args.wait:
        with Progress() as progress:
            status = wait_until_stopped(api, _wait_options(args), progress)
    _print_status(status, args.json)
    return 0


def _stop_box(args: argparse.Namespace) -> int:
    """devbox stop --box NAME: stop another's box of the fleet (admins only) and print its status."""
    if args.wait:
        # The status route answers for the caller's own box only: there is nothing to poll for NAME.
        raise CliError(f"--wait follows only your own box; see whether {args.box} is stopped with `devbox boxes`",
                       EXIT_USAGE)
    api = _api(args)
    with _fleet_errors(args.box):
        status = api.stop_box(args.box)
    _print_status(status, args.json)
    return 0


def cmd_boxes(args: argparse.Namespace) -> int:
    """devbox boxes: the fleet's boxes as a table (admins only), or the listing with --json."""
    api = _api(args)
    with _fleet_errors():
        document = api.boxes()
    if args.json:
        # json.dumps escapes control characters (and all non-ASCII) itself.
        print(json.dumps(document, indent=2))
    else:
        # Formatted whole before anything is printed: a malformed listing prints its error line only.
        _print_lines(format_boxes(document))
    return 0


@contextmanager
def _fleet_errors(box: Optional[str] = None) -> Iterator[None]:
    """The fleet routes' refusals in their own words: who may call them, which box is unknown, no fleet at all."""
    try:
        yield
    except ApiError as err:
        detail = err.detail or "no details given"
        label = f"HTTP {err.status} {err.code}" if err.code else f"HTTP {err.status}"
        if err.status == 403 and err.code:
            # The app's own refusal; API Gateway's (a bad signature, an unknown path) carry no Code.
            raise ApiError(f"{ADMIN_ONLY} ({label}): {detail}", err.exit_code, err.status, err.code, detail) from None
        if err.status == 403 and "missing authentication token" in detail.lower():
            raise ApiError(f"the devbox API has no fleet routes ({label}: {detail}): the deployment is not a fleet or"
                           " predates fleet mode, or the URL is wrong", err.exit_code, err.status, err.code,
                           detail) from None
        if box is None and err.status in (400, 404):
            raise ApiError(f"the devbox API lists no boxes ({label}): {detail}; is this deployment a fleet?",
                           err.exit_code, err.status, err.code, detail) from None
        if box is not None and err.status == 404:
            raise ApiError(f"no box {box} ({label}): {detail}", err.exit_code, err.status, err.code,
                           detail) from None
        raise


def format_boxes(document: Mapping[str, Any]) -> str:
    """The fleet's boxes as a table sorted by name, then "N of at most M boxes".

    The listing's types are checked first: a malformed one is an ApiError naming the field, and nothing is printed.
    """
    entries = document.get("boxes")
    if not isinstance(entries, list):
        raise _malformed_listing("boxes", entries, "a list of boxes")
    rows = []
    for index, entry in enumerate(entries):
        where = f"boxes[{index}]"
        if not isinstance(entry, dict):
            raise _malformed_listing(where, entry, "an object")
        name = _listing_text(entry, where, "box")
        if name is None:
            raise _malformed_listing(f"{where}.box", entry.get("box"), "a box name")
        uptime = _listing_number(entry, where, "uptime_seconds", minimum=0)
        cost = _listing_number(entry, where, "cost_this_month_usd")
        state = _listing_text(entry, where, "state")
        if _listing_text(entry, where, "removing"):
            # An admin's `devbox destroy --box` is under way (or was cut off).
            state = f"{state or '?'} (being removed)"
        rows.append((name, [
            name,
            _listing_text(entry, where, "owner"),
            state,
            _listing_text(entry, where, "instance_type"),
            None if uptime is None else _duration(uptime),
            None if cost is None else _money(cost, "", 2),
        ]))
    count = _listing_number(document, "", "count", minimum=0, whole=True)
    most = _listing_number(document, "", "max_boxes", minimum=0, whole=True)
    total = len(entries) if count is None else int(count)
    lines = []
    if rows:
        rows.sort(key=lambda row: row[0])
        table = [list(BOXES_HEADER)] + [[_cell(value) for value in cells] for _, cells in rows]
        widths = [max(len(line[column]) for line in table) for column in range(len(BOXES_HEADER))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    if most is not None:
        lines.append(f"{total} of at most {int(most)} boxes")
    else:
        lines.append(f"{total} box" if total == 1 else f"{total} boxes")
    return "\n".join(lines)


def _malformed_listing(field: str, value: Any, expected: str) -> ApiError:
    return malformed_status(field, value, expected, document="box listing")


def _listing_text(entry: Mapping[str, Any], where: str, field: str) -> Optional[str]:
    """entry[field] as text, None when absent, null or empty; any other type is a malformed listing."""
    value = entry.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _malformed_listing(f"{where}.{field}", value, "text")
    return value


def _listing_number(entry: Mapping[str, Any], where: str, field: str, minimum: Optional[float] = None,
                    whole: bool = False) -> Optional[float]:
    """entry[field] as a finite number (at least minimum; whole if told), None when absent or null."""
    value = entry.get(field)
    if value is None:
        return None
    expected = "a whole number" if whole else "a number"
    if minimum is not None:
        expected += f" of at least {minimum:g}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or (whole and value != int(value)) or (minimum is not None and value < minimum):
        raise _malformed_listing(f"{where}.{field}" if where else field, value, expected)
    return float(value)


def cmd_ssh_config(args: argparse.Namespace) -> int:
    """devbox ssh-config: add or update the managed Host block in the ssh config file."""
    from devbox import sshconfig

    found = locate_url(args.url, args.stage)
    # ssh runs the ProxyCommand from any folder: a URL found in this project's deployment
    # record must be written down, while $DEVBOX_URL is left to the environment.
    block_url = found.url if found is not None and found.source != f"${URL_ENV}" else None
    # Said before anything is written: the URL receives signed requests at every `ssh`.
    _print_lines(_url_origin(found, block_url is not None, args.stage))
    identity = args.identity
    if identity and not identity.startswith(("~", "/")):
        identity = os.path.abspath(identity)
    entry = sshconfig.HostEntry(
        name=args.host,
        hostname=args.hostname or _managed_dns_name(args, found) or args.host,
        proxy_command=sshconfig.proxy_command(
            sshconfig.devbox_command(), args.port, block_url, args.profile, args.region,
            # Written only when it differs: a later default then reaches old blocks too.
            idle_cooldown=None if args.idle_cooldown == DEFAULT_IDLE_COOLDOWN else args.idle_cooldown,
        ),
        user=args.user,
        identity_file=identity,
    )
    path = Path(args.config).expanduser()
    ssh = shutil.which("ssh")
    outcome = sshconfig.write_config(path, entry, ssh=ssh)
    if outcome == "unchanged":
        _print_lines(f"{path}: the Host {entry.name} block is up to date")
    else:
        notes = ["ssh -G accepts it" if ssh else "not checked with `ssh -G`: ssh is not installed"]
        if outcome == "updated":
            notes.append(f"previous version: {sshconfig.backup_path(Path(os.path.realpath(path)))}")
        _print_lines(f"{path}: Host {entry.name} block {outcome} ({'; '.join(notes)});"
                     f" connect with `ssh {entry.name}`")
    if args.vscode or args.vscode_settings:
        _configure_vscode(args.vscode_settings)
    return 0


def _configure_vscode(settings: Optional[str]) -> None:
    from devbox import vscode

    path = Path(settings).expanduser() if settings else vscode.default_settings_path()
    edit = vscode.set_connect_timeout(path)
    if edit.outcome == "manual":
        _print_lines(f"{path}: not changed ({edit.detail}); add this line to its outer {{ }} yourself:"
                     f" {vscode.manual_line()}")
    elif edit.outcome == "unchanged":
        _print_lines(f"{path}: {edit.detail}")
    else:
        kept = f"; previous version: {edit.backup}" if edit.backup else ""
        _print_lines(f"{path}: {edit.detail}, so VS Code waits for the box to start{kept}")


def _url_origin(found: Optional[ApiUrl], written: bool, stage: str) -> str:
    if found is None:
        return (f"no API URL found: the proxy looks for one each time ssh runs it (${URL_ENV}, else"
                f" .chalice/deployed/{stage}.json in or above the folder ssh runs in)")
    if not written:
        return (f"API URL {found.url} (from {found.source}): not written into the block; the proxy reads"
                f" {found.source} each time ssh runs it")
    return f"API URL {found.url} (from {found.source}): written into the ProxyCommand"


def _managed_dns_name(args: argparse.Namespace, found: Optional[ApiUrl]) -> Optional[str]:
    # Only a managed domain is stable enough to write down; EC2's own names change at each start.
    from devbox.progress import is_managed_name, status_dns_name

    if found is None:
        return None
    try:
        api = DevboxApi(found.url, make_auth(found.url, args.profile, args.region), SSH_CONFIG_STATUS_TIMEOUT,
                        source=found.source)
        dns_name = status_dns_name(api.status())
    except CliError as err:
        print(f"devbox: note: HostName not taken from the status ({printable(err.message)})", file=sys.stderr)
        return None
    return dns_name if is_managed_name(dns_name) else None


def cmd_ssh(args: argparse.Namespace) -> int:
    """devbox ssh: start the devbox if needed, wait for SSH, then run ssh and return its exit code."""
    extra = list(args.ssh_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    api = _api(args)
    # Always /start: it is idempotent and lets this IP in, which may have changed since last time.
    answer = api.start()
    with Progress() as progress:
        note_start(progress, answer)
        ready = wait_until_ready(api, _wait_options(args), progress)
    if args.host:
        command = ["ssh", args.host, *extra]
    else:
        # The managed name once it was seen pointing at the box; else the address probed.
        address = ready.verified_name or ready.host
        command = ["ssh", "-p", str(args.port), "-o", "HostKeyAlias=devbox", address, *extra]
    return run_ssh_process(command)


def run_ssh_process(command: List[str]) -> int:
    """Run ssh in the foreground and return its exit code (128+N when killed by signal N)."""
    executable = shutil.which(command[0])
    if executable is None:
        raise CliError("ssh is not installed (the OpenSSH client provides it)", EXIT_FAILURE)
    # ssh handles Ctrl-C itself (the remote side gets it); this process just waits.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call([executable, *command[1:]])
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code


def cmd_proxy(args: argparse.Namespace) -> int:
    """devbox proxy: ssh's ProxyCommand (see devbox.proxy)."""
    from devbox.proxy import run_proxy
    from devbox.reconnect import ReconnectGuard

    api = _api(args)
    return run_proxy(api, _wait_options(args), guard=ReconnectGuard(api.url, args.idle_cooldown))


def cmd_code(args: argparse.Namespace) -> int:
    """devbox code: start the devbox, wait for SSH, then open VS Code on it; returns the launcher's exit code."""
    from devbox import sshconfig, vscode

    if not sshconfig.is_host_alias(args.host):
        raise CliError(f"--host must be a plain alias (letters, digits, . _ -), not {args.host!r}", EXIT_USAGE)
    # Both checked before the box is started: neither needs it, and a start is not free.
    launcher = vscode.find_launcher()
    folder = vscode.remote_folder(args.host, args.path, vscode.ssh_view(args.host))
    api = _api(args)
    _start(api)
    # VS Code reaches the box through the ProxyCommand, which connects to its IP: no DNS wait.
    _wait_ready(api, replace(_wait_options(args), dns_check=False))
    _print_lines(f"opening {folder} on {args.host} in VS Code")
    return vscode.open_remote(vscode.code_command(launcher, args.host, folder))


def format_status(status: Dict[str, Any], api: Optional[DevboxApi] = None, now: Optional[datetime] = None) -> str:
    """A short human table of the status document (a malformed one too: odd values are shown, not fatal).

    With api, a last row names the API's URL and where it came from.
    """
    address = status.get("dns_name") or status.get("public_ip")
    if address and status.get("public_ip") and address != status.get("public_ip"):
        address = f"{address} ({status['public_ip']})"
    state = status.get("state")
    if state == "none":
        state = "none (no instance yet: `devbox start` launches one)"
    rows = [("box", status.get("box"))]
    if status.get("owner") not in (None, ""):
        # A fleet's status (e.g. of another's box stopped by an admin) names whose box it is.
        rows.append(("owner", status["owner"]))
    rows.append(("state", state))
    if status.get("removing") not in (None, ""):
        rows.append(("removing", f"an admin began removing this box at {_time(status['removing'])};"
                                 " starts are refused until that has finished"))
    if status.get("interrupted") is True:
        # Only EC2 may start a spot-stopped instance again, whenever capacity returns.
        rows.append(("interrupted", "the spot service stopped this instance; `devbox start` launches a new"
                                    " instance with the same data volume"))
    rows += _stop_rows(status, now or datetime.now(timezone.utc))
    rows += [
        ("instance", status.get("instance_id")),
        ("type", status.get("instance_type")),
        # "lifecycle" is what servers from before "market" answered.
        ("market", status.get("market") or status.get("lifecycle")),
        ("zone", status.get("availability_zone")),
        ("data volume", status.get("data_volume_id")),
        ("address", address),
        ("allowed IPs", _listing(status.get("allowed_ips")) or "none"),
        ("launched", _time(status.get("launch_time"))),
    ]
    if status.get("last_interruption"):
        rows.append(("last interruption", _mapping(status["last_interruption"])))
    if status.get("spot_price_per_hour") is not None:
        rows.append(("spot price", _money(status["spot_price_per_hour"], "/h", 4)))
    if status.get("uptime_seconds") is not None:
        rows.append(("uptime", _duration(status["uptime_seconds"])))
    if status.get("estimated_cost") is not None:
        rows.append(("estimated cost", _money(status["estimated_cost"], "", 4)))
    if api is not None:
        rows.append(("api", f"{api.url}/ (from {api.source})"))
    width = max(len(label) for label, _ in rows) + 3
    return "\n".join(f"{label + ':':<{width}}{_cell(value)}" for label, value in rows)


def _stop_rows(status: Dict[str, Any], now: datetime) -> List[Any]:
    """Who stopped the box and when, EC2's reason when nobody is named, and what the idle watcher said."""
    rows: List[Any] = []
    stopped_by, reason = status.get("stopped_by"), status.get("state_reason")
    if stopped_by not in (None, ""):
        known = STOP_REASONS.get(stopped_by) if isinstance(stopped_by, str) else None
        rows.append(("stopped by", known or stopped_by))
    elif reason not in (None, ""):
        # Not a stop anyone asked for (e.g. a start EC2 could not carry out): its own words.
        rows.append(("stopped by", f"EC2: {printable(reason)}"))
    stopped_at = status.get("stopped_at")
    if stopped_at not in (None, ""):
        moment = parse_utc(stopped_at)
        shown = _time(stopped_at)
        if moment is not None:
            shown = f"{shown} ({age_text(max(now - moment, timedelta(0)))})"
        rows.append(("stopped at", shown))
    if status.get("idle") not in (None, ""):
        rows.append(("idle", status["idle"]))
    return rows


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return printable(value)


def _listing(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value if item not in (None, ""))
    return "" if value is None else str(value)


def _time(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _mapping(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {_time(item)}" for key, item in value.items() if item is not None)
    # The service records "<ISO time> <event>" (e.g. "...Z EC2 Spot Instance Interruption Warning stop").
    when, _, what = str(value).partition(" ")
    return f"{_time(when)} {what}".strip()


def _money(value: Any, suffix: str, digits: int) -> str:
    if isinstance(value, dict):
        return _mapping(value)
    try:
        return f"${float(value):.{digits}f}{suffix}"
    except (TypeError, ValueError):
        return f"{value}{suffix}"


def _duration(value: Any) -> str:
    try:
        seconds = int(float(value))
    except (TypeError, ValueError):
        return str(value)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {rest % 60:02d}s"
