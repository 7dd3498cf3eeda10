"""VS Code: the connect timeout edited into a JSONC settings.json, and `devbox code`.

The settings edits are checked byte for byte on files written the ways people and VS Code
write them; `devbox code` runs against the fake API with stand-ins for `code` and `ssh` on PATH.
"""
import json
import stat
from pathlib import Path
from typing import Any, Dict, List

import pytest

from devbox import api, reconnect, vscode
from devbox.vscode import CONNECT_TIMEOUT, SETTING, plan_timeout_edit, set_connect_timeout
from tests.test_api import FakeApi, fake_api, status_doc  # noqa: F401 (fixture)
from tests.test_cli import Run, isolated, listener, run  # noqa: F401 (fixtures)

# What VS Code's settings editor leaves, plus what people add by hand: comments, trailing commas,
# a language block, a URL holding // and /*.
TYPICAL = """// Place your settings in this file to overwrite the default settings
{
    "editor.fontSize": 14, // bigger
    /* proxies
       for work */
    "http.proxy": "http://proxy.example.com:3128/*not-a-comment*/",
    "[python]": {
        "editor.tabSize": 4,
    },
    "files.exclude": {"**/.git": true,},
}
"""


def parse_jsonc(text: str) -> Dict[str, Any]:
    """The settings as VS Code reads them, through the module's own scanner (itself checked below)."""
    return vscode._scan(text.lstrip("\ufeff")).document


def test_the_scanner_reads_jsonc_as_json_without_its_comments_and_trailing_commas() -> None:
    assert parse_jsonc(TYPICAL) == {
        "editor.fontSize": 14,
        "http.proxy": "http://proxy.example.com:3128/*not-a-comment*/",
        "[python]": {"editor.tabSize": 4},
        "files.exclude": {"**/.git": True},
    }


# --- the edit ------------------------------------------------------------------------------------------


def test_the_setting_is_inserted_after_the_brace_and_every_comment_and_key_is_kept() -> None:
    edit = plan_timeout_edit(TYPICAL)

    assert edit.outcome == "updated"
    assert edit.text == TYPICAL.replace("{\n", '{\n    "remote.SSH.connectTimeout": 120,\n', 1)
    assert parse_jsonc(edit.text) == {SETTING: 120, **parse_jsonc(TYPICAL)}


def test_a_lower_value_is_replaced_in_place_and_nothing_else_changes() -> None:
    original = '{\n  "a": 1,\n  "remote.SSH.connectTimeout": 15, // VS Code\'s default\n  "b": [2,],\n}\n'

    edit = plan_timeout_edit(original)

    assert (edit.outcome, edit.detail) == ("updated", f"{SETTING} set to 120 (was 15)")
    assert edit.text == original.replace(": 15,", ": 120,")


@pytest.mark.parametrize("value", ["120", "300", "1e3"])
def test_a_value_of_at_least_120_is_left_alone(value: str) -> None:
    edit = plan_timeout_edit(f'{{"{SETTING}": {value}}}')

    assert (edit.outcome, edit.text) == ("unchanged", None)
    assert edit.detail.startswith(f"{SETTING} is already ")


