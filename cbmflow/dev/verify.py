"""Compare extracted signatures with a test world's ``truth.csv``.

The truth comes from the generator's own point-in-polygon knowledge, never from the extractor,
so agreement here is evidence, not a tautology. Used by ``cbmflow demo`` and the chain test.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from psycopg2 import sql

from cbmflow import db


@dataclass
class Tally:
    expected: int = 0
    found: int = 0
    count_equal: int = 0
    mean_equal: int = 0
    missing: int = 0
    extra: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.expected > 0
            and self.missing == 0
            and self.extra == 0
            and self.count_equal == self.expected
            and self.mean_equal == self.expected
        )


def verify_truth(dsn: str, truth_csv: Path, aoi: str, year: int, rel_tol: float = 1e-6) -> Tally:
    tally = Tally()
    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, aoi, year)
        if ds is None:
            raise LookupError(f"no dataset {aoi}/{year}")
        cur.execute(
            sql.SQL(
                "SELECT p.parcel_id, s.product_id, g.band, g.count, g.mean FROM {sigs} g"
                " JOIN {parcels} p ON p.pid = g.pid JOIN scenes s ON s.id = g.scene_id"
            ).format(sigs=ds.sigs, parcels=ds.parcels)
        )
        got = {(r[0], r[1], r[2]): (int(r[3]), float(r[4])) for r in cur.fetchall()}
    seen: set[tuple[str, str, str]] = set()
    with truth_csv.open() as fh:
        for row in csv.DictReader(fh):
            key = (row["parcel_id"], row["product_id"], row["band"])
            seen.add(key)
            tally.expected += 1
            have = got.get(key)
            if have is None:
                tally.missing += 1
                if len(tally.mismatches) < 10:
                    tally.mismatches.append(f"missing {key}")
                continue
            tally.found += 1
            count, mean = int(row["count"]), float(row["mean"])
            if have[0] == count:
                tally.count_equal += 1
            if math.isclose(have[1], mean, rel_tol=rel_tol, abs_tol=1e-9):
                tally.mean_equal += 1
            if (have[0] != count or not math.isclose(have[1], mean, rel_tol=rel_tol, abs_tol=1e-9)) and len(
                tally.mismatches
            ) < 10:
                tally.mismatches.append(f"{key}: got count {have[0]} mean {have[1]}, truth {count} {mean}")
    tally.extra = len(set(got) - seen)
    return tally
