"""Boot the worker's user-data with the real cloud-init stages into a worker that extracts a real
scene from the test RabbitMQ, without a VM and without touching this machine.

The user-data is exactly what the OpenStack driver posts to Nova for a server (``server_userdata``,
install mode ``preinstalled``). The "image" is this machine's root file system seen through an
overlay, with one pre-baked addition: ``/opt/cbmflow/venv`` pointing at this checkout's venv.

Sandbox (docs/provisioning.md and the reference's mandatory rules; every mount is made inside
private namespaces and vanishes with them):

* ``unshare --mount --uts --pid --fork --kill-child --propagation private``: a private UTS namespace
  (cloud-init's hostname handling can only ever rename the sandbox) and ``preserve_hostname: true``
  as the second guard; ``meta-data`` has an instance-id and no host name.
* A tmpfs on the empty scratch directory holds the overlay's upper and work directories, and the
  overlay ``lowerdir=/`` is the sandbox root: every write of cloud-init and the worker lands in that
  tmpfs. The real root is never the target of anything.
* Stricter than binding the host's ``/proc``, ``/dev`` and ``/sys``: the sandbox gets a fresh
  ``/proc`` of its own PID namespace (it sees only its own processes), a tmpfs ``/dev`` with only
  null, zero, full, random, urandom and tty (no console, no disks, no ``/dev/log``, so nothing
  reaches the host's console or syslog), ``/sys`` bound read-only, and a tmpfs ``/run`` (no host
  sockets, no ``/run/systemd/system``, so the launcher starts the worker without systemd).
* The only outside resource used is the test broker and database on 127.0.0.1 (the network
  namespace is shared for that reason, and the network config module is disabled).
* The script first checks that its UTS and mount namespaces differ from the test's, and refuses to
  do anything otherwise.
* Teardown: the test SIGKILLs ``unshare``; ``--kill-child`` SIGKILLs the namespace's init, the kernel
  then kills every process of the PID namespace (the worker included), the mount namespace and its
  mounts go with them, and the scratch directory is removed empty. ``unshare`` itself dies with the
  test process (``PR_SET_PDEATHSIG``), so even a killed pytest leaves nothing running.

Afterwards the test checks that the host name and the parts of ``/etc`` that cloud-init modules
write are byte-for-byte unchanged, and that none of the files the boot wrote exist on the host.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from card.testworld import generate
from catalog_watcher.service import watch_once
from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.dev.verify import verify_truth
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import BusSettings, ProvisionSettings, WatchSettings
from provisioner.service import server_userdata
from provisioner.userdata import ENV_PATH, LAUNCHER_PATH, LOG_PATH, UNIT_PATH, VENV_DIR, parse_worker_launch

VENV = Path(sys.executable).parent.parent
REQUIRED = ("/usr/bin/cloud-init", "/usr/bin/unshare", "/usr/sbin/chroot", "/usr/bin/mount", "/usr/bin/mknod")
# What cloud-init's modules write in /etc on a real boot; the host's copies must not change.
HOST_WATCHED = [
    "/etc/hostname", "/etc/hosts", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/fstab",
    "/etc/sudoers.d", "/etc/ssh", "/etc/cloud", "/etc/systemd/system", "/etc/default", "/etc/timezone",
    "/etc/apt/sources.list", "/etc/apt/apt.conf.d",
]  # fmt: skip
# What the boot writes; none of it may appear on the host.
BOOT_WRITES = [ENV_PATH, LAUNCHER_PATH, UNIT_PATH, "/opt/cbmflow", "/var/lib/cloud", LOG_PATH,
               "/etc/cloud/cloud.cfg.d/99-sandbox.cfg"]  # fmt: skip

SANDBOX_CFG = """\
datasource_list: [NoCloud, None]
network: {config: disabled}
locale: false
preserve_hostname: true
growpart: {mode: 'off'}
resize_rootfs: false
"""

# Runs as the init of the new PID namespace, inside the new mount and UTS namespaces.
SANDBOX_SH = r"""
set -euo pipefail
SB=$1 SEED=$2 NAME=$3 VENV=$4 HOST_NS=$5 R=$1/root
# Refuse to touch anything unless the UTS and mount namespaces really are private.
if [ "$(readlink /proc/self/ns/uts)" = "${HOST_NS% *}" ] || [ "$(readlink /proc/self/ns/mnt)" = "${HOST_NS#* }" ]; then
  echo "SANDBOX-ERROR not in private UTS and mount namespaces"; exit 91
