"""Tests of infra/volume/: the boot script that puts the data volume at /home, and the on-new-root runner.

The real script runs under /bin/sh with fake disk commands first on PATH (tests/fixtures/volume/bin,
whose README says how a fake volume and a fake mount work), a folder standing for the instance's
root disk (DEVBOX_ROOT) and a small IMDSv2 server on 127.0.0.1 that the real curl talks to.
"""
import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
VOLUME = ROOT / "infra" / "volume"
SCRIPT = VOLUME / "devbox-data-volume"
HOOK = VOLUME / "devbox-on-new-root"
FAKES = Path(__file__).resolve().parent / "fixtures" / "volume" / "bin"
VOLUME_ID = "vol-0123456789abcdef0"
TOKEN = "AQAEAFakeToken=="
LOGIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeLoginKeyFromInstanceMetadata devbox-key"
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the boot script reads the metadata with curl")


class Imds:
    """Instance metadata, IMDSv2 only: a GET without a token from PUT /latest/api/token gets 401."""

    def __init__(self) -> None:
        self.volume_tag: Optional[str] = VOLUME_ID
        self.tag_misses = 0  # answer 404 to this many reads of the tag first, as before the service tags
        self.login_key: Optional[str] = LOGIN_KEY
        self.requests: List[str] = []
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                imds.requests.append(f"PUT {self.path}")
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self.answer(400, "")
                else:
                    self.answer(200, TOKEN)

            def do_GET(self) -> None:
                imds.requests.append(f"GET {self.path}")
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    self.answer(401, "")
                    return
                value = None
                if self.path == "/latest/meta-data/tags/instance/devbox:volume":
                    if imds.tag_misses > 0:
                        imds.tag_misses -= 1
                    else:
                        value = imds.volume_tag
                elif self.path == "/latest/meta-data/public-keys/0/openssh-key":
                    value = imds.login_key
                if value is None:
                    self.answer(404, "Not Found")
                else:
                    self.answer(200, value)

            def answer(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: shutdown() waits for the next poll, once per test.
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Instance:
    """One instance: a folder for its root disk, as a fresh Ubuntu image has it."""

    def __init__(self, cloud: "Cloud", name: str) -> None:
        self.cloud = cloud
        self.root = cloud.tmp / name
        for folder in ("etc/ssh", "etc/skel", "home", "var/log", "run", "dev/disk/by-id"):
            (self.root / folder).mkdir(parents=True)
        (self.root / "etc" / "skel" / ".bashrc").write_text("# skel\n")
        (self.root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def motd(self) -> Path:
        return self.root / "run" / "motd.d" / "90-devbox-data-volume"

    def log(self, name: str = "devbox-data-volume") -> str:
        path = self.root / "var" / "log" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def attach(self, image: Path, nitro: bool = True) -> None:
        """What EC2 shows once AttachVolume is done: udev's by-id link on Nitro, /dev/xvdf on Xen."""
        if nitro:
            link = self.root / "dev" / "disk" / "by-id" / f"nvme-Amazon_Elastic_Block_Store_vol{image.stem[4:]}"
        else:
            link = self.root / "dev" / "xvdf"
        link.symlink_to(image)

    def run(self, *args: str, timeout_s: int = 5, **env: str) -> "subprocess.CompletedProcess[str]":
        environment = {
            "PATH": f"{FAKES}:/usr/bin:/bin",
            "DEVBOX_ROOT": str(self.root),
            "DEVBOX_IMDS_URL": self.cloud.imds.url,
            "DEVBOX_VOLUME_TIMEOUT": str(timeout_s),
            "DEVBOX_VOLUME_POLL": "0.1",
            "FAKE_CALLS": str(self.cloud.calls_file),
            **env,
        }
        return subprocess.run(["/bin/sh", str(SCRIPT), *args], env=environment, capture_output=True, text=True,
                              timeout=timeout_s + 30)

    def boot(self, timeout_s: int = 5, **env: str) -> "subprocess.CompletedProcess[str]":
        return self.run("boot", timeout_s=timeout_s, **env)

    def reboot(self) -> None:
        """Stop and start: the mount and /run are gone, the root disk stays."""
        if self.home.is_symlink():
            self.home.unlink()
            (self.root / "home.root-disk").rename(self.home)
        shutil.rmtree(self.root / "run")
        (self.root / "run").mkdir()

    def cloud_init_creates_the_default_user(self) -> None:
        """What users_groups and ssh do after bootcmd on a new instance (useradd -m, then the login key)."""
        uid, gid = os.getuid(), os.getgid()
        with (self.root / "etc" / "passwd").open("a") as passwd:
            passwd.write(f"ubuntu:x:{uid}:{gid}:Ubuntu:/home/ubuntu:/bin/bash\n")
        home = self.home / "ubuntu"
        if not home.exists():
            shutil.copytree(self.root / "etc" / "skel", home)
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        keys = home / ".ssh" / "authorized_keys"
        if LOGIN_KEY not in (keys.read_text() if keys.exists() else ""):
            with keys.open("a") as f:
                f.write(LOGIN_KEY + "\n")

    def host_keys(self) -> Dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.root / "etc" / "ssh").glob("ssh_host_*"))}