@pytest.mark.parametrize(
    "original, expected",
    [
        (None, '{\n    "remote.SSH.connectTimeout": 120\n}\n'),
        ("", '{\n    "remote.SSH.connectTimeout": 120\n}\n'),
        ("  \n", '{\n    "remote.SSH.connectTimeout": 120\n}\n'),
        ("{}", '{\n    "remote.SSH.connectTimeout": 120\n}'),
        ("{\n}\n", '{\n    "remote.SSH.connectTimeout": 120\n}\n'),
        ('{"a": 1}', '{"remote.SSH.connectTimeout": 120, "a": 1}'),
        ('{\r\n\t"a": 1\r\n}\r\n', '{\r\n\t"remote.SSH.connectTimeout": 120,\r\n\t"a": 1\r\n}\r\n'),
        ('\ufeff{\n  "a": 1\n}', '\ufeff{\n  "remote.SSH.connectTimeout": 120,\n  "a": 1\n}'),
        ('{ // mine\n  "a": 1\n}', '{ // mine\n  "remote.SSH.connectTimeout": 120,\n  "a": 1\n}'),
        ('{\n  // about a\n  "a": 1\n}', '{\n  "remote.SSH.connectTimeout": 120,\n  // about a\n  "a": 1\n}'),
        ('{\n  // nothing yet\n}', '{\n  "remote.SSH.connectTimeout": 120\n  // nothing yet\n}'),
        # The line break inside the block comment is not one to insert after.
        ('{ /* a\n b */ "a": 1 }', '{"remote.SSH.connectTimeout": 120,  /* a\n b */ "a": 1 }'),
        # Only the top level counts: a language block or a comment naming the setting is not it.
        ('{"[python]": {"remote.SSH.connectTimeout": 5}}',
         '{"remote.SSH.connectTimeout": 120, "[python]": {"remote.SSH.connectTimeout": 5}}'),
        ('{\n  // "remote.SSH.connectTimeout": 300,\n}',
         '{\n  "remote.SSH.connectTimeout": 120\n  // "remote.SSH.connectTimeout": 300,\n}'),
    ],
)
def test_files_of_every_shape_get_the_smallest_edit(original: Any, expected: str) -> None:
    edit = plan_timeout_edit(original)

    assert edit.outcome == ("created" if original is None else "updated")
    assert edit.text == expected
    assert parse_jsonc(expected)[SETTING] == 120


@pytest.mark.parametrize(
    "original, why",
    [
        ('{"a": 1', "line 1: Expecting ',' delimiter"),
        ('{\n  "a": 1\n  "b": 2\n}', "line 3: Expecting ',' delimiter"),
        ('{\n  /* never closed\n  "a": 1\n}', "line 2 is not JSON with comments"),
        ("[1, 2]", "its top level is not an object"),
        ('{"a": NaN}', "NaN is not JSON"),
        ('{"a":\x0c1}', "line 1: Expecting value"),
        (f'{{"{SETTING}": "15"}}', f'{SETTING} holds "15", not a number of seconds'),
        (f'{{"{SETTING}": {{"value": 15}}}}', f'{SETTING} holds {{"value": 15}}, not a number of seconds'),
        (f'{{"{SETTING}": true}}', f"{SETTING} holds true, not a number of seconds"),
        (f'{{"{SETTING}": 10, "{SETTING}": 20}}', f"{SETTING} is set 2 times"),
    ],
)
def test_what_cannot_be_edited_safely_is_left_alone_with_the_reason(original: str, why: str) -> None:
    edit = plan_timeout_edit(original)

    assert (edit.outcome, edit.text, edit.detail) == ("manual", None, why)


def test_the_line_to_add_by_hand() -> None:
    assert vscode.manual_line() == '"remote.SSH.connectTimeout": 120,'


# --- the file ------------------------------------------------------------------------------------------


