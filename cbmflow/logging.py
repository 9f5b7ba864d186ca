"""structlog for every component: JSON lines for machines, coloured console lines for a person.

Event names are stable identifiers (``scene.extracted``, ``watch.published``); variable facts go
into keys, never into the event string, so both renderings carry the same information and a
grep for an event name works on either.

``CBMFLOW_LOG_FORMAT=auto`` (the default) renders for whoever reads stderr: a terminal gets the
console renderer, anything else (a worker's log file under the local driver, journald on a VM, a
pipe) gets JSON lines. Records of third-party libraries that log through :mod:`logging` go through
the same renderer, so a JSON stream never gets a stray plain-text line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

Format = Literal["console", "json"]

_configured = False
_handler: logging.Handler | None = None

QUIET_LIBRARIES = {
    # pika logs connection failures as plain-text tracebacks; our own events cover those cases.
    "pika": logging.CRITICAL,
    # pyogrio reports every layer it writes at INFO ("Created 300 records") from card.testworld.
    "pyogrio": logging.WARNING,
}
"""Library loggers held above our level, whose messages our own events already say better."""


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write, not at configure time.

    rich's live displays (the demo's progress bar) and pytest's capture swap ``sys.stderr``; a
    logger that kept the original stream would draw over the progress bar or escape the capture.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return _isatty(sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def choose_format(fmt: str, stream: Any) -> Format:
    """``auto`` means console lines for a terminal and JSON lines for a file, pipe or journald."""
    if fmt == "json":
        return "json"
    if fmt == "console":
        return "console"
    return "console" if _isatty(stream) else "json"


_URL_PASSWORD_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@'\"]*):[^@\s/'\"]*@")
_KV_PASSWORD_RE = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)")


def redact_secrets(text: str) -> str:
    """``text`` with the passwords of URLs (``amqp://u:pw@h``) and libpq DSNs (``password=pw``)
    replaced by ``***``: error messages of drivers and configuration echo what they were given."""
    if "@" not in text and "=" not in text:
        return text
    return _KV_PASSWORD_RE.sub(r"\1=***", _URL_PASSWORD_RE.sub(r"\1:***@", text))


def _redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: no log line carries a password, whichever value (or traceback) held it."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact_secrets(value)
    return event


def _renderer(fmt: Format, colors: bool) -> Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    # plain tracebacks: rich's show_locals would print DSNs and passwords held in local variables.
    return structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)


def configure(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None, *, force: bool = False
) -> None:
    """Set up structlog and :mod:`logging` once per process (again with ``force``).

    ``level`` and ``fmt`` default to ``CBMFLOW_LOG_LEVEL`` and ``CBMFLOW_LOG_FORMAT``; ``stream``
    defaults to the process's current stderr. Loggers from :func:`get_logger` resolve the
    configuration on every call, so reconfiguring (the demo quietens itself while its progress bar
    is live) reaches loggers that modules created at import time.
    """
    global _configured, _handler
    if _configured and not force:
        return
    from pydantic import ValidationError

    from cbmflow.settings import LogSettings

    invalid = ""
    try:
        settings = LogSettings()
    except ValidationError as exc:
        # A typo in a log variable must not keep a worker from starting; it is reported below.
        invalid = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        settings = LogSettings(**{name: LogSettings.model_fields[name].default for name in bad})
    lvl = logging.getLevelNamesMapping().get((level or settings.level).strip().upper(), logging.INFO)
    out: Any = stream if stream is not None else _CurrentStderr()
    chosen = choose_format((fmt or settings.format).strip().lower(), out)
    renderer = _renderer(chosen, colors=chosen == "console" and _isatty(out))
    timestamper = structlog.processors.TimeStamper(
        fmt="iso" if chosen == "json" else "%Y-%m-%d %H:%M:%S", utc=chosen == "json"
    )
    shared: list[Processor] = [structlog.processors.add_log_level, timestamper]
    if chosen == "json":
        shared.append(structlog.processors.format_exc_info)  # the console renderer formats exceptions itself
    shared.append(_redact)

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(lvl)
    for name, floor in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(lvl, floor))

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: a logger bound at import time must follow a later configure(force=True).
        cache_logger_on_first_use=False,
    )
    _configured = True
    if invalid:
        get_logger("log").warning(
            "log.settings_invalid", error=invalid, using=f"level={logging.getLevelName(lvl)} format={chosen}"
        )


def get_logger(name: str, **bound: Any) -> FilteringBoundLogger:
    """A logger with ``component=name`` and ``bound`` on every event; configures logging on first use."""
    configure()
    # A lazy proxy: it builds the bound logger from the configuration current at each call.
    return cast(FilteringBoundLogger, structlog.get_logger(name, component=name, **bound))
