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
from cbmflow.vocab import CardKind, CardProduct

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


class GenerateCard(_Message):
    """Turn one Sentinel-1 Level-1 product (a ``card_inputs`` row) into CARD scenes on the S2 tile grid.

    ``bs``: one GRD → backscatter COGs per covered MGRS tile, each registered as a ``bs`` scene whose
    extraction is queued through the outbox. ``coh``: one SLC and the previous acquisition of the
    same relative orbit (``partner_*``) → coherence COGs. CARD jobs cost minutes and gigabytes, so
    they travel on their own queue (``CBMFLOW_BUS_CARD_QUEUE``) and their own worker pool.
    """

    kind: Literal["GenerateCard"] = "GenerateCard"
    card_input_id: int = Field(gt=0)
    product_id: str = Field(min_length=1)
    card: CardProduct
    location: str = Field(min_length=1, description="product location: local path, file:// or s3:// URL")
    partner_input_id: int | None = Field(None, gt=0, description="coh: the earlier SLC of the pair")
    partner_location: str | None = Field(None, min_length=1, description="coh: where the earlier SLC is")

    @property
    def message_id(self) -> str:
        """One id per (input, product kind): a redelivered or re-published job is recognisable."""
        return f"card-{self.card}-{self.card_input_id}"


class SceneDiscovered(_Message):
    """The watcher saw a new or changed product that intersects an AOI."""

    kind: Literal["SceneDiscovered"] = "SceneDiscovered"
    scene_id: int = Field(gt=0)
    product_id: str
    acquired_at: datetime


Job = ExtractParcels | GenerateCard
"""What travels on the job queues (and through the outbox)."""

JOB_KINDS: tuple[str, ...] = ("ExtractParcels", "GenerateCard")

Message = Annotated[ExtractParcels | GenerateCard | SceneDiscovered, Field(discriminator="kind")]
_adapter: TypeAdapter[ExtractParcels | GenerateCard | SceneDiscovered] = TypeAdapter(Message)


class MalformedMessage(PermanentJobError):
    """A body that is not a valid message of this contract."""


def parse_message(body: bytes | str) -> ExtractParcels | GenerateCard | SceneDiscovered:
    try:
        return _adapter.validate_json(body)
    except ValidationError as exc:
        raise MalformedMessage(f"malformed message: {exc.errors(include_url=False)}") from exc


def dump_message(msg: ExtractParcels | GenerateCard | SceneDiscovered) -> bytes:
    return msg.model_dump_json().encode()
