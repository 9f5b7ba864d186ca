"""SSH to worker VMs for operator commands (``provision logs|exec``), with Fabric.

Only operators use SSH: the control loop never does (drains go through the registry), so a
broken key or a closed port 22 can never stop scaling.
"""

from __future__ import annotations

import shlex
from typing import Any

from cbmflow.settings import ProvisionSettings
from provisioner.userdata import LOG_PATH, UNIT_NAME

CONNECT_TIMEOUT_S = 15


def _split(target: str, default_user: str) -> tuple[str, str]:
    user, _, host = target.rpartition("@")
    return (user or default_user), host


def connection(settings: ProvisionSettings, host: str) -> Any:
    """A ``fabric.Connection`` to ``host``, through the bastion if one is configured.

    ``look_for_keys`` is off when a key file is given, so a stray key in ~/.ssh never answers for
    the worker key (servers lock out after a few wrong keys).
    """
    from fabric import Connection

    connect_kwargs: dict[str, Any] = {}
    if settings.ssh_key_file:
        connect_kwargs = {"key_filename": settings.ssh_key_file, "look_for_keys": False}
    gateway = None
    if settings.ssh_gateway:
        gw_user, gw_host = _split(settings.ssh_gateway, settings.ssh_user)
        gateway = Connection(gw_host, user=gw_user, connect_kwargs=connect_kwargs, connect_timeout=CONNECT_TIMEOUT_S)
    return Connection(
        host, user=settings.ssh_user, connect_kwargs=connect_kwargs, connect_timeout=CONNECT_TIMEOUT_S, gateway=gateway
    )


def logs_command(lines: int, boot: bool, user: str) -> str:
    """The worker's log on the VM: its journal under systemd, the launcher's log file without.

    ``boot`` shows cloud-init's output instead, which is where a failed install is explained.
    Root-owned logs need ``sudo -n`` (non-interactive: fail rather than hang on a password).
    """
    n = int(lines)
    if boot:
        inner = f"tail -n {n} /var/log/cloud-init-output.log"
    else:
        inner = (
            f"if [ -d /run/systemd/system ]; then journalctl -u {UNIT_NAME} -n {n} --no-pager -o cat; "
            f"else tail -n {n} {LOG_PATH}; fi"
        )
    command = f"sh -c {shlex.quote(inner)}"
    return command if user == "root" else f"sudo -n {command}"
