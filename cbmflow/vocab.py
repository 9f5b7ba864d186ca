"""Words every component uses with one meaning: the kinds of imagery and the states of a scene.

They are the values stored in ``scenes.card`` and ``scenes.status`` (sql/001_core.sql), carried
in messages and accepted by the API, so they are spelt once here.
"""

from __future__ import annotations

from typing import Literal, get_args

CardKind = Literal["s2", "bs", "c6", "c12"]
"""``s2``: Sentinel-2 L2A as published; ``bs``: Sentinel-1 CARD backscatter; ``c6``/``c12``:
Sentinel-1 CARD 6-day / 12-day coherence (sql/013_card_jobs.sql adds ``c12``)."""
CARD_KINDS: tuple[CardKind, ...] = get_args(CardKind)

SceneStatus = Literal["discovered", "queued", "processing", "extracted", "failed", "no_parcels"]
"""A scene's life: found by the watcher, its job published, claimed by a worker under a lease,
then done (``extracted``, or ``no_parcels`` when no parcel falls on it) or ``failed`` with a reason."""
SCENE_STATUSES: tuple[SceneStatus, ...] = get_args(SceneStatus)

CardProduct = Literal["bs", "coh"]
"""What a ``GenerateCard`` job makes from a CARD input: ``bs`` backscatter (from a GRD) or ``coh``
coherence (from an SLC and its predecessor on the same relative orbit)."""

CardInputKind = Literal["grd", "slc"]
"""Sentinel-1 Level-1 products that are inputs of CARD generation, never extracted as such:
``grd`` (Ground Range Detected, SAFE or COG) and ``slc`` (Single Look Complex). The values of
``card_inputs.kind`` (sql/008_card_inputs.sql)."""
CARD_INPUT_KINDS: tuple[CardInputKind, ...] = get_args(CardInputKind)

CardInputStatus = Literal["awaiting_card", "queued", "processing", "done", "failed"]
"""A CARD input's life (sql/013_card_jobs.sql): recorded by the watcher with its ``GenerateCard`` job
in the outbox (``awaiting_card``; an SLC stays there without a job until its predecessor on the
orbit is recorded), the job confirmed by the broker (``queued``), claimed by a worker under a lease
(``processing``), then ``done`` (its scenes registered and their extractions queued) or ``failed``
with a reason. The values of ``card_inputs.status``."""
CARD_INPUT_STATUSES: tuple[CardInputStatus, ...] = get_args(CardInputStatus)

AOI_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
"""An AOI (member state) name: it becomes the dataset's PostgreSQL schema, so a lower-case letter,
then letters, digits or ``_``, at most 31 characters (the CHECK on ``aois.name`` in sql/001_core.sql)."""