def test_the_file_is_edited_with_its_previous_version_kept(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(TYPICAL)
    settings.chmod(0o640)

    edit = set_connect_timeout(settings)

    assert edit.outcome == "updated"
    assert edit.backup == tmp_path / "settings.json.devbox.bak"
    assert edit.backup.read_text() == TYPICAL
    assert settings.read_text() == edit.text
    assert stat.S_IMODE(settings.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json", "settings.json.devbox.bak"]


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    set_connect_timeout(settings)
    first = settings.read_bytes()

    edit = set_connect_timeout(settings)

    assert edit.outcome == "unchanged"
    assert settings.read_bytes() == first
    assert not (tmp_path / "settings.json.devbox.bak").exists()


def test_a_symlinked_settings_file_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "settings.json"
    real.parent.mkdir()
    real.write_text('{\n    "a": 1\n}\n')
    link = tmp_path / "User" / "settings.json"
    link.parent.mkdir()
    link.symlink_to(real)

    set_connect_timeout(link)

    assert link.is_symlink()
    assert parse_jsonc(real.read_text()) == {SETTING: 120, "a": 1}


def test_a_missing_folder_is_not_created(tmp_path: Path) -> None:
    edit = set_connect_timeout(tmp_path / "Code" / "User" / "settings.json")

    assert edit.outcome == "manual"
    assert edit.detail == f"there is no folder {tmp_path / 'Code' / 'User'} (is VS Code installed?)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b'{"a": "caf\xe9"}', b'{"a": 1'])
def test_a_file_that_cannot_be_edited_is_left_byte_for_byte(tmp_path: Path, content: bytes) -> None:
    settings = tmp_path / "settings.json"
    settings.write_bytes(content)

    edit = set_connect_timeout(settings)

    assert edit.outcome == "manual"
    assert settings.read_bytes() == content
    assert list(tmp_path.iterdir()) == [settings]


@pytest.mark.parametrize(
    "platform, environ, expected",
    [
        ("linux", {}, "home/.config/Code/User/settings.json"),
        ("linux", {"XDG_CONFIG_HOME": "/xdg"}, "/xdg/Code/User/settings.json"),
        ("linux", {"XDG_CONFIG_HOME": "relative"}, "home/.config/Code/User/settings.json"),
        ("darwin", {}, "home/Library/Application Support/Code/User/settings.json"),
    ],
)
def test_the_user_settings_are_where_vs_code_keeps_them(platform: str, environ: Dict[str, str],
                                                         expected: str) -> None:
    assert vscode.default_settings_path(platform, environ, Path("home")) == Path(expected)


# --- devbox ssh-config --vscode ------------------------------------------------------------------------------


def test_ssh_config_vscode_sets_the_timeout_after_writing_the_block(run: Run, tmp_path: Path) -> None:
    settings = tmp_path / "Code" / "User" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(TYPICAL)

    code, out, err = run("ssh-config", "--config", str(tmp_path / "ssh_config"), "--hostname", "devbox.example.com",
                         "--vscode-settings", str(settings))

    assert code == 0, err
    assert out.splitlines()[-1] == (f"{settings}: {SETTING} set to 120, so VS Code waits for the box to start;"
                                    f" previous version: {settings}.devbox.bak")
    assert parse_jsonc(settings.read_text())[SETTING] == 120


def test_ssh_config_vscode_uses_the_user_settings_of_this_system(run: Run, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vscode.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    settings = tmp_path / "xdg" / "Code" / "User" / "settings.json"
    settings.parent.mkdir(parents=True)

    code, out, _ = run("ssh-config", "--config", str(tmp_path / "ssh_config"), "--hostname", "devbox.example.com",
                       "--vscode")

    assert code == 0
    assert out.splitlines()[-1] == f"{settings}: {SETTING} set to 120, so VS Code waits for the box to start"
    assert json.loads(settings.read_text()) == {SETTING: CONNECT_TIMEOUT}


def test_ssh_config_vscode_prints_the_line_to_add_when_it_cannot_edit(run: Run, tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text('{\n  "a": 1\n  "b": 2\n}\n')

    code, out, _ = run("ssh-config", "--config", str(tmp_path / "ssh_config"), "--hostname", "devbox.example.com",
                       "--vscode-settings", str(settings))

    assert code == 0
    assert out.splitlines()[-1] == (f"{settings}: not changed (line 3: Expecting ',' delimiter); add this line to"
                                    f' its outer {{ }} yourself: "{SETTING}": 120,')
    assert settings.read_text() == '{\n  "a": 1\n  "b": 2\n}\n'


def test_ssh_config_without_vscode_leaves_its_settings_alone(run: Run, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "Code" / "User").mkdir(parents=True)

    code, out, _ = run("ssh-config", "--config", str(tmp_path / "ssh_config"), "--hostname", "devbox.example.com")

    assert code == 0
    assert "settings.json" not in out
    assert list((tmp_path / "xdg" / "Code" / "User").iterdir()) == []


# --- devbox code ---------------------------------------------------------------------------------------------

SSH_G_WITH_BLOCK = "user ubuntu\nhostname devbox.example.com\nproxycommand /opt/devbox proxy --port 22\n"
SSH_G_WITHOUT_BLOCK = "user me\nhostname devbox\nport 22\n"


class Tools:
    """Stand-ins for `code` (records its arguments) and `ssh -G` (prints what it is told) on PATH."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = folder / "bin"
        self.bin.mkdir()
        self.record = folder / "code-args"
        # Only these two: the scripts use shell builtins alone.
        monkeypatch.setenv("PATH", str(self.bin))
        self.ssh_g(SSH_G_WITH_BLOCK)
        self.script("code", f'#!/bin/sh\nfor word in "$@"; do printf "%s\\n" "$word"; done > "{self.record}"\n')

    def script(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def ssh_g(self, text: str) -> None:
        """What `ssh -G` prints from now on."""
        self.script("ssh", f'#!/bin/sh\n[ "$1" = "-G" ] || exit 99\nprintf %s \'{text}\'\n')

    def without_code(self) -> None:
        (self.bin / "code").unlink()

    def code_args(self) -> List[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tools:
    return Tools(tmp_path, monkeypatch)


def start_and_run(fake: FakeApi) -> None:
    fake.answer("POST", "/start", (200, {**status_doc(state="pending", public_ip=None, dns_name=None),
                                         "action": "start", "reason": "stopped"}))
    fake.answer("GET", "/status", (200, status_doc(state="pending", public_ip=None, dns_name=None)),
                (200, status_doc(public_ip="127.0.0.1", dns_name="devbox.example.com")))


def test_code_starts_the_box_with_progress_then_opens_the_home_folder(
    fake_api: FakeApi, run: Run, tools: Tools, listener: int, tmp_path: Path
) -> None:
    start_and_run(fake_api)

    code, out, err = run("code", "--poll-interval", "0", "--port", str(listener), "--url", fake_api.url)

    assert code == 0, err
    assert tools.code_args() == ["--remote", "ssh-remote+devbox", "/home/ubuntu"]
    assert out.splitlines() == ["started i-0123456789abcdef0 (t3.large spot in us-east-1a)",
                                "opening /home/ubuntu on devbox in VS Code"]
    # The same progress as `devbox start --wait`; no DNS step, since VS Code goes through the proxy.
    assert err.splitlines() == [
        "devbox: waiting: instance i-0123456789abcdef0 pending",
        "devbox: instance i-0123456789abcdef0 running (t3.large spot in us-east-1a, 127.0.0.1)",
        f"devbox: SSH port reachable (127.0.0.1:{listener})",
    ]
    # A start a person asked for: the proxy's reconnect guard lets VS Code's own reconnects through.
    assert reconnect.last_start(fake_api.url) is not None


@pytest.mark.parametrize("path, folder", [("/srv/project", "/srv/project"), ("src/app", "/home/ubuntu/src/app"),
                                          ("~/src", "/home/ubuntu/src"), ("~", "/home/ubuntu")])
def test_code_opens_a_folder_relative_to_the_login_users_home(
    fake_api: FakeApi, run: Run, tools: Tools, listener: int, path: str, folder: str
) -> None:
    start_and_run(fake_api)

    code, _, err = run("code", path, "--host", "work-box", "--poll-interval", "0", "--port", str(listener),
                       "--url", fake_api.url)

    assert code == 0, err
    assert tools.code_args() == ["--remote", "ssh-remote+work-box", folder]


def test_code_as_root_opens_roots_home(fake_api: FakeApi, run: Run, tools: Tools, listener: int) -> None:
    start_and_run(fake_api)
    tools.ssh_g("user root\nhostname 203.0.113.10\n")

    assert run("code", "--poll-interval", "0", "--port", str(listener), "--url", fake_api.url)[0] == 0
    assert tools.code_args()[-1] == "/root"


def test_code_without_the_launcher_says_so_in_one_line_and_starts_nothing(
    fake_api: FakeApi, run: Run, tools: Tools
) -> None:
    tools.without_code()

    code, out, err = run("code", "--url", fake_api.url)

    assert code == api.EXIT_FAILURE
    assert out == ""
    assert err == ("devbox: `code` (VS Code's command-line launcher) is not on PATH: in VS Code, run \"Shell Command:"
                   " Install 'code' command in PATH\" from the command palette, or add VS Code's bin folder to PATH\n")
    assert fake_api.calls() == []


def test_code_without_a_host_block_says_what_to_run_and_starts_nothing(fake_api: FakeApi, run: Run,
                                                                       tools: Tools) -> None:
    tools.ssh_g(SSH_G_WITHOUT_BLOCK)

    code, _, err = run("code", "--url", fake_api.url)

    assert code == api.EXIT_USAGE
    assert err == ("devbox: your ssh config has no Host devbox block, so VS Code could not reach the box: run"
                   " `devbox ssh-config --vscode` first (or pass --host with your alias)\n")
    assert fake_api.calls() == []
    assert tools.code_args() == []


@pytest.mark.parametrize("host", ["-oProxyCommand=x", "dev box", "*", "devbox\n"])
def test_code_refuses_a_host_that_is_not_a_plain_alias(fake_api: FakeApi, run: Run, tools: Tools, host: str) -> None:
    code, _, err = run("code", f"--host={host}", "--url", fake_api.url)

    assert code == api.EXIT_USAGE
    assert err.startswith("devbox: --host must be a plain alias")
    assert fake_api.calls() == [] and tools.code_args() == []


def test_code_on_a_box_that_falls_back_to_stopped_gives_ec2s_reason_and_opens_nothing(
    fake_api: FakeApi, run: Run, tools: Tools
) -> None:
    fake_api.answer("POST", "/start", (200, status_doc(state="pending")))
    fake_api.answer("GET", "/status", (200, status_doc(state="pending")),
                    (200, status_doc(state="stopped", state_reason="Client.InternalError: Client error on launch")))

    code, _, err = run("code", "--poll-interval", "0", "--url", fake_api.url)

    assert code == api.EXIT_CONFLICT
    assert err.splitlines()[-1] == (
        "devbox: the devbox's instance i-0123456789abcdef0 stopped again while starting; EC2's reason:"
        " Client.InternalError: Client error on launch (EC2 gives this reason, among others, when it may not use"
        " the volumes' KMS key: see KmsKeyId)"
    )
    assert tools.code_args() == []


def test_devbox_code_returns_the_launchers_exit_code(fake_api: FakeApi, run: Run, tools: Tools, listener: int) -> None:
    start_and_run(fake_api)
    tools.script("code", "#!/bin/sh\nexit 3\n")

    assert run("code", "--poll-interval", "0", "--port", str(listener), "--url", fake_api.url)[0] == 3


def test_ssh_g_reads_the_first_value_of_each_keyword(tools: Tools) -> None:
    tools.ssh_g("user first\nuser second\nhostname h\n")

    assert vscode.ssh_view("devbox") == {"user": "first", "hostname": "h"}


def test_a_failing_ssh_g_is_one_line(tools: Tools) -> None:
    tools.script("ssh", "#!/bin/sh\necho 'line 3: Bad configuration option: nonsense' >&2\necho 'terminating' >&2\n"
                        "exit 255\n")

    with pytest.raises(api.CliError) as caught:
        vscode.ssh_view("devbox")

    assert caught.value.message == ("ssh cannot read its config for devbox: line 3: Bad configuration option:"
                                    " nonsense terminating")


def test_without_ssh_devbox_code_says_vs_code_needs_it(tools: Tools) -> None:
    (tools.bin / "ssh").unlink()

    with pytest.raises(api.CliError) as caught:
        vscode.ssh_view("devbox")

    assert caught.value.message == "ssh is not installed (VS Code's Remote - SSH runs the OpenSSH client)"


def test_a_folder_with_control_characters_is_refused() -> None:
    with pytest.raises(api.CliError):
        vscode.remote_folder("devbox", "src\x1b[2J", {"user": "ubuntu", "proxycommand": "x"})

