"""structlog configured for JSON lines on stderr, so every component's logs are machine-readable.

Event names are stable identifiers (``scene.extracted``, ``watch.published``); variable facts go
into keys, never into the event string.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(level: str | None = None) -> None:
    global _configured
    if _configured:
        return
    lvl = getattr(logging, (level or os.environ.get("CBMFLOW_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    # pika logs connection failures as plain-text tracebacks; our own events cover those cases.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str, **bound: Any) -> Any:
    configure()
    return structlog.get_logger(name).bind(component=name, **bound)
