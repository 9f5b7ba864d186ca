"""Words every component uses with one meaning: the kinds of imagery and the states of a scene.

They are the values stored in ``scenes.card`` and ``scenes.status`` (sql/001_core.sql), carried
in messages and accepted by the API, so they are spelt once here.
"""

from __future__ import annotations

from typing import Literal, get_args

CardKind = Literal["s2", "bs", "c6"]
"""``s2``: Sentinel-2 L2A as published; ``bs``: Sentinel-1 CARD backscatter; ``c6``: Sentinel-1
CARD 6-day coherence."""
CARD_KINDS: tuple[CardKind, ...] = get_args(CardKind)

SceneStatus = Literal["discovered", "queued", "processing", "extracted", "failed", "no_parcels"]
"""A scene's life: found by the watcher, its job published, claimed by a worker under a lease,
then done (``extracted``, or ``no_parcels`` when no parcel falls on it) or ``failed`` with a reason."""
SCENE_STATUSES: tuple[SceneStatus, ...] = get_args(SceneStatus)

AOI_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
"""An AOI (member state) name: it becomes the dataset's PostgreSQL schema, so a lower-case letter,
then letters, digits or ``_``, at most 31 characters (the CHECK on ``aois.name`` in sql/001_core.sql)."""
