"""The message contract between watcher, broker and workers.

Every message is a frozen pydantic model carrying ``kind`` and ``schema_version``; jobs are
imperative (``ExtractParcels``), events past tense (``SceneDiscovered``). Consumers parse with
:func:`parse_message`, which turns any malformed body into one :class:`MalformedMessage` error so
the worker can dead-letter it instead of crashing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cbmflow.errors import PermanentJobError
from cbmflow.vocab import CardKind

SCHEMA_VERSION: Literal[1] = 1


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION


class ExtractParcels(_Message):
    """Reduce one scene to parcel statistics for every dataset whose AOI it intersects."""

    kind: Literal["ExtractParcels"] = "ExtractParcels"
    scene_id: int = Field(gt=0)
    product_id: str = Field(min_length=1)
    card: CardKind
    location: str = Field(min_length=1, description="product location: local path, file:// or s3:// URL")

    @property
    def message_id(self) -> str:
        """Message ids are scene ids, so a redelivered or re-published job is recognisable."""
        return f"scene-{self.scene_id}"


class SceneDiscovered(_Message):
    """The watcher saw a new or changed product that intersects an AOI."""

    kind: Literal["SceneDiscovered"] = "SceneDiscovered"
    scene_id: int = Field(gt=0)
    product_id: str
    acquired_at: datetime


Message = Annotated[ExtractParcels | SceneDiscovered, Field(discriminator="kind")]
_adapter: TypeAdapter[ExtractParcels | SceneDiscovered] = TypeAdapter(Message)


class MalformedMessage(PermanentJobError):
    """A body that is not a valid message of this contract."""


def parse_message(body: bytes | str) -> ExtractParcels | SceneDiscovered:
    try:
        return _adapter.validate_json(body)
    except ValidationError as exc:
        raise MalformedMessage(f"malformed message: {exc.errors(include_url=False)}") from exc


def dump_message(msg: ExtractParcels | SceneDiscovered) -> bytes:
    return msg.model_dump_json().encode()
