"""The unit layer: no servers, warnings are errors.

``make test-unit`` runs this folder alone on a laptop without PostgreSQL or RabbitMQ installed, so a
unit test that asks for a server fixture is a mistake in the layering, reported at collection.
"""

from __future__ import annotations

import pytest

SERVER_FIXTURES = frozenset(
    {"stack", "pg_template", "pg_dsn", "rabbit_vhost", "amqp_url", "management_url", "cbm_env", "moto_endpoint", "s3"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/unit/" not in str(item.path).replace("\\", "/"):
            continue
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(
                f"{item.nodeid} uses server fixture(s) {', '.join(sorted(used))}: move it to tests/integration"
            )
        item.add_marker(pytest.mark.filterwarnings("error"))
