"""Worker user-data: the one description of how a worker boots, for VMs and local processes alike.

The document is built as a Python dict and dumped with ``yaml.safe_dump`` instead of being
text-templated: DSNs and passwords then can never break the YAML, the structure is what the
cloud-init schema checks, and ``parse_worker_launch`` can read the same document back. The local
driver starts its processes from that parse, so a worker that runs locally was launched from exactly
the environment and command a VM would get.

Layout on the machine:

* ``/etc/cbmflow/worker.env`` (0600, secrets): ``KEY='value'`` lines. Single-quoted values are the
  subset that systemd's ``EnvironmentFile=`` and ``sh``'s ``.`` read identically (no escapes, no
  expansion), which is why values with ``'`` or newlines are refused instead of escaped.
* ``/opt/cbmflow/bin/cbmflow-worker``: the launcher, the only place the worker command is written.
  It sources the environment file and ``exec`` s the worker, so the worker is the main process that
  receives systemd's SIGTERM.
* ``/etc/systemd/system/cbmflow-worker.service``: runs the launcher; on a machine without systemd
  (containers, the sandboxed boot test) ``runcmd`` starts the launcher directly.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal

import yaml

from cbmflow.errors import ConfigError, InvalidInputError
from cbmflow.logging import get_logger
from cbmflow.settings import BusSettings, DbSettings, ProvisionSettings, WorkerSettings

log = get_logger("provision")

ENV_PATH = "/etc/cbmflow/worker.env"
LAUNCHER_PATH = "/opt/cbmflow/bin/cbmflow-worker"
UNIT_PATH = "/etc/systemd/system/cbmflow-worker.service"
UNIT_NAME = "cbmflow-worker.service"
VENV_DIR = "/opt/cbmflow/venv"
VM_WORKER_COMMAND = (f"{VENV_DIR}/bin/cbmflow", "worker")
LOG_PATH = "/var/log/cbmflow-worker.log"
# systemd must not SIGKILL a worker that is still inside its own stop deadline (the job finishes or
# is requeued by then); this is the slack on top of it.
STOP_TIMEOUT_SLACK_S = 60
# Variables handed from the provisioner's environment to workers; CBMFLOW_WORKER_ID is not among
# them because each worker gets its own. The management URL (administrator credentials) is never
# handed over: a worker reads its queue over AMQP only.
FORWARDED_PREFIXES = ("CBMFLOW_WORKER_", "CBMFLOW_BUS_", "CBMFLOW_STORE_", "CBMFLOW_DB_")
FORWARDED_NAMES = ("CBMFLOW_LOG_LEVEL",)
PER_WORKER_NAMES = ("CBMFLOW_WORKER_ID",)
WITHHELD_NAMES = ("CBMFLOW_BUS_MANAGEMENT_URL",)
_WARNED: set[tuple[str, ...]] = set()

# What a worker VM installs: the worker's libraries only, none of the API's, cloud's or SSH's.
WORKER_REQUIREMENT = "cbmflow[worker]"

Install = Literal["preinstalled", "wheel", "index"]
INSTALL_MODES: tuple[Install, ...] = ("preinstalled", "wheel", "index")

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_LINE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)='([^'\n]*)'$")


def worker_env(environ: Mapping[str, str] | None = None, *, remote: bool = True) -> dict[str, str]:
    """The environment a worker needs: resolved connection URLs plus forwarded CBMFLOW_* settings.

    URLs are resolved here (from the local stack's record when not set) because a VM has no
    ``stack.json`` to fall back on. The worker's own credentials (``CBMFLOW_PROVISION_WORKER_DSN``,
    ``CBMFLOW_PROVISION_WORKER_AMQP_URL``) go onto the machine, not the provisioner's: a VM is the
    most exposed place a secret can be, so it gets only the worker role's. Without them the
    provisioner's own are used, with a warning when the workers are ``remote`` (VMs); local workers
    run on the provisioner's own machine with what it already holds (the demo, tests).
    """
    source = dict(os.environ if environ is None else environ)
    env = {
        k: v
        for k, v in sorted(source.items())
        if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES)
        and k not in PER_WORKER_NAMES
        and k not in WITHHELD_NAMES
    }
    provision = ProvisionSettings()
    env["CBMFLOW_DB_DSN"] = provision.worker_dsn or DbSettings().resolved_dsn()
    env["CBMFLOW_BUS_AMQP_URL"] = provision.worker_amqp_url or BusSettings().resolved_amqp_url()
    missing = [
        name
        for name, value in (
            ("CBMFLOW_PROVISION_WORKER_DSN", provision.worker_dsn),
            ("CBMFLOW_PROVISION_WORKER_AMQP_URL", provision.worker_amqp_url),
        )
        if not value
    ]
    if remote and missing and tuple(missing) not in _WARNED:
        _WARNED.add(tuple(missing))  # once per process, not at every worker a scale step starts
        log.warning(
            "provision.worker_credentials_fallback",
            unset=missing,
            hint="workers get the provisioner's own credentials; see `cbmflow db role-dsn worker`"
            " and `cbmflow bus role-url worker`",
        )
    return env


def pool_env(pool: ProvisionSettings) -> dict[str, str]:
    """What the workers of one pool get on top of ``worker_env``: the job kinds they consume (so a
    CARD VM never takes an extraction and the reverse) and the pool's own ``worker_env``.

    JSON, as pydantic-settings reads a list from the environment; compact, so the env file line
    has no space in it.
    """
    return {**pool.worker_env, "CBMFLOW_WORKER_JOB_KINDS": json.dumps(list(pool.job_kinds), separators=(",", ":"))}


def _env_file(env: Mapping[str, str]) -> str:
    lines = ["# cbmflow worker environment (secrets). KEY='value' reads the same in systemd and sh."]
    for key, value in sorted(env.items()):
        if not _ENV_KEY_RE.match(key):
            raise InvalidInputError(f"environment name {key!r} is not a valid variable name")
        if "'" in value or "\n" in value or "\r" in value or "\0" in value:
            raise InvalidInputError(
                f"value of {key} contains a quote, newline or NUL; percent-encode it (URLs and DSNs accept %27)"
            )
        lines.append(f"{key}='{value}'")
    return "\n".join(lines) + "\n"


def _launcher(command: Sequence[str]) -> str:
    return (
        "#!/bin/sh\n"
        "# Starts the cbmflow worker in the foreground; used by the systemd unit and without systemd.\n"
        "set -eu\n"
        "set -a\n"
        f". {ENV_PATH}\n"
        "set +a\n"
        f"exec {shlex.join(command)}\n"
    )


def _unit(stop_timeout_s: int) -> str:
    return (
        "[Unit]\n"
        "Description=cbmflow extraction worker\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"EnvironmentFile={ENV_PATH}\n"
        f"ExecStart={LAUNCHER_PATH}\n"
        # A drained worker exits 0 and must stay down; a crash is restarted.
        "Restart=on-failure\n"
        "RestartSec=10\n"
        # Only the worker gets SIGTERM and drains; anything left is killed after the timeout.
        "KillMode=mixed\n"
        "KillSignal=SIGTERM\n"
        f"TimeoutStopSec={stop_timeout_s}\n"
        "NoNewPrivileges=yes\n"
        "PrivateTmp=yes\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


# Runs under sh from runcmd. systemd is used only when it is PID 1 (/run/systemd/system exists);
# otherwise the launcher is detached with its output in a log file so cloud-init does not wait on it.
_START_SCRIPT = (
    "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then "
    f"systemctl daemon-reload && systemctl enable --now {UNIT_NAME}; "
    f"else nohup setsid {LAUNCHER_PATH} </dev/null >>{LOG_PATH} 2>&1 & fi"
)


def _install_commands(
    install: Install, wheel_url: str, index_url: str, package: str, command: Sequence[str]
) -> list[str | list[str]]:
    if install == "preinstalled":
        # Checks the very executable the launcher will exec, so a wrong image fails the boot here,
        # with a message in cloud-init's log, instead of as a unit that crash-loops.
        exe = shlex.quote(command[0])
        probe = f"test -x {exe}" if "/" in command[0] else f"command -v {exe} >/dev/null"
        return [
            [
                "sh",
                "-c",
                f'{probe} || {{ echo "{command[0]} not found: use an image with cbmflow '
                'baked in or render with install=wheel/index" >&2; exit 1; }',
            ]
        ]
    pip = [f"{VENV_DIR}/bin/pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
    if install == "wheel":
        if not wheel_url:
            raise ConfigError("install=wheel needs a wheel URL (CBMFLOW_PROVISION_WHEEL_URL)")
        # A PEP 508 direct reference is how pip takes extras with a wheel URL; it needs a URL, so
        # an absolute path (a wheel the image or a mount provides) becomes a file:// URL.
        if "://" not in wheel_url:
            if not wheel_url.startswith("/"):
                raise ConfigError(f"wheel URL {wheel_url!r} is neither a URL nor an absolute path")
            wheel_url = PurePosixPath(wheel_url).as_uri()
        target = [f"{package} @ {wheel_url}"]
    else:
        target = (["--index-url", index_url] if index_url else []) + [package]
    return [["python3", "-m", "venv", VENV_DIR], pip + target]


# Nova's schema caps ``user_data`` at 65 535 characters of base64 (about 48 KiB raw).
NOVA_USER_DATA_LIMIT = 65_535


def nova_user_data(text: str) -> str:
    """Base64 for Nova's ``user_data``, gzip'd first when the plain form is over Nova's limit.

    cloud-init recognises gzip by its magic bytes, so a large operator base config (CA bundles,
    many users) still boots. ``mtime=0`` keeps the encoding deterministic, so the request body of
    two renders of the same document is the same.
    """
    raw = text.encode()
    encoded = base64.b64encode(raw).decode("ascii")
    if len(encoded) <= NOVA_USER_DATA_LIMIT:
        return encoded
    encoded = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")
    if len(encoded) > NOVA_USER_DATA_LIMIT:
        raise ConfigError(
            f"user-data is {len(raw)} bytes and still {len(encoded)} base64 characters gzip'd; "
            f"Nova accepts {NOVA_USER_DATA_LIMIT}: move large files into the image or fetch them at boot"
        )
    return encoded


def resolve_install(install: str, wheel_url: str) -> Install:
    """The install mode a setting names; empty means wheel when a wheel URL is set, else a baked image."""
    mode = install or ("wheel" if wheel_url else "preinstalled")
    if mode not in INSTALL_MODES:
        raise ConfigError(f"install must be one of {', '.join(INSTALL_MODES)}, got {mode!r}")
    return mode


class _BlockDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as ``|`` blocks, so the files read as files."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str_block)


def render_userdata(
    env: Mapping[str, str],
    *,
    install: Install = "preinstalled",
    wheel_url: str = "",
    worker_command: Sequence[str] | None = None,
    index_url: str = "",
    package: str = WORKER_REQUIREMENT,
    stop_timeout_s: int | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> str:
    """The ``#cloud-config`` document that turns a fresh machine into one running worker.

    ``base_config`` is an operator's own cloud-config (users, CA certificates, apt mirrors) that the
    worker pieces are appended to, so site customisation never means editing this module.
    ``stop_timeout_s`` defaults to the worker's stop deadline plus slack, so systemd waits for a
    drain instead of killing a job it has been told to finish. ``package`` is the requirement pip
    installs (in wheel mode, with the wheel URL as its direct reference); its ``[worker]`` extra
    keeps the API, cloud and SSH libraries off the VM.
    """
    if install not in INSTALL_MODES:
        raise ConfigError(f"install must be one of {', '.join(INSTALL_MODES)}, got {install!r}")
    command = list(worker_command) if worker_command is not None else list(VM_WORKER_COMMAND)
    if not command:
        raise ConfigError("worker_command must not be empty")
    if stop_timeout_s is None:
        deadline_s = env.get("CBMFLOW_WORKER_STOP_DEADLINE_S") or WorkerSettings.model_fields["stop_deadline_s"].default
        stop_timeout_s = int(float(deadline_s)) + STOP_TIMEOUT_SLACK_S
    doc: dict[str, Any] = {k: v for k, v in (base_config or {}).items() if k not in ("write_files", "runcmd")}
    base_files = list((base_config or {}).get("write_files", []) or [])
    ours = {ENV_PATH, LAUNCHER_PATH, UNIT_PATH}
    clash = sorted(str(f.get("path")) for f in base_files if isinstance(f, Mapping) and f.get("path") in ours)
    if clash:
        raise ConfigError(f"the base cloud-config writes {', '.join(clash)}, which the worker user-data owns")
    if install != "preinstalled":
        # The venv module is not in minimal cloud images; pip itself comes with the venv.
        packages = list(doc.get("packages", []) or [])
        if "python3-venv" not in packages:
            packages.append("python3-venv")
        doc["packages"] = packages
    doc["write_files"] = base_files + [
        {"path": ENV_PATH, "owner": "root:root", "permissions": "0600", "content": _env_file(env)},
        {"path": LAUNCHER_PATH, "owner": "root:root", "permissions": "0755", "content": _launcher(command)},
        {"path": UNIT_PATH, "owner": "root:root", "permissions": "0644", "content": _unit(stop_timeout_s)},
    ]
    # runcmd items become lines of one sh script; ``set -e`` makes a failed install stop before the
    # start, so cloud-init reports an error instead of a unit that crash-loops on a missing binary.
    doc["runcmd"] = list((base_config or {}).get("runcmd", []) or []) + [
        "set -e",
        *_install_commands(install, wheel_url, index_url, package, command),
        _START_SCRIPT,
    ]
    return "#cloud-config\n" + yaml.dump(
        doc, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=10_000
    )


def parse_worker_launch(userdata: str) -> tuple[dict[str, str], list[str]]:
    """(environment, command) of the worker described by rendered user-data.

    Reads the environment file and the launcher's ``exec`` line back, so whatever starts a worker
    from user-data (the local driver, a test) runs what a VM would run.
    """
    if not userdata.startswith("#cloud-config"):
        raise InvalidInputError("not a #cloud-config document")
    doc = yaml.safe_load(userdata)
    files = {str(f.get("path")): str(f.get("content", "")) for f in doc.get("write_files", []) or []}
    if ENV_PATH not in files or LAUNCHER_PATH not in files:
        raise InvalidInputError(f"user-data writes no {ENV_PATH} or {LAUNCHER_PATH}; not worker user-data")
    env: dict[str, str] = {}
    for number, line in enumerate(files[ENV_PATH].splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE_RE.match(line)
        if match is None:
            raise InvalidInputError(f"{ENV_PATH} line {number} is not KEY='value'")
        env[match.group(1)] = match.group(2)
    exec_lines = [line for line in files[LAUNCHER_PATH].splitlines() if line.startswith("exec ")]
    if len(exec_lines) != 1:
        raise InvalidInputError(f"{LAUNCHER_PATH} must have exactly one exec line")
    return env, shlex.split(exec_lines[0])[1:]


EXAMPLE_ENV = {
    "CBMFLOW_DB_DSN": "postgresql://cbmflow_worker_login:CHANGE_ME@db.example.internal:5432/cbmflow?sslmode=require",
    "CBMFLOW_BUS_AMQP_URL": "amqps://cbmflow-worker:CHANGE_ME@mq.example.internal:5671/cbmflow",
    "CBMFLOW_STORE_URL": "s3://eodata/",
    "CBMFLOW_STORE_S3_ENDPOINT_URL": "https://eodata.example.internal",
    "CBMFLOW_WORKER_STOP_DEADLINE_S": "600",
}
EXAMPLE_WHEEL_URL = "https://repo.example.internal/cbmflow/cbmflow-0.1.0-py3-none-any.whl"


EXAMPLE_INDEX_URL = "https://pypi.example.internal/simple"
EXAMPLE_FILES: dict[Install, str] = {
    "wheel": "worker.example.yaml",
    "index": "worker.index.example.yaml",
    "preinstalled": "worker.preinstalled.example.yaml",
}


def example_userdata(install: Install = "wheel") -> str:
    """What ``cloud-init/<EXAMPLE_FILES[install]>`` must contain (a test keeps the files in sync)."""
    return render_userdata(
        {**EXAMPLE_ENV, "CBMFLOW_WORKER_ID": "cbmflow-default-0a1b2c3d"},
        install=install,
        wheel_url=EXAMPLE_WHEEL_URL if install == "wheel" else "",
        index_url=EXAMPLE_INDEX_URL if install == "index" else "",
    )
