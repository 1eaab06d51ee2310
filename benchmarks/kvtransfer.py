"""KV transfer: Tandem's connector between two processes against memcpy and a Unix socket.

A child process holds a KV tensor (SmolLM2-135M's geometry by default) with its blocks
leased, behind the real prefill-side connector; this process loads them through the real
decode-side connector (control channel, layout handshake, data plane) into its own KV
tensor, once with destination blocks in one run and once scattered (one message per
block). In the same run it times a torch copy of the same bytes and a plain Unix-socket
transfer between two processes, and prints GB/s for each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

READY = "TANDEM-KV-READY"
GEOMETRY = dict(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=("ucx", "nccl"), default="ucx")
    parser.add_argument("--size", default="256MiB", help="Bytes to move, e.g. '256MiB'.")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs of each path.")
    parser.add_argument("--output-json", default=None)


def _kv_cache(num_blocks: int, block_size: int, fill: bool) -> torch.Tensor:
    g = GEOMETRY
    shape = (num_blocks, g["num_layers"], 2, block_size, g["num_kv_heads"], g["head_dim"])
    if not fill:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _connector(transport: str, role: str, block_size: int):
    from tandem.engine.config import TransferConfig
    from tandem.kvtransfer import create_connector

    config = TransferConfig(kv_lease_seconds=3600.0, kv_transfer_timeout=120.0)
    return create_connector(transport, f"bench-{role}", role, block_size, config, "bench")


def serve_kv(transport: str, num_blocks: int, block_size: int, num_leases: int) -> None:
    """Child: a prefill-side connector serving leases r0.. over every block."""
    scheduler, worker = _connector(transport, "prefill", block_size)
    worker.register_kv_cache(_kv_cache(num_blocks, block_size, fill=True))
    for i in range(num_leases):
        scheduler.state.leases.add(f"r{i}", list(range(num_blocks)), 3600.0)
    print(READY, json.dumps({"address": list(worker.address)}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    worker.close()


def _ready(child: subprocess.Popen) -> dict:
    """The child's READY line (libraries may print their own lines first)."""
    for line in child.stdout:
        if line.startswith(READY):
            return json.loads(line[len(READY) :])
    raise RuntimeError(f"the benchmark's child process exited ({child.wait()})")


