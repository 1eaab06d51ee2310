"""``tandem router``: connect to the prefill and decode instances, check they can hand KV
to each other, then serve the API server's app over a ``RemoteEngineClient`` until SIGTERM
(the same drain as ``tandem serve``: the socket closes, requests in flight get
``--shutdown-timeout`` seconds, the rest are cancelled, which cancels their gRPC calls).
"""

from __future__ import annotations

import asyncio
import logging
import pathlib

from tandem.services.api_server.config import ServerConfig
from tandem.services.router.config import RouterConfig

logger = logging.getLogger("tandem.router")


def run_router(server: ServerConfig, router: RouterConfig) -> int:
    from tandem.services.api_server.engine_client import EngineUnavailableError
    from tandem.services.api_server.server import exit_status, setup_logging

    setup_logging()
    try:
        started = asyncio.run(_serve(server, router))
    except (ValueError, EngineUnavailableError) as e:  # bad flags, incompatible or absent instances
        logger.error("router not started: %s", e)
        return 1
    return exit_status(started)


async def _serve(server: ServerConfig, router: RouterConfig) -> bool:
    from tandem.engine.tokenizer import load_tokenizer
    from tandem.services.api_server.app import create_app
    from tandem.services.api_server.server import serve_http
    from tandem.services.router.instances import InstancePool, parse_addresses
    from tandem.services.router.remote import RemoteEngineClient

    pool = InstancePool(
        parse_addresses(router.prefill, "--prefill"), parse_addresses(router.decode, "--decode")
    )
    try:
        await pool.connect(router.connect_timeout)
        # The decode instances detokenize; the router tokenizes with the same files.
        source = pathlib.Path(pool.of_role("decode")[0].info.model_path)
        if not source.is_dir() and server.model_path:  # instances on another machine
            source = pathlib.Path(server.model_path)
        tokenizer = await asyncio.to_thread(load_tokenizer, source)
        client = RemoteEngineClient(pool, tokenizer, router.remote_prefill_min_tokens)
        pool.start_polling(router.instance_poll_interval)
        for instance in pool.instances:
            logger.info(
                "%s instance %s: engine %s, %s",
                instance.role,
                instance.address,
                instance.info.engine_id,
                instance.info.kv_connector,
            )
        return await serve_http(create_app(client, server), server, client.max_model_len)
    finally:
        await pool.close()
