"""Provisioner: user-data checked by the real cloud-init validator and read back by sh, the local
driver booting, listing, draining and deleting real processes, and the CLI around them.
(The control law has its own file, test_provisioner_policy.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cbmflow import db
from cbmflow.errors import ConfigError, InvalidInputError
from cbmflow.settings import ProvisionSettings
from provisioner.cli import provision_app
from provisioner.drivers.local import LocalDriver, local_worker_command
from provisioner.service import scale_once
from provisioner.userdata import (
    ENV_PATH,
    EXAMPLE_FILES,
    INSTALL_MODES,
    LAUNCHER_PATH,
    UNIT_PATH,
    example_userdata,
    parse_worker_launch,
    render_userdata,
    worker_env,
)

REPO = Path(__file__).resolve().parents[2]
CLOUD_INIT = "/usr/bin/cloud-init"
ENV = {
    "CBMFLOW_DB_DSN": 'postgresql://cbm:p%27a$s w\\o"rd#1@db.internal:5432/cbm?sslmode=require',
    "CBMFLOW_BUS_AMQP_URL": "amqp://cbm:secret@mq.internal:5672/cbmflow%2Fprod",
    "CBMFLOW_BUS_MANAGEMENT_URL": "http://cbm:secret@mq.internal:15672",
    "CBMFLOW_WORKER_STOP_DEADLINE_S": "900",
    "CBMFLOW_LOG_LEVEL": "DEBUG",
    "CBMFLOW_STORE_URL": " leading space and ünïcode ",
}
SLEEPER = [sys.executable, "-c", "import os,time; print(os.environ['CBMFLOW_WORKER_ID'], flush=True); time.sleep(30)"]


# ---- user-data -----------------------------------------------------------------------------------


def _cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    if not Path(CLOUD_INIT).exists():
        pytest.fail(
            f"{CLOUD_INIT} is missing: user-data must be checked by the real validator; "
            "install it with `apt-get install cloud-init` (Debian package, not on PyPI)",
            pytrace=False,
        )
    return subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=60
    )


def _render(install: str, **kwargs: object) -> str:
    wheel_url = "https://repo.internal/cbmflow-0.1.0-py3-none-any.whl" if install == "wheel" else ""
    return render_userdata(ENV, install=install, wheel_url=wheel_url, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("install", INSTALL_MODES)
def test_every_variant_passes_the_real_cloud_init_schema(install: str, tmp_path: Path) -> None:
    path = tmp_path / f"{install}.yaml"
    path.write_text(_render(install))
    result = _cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_the_validator_really_rejects_a_broken_document(tmp_path: Path) -> None:
    doc = yaml.safe_load(_render("preinstalled"))
    doc["write_files"][0]["permissions"] = 0o600  # an int: the classic mistake
    path = tmp_path / "broken.yaml"
    path.write_text("#cloud-config\n" + yaml.safe_dump(doc))
    result = _cloud_init_schema(path)
    assert result.returncode != 0
    assert "permissions" in result.stdout + result.stderr


def test_rendered_document_layout() -> None:
    doc = yaml.safe_load(_render("wheel", index_url="ignored"))
    files = {f["path"]: f for f in doc["write_files"]}
    assert files[ENV_PATH]["permissions"] == "0600" and files[ENV_PATH]["owner"] == "root:root"
    assert files[LAUNCHER_PATH]["permissions"] == "0755"
    unit = files[UNIT_PATH]["content"]
    for line in (
        f"EnvironmentFile={ENV_PATH}",
        f"ExecStart={LAUNCHER_PATH}",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=960",  # the worker's 900 s stop deadline plus slack
    ):
        assert line in unit.splitlines()
    assert doc["packages"] == ["python3-venv"]
    assert ["python3", "-m", "venv", "/opt/cbmflow/venv"] in doc["runcmd"]
    assert doc["runcmd"][-1].startswith("if [ -d /run/systemd/system ]")
    assert "packages" not in yaml.safe_load(_render("preinstalled"))
    index = yaml.safe_load(_render("index", index_url="https://pypi.internal/simple"))
    assert index["runcmd"][-2][-3:] == ["--index-url", "https://pypi.internal/simple", "cbmflow[worker]"]
    # a VM gets the worker extra only: pip takes extras with a wheel URL as a direct reference
    assert doc["runcmd"][-2][-1] == "cbmflow[worker] @ https://repo.internal/cbmflow-0.1.0-py3-none-any.whl"
    local = yaml.safe_load(
        render_userdata(ENV, install="wheel", wheel_url="/srv/wheels/cbmflow-0.1.0-py3-none-any.whl")
    )
    assert local["runcmd"][-2][-1] == "cbmflow[worker] @ file:///srv/wheels/cbmflow-0.1.0-py3-none-any.whl"
    with pytest.raises(ConfigError, match="neither a URL nor an absolute path"):
        render_userdata(ENV, install="wheel", wheel_url="dist/cbmflow-0.1.0-py3-none-any.whl")
    with pytest.raises(ConfigError, match="wheel URL"):
        render_userdata(ENV, install="wheel")
    with pytest.raises(ConfigError, match="install must be"):
        render_userdata(ENV, install="docker")  # type: ignore[arg-type]


def test_parse_worker_launch_round_trips() -> None:
    command = [sys.executable, "-c", "print('a b')", "it's", "$HOME", "*"]
    env, parsed = parse_worker_launch(render_userdata(ENV, worker_command=command))
    assert env == ENV
    assert parsed == command
    env, parsed = parse_worker_launch(render_userdata(ENV))
    assert parsed == ["/opt/cbmflow/venv/bin/cbmflow", "worker"]


@pytest.mark.parametrize("value", ["it's", "two\nlines", "nul\0"])
def test_values_that_systemd_and_sh_would_read_differently_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError):
        render_userdata({"CBMFLOW_DB_DSN": value})
    with pytest.raises(InvalidInputError):
        render_userdata({"BAD-NAME": "x"})


def test_launcher_and_env_file_are_read_back_identically_by_sh(tmp_path: Path) -> None:
    """Runs the rendered launcher with sh (env file path redirected into tmp_path)."""
    probe = [sys.executable, "-c", "import json,os,sys; print(json.dumps([dict(os.environ), sys.argv[1:]]))", "a b"]
    doc = yaml.safe_load(render_userdata(ENV, worker_command=[*probe, "it's", "$HOME"]))
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    env_file = tmp_path / "worker.env"
    env_file.write_text(files[ENV_PATH])
    launcher = tmp_path / "launch.sh"
    launcher.write_text(files[LAUNCHER_PATH].replace(ENV_PATH, str(env_file)))
    out = subprocess.run(
        ["sh", str(launcher)], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}
    )
    assert out.returncode == 0, out.stderr
    seen_env, argv = json.loads(out.stdout)
    assert {k: seen_env[k] for k in ENV} == ENV
    assert argv == ["a b", "it's", "$HOME"]


def test_base_config_is_merged_not_replaced(tmp_path: Path) -> None:
    base = {
        "ntp": {"enabled": True},
        "runcmd": [["echo", "site first"]],
        "write_files": [{"path": "/etc/x", "content": "x"}],
    }
    text = render_userdata(ENV, base_config=base)
    doc = yaml.safe_load(text)
    assert doc["ntp"] == {"enabled": True}
    assert doc["runcmd"][0] == ["echo", "site first"]
    assert doc["write_files"][0]["path"] == "/etc/x" and len(doc["write_files"]) == 4
    path = tmp_path / "merged.yaml"
    path.write_text(text)
    assert _cloud_init_schema(path).returncode == 0
    with pytest.raises(ConfigError, match="owns"):
        render_userdata(ENV, base_config={"write_files": [{"path": ENV_PATH, "content": ""}]})


def test_worker_env_resolves_urls_and_forwards_only_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", "postgresql://x@h/db")
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", "amqp://u:p@h/v")
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", "http://u:p@h:15672")
    env = worker_env(
        {
            "CBMFLOW_WORKER_LEASE_S": "60",
            "CBMFLOW_WORKER_ID": "must-not-be-shared",
            "CBMFLOW_API_PORT": "9999",
            "CBMFLOW_LOG_LEVEL": "DEBUG",
            "HOME": "/root",
        }
    )
    # The management URL (administrator credentials) stays with the provisioner: workers never use it.
    assert env == {
        "CBMFLOW_WORKER_LEASE_S": "60",
        "CBMFLOW_LOG_LEVEL": "DEBUG",
        "CBMFLOW_DB_DSN": "postgresql://x@h/db",
        "CBMFLOW_BUS_AMQP_URL": "amqp://u:p@h/v",
    }


def test_worker_env_carries_the_worker_credentials_not_the_provisioners(monkeypatch: pytest.MonkeyPatch) -> None:
    owner_dsn, admin_url = "postgresql://owner:ownerpw@h/db", "amqp://admin:adminpw@h/v"
    monkeypatch.setenv("CBMFLOW_DB_DSN", owner_dsn)
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", admin_url)
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", "http://admin:adminpw@h:15672")
    monkeypatch.setenv("CBMFLOW_PROVISION_WORKER_DSN", "postgresql://cbmflow_worker_login:w@h/db")
    monkeypatch.setenv("CBMFLOW_PROVISION_WORKER_AMQP_URL", "amqp://cbmflow-worker:w@h/v")
    env = worker_env(dict(os.environ))
    assert env["CBMFLOW_DB_DSN"] == "postgresql://cbmflow_worker_login:w@h/db"
    assert env["CBMFLOW_BUS_AMQP_URL"] == "amqp://cbmflow-worker:w@h/v"
    text = render_userdata(env)
    for secret in ("ownerpw", "adminpw", "MANAGEMENT"):
        assert secret not in text


def test_only_remote_workers_are_warned_about_getting_the_provisioners_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """VMs must get the worker role's credentials (warned when they would not); local workers run on
    the provisioner's own machine, where its credentials already are, so the demo stays quiet."""
    from provisioner import userdata

    monkeypatch.setattr(userdata, "_WARNED", set())
    monkeypatch.setenv("CBMFLOW_DB_DSN", "postgresql://owner:pw@h/db")
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", "amqp://admin:pw@h/v")
    for name in ("CBMFLOW_PROVISION_WORKER_DSN", "CBMFLOW_PROVISION_WORKER_AMQP_URL"):
        monkeypatch.delenv(name, raising=False)
    worker_env(dict(os.environ), remote=False)
    assert "provision.worker_credentials_fallback" not in capsys.readouterr().err
    worker_env(dict(os.environ))
    assert "provision.worker_credentials_fallback" in capsys.readouterr().err


