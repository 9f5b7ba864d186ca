"""Worker pools: which queue's backlog drives which workers.

A CARD job costs minutes and gigabytes where an extraction costs seconds, so one fleet sized for
both would be wrong for each: VMs big enough for CARD would idle through extractions, and a
backlog of CARD jobs divided by an extraction's ``per_worker`` would boot far too few machines.
Each pool therefore consumes its own job kinds (``CBMFLOW_WORKER_JOB_KINDS`` in its workers'
user-data), scales on the backlog of those kinds' queues only, and carries its own bounds, flavor
and image, under the same control law. Its servers carry its name (the ``cbmflow-pool-<name>``
tag, ``local-<name>-…`` process ids), so the step of one pool never sees, drains or deletes the
workers of another.

A job kind belongs to at most one pool (the settings refuse the rest): two pools on one queue
would each want ``backlog / per_worker`` workers, twice what the backlog needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cbmflow.errors import ConfigError
from cbmflow.messages import JOB_KINDS
from cbmflow.settings import BusSettings, ProvisionSettings
from provisioner.policy import Policy

# Nova tags: at most 60 characters, no comma or slash; server names become host names.
POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# Set by the pool itself; an operator's worker_env cannot override them.
RESERVED_ENV = ("CBMFLOW_WORKER_ID", "CBMFLOW_WORKER_JOB_KINDS")


@dataclass(frozen=True)
class Pool:
    """One pool as the provisioner runs it: its settings resolved and the queues that drive it."""

    settings: ProvisionSettings
    queues: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.settings.pool

    @property
    def job_kinds(self) -> tuple[str, ...]:
        return tuple(self.settings.job_kinds)


def check_name(name: str) -> str:
    if not POOL_NAME_RE.match(name):
        raise ConfigError(
            f"pool name {name!r}: use 1-40 lowercase letters, digits and '-' (it becomes a tag and a host name)"
        )
    return name


def queues_of(job_kinds: list[str] | tuple[str, ...], bus: BusSettings) -> tuple[str, ...]:
    """The queues these job kinds travel on, in the bus's order, each once."""
    wanted = {bus.queue_for(kind) for kind in job_kinds}
    return tuple(q for q in bus.job_queues if q in wanted)


def resolve(settings: ProvisionSettings, bus: BusSettings | None = None) -> list[Pool]:
    """Every configured pool, checked: name, job kinds, bounds and worker environment.

    Raises ``ConfigError`` naming the pool, so a typo in ``CBMFLOW_PROVISION_POOLS`` stops the
    provisioner before it starts or drains anything.
    """
    bus = bus or BusSettings()
    out = []
    for pool in settings.resolved_pools():
        check_name(pool.pool)
        where = f"pool {pool.pool}"
        if not pool.job_kinds:
            raise ConfigError(f"{where}: job_kinds is empty; name the job kinds its workers consume")
        unknown = sorted(set(pool.job_kinds) - set(JOB_KINDS))
        if unknown:
            raise ConfigError(f"{where}: unknown job kind(s) {', '.join(unknown)}; known: {', '.join(JOB_KINDS)}")
        reserved = sorted(set(pool.worker_env) & set(RESERVED_ENV))
        if reserved:
            raise ConfigError(f"{where}: worker_env may not set {', '.join(reserved)} (the pool sets them)")
        try:
            Policy.from_settings(pool)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        out.append(Pool(pool, queues_of(pool.job_kinds, bus)))
    return out


def unserved_kinds(pools: list[Pool]) -> list[str]:
    """Job kinds no pool consumes: their jobs wait until someone runs such workers by hand."""
    served = {kind for p in pools for kind in p.job_kinds}
    return [kind for kind in JOB_KINDS if kind not in served]


def select(pools: list[Pool], names: list[str] | None) -> list[Pool]:
    """The named pools (all when none is named); an unknown name is a ``ConfigError``."""
    if not names:
        return pools
    known = {p.name: p for p in pools}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"no such pool: {', '.join(missing)} (configured: {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(names)]
