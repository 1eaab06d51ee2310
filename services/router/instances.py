"""The prefill and decode instances a router sends requests to: their gRPC stubs, what
they said about themselves (InstanceService: InstanceInfo, Health), their load, and
picking the least loaded.

At start-up every instance is asked for its InstanceInfo; a prefill and a decode
instance that disagree on anything the KV layout depends on stop the router with a
message naming the field. Afterwards a background task refreshes each instance's load
every ``poll_interval`` seconds; an instance that does not answer is skipped until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from tandem.engine.stats import EngineStats
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc as pb_grpc
from tandem.services.api_server.engine_client import EngineUnavailableError

logger = logging.getLogger("tandem.router")

LAYOUT_FIELDS = ("model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "layout")
_ROLE_NAMES = {pb.ROLE_PREFILL: "prefill", pb.ROLE_DECODE: "decode"}
_INFO_TIMEOUT = 5.0


class IncompatibleInstancesError(ValueError):
    """Two instances cannot hand KV to each other (or one is not what it was listed as)."""


@dataclass
class Instance:
    address: str
    role: str  # "prefill" | "decode"
    channel: grpc.aio.Channel
    stub: pb_grpc.PrefillServiceStub | pb_grpc.DecodeServiceStub  # the role's calls
    instance_stub: pb_grpc.InstanceServiceStub  # the polls, on the same channel
    info: pb.InstanceInfoResponse = field(default_factory=pb.InstanceInfoResponse)
    healthy: bool = False
    num_in_flight: int = 0  # calls this router has open on it

    def load(self) -> float:
        """Requests on it (what it reported, or this router's own calls if more, since the
        report may be a poll old), plus its KV usage to break ties."""
        load = self.info.load
        reported = load.num_requests_running + load.num_requests_waiting
        return max(self.num_in_flight, reported) + load.kv_cache_usage_perc

    async def refresh(self) -> None:
        """Ask for its InstanceInfo and Health; raises AioRpcError when it does not answer."""
        polled = self.instance_stub
        self.info = await polled.InstanceInfo(pb.InstanceInfoRequest(), timeout=_INFO_TIMEOUT)
        health = await polled.Health(pb.HealthRequest(), timeout=_INFO_TIMEOUT)
        if self.healthy and not health.serving:
            logger.warning("%s %s is not serving: %s", self.role, self.address, health.message)
        self.healthy = health.serving


def parse_addresses(text: str | None, flag: str) -> tuple[str, ...]:
    """'host:port,host:port' -> the addresses; the error names the flag."""
    addresses = tuple(a.strip() for a in (text or "").split(",") if a.strip())
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{flag}: {address!r} is not HOST:PORT")
    return addresses


def check_compatible(prefill: Instance, decode: Instance) -> None:
    """Raise naming the first KV-layout field on which the two disagree."""
    for name in LAYOUT_FIELDS:
        mine, theirs = getattr(prefill.info.kv_layout, name), getattr(decode.info.kv_layout, name)
        if mine != theirs:
            raise IncompatibleInstancesError(
                f"{name}: prefill instance {prefill.address} has {mine!r} but decode instance "
                f"{decode.address} has {theirs!r}; KV blocks cannot move between them"
            )


class InstancePool:
    def __init__(self, prefill: tuple[str, ...], decode: tuple[str, ...]) -> None:
        if not decode:
            raise ValueError("--decode: give at least one decode instance (HOST:PORT)")
        self.instances = [_instance(a, "prefill") for a in prefill]
        self.instances += [_instance(a, "decode") for a in decode]
        self._poller: asyncio.Task | None = None

    def of_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role]

    async def connect(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) for every instance's InstanceInfo, then check them."""
        deadline = time.monotonic() + timeout
        for instance in self.instances:
            while True:
                try:
                    await instance.refresh()
                    break
                except grpc.aio.AioRpcError as e:
                    if time.monotonic() > deadline:
                        raise EngineUnavailableError(
                            f"{instance.role} instance {instance.address} did not answer within "
                            f"{timeout} s: {e.details()}"
                        ) from e
                    await asyncio.sleep(0.25)
            role = _ROLE_NAMES.get(instance.info.role, "unknown")
            if role != instance.role:
                raise IncompatibleInstancesError(
                    f"--{instance.role}: {instance.address} is a {role} instance"
                )
        decode = self.of_role("decode")
        for other in decode[1:]:  # decode instances answer with the first one's tokenizer
            check_compatible(decode[0], other)
        for prefill in self.of_role("prefill"):
            for instance in decode:
                check_compatible(prefill, instance)

    def start_polling(self, interval: float) -> None:
        self._poller = asyncio.ensure_future(self._poll(interval))

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for instance in self.instances:
                try:
                    await instance.refresh()
                except grpc.aio.AioRpcError as e:
                    if instance.healthy:
                        logger.warning(
                            "%s %s is not answering: %s",
                            instance.role,
                            instance.address,
                            e.details(),
                        )
                    instance.healthy = False

    def pick(self, role: str) -> Instance:
        """The least-loaded healthy instance of ``role``."""
        candidates = [i for i in self.of_role(role) if i.healthy]
        if not candidates:
            listed = ", ".join(i.address for i in self.of_role(role)) or "none listed"
            raise EngineUnavailableError(f"no {role} instance is reachable ({listed})")
        return min(candidates, key=Instance.load)

    def stats(self) -> EngineStats:
        """The instances' gauges and counters summed, KV usage the fullest one's (as of
        the last poll)."""
        loads = [i.info.load for i in self.instances]
        return EngineStats(
            num_requests_running=sum(x.num_requests_running for x in loads),
            num_requests_waiting=sum(x.num_requests_waiting for x in loads),
            kv_cache_usage_perc=max((x.kv_cache_usage_perc for x in loads), default=0.0),
            prefix_cache_queries=sum(x.prefix_cache_queries for x in loads),
            prefix_cache_hits=sum(x.prefix_cache_hits for x in loads),
            num_preemptions=sum(x.num_preemptions for x in loads),
        )

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for instance in self.instances:
            await instance.channel.close()


def _instance(address: str, role: str) -> Instance:
    channel = grpc.aio.insecure_channel(address)
    stub_cls = pb_grpc.PrefillServiceStub if role == "prefill" else pb_grpc.DecodeServiceStub
    return Instance(address, role, channel, stub_cls(channel), pb_grpc.InstanceServiceStub(channel))
