"""``tandem serve``: build the engine, then serve the app with uvicorn until SIGTERM.

Shutdown: on SIGTERM (or Ctrl-C) uvicorn closes the listening socket at once, so new
connections are refused, lets requests in flight finish for up to ``--shutdown-timeout``
seconds, cancels what is left (which aborts those engine requests), then the engine stops
and the process exits 0. ``serve_http`` is that loop for any ``EngineClient``; the router
(``tandem router``) runs it too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from tandem.services.api_server.config import ServerConfig

logger = logging.getLogger("tandem.api_server")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_server(config: ServerConfig, engine_options: dict[str, Any]) -> int:
    from tandem.engine.async_llm import AsyncLLM
    from tandem.services.api_server.app import create_app
    from tandem.services.api_server.engine_client import LocalEngineClient

    setup_logging()
    # The engine loads before the socket opens: /health answers only when it can serve.
    async_llm = AsyncLLM.from_options(**engine_options)
    client = LocalEngineClient(async_llm)
    try:
        started = asyncio.run(serve_http(create_app(client, config), config, client.max_model_len))
    finally:
        async_llm.shutdown()
    return exit_status(started)


async def serve_http(app: Any, config: ServerConfig, max_model_len: int) -> bool:
    """Serve ``app`` until SIGTERM / Ctrl-C, drained as the module says; False when the
    server could not start (the port in use ...)."""
    import uvicorn

    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http="h11",
        # The head limit itself is GuardMiddleware's (431 with an OpenAI error body): h11
        # enforces its own only on a head arriving in pieces, and answers in plain text.
        # Its buffer cap stays as a backstop against heads that never end.
        h11_max_incomplete_event_size=max(4 * config.h11_max_incomplete_event_size, 1 << 20),
        timeout_graceful_shutdown=config.shutdown_timeout,
        log_level=config.uvicorn_log_level,
        lifespan="off",
    )
    server = uvicorn.Server(uvicorn_config)
    # uvicorn re-raises the signal that stopped it once it is done, under the handler
    # that was installed before it started; with the default one SIGTERM would kill the
    # process after a clean drain. A handler that only notes it keeps the exit status 0.
    signal.signal(signal.SIGTERM, _note_signal)
    auth = "on" if config.api_key else "off"
    logger.info(
        "serving %s on http://%s:%d (API key %s, max_model_len %d)",
        config.model_name,
        config.host,
        config.port,
        auth,
        max_model_len,
    )
    await server.serve()
    return server.started


def exit_status(started: bool) -> int:
    if not started:
        logger.error("the server did not start; see the errors above (is the port in use?)")
        return 1
    logger.info("drained and stopped")
    return 0


def _note_signal(signum: int, _frame: Any) -> None:
    logger.info("received %s after shutdown", signal.Signals(signum).name)
