"""What the prefill and decode services share: ``InstanceService`` (Health, InstanceInfo;
one class for both roles), the base of the role's servicer with its gRPC error mapping,
and running a grpc.aio server until SIGTERM with a graceful drain.

Data flow: ``tandem prefill|decode`` -> ``run_instance`` builds the ``AsyncLLM`` with the
role, wraps it in the role's servicer (which holds the instance's ``InstanceServicer``),
serves both services on one port until SIGTERM (new calls refused, calls in flight get
``--shutdown-timeout`` seconds, the rest are cancelled, which aborts their engine
requests), then stops the engine.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tandem.engine.async_llm import AsyncLLM, EngineDeadError
from tandem.engine.core import EngineInfo
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc

logger = logging.getLogger("tandem.pd")

_ROLES = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE}


def kv_layout(info: EngineInfo) -> pb.KVLayout:
    """What must match between a prefill and a decode engine: the connector's own
    description, which is what goes on the KV wire."""
    described = info.kv_layout
    return pb.KVLayout(
        model=str(described.get("model", "")),
        dtype=str(described.get("dtype", info.dtype)),
        block_size=int(described.get("block_size", info.block_size)),
        num_layers=int(described.get("num_layers", 0)),
        num_kv_heads=int(described.get("num_kv_heads", 0)),
        head_dim=int(described.get("head_dim", 0)),
        layout=str(described.get("layout", "")),
    )


class InstanceServicer(pb_grpc.InstanceServiceServicer):
    """``InstanceService`` of one prefill or decode instance: Health and InstanceInfo over
    its ``AsyncLLM``. Also the state its role's service shares with it: the drain flag and
    the open calls (``call``)."""

    def __init__(
        self,
        async_llm: AsyncLLM,
        role: str,
        transfer_totals: Callable[[], tuple[int, float]] | None = None,
    ) -> None:
        """``transfer_totals``: KV bytes and seconds loaded so far (a decode instance's)."""
        if role not in _ROLES:
            raise ValueError(f"role: expected one of {sorted(_ROLES)}, got {role!r}")
        self.async_llm = async_llm
        self.role = role
        self.transfer_totals = transfer_totals or (lambda: (0, 0.0))
        self.draining = False
        self.num_open_calls = 0

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        if self.async_llm.dead_error is not None:
            return pb.HealthResponse(serving=False, message=f"engine died: {self.dead_reason()}")
        if self.draining:
            return pb.HealthResponse(serving=False, message="draining (SIGTERM)")
        return pb.HealthResponse(serving=True)

    async def InstanceInfo(
        self, request: pb.InstanceInfoRequest, context: Any
    ) -> pb.InstanceInfoResponse:
        return self.info()

    def info(self) -> pb.InstanceInfoResponse:
        info, stats = self.async_llm.info, self.async_llm.get_stats()
        load = pb.Load(
            num_requests_running=stats.num_requests_running,
            num_requests_waiting=stats.num_requests_waiting,
            kv_cache_usage_perc=stats.kv_cache_usage_perc,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            num_free_kv_blocks=stats.num_free_kv_blocks,
            num_leased_requests=stats.num_leased_requests,
            num_open_streams=self.num_open_calls,
        )
        num_bytes, seconds = self.transfer_totals()
        return pb.InstanceInfoResponse(
            engine_id=info.engine_id,
            role=_ROLES[self.role],
            model_path=info.model_dir,
            kv_layout=kv_layout(info),
            max_model_len=info.runtime.max_model_len,
            vocab_size=info.runtime.vocab_size,
            num_kv_blocks=info.runtime.num_kv_blocks,
            kv_connector=info.kv_connector or "",
            load=load,
            kv_transfer_bytes_total=num_bytes,
            kv_transfer_seconds_total=seconds,
        )

    def dead_reason(self) -> str:
        return repr(self.async_llm.dead_error)

    @contextlib.asynccontextmanager
    async def call(self, context: Any) -> AsyncIterator[None]:
        """One Prefill / Decode call: refused while draining, engine errors as gRPC status.

        An engine already dead when the call came is UNAVAILABLE (the request never ran:
        the router may send it elsewhere); one that died while the call ran is INTERNAL
        (the request may be what killed it: the router must not send it on)."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "instance is draining (SIGTERM)")
        if self.async_llm.dead_error is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"the engine was dead: {self.dead_reason()}"
            )
        self.num_open_calls += 1
        try:
            yield
        except ValueError as e:  # the engine refused the request (the message names the field)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError:
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the engine died while running this request: {self.dead_reason()}",
            )
        finally:
            self.num_open_calls -= 1


class RoleServicer(abc.ABC):
    """Base of the prefill and the decode servicer: the role's ``AsyncLLM`` and the
    instance's ``InstanceServicer``, served beside the role's service on the same port."""

    role: str  # "prefill" | "decode"

    def __init__(self, async_llm: AsyncLLM) -> None:
        self.async_llm = async_llm
        self.instance = InstanceServicer(async_llm, self.role, self.transfer_totals)

    def transfer_totals(self) -> tuple[int, float]:
        """KV bytes and seconds this instance has loaded so far (InstanceInfo's totals)."""
        return 0, 0.0

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register this servicer as its role's gRPC service on ``server``."""


async def serve_instance(
    servicer: RoleServicer,
    host: str,
    port: int,
    shutdown_timeout: float,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """Serve the role's service and ``InstanceService`` until SIGTERM / SIGINT (or
    cancellation), then drain as the module says."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer.add_to_server(server)
    pb_grpc.add_InstanceServiceServicer_to_server(servicer.instance, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"--port: cannot listen on {host}:{port} (in use?)")
    await server.start()
    logger.info(
        "%s service on %s:%d (engine %s)",
        servicer.role,
        host,
        bound,
        servicer.async_llm.info.engine_id,
    )
    if on_started is not None:
        on_started(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("draining: new calls refused, %s s for the ones in flight", shutdown_timeout)
    finally:
        servicer.instance.draining = True
        await server.stop(grace=shutdown_timeout)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
