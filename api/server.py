"""Serving the API: uvicorn on the app factory, shared by ``cbmflow api`` and the demo."""

from __future__ import annotations

import socket
from typing import Any


def serve(host: str, port: int, workers: int = 1) -> None:
    """Run uvicorn on the app factory; each worker process builds its own app and pool."""
    import uvicorn

    from cbmflow.settings import DbSettings

    DbSettings().resolved_dsn()  # fail here, with a clear message, rather than in every worker
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
            **options,
        )
    finally:
        if listener is not None:
            listener.close()
