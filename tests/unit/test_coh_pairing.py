"""The coherence pairing rule (catalog_watcher.service): which earlier SLC a later one is paired
with, and the gap recorded. Times and footprints are built here, the expected pairs stated by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from catalog_watcher.service import SlcAcquisition, choose_partner, coherence_gap

T0 = datetime(2025, 4, 18, 2, 20, 8, tzinfo=UTC)
FRAME = box(-128.6, 52.0, -125.0, 54.0)


def slc(id_: int, days_before: float, *, orbit: int | None = 35, footprint: BaseGeometry = FRAME) -> SlcAcquisition:
    return SlcAcquisition(id_, orbit, T0 - timedelta(days=days_before), footprint)


LATE = slc(100, 0)


def test_six_and_twelve_days_are_pairs_with_their_gap() -> None:
    assert coherence_gap(slc(1, 6), LATE) == 6
    assert coherence_gap(slc(2, 12), LATE) == 12
    assert coherence_gap(slc(3, 18), LATE) is None  # a 18-day pair is not made
    assert coherence_gap(slc(4, 3), LATE) is None
    assert coherence_gap(LATE, slc(1, 6)) is None  # the early one must come first


def test_the_tolerance_is_one_day_either_side() -> None:
    assert coherence_gap(slc(1, 12 + 23 / 24), LATE) == 12
    assert coherence_gap(slc(1, 11 + 1 / 24), LATE) == 12
    assert coherence_gap(slc(1, 10.9), LATE) is None
    assert coherence_gap(slc(1, 5.0), LATE) == 6
    assert coherence_gap(slc(1, 13 + 2 / 24), LATE) is None
    assert coherence_gap(slc(1, 4.9), LATE) is None
    assert coherence_gap(slc(1, 9), LATE) is None  # between the two gaps


def test_six_days_is_preferred_when_both_exist() -> None:
    chosen = choose_partner(LATE, [slc(2, 12), slc(1, 6)])
    assert chosen is not None and (chosen[0].id, chosen[1]) == (1, 6)
    chosen = choose_partner(LATE, [slc(2, 12)])
    assert chosen is not None and (chosen[0].id, chosen[1]) == (2, 12)


def test_another_orbit_or_no_overlap_is_no_pair() -> None:
    assert coherence_gap(slc(1, 12, orbit=137), LATE) is None
    assert coherence_gap(slc(1, 12, orbit=None), slc(100, 0, orbit=None)) is None
    elsewhere = box(-120.0, 52.0, -117.0, 54.0)
    assert coherence_gap(slc(1, 12, footprint=elsewhere), LATE) is None
    touching = box(-125.0, 52.0, -122.0, 54.0)  # shares an edge only: no area in common
    assert coherence_gap(slc(1, 12, footprint=touching), LATE) is None
    assert choose_partner(LATE, [slc(1, 12, orbit=137), slc(2, 12, footprint=elsewhere)]) is None


def test_the_same_slice_wins_over_a_neighbouring_one_and_the_choice_is_deterministic() -> None:
    neighbour = box(-128.6, 53.8, -125.0, 55.8)  # the next slice along the track: a sliver in common
    chosen = choose_partner(LATE, [slc(1, 12, footprint=neighbour), slc(2, 12)])
    assert chosen is not None and chosen[0].id == 2
    closer = slc(7, 12 + 1 / 86400)  # two candidates alike but for a second: the nearer to 12 days
    farther = slc(5, 12 + 5 / 86400)
    chosen = choose_partner(LATE, [farther, closer])
    assert chosen is not None and chosen[0].id == 7
    chosen = choose_partner(LATE, [slc(9, 12), slc(8, 12)])
    assert chosen is not None and chosen[0].id == 8


def test_a_late_arrival_is_the_partner_of_its_waiting_successor() -> None:
    """The rule is symmetric in time of recording: an earlier SLC recorded after its successor is the
    successor's pair exactly as if it had come first (the watcher re-runs the rule for the successor)."""
    early = slc(1, 12)
    successor = LATE
    assert coherence_gap(early, successor) == 12
    chosen = choose_partner(successor, [early])
    assert chosen is not None and chosen == (early, 12)
