"""The message contract: strict parsing, one error type for every malformed body."""

import pytest
from pydantic import ValidationError

from cbmflow.errors import PermanentJobError
from cbmflow.messages import ExtractParcels, MalformedMessage, dump_message, parse_message


def test_round_trip_and_ids() -> None:
    msg = ExtractParcels(scene_id=7, product_id="S2B_X", card="s2", location="/data/x.SAFE")
    back = parse_message(dump_message(msg))
    assert back == msg
    assert msg.message_id == "scene-7"
    assert msg.kind == "ExtractParcels" and msg.schema_version == 1
    with pytest.raises(ValidationError):
        msg.scene_id = 8  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"kind": "ExtractParcels"}',
        b'{"kind": "Nope", "scene_id": 1}',
        b'{"kind": "ExtractParcels", "schema_version": 2, "scene_id": 1, "product_id": "p", "card": "s2",'
        b' "location": "x"}',
        b'{"kind": "ExtractParcels", "scene_id": -1, "product_id": "p", "card": "s2", "location": "x"}',
        b'{"kind": "ExtractParcels", "scene_id": 1, "product_id": "p", "card": "zz", "location": "x"}',
        b'{"kind": "ExtractParcels", "scene_id": 1, "product_id": "p", "card": "s2", "location": "x", "evil": 1}',
        "\udcff".encode("utf-8", "surrogatepass"),
    ],
)
def test_malformed_bodies_raise_one_permanent_error(body: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_message(body)
    assert isinstance(info.value, PermanentJobError)
