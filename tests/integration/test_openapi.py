"""The OpenAPI document is accurate: it lists exactly the app's routes, and every operation,
fuzzed by schemathesis against a real uvicorn server, answers only documented statuses, content
types and shapes, and never a 500 for any input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_api import ALICE, ROOT, Seed, _seed

from api.app import endpoints
from cbmflow.dev.api_process import api_server

# That the document lists exactly the app's routes, and is valid, is checked without a server in
# tests/unit/test_api_params.py.
ROUTE_PATHS = {endpoint.path for endpoint in endpoints()}


@pytest.fixture(scope="module")
def live(stack: object, pg_template: str) -> Iterator[str]:
    """One seeded database and server for the whole module (schemathesis runs many cases)."""
    import uuid

    import psycopg2
    from psycopg2 import sql

    admin_dsn = stack.pg.dsn_for("postgres")  # type: ignore[attr-defined]
    name = f"t_openapi_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template)))
    dsn = stack.pg.dsn_for(name)  # type: ignore[attr-defined]
    seed: Seed = _seed(dsn)
    try:
        with api_server(seed.dsn) as base:
            yield base
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.close()


def test_operations_conform(live: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    missing = ROUTE_PATHS - {op.path for op in operations}
    assert missing <= {"/api/v1/openapi.json"}, missing  # schemathesis skips the document itself
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def conforms(case: schemathesis.Case) -> None:
            # An admin reaches every dataset, so generated values exercise 400/404, not just 403.
            # Every check runs except "schema-valid data must be accepted": some rules span
            # parameters (exactly one of polygon/geojson/wkt, from before to, nd needs two bands)
            # and OpenAPI 3.0 cannot express them, so such requests rightly answer 400.
            case.call_and_validate(auth=ROOT, excluded_checks=[positive_data_acceptance])
            if "{aoi}" in case.path or case.path.startswith("/query/"):
                case.call_and_validate(auth=ALICE, excluded_checks=[positive_data_acceptance])

        conforms()
