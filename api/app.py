"""The Starlette application: ``create_app`` includes the routers, ``app_from_env`` is uvicorn's factory.

Nothing is built at import (titiler style): ``create_app(dsn)`` returns a fresh app, so tests and
uvicorn workers each get their own pool and auth cache. The pool is opened by the lifespan, not
at construction, so building an app never touches the network. The routers (``api.routes``,
``api.v1``, ``api.chips``, ``api.openapi``) are factories that never import this module; the
error contract is ``api.errors``, the shared machinery ``api.infra``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from api import chips, explorer, openapi, routes, tiles, v1
from api.aiodb import AsyncPool
from api.auth import LoginThrottle, SharedLoginThrottle
from api.errors import add_exception_handlers
from api.infra import AppState, DatasetCache, Endpoint, Pool, route
from cbmflow.logging import get_logger
from cbmflow.settings import ApiSettings

log = get_logger("api")


def endpoints() -> list[Endpoint]:
    """Every route of the API, in the order Starlette matches them (the OpenAPI document's too)."""
    served = [*routes.routes(), *v1.routes(), *chips.routes(), *tiles.routes(), *explorer.routes()]
    return [*served, *openapi.routes(served)]


def create_app(dsn: str, settings: ApiSettings | None = None) -> Starlette:
    """A new API app on ``dsn``; the pool opens when the app starts and closes when it stops."""
    api_settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        size = max(1, api_settings.pool_size)
        pool = await run_in_threadpool(Pool, dsn, size, api_settings.statement_timeout_s)
        aio = AsyncPool(pool.dsn, size)
        chip_secret = chips.load_secret(api_settings)
        throttle = LoginThrottle(
            api_settings.login_backoff_base_s, api_settings.login_backoff_max_s, api_settings.login_free_failures
        )
        app.state.cbmflow = AppState(
            settings=api_settings,
            pool=pool,
            aio=aio,
            auth=explorer.SessionAuthenticator(api_settings.auth_cache_s, explorer.session_key(chip_secret)),
            polygon_limit=max(1, api_settings.polygon_limit),
            chip_secret=chip_secret,
            datasets=DatasetCache(api_settings.dataset_cache_s),
            throttle=throttle,
            shared_throttle=SharedLoginThrottle(chip_secret, throttle.allowance),
        )
        log.info("api.started", pool_size=size)
        try:
            yield
        finally:
            app.state.cbmflow = None
            aio.close()
            await run_in_threadpool(pool.close)
            log.info("api.stopped")

    middleware = []
    if api_settings.proxy_hosts():
        # In the app, not as uvicorn's option: the app factory is what every server (and the test
        # client) runs, so the throttle and the plain-HTTP check see the same client everywhere.
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        middleware.append(Middleware(ProxyHeadersMiddleware, trusted_hosts=api_settings.proxy_hosts()))
    app = Starlette(
        routes=[explorer.token_route(), *(route(endpoint) for endpoint in endpoints())],
        lifespan=lifespan,
        middleware=middleware,
    )
    add_exception_handlers(app)
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory``: every worker process builds its app from the environment."""
    settings = ApiSettings()
    return create_app(settings.resolved_dsn(), settings)