def _child(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-P", "-m", "tandem.benchmarks.kvtransfer", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


class TandemPath:
    """Loads every block of a lease from the child's prefill connector, each time anew."""

    def __init__(self, args, num_blocks: int) -> None:
        from tandem.kvtransfer.base import KVConnectorMetadata, KVTransferParams, LoadSpec

        self._types = KVConnectorMetadata, KVTransferParams, LoadSpec
        self.num_blocks, self.block_size, self.transport = (
            num_blocks,
            args.block_size,
            args.transport,
        )
        num_leases = 2 * (args.repeats + 1)
        self.child = _child("--serve-kv", args.transport, str(num_blocks), str(self.block_size),
                            str(num_leases))  # fmt: skip
        self.host, self.port = _ready(self.child)["address"]
        _, self.worker = _connector(args.transport, "decode", self.block_size)
        self.size = num_blocks + 1 + num_blocks % 2  # odd, so i -> 2i mod size is one-to-one
        self.kv = _kv_cache(self.size, self.block_size, fill=False)
        self.worker.register_kv_cache(self.kv)
        self.leases = iter(range(num_leases))

    def destinations(self, scattered: bool) -> list[int]:
        # Scattered: block i lands in block 2i mod size, so no two neighbours stay neighbours.
        src = range(self.num_blocks)
        return [2 * i % self.size for i in src] if scattered else [i + 1 for i in src]

    def run(self, scattered: bool) -> float:
        metadata_cls, params_cls, spec_cls = self._types
        src, dst = list(range(self.num_blocks)), self.destinations(scattered)
        lease = f"r{next(self.leases)}"
        params = params_cls("bench-prefill", lease, src, len(src) * self.block_size,
                            self.host, self.port)  # fmt: skip
        start = time.perf_counter()
        self.worker.start_load_kv(metadata_cls([spec_cls(f"load-{lease}", params, dst, src)]))
        finished = self.worker.get_finished()
        while not (finished.receiving or finished.failed):
            time.sleep(0.0002)
            finished = self.worker.get_finished()
        if finished.failed:
            raise RuntimeError(f"tandem {self.transport} load failed: {finished.errors}")
        return time.perf_counter() - start

    def check(self, scattered: bool) -> None:
        expected = _kv_cache(self.num_blocks, self.block_size, fill=True)
        if not torch.equal(self.kv[self.destinations(scattered)], expected):
            raise RuntimeError("tandem: the loaded blocks differ from the source")

    def close(self) -> None:
        self.worker.close()
        self.child.stdin.close()
        self.child.wait(timeout=30)


def serve_socket(path: str, size: int) -> None:
    """Child: sends ``size`` bytes over a Unix socket each time the parent asks."""
    payload = memoryview(torch.ones(size, dtype=torch.uint8).numpy())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        while sock.recv(1):
            sock.sendall(payload)


class SocketPath:
    """A plain Python Unix-socket transfer of the same bytes from a child process."""

    def __init__(self, size: int) -> None:
        self.size, self.tmp = size, tempfile.TemporaryDirectory()
        self.buffer = memoryview(torch.zeros(size, dtype=torch.uint8).numpy())
        path = os.path.join(self.tmp.name, "kv.sock")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen(1)
            self.child = _child("--serve-socket", path, str(size))
            self.conn, _ = server.accept()

    def run(self) -> float:
        start = time.perf_counter()
        self.conn.sendall(b"g")
        received = 0
        while received < self.size:
            n = self.conn.recv_into(self.buffer[received:])
            if not n:
                raise RuntimeError("unix socket: the sender hung up")
            received += n
        return time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()
        self.child.wait(timeout=30)
        self.tmp.cleanup()


def main(args: argparse.Namespace) -> int:
    from tandem.engine.config import parse_size

    g, bs = GEOMETRY, args.block_size
    block_bytes = g["num_layers"] * 2 * bs * g["num_kv_heads"] * g["head_dim"] * 4
    num_blocks = max(1, parse_size(args.size) // block_bytes)
    size = num_blocks * block_bytes
    src, dst = torch.ones(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
    sock, tandem = SocketPath(size), TandemPath(args, num_blocks)

    def memcpy() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    paths = {
        "memcpy (torch copy_)": memcpy,
        "unix socket (python)": sock.run,
        f"tandem {args.transport} (one run)": lambda: tandem.run(False),
        f"tandem {args.transport} (scattered)": lambda: tandem.run(True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.repeats + 1):  # round robin, so load from elsewhere hits all alike
        for name, path in paths.items():
            elapsed = path()
            if i:  # the first round connects and touches pages: not timed
                seconds[name].append(elapsed)
    tandem.check(True)
    tandem.close()
    sock.close()
    report(args, size, num_blocks, block_bytes, seconds)
    return 0


def report(args, size: int, num_blocks: int, block_bytes: int, seconds: dict) -> None:
    print(
        f"\nKV transfer of {size / 2**20:.1f} MiB ({num_blocks} blocks of "
        f"{block_bytes / 2**10:.0f} KiB), median of {args.repeats} interleaved runs"
    )
    print(f"{'path':<30} {'GB/s':>7} {'GiB/s':>7} {'ms':>8}")
    rates = {}
    for name, runs in seconds.items():
        median = statistics.median(runs)
        rates[name] = size / median
        print(f"{name:<30} {size / median / 1e9:>7.2f} {size / median / 2**30:>7.2f} "
              f"{median * 1e3:>8.1f}")  # fmt: skip
    tandem = rates[f"tandem {args.transport} (one run)"]
    socket_rate, memcpy_rate = rates["unix socket (python)"], rates["memcpy (torch copy_)"]
    print(f"tandem/socket {tandem / socket_rate:.2f}x   tandem/memcpy {tandem / memcpy_rate:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"bytes": size, "bytes_per_second": rates}, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-kv"]:
        transport, num_blocks, block_size, num_leases = sys.argv[2:6]
        serve_kv(transport, int(num_blocks), int(block_size), int(num_leases))
    elif sys.argv[1:2] == ["--serve-socket"]:
        serve_socket(sys.argv[2], int(sys.argv[3]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_args(parser)
        sys.exit(main(parser.parse_args()))
