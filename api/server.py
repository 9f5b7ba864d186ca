"""Serving the API: uvicorn on the app factory, shared by ``cbmflow api`` and the demo."""

from __future__ import annotations

import os
import socket
from typing import Any


def serve(host: str, port: int, workers: int = 1, tls_cert: str = "", tls_key: str = "") -> None:
    """Run uvicorn on the app factory; each worker process builds its own app and pool.

    With ``tls_cert`` and ``tls_key`` uvicorn serves HTTPS itself (no proxy needed for a small
    deployment); both or neither, checked here so a half-configured TLS never falls back to HTTP.
    """
    import uvicorn

    from cbmflow.errors import ConfigError
    from cbmflow.settings import ApiSettings

    ApiSettings().resolved_dsn()  # fail here, with a clear message, rather than in every worker
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    for path in (tls_cert, tls_key):
        if path and not os.path.isfile(path):
            raise ConfigError(f"TLS file {path} does not exist")
    tls: dict[str, Any] = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key} if tls_cert else {}
    options: dict[str, Any] = {"host": host, "port": port}
    listener = None
    if workers > 1:
        # uvicorn's worker processes rebuild the listening socket without its TCP protocol number,
        # so asyncio skips TCP_NODELAY on accepted connections and every response stalls ~40 ms
        # (Nagle + delayed ACK; measured by `make bench-api`). A listener bound here with
        # TCP_NODELAY, which Linux copies to accepted sockets, avoids that.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((host, port))
        listener.listen(2048)
        listener.set_inheritable(True)
        options = {"fd": listener.fileno()}
    try:
        uvicorn.run(
            "api.app:app_from_env",
            factory=True,
            workers=workers,
            proxy_headers=False,
            server_header=False,
            **tls,
            **options,
        )
    finally:
        if listener is not None:
            listener.close()