@pytest.mark.parametrize("install", INSTALL_MODES)
def test_checked_in_examples_are_current_and_valid(install: str) -> None:
    path = REPO / "cloud-init" / EXAMPLE_FILES[install]  # type: ignore[index]
    assert path.read_text() == example_userdata(install), (  # type: ignore[arg-type]
        f"regenerate: cbmflow provision render-userdata --example --install {install} > cloud-init/{path.name}"
    )
    result = _cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_preinstalled_boot_fails_loudly_when_the_image_lacks_the_worker(tmp_path: Path) -> None:
    """The check runs the very executable the launcher execs; run it as cloud-init's sh would."""
    for command, ok in (([str(tmp_path / "missing" / "cbmflow"), "worker"], False), ([sys.executable, "-V"], True)):
        doc = yaml.safe_load(render_userdata(ENV, worker_command=command))
        [probe] = [item for item in doc["runcmd"] if isinstance(item, list) and item[:2] == ["sh", "-c"]]
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert (result.returncode == 0) is ok, result.stderr
        if not ok:
            assert f"{command[0]} not found" in result.stderr


def test_render_userdata_cli_prints_to_stdout_and_warns_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", "postgresql://x@h/db")
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", "amqp://u:p@h/v")
    monkeypatch.setenv("CBMFLOW_BUS_MANAGEMENT_URL", "http://u:p@h:15672")
    result = CliRunner().invoke(provision_app, ["render-userdata", "--local"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("#cloud-config\n")
    assert "credentials" in result.stderr and "credentials" not in result.stdout
    env, command = parse_worker_launch(result.stdout)
    assert env["CBMFLOW_DB_DSN"] == "postgresql://x@h/db"
    assert command == local_worker_command()


# ---- local driver ----------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_local_driver_boots_a_process_from_userdata_lists_and_drains_it(tmp_path: Path) -> None:
    userdata = render_userdata(ENV, worker_command=SLEEPER)
    driver = LocalDriver(tmp_path / "workers", userdata=userdata, dsn=None)
    assert driver.list_workers() == []
    [worker_id] = driver.start(1)
    try:
        log = driver.log_path(worker_id)
        assert _wait(lambda: log.exists() and worker_id in log.read_text()), "the worker did not start"
        [view] = driver.list_workers()
        assert view.id == worker_id and view.state == "unknown"  # no registry reachable
        assert view.pid is not None
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{view.pid}/environ").read_text().split("\0") if "=" in item
        )
        assert environ["CBMFLOW_DB_DSN"] == ENV["CBMFLOW_DB_DSN"], "env comes from the user-data's env file"
        assert environ["CBMFLOW_WORKER_ID"] == worker_id
        # local workers share this machine's cores: one each, unless the operator said otherwise
        assert environ["CBMFLOW_WORKER_THREADS"] == os.environ.get("CBMFLOW_WORKER_THREADS", "1")
        assert os.getsid(view.pid) == view.pid, "workers run in a session of their own"

        assert driver.drain([worker_id]) == [worker_id]
        views = driver.list_workers()
        assert views == [] or views[0].state == "draining"
        assert driver.wait_gone([worker_id], 10.0) == []
        assert driver.list_workers() == []
        assert not (tmp_path / "workers" / f"{worker_id}.pid").exists()
        assert driver.drain([worker_id]) == [], "draining a gone worker is a no-op"
    finally:
        driver.down()


def test_a_recycled_pid_is_not_mistaken_for_a_worker(tmp_path: Path) -> None:
    workers = tmp_path / "workers"
    workers.mkdir()
    (workers / "local-stale.pid").write_text(f"{os.getpid()} 1\n")  # our pid, but a wrong start time
    driver = LocalDriver(workers, userdata="", dsn=None)
    assert driver.list_workers() == []
    assert driver.drain(["local-stale"]) == []
    assert not (workers / "local-stale.pid").exists()


def test_scale_uses_registry_state_and_never_drains_a_busy_worker(pg_dsn: str, tmp_path: Path) -> None:
    driver = LocalDriver(tmp_path / "workers", userdata=render_userdata(ENV, worker_command=SLEEPER), dsn=pg_dsn)
    settings = ProvisionSettings(min_workers=0, max_workers=3, per_worker=2)
    try:
        step = scale_once(settings, driver=driver, backlog=3)
        assert (step.want, step.start) == (2, 2)
        views = driver.list_workers()
        assert sorted(v.state for v in views) == ["starting", "starting"]  # no registry row yet
        busy, idle = views[0].id, views[1].id
        with db.transaction(pg_dsn) as cur:
            for worker_id, state, scene in ((busy, "busy", 7), (idle, "idle", None)):
                cur.execute(
                    "INSERT INTO workers (id, host, pid, state, current_scene) VALUES (%s, 'h', 1, %s, %s)",
                    (worker_id, state, scene),
                )
        states = {v.id: (v.state, v.current_scene) for v in driver.list_workers()}
        assert states == {busy: ("busy", 7), idle: ("idle", None)}

        assert scale_once(settings, driver=driver, backlog=3, dry_run=True).drain == []
        step = scale_once(settings, driver=driver, backlog=0)
        assert step.drain == [idle], "only the idle worker is drained"
        assert driver.wait_gone([idle], 10.0) == []
        assert [v.id for v in driver.list_workers()] == [busy]
        assert scale_once(settings, driver=driver, backlog=0).drain == [], "the busy worker is left alone"
    finally:
        driver.wait_gone(driver.down(), 10.0)


def test_the_local_worker_command_is_this_venvs_cbmflow() -> None:
    command = local_worker_command()
    assert command[-1] == "worker"
    assert shutil.which(command[0]) or Path(command[0]).exists()


def test_scale_boots_the_real_worker_from_userdata_and_drains_it(cbm_env: object) -> None:
    """The whole local path: settings → worker_env → user-data → parse → `cbmflow worker` → registry."""
    from provisioner.service import make_driver

    settings = ProvisionSettings(min_workers=0, max_workers=1, per_worker=1)
    driver = make_driver(settings)
    try:
        assert scale_once(settings, backlog=1).start == 1
        assert _wait(lambda: [w.state for w in driver.list_workers()] == ["idle"], 60.0), driver.list_workers()
        [worker] = driver.list_workers()
        assert "worker.consuming" in Path(worker.detail).read_text()
        assert scale_once(settings, backlog=0).drain == [worker.id]
        assert driver.wait_gone([worker.id], 30.0) == []
        with db.transaction(os.environ["CBMFLOW_DB_DSN"]) as cur:
            cur.execute("SELECT state FROM workers WHERE id = %s", (worker.id,))
            assert cur.fetchone() == ("stopped",), "the worker exited through its own drain path"
    finally:
        driver.down()


def test_backlog_sees_a_job_published_a_moment_ago(cbm_env: object, tmp_path: Path) -> None:
    """The management API samples every ~5 s; a control step right after a publish must still see it."""
    from cbmflow import bus as busmod
    from cbmflow.settings import BusSettings

    settings = BusSettings()
    conn = busmod.connect(settings)
    try:
        channel = conn.channel()
        busmod.declare_topology(channel, settings)
        channel.confirm_delivery()
        busmod.publish(channel, settings, b"{}", message_id="m-1", kind="ExtractParcels")
    finally:
        conn.close()
    driver = LocalDriver(tmp_path / "workers", userdata=render_userdata(ENV, worker_command=SLEEPER), dsn=None)
    step = scale_once(ProvisionSettings(min_workers=0, max_workers=2, per_worker=1), driver=driver, dry_run=True)
    assert (step.backlog, step.want, step.start) == (1, 1, 1)


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: it exits 0 even on bad settings, so any output at all is a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install it with `apt-get install systemd`", pytrace=False)
    doc = yaml.safe_load(render_userdata(ENV))
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    launcher = tmp_path / "cbmflow-worker"
    launcher.write_text(files[LAUNCHER_PATH])
    launcher.chmod(0o755)
    unit = tmp_path / "cbmflow-worker.service"
    unit.write_text(files[UNIT_PATH].replace(LAUNCHER_PATH, str(launcher)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_local_delete_kills_the_workers_whole_session(tmp_path: Path) -> None:
    """Deletion is for hung or never-registered workers: nothing they spawned may survive it."""
    spawner = [
        sys.executable,
        "-c",
        "import os,subprocess,time; p = subprocess.Popen(['sleep', '300']);"
        " print(os.environ['CBMFLOW_WORKER_ID'], p.pid, flush=True); time.sleep(300)",
    ]
    driver = LocalDriver(tmp_path / "workers", userdata=render_userdata(ENV, worker_command=spawner), dsn=None)
    [worker_id] = driver.start(1)
    log = driver.log_path(worker_id)
    assert _wait(lambda: log.exists() and len(log.read_text().split()) == 2), "the worker did not start"
    child = int(log.read_text().split()[1])
    [view] = driver.list_workers()
    assert driver.delete([worker_id]) == [worker_id]
    assert driver.list_workers() == []
    assert _wait(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()), (
        "the worker's child outlived the delete"
    )
    assert not Path(f"/proc/{view.pid}").exists()
    assert driver.delete([worker_id]) == [], "deleting a gone worker is a no-op"


def test_local_views_join_the_registry(pg_dsn: str, tmp_path: Path) -> None:
    # a worker busy with a job outlives the SIGTERM of its drain; this one ignores it to stay listed
    finishing = [
        sys.executable,
        "-c",
        "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)",
    ]
    driver = LocalDriver(tmp_path / "workers", userdata=render_userdata(ENV, worker_command=finishing), dsn=pg_dsn)
    try:
        a, b, c = driver.start(3)
        # A SIGTERM sent before the interpreter has set SIG_IGN would end it (CI's loaded 2 cores).
        deadline = time.monotonic() + 30
        while "ready" not in driver.log_path(a).read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        with db.transaction(pg_dsn) as cur:
            cur.execute("INSERT INTO workers (id, host, pid, state, current_scene) VALUES"
                        " (%s, 'h', 1, 'busy', 9), (%s, 'h', 1, 'stopped', NULL)", (a, b))  # fmt: skip
        assert driver.drain([a]) == [a]
        views = {v.id: v for v in driver.list_workers()}
        assert (views[a].state, views[a].current_scene, views[a].registered) == ("draining", 9, True)
        assert views[a].draining_since_s is not None
        assert (views[b].state, views[b].registered) == ("stopped", True)
        assert (views[c].state, views[c].registered) == ("starting", False)
        assert {v.server_status for v in views.values()} == {"running"}
    finally:
        driver.delete([w.id for w in driver.list_workers()])