class Cloud:
    """The EBS volumes, the instances and the metadata service of one test."""

    def __init__(self, tmp: Path, imds: Imds) -> None:
        self.tmp = tmp
        self.imds = imds
        self.calls_file = tmp / "calls.log"
        self.calls_file.touch()
        (tmp / "ebs").mkdir()

    def volume(self, volume_id: str = VOLUME_ID, fstype: Optional[str] = None) -> Path:
        """A volume as CreateVolume leaves it (zeros), or holding a filesystem already."""
        image = self.tmp / "ebs" / f"{volume_id}.img"
        with image.open("wb") as f:
            f.truncate(4 * MiB)
        if fstype:
            image.with_name(image.name + ".fstype").write_text(fstype + "\n")
            image.with_name(image.name + ".d").mkdir()
        return image

    def instance(self, name: str = "i-first") -> Instance:
        return Instance(self, name)

    def calls(self, command: str) -> List[str]:
        return [line for line in self.calls_file.read_text().splitlines() if line.split(" ", 1)[0] == command]


@pytest.fixture
def imds() -> Iterator[Imds]:
    server = Imds()
    yield server
    server.close()


@pytest.fixture
def cloud(tmp_path: Path, imds: Imds) -> Cloud:
    return Cloud(tmp_path, imds)


def files_on(image: Path) -> Path:
    return image.with_name(image.name + ".d")


# --- mounting the data volume -------------------------------------------------------------------