fi
hostname "$NAME"
mount -t tmpfs -o size=1g,mode=0700 cbmflow-sandbox "$SB"
mkdir "$SB/upper" "$SB/wd" "$R"
if ! err=$(mount -t overlay cbmflow-sandbox-root -o "lowerdir=/,upperdir=$SB/upper,workdir=$SB/wd" "$R" 2>&1); then
  if command -v fuse-overlayfs >/dev/null; then
    fuse-overlayfs -o "lowerdir=/,upperdir=$SB/upper,workdir=$SB/wd" "$R"
  else
    echo "SANDBOX-ERROR overlay mount refused ($err) and fuse-overlayfs is not installed"; exit 90
  fi
fi
mount -t proc proc "$R/proc"
mount --bind /sys "$R/sys"
mount -o remount,bind,ro "$R/sys"
mount -t tmpfs -o mode=0755 cbmflow-sandbox-dev "$R/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  IFS=: read -r dev major minor <<<"$node"
  mknod -m 666 "$R/dev/$dev" c "$major" "$minor"
done
ln -s /proc/self/fd "$R/dev/fd"
mkdir "$R/dev/shm" "$R/dev/pts"
mount -t tmpfs -o mode=0755 cbmflow-sandbox-run "$R/run"
mkdir -p "$R/var/lib/cloud/seed/nocloud" "$R/etc/cloud/cloud.cfg.d" "$R/opt/cbmflow"
cp "$SEED/user-data" "$SEED/meta-data" "$R/var/lib/cloud/seed/nocloud/"
cp "$SEED/sandbox.cfg" "$R/etc/cloud/cloud.cfg.d/99-sandbox.cfg"
ln -s "$VENV" "$R/opt/cbmflow/venv"   # the pre-baked image
ci() { chroot "$R" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
       HOME=/root LANG=C.UTF-8 /usr/bin/cloud-init "$@"; }
ci init --local
ci init
ci modules --mode=config
ci modules --mode=final
echo "FACT status=$(ci status | sed -n 's/^status: //p')"
echo "FACT hostname=$(hostname)"
echo "FACT env_mode=$(stat -c '%a %U:%G' "$R/etc/cbmflow/worker.env")"
for f in etc/cbmflow/worker.env opt/cbmflow/bin/cbmflow-worker etc/systemd/system/cbmflow-worker.service \
         etc/cloud/cloud.cfg.d/99-sandbox.cfg var/lib/cloud/instance; do
  if [ -e "$SB/upper/$f" ] || [ -L "$SB/upper/$f" ]; then echo "FACT upper=$f"; fi