def test_new_volume_gets_an_ext4_filesystem_and_is_mounted_at_home(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    box.attach(image)
    result = box.boot()
    assert result.returncode == 0, result.stderr
    assert cloud.calls("mkfs.ext4") == [f"mkfs.ext4 -q -L devbox-home {image}"]
    assert cloud.calls("mount") == [f"mount {image} {box.home}"]
    assert box.home.resolve() == files_on(image)
    assert f"boot: /home is on {VOLUME_ID}" in box.log()
    assert not box.motd.exists()


def test_existing_filesystem_is_never_reformatted(cloud: Cloud) -> None:
    image = cloud.volume(fstype="ext4")
    (files_on(image) / "ubuntu").mkdir()
    (files_on(image) / "ubuntu" / "thesis.tex").write_text("chapter 1\n")
    box = cloud.instance()
    box.attach(image)
    result = box.boot()
    assert result.returncode == 0, result.stderr
    assert cloud.calls("mkfs.ext4") == []
    assert (box.home / "ubuntu" / "thesis.tex").read_text() == "chapter 1\n"
    assert "has a filesystem (ext4); keeping it" in box.log()


def test_filesystem_made_on_first_boot_is_kept_on_the_next(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    box.attach(image)
    assert box.boot().returncode == 0
    (box.home / "notes.txt").write_text("keep me\n")
    box.reboot()
    assert box.boot().returncode == 0
    assert len(cloud.calls("mkfs.ext4")) == 1
    assert (box.home / "notes.txt").read_text() == "keep me\n"


def test_a_volume_without_signature_but_with_data_is_not_formatted(cloud: Cloud) -> None:
    image = cloud.volume()
    with image.open("r+b") as f:
        f.seek(4096)
        f.write(b"someone's data")
    box = cloud.instance()
    box.attach(image)
    result = box.boot()
    assert result.returncode == 1
    assert cloud.calls("mkfs.ext4") == []
    assert "not blank" in box.motd.read_text()


def test_a_volume_with_a_partition_table_is_not_formatted(cloud: Cloud) -> None:
    image = cloud.volume()
    image.with_name(image.name + ".pttype").write_text("gpt\n")
    box = cloud.instance()
    box.attach(image)
    assert box.boot().returncode == 1
    assert cloud.calls("mkfs.ext4") == []
    assert "partition table" in box.motd.read_text()


def test_a_device_blkid_cannot_read_is_not_formatted(cloud: Cloud) -> None:
    box = cloud.instance()
    box.attach(cloud.volume())
    assert box.boot(FAKE_BLKID_STATUS="4").returncode == 1
    assert cloud.calls("mkfs.ext4") == []
    assert "blkid could not read" in box.motd.read_text()


def test_tag_added_after_launch_is_waited_for(cloud: Cloud) -> None:
    cloud.imds.tag_misses = 3
    box = cloud.instance()
    box.attach(cloud.volume())
    result = box.boot()
    assert result.returncode == 0, result.stderr
    tag_reads = [r for r in cloud.imds.requests if r.endswith("devbox:volume")]
    assert len(tag_reads) == 4


def test_metadata_is_read_with_an_imdsv2_token(cloud: Cloud) -> None:
    box = cloud.instance()
    box.attach(cloud.volume())
    assert box.boot().returncode == 0
    assert cloud.imds.requests[:2] == ["PUT /latest/api/token", "GET /latest/meta-data/tags/instance/devbox:volume"]


def test_volume_attached_after_boot_starts_is_waited_for(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    attach = threading.Timer(1.0, box.attach, args=(image,))
    attach.start()
    try:
        result = box.boot(timeout_s=10)
    finally:
        attach.join()
    assert result.returncode == 0, result.stderr
    assert box.home.resolve() == files_on(image)


def test_xen_device_name_is_used_without_an_nvme_link(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    box.attach(image, nitro=False)
    assert box.boot().returncode == 0
    assert cloud.calls("mount") == [f"mount {image} {box.home}"]


def test_another_volume_on_nvme_is_not_taken_for_the_data_volume(cloud: Cloud) -> None:
    box = cloud.instance()
    box.attach(cloud.volume("vol-0aaaaaaaaaaaaaaaa"))
    assert box.boot(timeout_s=1).returncode == 1
    assert cloud.calls("mount") == []


# --- no volume: boot goes on, with a warning ---------------------------------------------------------


def test_volume_never_attached_times_out_and_leaves_a_warning(cloud: Cloud) -> None:
    box = cloud.instance()
    started = time.monotonic()
    result = box.boot(timeout_s=1)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    banner = box.motd.read_text()
    assert "the data volume is NOT mounted" in banner
    assert f"{VOLUME_ID} was not attached within 1 s" in banner
    assert stat.S_IMODE(box.motd.stat().st_mode) == 0o644  # pam_motd reads it as the user logging in
    assert not box.home.is_symlink()
    assert any("logger -p user.warning" in call and VOLUME_ID in call for call in cloud.calls("logger"))
    assert "WARNING" in box.log()
    # sshd still gets host keys.
    assert set(box.host_keys()) >= {"ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"}


def test_instance_never_tagged_times_out(cloud: Cloud) -> None:
    cloud.imds.volume_tag = None
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    assert "no devbox:volume tag after 1 s" in box.motd.read_text()


def test_malformed_tag_falls_back_without_waiting(cloud: Cloud) -> None:
    cloud.imds.volume_tag = "vol-../../sda"
    box = cloud.instance()
    started = time.monotonic()
    assert box.boot(timeout_s=30).returncode == 1
    assert time.monotonic() - started < 10
    assert "not a volume id" in box.motd.read_text()


def test_warning_is_gone_once_a_later_boot_mounts_the_volume(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    box.reboot()
    box.attach(image)
    assert box.boot().returncode == 0
    assert not box.motd.exists()


# --- SSH host keys -------------------------------------------------------------------------------------


def test_host_keys_are_saved_to_the_volume_on_its_first_boot(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    box.attach(image)
    assert box.boot().returncode == 0
    saved = files_on(image) / ".devbox-host-keys"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o700
    assert {p.name: p.read_bytes() for p in sorted(saved.iterdir())} == box.host_keys()
    assert len(box.host_keys()) == 6


def test_host_keys_come_back_on_a_new_root_disk(cloud: Cloud) -> None:
    image = cloud.volume()
    first = cloud.instance("i-first")
    first.attach(image)
    assert first.boot().returncode == 0
    keys = first.host_keys()
    # Relaunch: a new instance and root disk, which happens to hold keys of its own.
    second = cloud.instance("i-second")
    (second.root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("a key of the new root\n")
    (second.root / "etc" / "ssh" / "ssh_host_dsa_key").write_text("another\n")
    second.attach(image)
    result = second.boot()
    assert result.returncode == 0, result.stderr
    assert second.host_keys() == keys
    private = second.root / "etc" / "ssh" / "ssh_host_ed25519_key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "restored the SSH host keys" in second.log()
    assert cloud.calls("ssh-keygen") == [f"ssh-keygen -A -f {first.root}"]


def test_host_keys_baked_into_the_image_are_never_kept(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    (box.root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("every instance of the image has this\n")
    box.attach(image)
    assert box.boot().returncode == 0
    saved = files_on(image) / ".devbox-host-keys" / "ssh_host_ed25519_key"
    assert "every instance" not in saved.read_text()
    assert box.host_keys()["ssh_host_ed25519_key"] == saved.read_bytes()


def test_host_keys_of_a_boot_without_the_volume_are_the_ones_saved(cloud: Cloud) -> None:
    # A client may have accepted them already; the next boot with the volume keeps them.
    image = cloud.volume()
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    keys = box.host_keys()
    box.reboot()
    box.attach(image)
    assert box.boot().returncode == 0
    assert box.host_keys() == keys
    assert {p.name: p.read_bytes() for p in sorted((files_on(image) / ".devbox-host-keys").iterdir())} == keys


def test_host_keys_stay_the_same_across_a_reboot(cloud: Cloud) -> None:
    box = cloud.instance()
    box.attach(cloud.volume())
    assert box.boot().returncode == 0
    keys = box.host_keys()
    box.reboot()
    assert box.boot().returncode == 0
    assert box.host_keys() == keys


def test_half_saved_host_keys_are_saved_again(cloud: Cloud) -> None:
    image = cloud.volume(fstype="ext4")
    (files_on(image) / ".devbox-host-keys.partial").mkdir()
    (files_on(image) / ".devbox-host-keys").mkdir()  # no keys inside
    box = cloud.instance()
    box.attach(image)
    assert box.boot().returncode == 0
    saved = files_on(image) / ".devbox-host-keys"
    assert {p.name: p.read_bytes() for p in sorted(saved.iterdir())} == box.host_keys() != {}
    assert not (files_on(image) / ".devbox-host-keys.partial").exists()


# --- the user's login ----------------------------------------------------------------------------------


def test_new_root_leaves_the_default_user_to_cloud_init(cloud: Cloud) -> None:
    image = cloud.volume(fstype="ext4")
    (files_on(image) / "ubuntu" / ".ssh").mkdir(parents=True)
    (files_on(image) / "ubuntu" / ".ssh" / "authorized_keys").write_text("ssh-rsa AAAAB3OldKey laptop\n")
    box = cloud.instance()
    box.attach(image)
    assert box.boot().returncode == 0
    # The user does not exist yet: cloud-init's users_groups and ssh modules run after bootcmd.
    assert (box.home / "ubuntu" / ".ssh" / "authorized_keys").read_text() == "ssh-rsa AAAAB3OldKey laptop\n"
    box.cloud_init_creates_the_default_user()
    assert (box.home / "ubuntu" / ".ssh" / "authorized_keys").read_text().splitlines() == [
        "ssh-rsa AAAAB3OldKey laptop", LOGIN_KEY]


def test_reboot_after_a_boot_without_the_volume_still_lets_the_user_log_in(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    box.cloud_init_creates_the_default_user()  # on the root disk; never again on this instance
    box.reboot()
    box.attach(image)
    result = box.boot()
    assert result.returncode == 0, result.stderr
    home = files_on(image) / "ubuntu"
    assert (home / ".bashrc").read_text() == "# skel\n"
    assert (home / ".ssh" / "authorized_keys").read_text() == LOGIN_KEY + "\n"
    assert stat.S_IMODE((home / ".ssh" / "authorized_keys").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700
    assert (home / ".ssh" / "authorized_keys").stat().st_uid == os.getuid()


def test_login_key_is_added_once_after_the_boot_without_the_volume(cloud: Cloud) -> None:
    image = cloud.volume(fstype="ext4")
    (files_on(image) / "ubuntu" / ".ssh").mkdir(parents=True)
    (files_on(image) / "ubuntu" / ".ssh" / "authorized_keys").write_text(LOGIN_KEY + "\n")
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    box.cloud_init_creates_the_default_user()
    box.reboot()
    box.attach(image)
    assert box.boot().returncode == 0
    keys = files_on(image) / "ubuntu" / ".ssh" / "authorized_keys"
    assert keys.read_text() == LOGIN_KEY + "\n"
    # The user takes the key out; later boots leave that alone, as cloud-init does.
    keys.write_text("")
    box.reboot()
    assert box.boot().returncode == 0
    assert keys.read_text() == ""


# --- ~/.devbox/on-new-root --------------------------------------------------------------------------


def give_user_script(box: Instance, body: str, mode: int = 0o755) -> Path:
    script = box.home / "ubuntu" / ".devbox" / "on-new-root"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(mode)
    return script


def booted(cloud: Cloud, image: Path, name: str) -> Instance:
    box = cloud.instance(name)
    box.attach(image)
    assert box.boot().returncode == 0
    box.cloud_init_creates_the_default_user()
    return box


def test_user_script_runs_once_per_root_disk_and_is_logged(cloud: Cloud) -> None:
    image = cloud.volume()
    box = booted(cloud, image, "i-first")
    give_user_script(box, 'echo "setting up in $PWD as HOME=$HOME"\necho ran >>"$DEVBOX_HOME/runs"\n')
    for _ in range(2):
        assert box.run("on-new-root").returncode == 0
        box.reboot()
        assert box.boot().returncode == 0
    assert (files_on(image) / "ubuntu" / "runs").read_text() == "ran\n"
    log = box.log("devbox-on-new-root")
    assert f"setting up in {box.root}/home/ubuntu as HOME=/root" in log
    assert "already" in log
    # A relaunch: new root disk, same volume.
    second = booted(cloud, image, "i-second")
    assert second.run("on-new-root").returncode == 0
    assert (files_on(image) / "ubuntu" / "runs").read_text() == "ran\nran\n"


def test_user_script_waits_for_a_boot_with_the_volume(cloud: Cloud) -> None:
    image = cloud.volume()
    box = cloud.instance()
    assert box.boot(timeout_s=1).returncode == 1
    assert box.run("on-new-root").returncode == 0
    assert "not mounted" in box.log("devbox-on-new-root")
    box.reboot()
    box.attach(image)
    assert box.boot().returncode == 0
    box.cloud_init_creates_the_default_user()
    give_user_script(box, 'echo ran >>"$DEVBOX_HOME/runs"\n')
    assert box.run("on-new-root").returncode == 0
    assert (files_on(image) / "ubuntu" / "runs").read_text() == "ran\n"


def test_without_a_user_script_the_root_disk_is_marked_done(cloud: Cloud) -> None:
    box = booted(cloud, cloud.volume(), "i-first")
    assert box.run("on-new-root").returncode == 0
    assert "nothing to run" in box.log("devbox-on-new-root")
    give_user_script(box, 'echo ran >>"$DEVBOX_HOME/runs"\n')
    assert box.run("on-new-root").returncode == 0
    assert not (box.home / "ubuntu" / "runs").exists()


def test_failing_user_script_is_reported(cloud: Cloud) -> None:
    box = booted(cloud, cloud.volume(), "i-first")
    give_user_script(box, "echo 'apt-get: no network' >&2\nexit 3\n")
    result = box.run("on-new-root")
    assert result.returncode == 3
    log = box.log("devbox-on-new-root")
    assert "apt-get: no network" in log
    assert "exited with status 3" in log
    assert any("exited with status 3" in call for call in cloud.calls("logger"))


@pytest.mark.parametrize("mode, why", [(0o775, "writable by its group"), (0o644, "not an executable file")])
def test_user_script_that_is_unsafe_or_not_executable_is_not_run(cloud: Cloud, mode: int, why: str) -> None:
    box = booted(cloud, cloud.volume(), "i-first")
    give_user_script(box, 'echo ran >>"$DEVBOX_HOME/runs"\n', mode=mode)
    assert box.run("on-new-root").returncode == 1
    assert not (box.home / "ubuntu" / "runs").exists()
    assert why in box.log("devbox-on-new-root")


def test_per_boot_hook_starts_the_runner_without_waiting_for_it(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    env = {"PATH": f"{FAKES}:/usr/bin:/bin", "FAKE_CALLS": str(calls)}
    subprocess.run(["/bin/sh", str(HOOK)], env=env, check=True, timeout=30)
    call = calls.read_text().split()
    assert call[0] == "systemd-run"
    assert "--no-block" in call
    assert call[-2:] == ["/usr/local/sbin/devbox-data-volume", "on-new-root"]


# --- real blkid, mkfs.ext4, mount and ssh-keygen on a loop device (root only) ---------------------------


def _loop_device(image: Path) -> Optional[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    found = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture
def loop_volume(cloud: Cloud) -> Iterator[str]:
    image = cloud.volume()
    device = _loop_device(image)
    if device is None:
        pytest.skip("needs root and a free loop device")
    yield device
    for home in cloud.tmp.glob("*/home"):
        subprocess.run(["umount", str(home)], capture_output=True, timeout=30)
    subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30)


def test_real_tools_make_ext4_once_mount_it_and_keep_the_host_keys(cloud: Cloud, loop_volume: str) -> None:
    only_logger = cloud.tmp / "bin"
    only_logger.mkdir()
    (only_logger / "logger").symlink_to(FAKES / "logger")
    path = f"{only_logger}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    box = cloud.instance()
    (box.root / "dev" / "disk" / "by-id" / f"nvme-Amazon_Elastic_Block_Store_vol{VOLUME_ID[4:]}").symlink_to(
        loop_volume)
    result = box.boot(timeout_s=20, PATH=path)
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(["blkid", "-p", "-o", "export", loop_volume], capture_output=True, text=True, timeout=30)
    assert "TYPE=ext4" in probe.stdout.splitlines()
    assert "LABEL=devbox-home" in probe.stdout.splitlines()
    assert subprocess.run(["mountpoint", "-q", str(box.home)], timeout=30).returncode == 0
    (box.home / "notes.txt").write_text("keep me\n")
    keys = box.host_keys()
    assert len(keys) == 6
    subprocess.run(["umount", str(box.home)], check=True, timeout=30)
    # A relaunch: a new root disk, the same volume.
    second = cloud.instance("i-second")
    (second.root / "dev" / "disk" / "by-id" / f"nvme-Amazon_Elastic_Block_Store_vol{VOLUME_ID[4:]}").symlink_to(
        loop_volume)
    result = second.boot(timeout_s=20, PATH=path)
    assert result.returncode == 0, result.stderr
    assert (second.home / "notes.txt").read_text() == "keep me\n"
    assert second.host_keys() == keys
    assert "keeping it" in second.log()


# --- the script itself -------------------------------------------------------------------------------


def test_unknown_command_prints_usage(cloud: Cloud) -> None:
    result = cloud.instance().run("mount-it")
    assert result.returncode == 2
    assert "usage: devbox-data-volume boot | on-new-root" in result.stderr


def test_scripts_are_executable_posix_shell() -> None:
    for script in (SCRIPT, HOOK):
        assert os.access(script, os.X_OK)
        assert script.read_text().startswith("#!/bin/sh\n")


def shellcheck() -> "str | None":
    """shellcheck from the virtualenv (requirements-dev.txt pins it), else from PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    fakes = [p for p in FAKES.iterdir() if p.name != "README"]
    result = subprocess.run([str(shellcheck()), "-s", "sh", str(SCRIPT), str(HOOK), *map(str, fakes)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