done
echo "FACT default_user=$(grep -c '^debian:' "$R/etc/passwd" || true)"
# the sandbox's own /proc: only its PID namespace ([c] keeps grep from matching itself)
echo "FACT worker_pids=$(cd "$R/proc" && grep -l -s -a 'bin/[c]bmflow' [0-9]*/cmdline | cut -d/ -f1 | xargs)"
echo READY
exec tail -n +1 -F "$R/var/log/cbmflow-worker.log"
"""

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _host_namespaces() -> str:
    """'uts:[inode] mnt:[inode]' of this process, which the sandbox script must not share."""
    return f"{os.readlink('/proc/self/ns/uts')} {os.readlink('/proc/self/ns/mnt')}"


def _require_sandbox_tools(*visible: Path) -> None:
    """Fail (never skip) with what is missing, so a CI machine cannot pass without this test."""
    problems = []
    root_dev = os.stat("/").st_dev
    for path in visible:
        if os.stat(path).st_dev != root_dev:
            problems.append(
                f"{path} is on another mount than /, and the sandbox's overlay of / cannot see other mounts "
                "(binding host paths into the sandbox is not allowed): run the tests from a checkout on the root "
                "file system, with TMPDIR on it too"
            )
    if os.geteuid() != 0:
        problems.append("the boot test needs root (mount and PID namespaces, mknod, chroot)")
    problems += [f"{path} is missing" for path in REQUIRED if not Path(path).exists()]
    if "overlay" not in Path("/proc/filesystems").read_text() and shutil.which("fuse-overlayfs") is None:
        problems.append("the kernel has no overlay file system and fuse-overlayfs is not installed")
    if problems:
        pytest.fail(
            "cannot boot the worker user-data in a sandbox: " + "; ".join(problems)
            + " (Debian packages: cloud-init, util-linux, coreutils; optionally fuse-overlayfs)",
            pytrace=False,
        )  # fmt: skip


def _fingerprint(paths: list[str]) -> dict[str, str]:
    """Content hashes (and modes) of files, recursively; '-' for absent paths."""
    out: dict[str, str] = {}
    for top in paths:
        base = Path(top)
        if not base.exists():
            out[top] = "-"
            continue
        files = [base] if not base.is_dir() else sorted(p for p in base.rglob("*") if not p.is_dir())
        for p in files:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = f"{p.stat().st_mode:o}:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment contains ``marker`` (the sandbox worker's unique id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Sandbox:
    def __init__(self, scratch: Path, seed: Path, hostname: str) -> None:
        self.scratch = scratch
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--propagation", "private",
             "bash", "-c", SANDBOX_SH, "sandbox", str(scratch), str(seed), hostname, str(VENV), _host_namespaces()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return False
                continue
            self.output.append(line)
            if line == marker:
                return True
        return False

    def drain_output(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get_nowait())
        return "\n".join(self.output[-150:])

    def facts(self) -> dict[str, list[str]]:
        facts: dict[str, list[str]] = {}
        for line in self.output:
            if line.startswith("FACT "):
                key, _, value = line[5:].partition("=")
                facts.setdefault(key, []).append(value)
        return facts

    def teardown(self) -> None:
        # unshare --fork ignores SIGTERM while it waits for its child, so it is killed outright;
        # --kill-child then SIGKILLs the namespace's init, and the kernel the rest of the namespace.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def host_snapshot() -> Iterator[tuple[str, dict[str, str]]]:
    yield socket.gethostname(), _fingerprint(HOST_WATCHED)


def _scene(dsn: str) -> tuple[str, int]:
    with db.transaction(dsn) as cur:
        cur.execute("SELECT status, rows_written FROM scenes")
        [(status, rows)] = cur.fetchall()
    return str(status), int(rows or 0)


def test_userdata_boots_into_a_worker_that_extracts_a_real_scene(
    cbm_env: object, pg_dsn: str, tmp_path: Path, host_snapshot: tuple[str, dict[str, str]]
) -> None:
    _require_sandbox_tools(VENV, tmp_path)
    host_name, host_files = host_snapshot
    host_boot_writes = {p: Path(p).exists() for p in BOOT_WRITES}
    assert not any(host_boot_writes.values()), f"this host already has worker files: {host_boot_writes}"

    # a real job: one S2 L2A scene over 25 parcels, queued by the watcher
    world = tmp_path / "world"
    generate(world, parcels=25, scenes=1, seed=11, aoi_name="ms", year=2024)
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world / "aoi.geojson")
        import_parcels(cur, world / "parcels.gpkg", "ms", 2024)
    report = watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world / "stac" / "catalog.json"),
                                                           lookback_days=0))  # fmt: skip
    assert report.published == 1
    bus = BusSettings()
    conn = busmod.connect(bus)
    try:
        assert busmod.passive_depth(conn.channel(), bus) == (1, 0), "one ready job, no consumer yet"
    finally:
        conn.close()

    # exactly what the OpenStack driver would post for a server of this name
    name = f"cbmflow-sandbox-{secrets.token_hex(4)}"
    # of an extraction pool: its workers consume ExtractParcels jobs only
    pool = ProvisionSettings(driver="openstack", install="preinstalled", pool="extract", job_kinds=["ExtractParcels"])
    userdata = server_userdata(pool, name)
    env, command = parse_worker_launch(userdata)
    assert env["CBMFLOW_WORKER_ID"] == name and command == [f"{VENV_DIR}/bin/cbmflow", "worker"]
    assert env["CBMFLOW_WORKER_JOB_KINDS"] == '["ExtractParcels"]'
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "user-data").write_text(userdata)
    (seed / "meta-data").write_text(f"instance-id: iid-{name}\n")
    (seed / "sandbox.cfg").write_text(SANDBOX_CFG)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    sandbox = Sandbox(scratch, seed, name)
    try:
        booted = sandbox.wait_for("READY", 120)
        assert booted, f"cloud-init did not finish in the sandbox:\n{sandbox.drain_output()}"
        facts = sandbox.facts()
        assert facts["status"] == ["done"], sandbox.drain_output()
        assert facts["hostname"] == [name], "the sandbox has its own host name"
        assert facts["env_mode"] == ["600 root:root"], "the secrets file is 0600 root"
        assert set(facts["upper"]) == {
            "etc/cbmflow/worker.env",
            "opt/cbmflow/bin/cbmflow-worker",
            "etc/systemd/system/cbmflow-worker.service",
            "etc/cloud/cloud.cfg.d/99-sandbox.cfg",
            "var/lib/cloud/instance",
        }, "everything the boot wrote is in the overlay's upper directory"
        assert facts["default_user"] == ["1"], "cloud-init really ran its modules (it added the image's user)"
        assert facts["worker_pids"] != [""], "runcmd started the worker (without systemd)"

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _scene(pg_dsn)[0] != "extracted":
            time.sleep(0.5)
        status, rows = _scene(pg_dsn)
        assert status == "extracted" and rows > 0, f"scene {status}:\n{sandbox.drain_output()}"
        with db.transaction(pg_dsn) as cur:
            cur.execute("SELECT host, state FROM workers WHERE id = %s", (name,))
            host, state = cur.fetchone()
        assert host == name, "the worker ran inside the sandbox (its host name is the sandbox's)"
        assert state in ("idle", "busy")
        deadline = time.monotonic() + 30  # the management API samples every ~5 s
        while time.monotonic() < deadline and busmod.queue_depth(bus).backlog != 0:
            time.sleep(1)
        depth = busmod.queue_depth(bus)
        assert (depth.backlog, depth.dead_lettered) == (0, 0), "acked (not even unacked), nothing dead-lettered"
        conn = busmod.connect(bus)
        try:
            assert busmod.passive_depth(conn.channel(), bus) == (0, 1), "the sandbox worker still consumes"
        finally:
            conn.close()
        assert verify_truth(pg_dsn, world / "truth.csv", "ms", 2024).ok
        assert _processes_with(f"CBMFLOW_WORKER_ID={name}"), "the worker is visible from the host while it runs"
    finally:
        sandbox.teardown()

    assert sandbox.proc.returncode is not None
    deadline = time.monotonic() + 10  # the kernel reaps the namespace asynchronously after its init died
    while _processes_with(f"CBMFLOW_WORKER_ID={name}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(f"CBMFLOW_WORKER_ID={name}") == [], "a sandbox process outlived the teardown"
    scratch.rmdir()  # empty on the host: the tmpfs and the overlay lived only in the namespace
    assert socket.gethostname() == host_name
    assert _fingerprint(HOST_WATCHED) == host_files, "the host's /etc changed"
    assert {p: Path(p).exists() for p in BOOT_WRITES} == host_boot_writes, "boot files leaked onto the host"
