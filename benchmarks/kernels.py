"""Kernels: each Triton kernel against a torch baseline and the memory-bandwidth limit.

CUDA only. For each kernel the table gives its time, the time of the same work in plain
torch (the vectorized path the torch backend and the model layers take), the bytes it
must move divided by its time, and that as a share of the device's measured copy
bandwidth (a large device-to-device copy). The goal for decode attention at 4k context
and batch 64 is 70% of that bandwidth; the w4a16 matmul should beat a bf16 matmul at
batch 1 to 16.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch


class KernelTiming(NamedTuple):
    name: str
    shape: str
    triton_ms: float
    torch_ms: float
    num_bytes: int

    def row(self, copy_gbps: float) -> str:
        gbps = self.num_bytes / self.triton_ms / 1e6
        speedup, share = self.torch_ms / self.triton_ms, 100 * gbps / copy_gbps
        return (f"{self.name:<24} {self.shape:<36} {self.triton_ms:9.3f} {self.torch_ms:9.3f} "
                f"{speedup:7.2f}x {gbps:8.0f} {share:6.1f}%")  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="Sequences in decode attention.")
    parser.add_argument("--context", type=int, default=4096, help="Tokens of KV per sequence.")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--skip-quant", action="store_true", help="Leave out the w4a16 table.")


def copy_bandwidth_gbps(num_bytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6  # read + write


def _time(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn)


def bench_attention(args, dev: str = "cuda") -> list[KernelTiming]:
    import torch.nn.functional as F
    from tandem import kernels

    b, ctx, h, kvh, d, bs = (args.batch, args.context, args.num_heads, args.num_kv_heads,
                             args.head_dim, args.block_size)  # fmt: skip
    dt = torch.bfloat16
    blocks_per_seq = -(-ctx // bs)
    cache = torch.randn(b * blocks_per_seq, 1, 2, bs, kvh, d, dtype=dt, device=dev)
    tables = torch.randperm(b * blocks_per_seq, device=dev).view(b, blocks_per_seq)
    seq_lens = torch.full((b,), ctx, dtype=torch.int64, device=dev)
    q = torch.randn(b, h, d, dtype=dt, device=dev)
    scale = d**-0.5

    def torch_decode():  # the torch backend's way: gather the pages, then SDPA
        keys = cache[tables, 0, 0].view(b, -1, kvh, d).transpose(1, 2)
        values = cache[tables, 0, 1].view(b, -1, kvh, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale,
                                              enable_gqa=True)  # fmt: skip

    kv_bytes = b * ctx * kvh * d * 2 * cache.element_size()
    rows = [KernelTiming(
        "paged_decode_attention", f"b={b} ctx={ctx} h={h}/{kvh} d={d}",
        _time(lambda: kernels.paged_decode_attention(q, cache, tables, seq_lens, 0, scale)),
        _time(torch_decode), kv_bytes + 2 * q.numel() * q.element_size(),
    )]  # fmt: skip
    # prefill: 4 sequences, each a chunk of a quarter of the context after a cached prefix
    n_seq, chunk = min(4, b), min(512, ctx // 4)
    prefix = ctx - chunk
    qp = torch.randn(n_seq * chunk, h, d, dtype=dt, device=dev)
    kp, vp = (torch.randn(n_seq * chunk, kvh, d, dtype=dt, device=dev) for _ in range(2))
    starts = torch.arange(0, n_seq + 1, device=dev) * chunk
    prefixes = torch.full((n_seq,), prefix, device=dev)
    ptables = tables[:n_seq, : -(-prefix // bs)].contiguous()
    mask = torch.ones(chunk, prefix + chunk, dtype=torch.bool, device=dev).tril(prefix)

    def torch_prefill():
        for s in range(n_seq):
            rows_ = slice(s * chunk, (s + 1) * chunk)
            keys = torch.cat([cache[ptables[s], 0, 0].reshape(-1, kvh, d), kp[rows_]])
            values = torch.cat([cache[ptables[s], 0, 1].reshape(-1, kvh, d), vp[rows_]])
            F.scaled_dot_product_attention(qp[rows_].transpose(0, 1), keys.transpose(0, 1),
                                           values.transpose(0, 1), attn_mask=mask,
                                           scale=scale, enable_gqa=True)  # fmt: skip

    pbytes = (n_seq * prefix * kvh * d * 2 + qp.numel() * 2 + kp.numel() * 2) * 2
    rows.append(KernelTiming(
        "paged_prefill_attention", f"{n_seq} x {chunk} after {prefix} h={h}/{kvh} d={d}",
        _time(lambda: kernels.paged_prefill_attention(
            qp, kp, vp, cache, ptables, starts, prefixes, 0, scale, max_query_len=chunk)),
        _time(torch_prefill), pbytes,
    ))  # fmt: skip
    slots = torch.randperm(cache.shape[0] * bs, device=dev)[: 4 * b]
    knew, vnew = kp[: 4 * b], vp[: 4 * b]

    def torch_cache_write():
        cache[slots // bs, 0, 0, slots % bs] = knew
        cache[slots // bs, 0, 1, slots % bs] = vnew

    rows.append(KernelTiming(
        "reshape_and_cache", f"{4 * b} tokens kv={kvh} d={d}",
        _time(lambda: kernels.reshape_and_cache(knew, vnew, cache, slots, 0)),
        _time(torch_cache_write), 4 * knew.numel() * 2,
    ))  # fmt: skip
    return rows


def bench_norm_rope(args, dev: str = "cuda", tokens: int = 4096) -> list[KernelTiming]:
    from tandem import kernels
    from tandem.kernels import reference

    dt, hidden = torch.bfloat16, args.num_heads * args.head_dim
    x, r = (torch.randn(tokens, hidden, dtype=dt, device=dev) for _ in range(2))
    w = torch.randn(hidden, dtype=dt, device=dev)
    rows = [KernelTiming(
        "rms_norm (+residual)", f"{tokens} x {hidden}",
        _time(lambda: kernels.rms_norm(x, w, 1e-6, r)),
        _time(lambda: reference.rms_norm(x, w, 1e-6, r)), 5 * x.numel() * 2,
    )]  # fmt: skip
    h, kvh, d = args.num_heads, args.num_kv_heads, args.head_dim
    q = torch.randn(tokens, h, d, dtype=dt, device=dev)
    k = torch.randn(tokens, kvh, d, dtype=dt, device=dev)
    pos = torch.randint(0, 8192, (tokens,), device=dev)
    freqs = torch.outer(torch.arange(8192.0), 1e4 ** -(torch.arange(0, d, 2) / d)).to(dev)
    cos, sin = freqs.cos(), freqs.sin()
    rows.append(KernelTiming(
        "rotary_embedding", f"{tokens} tokens h={h}/{kvh} d={d}",
        _time(lambda: kernels.rotary_embedding(pos, q, k, cos, sin)),
        _time(lambda: reference.rotary_embedding(pos, q, k, cos, sin)),
        2 * (q.numel() + k.numel()) * 2,
    ))  # fmt: skip
    return rows


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("tandem bench kernels needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    copy_gbps = copy_bandwidth_gbps()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'kernel':<24} {'shape':<36} {'triton ms':>9} {'torch ms':>9} {'speedup':>8} "
          f"{'GB/s':>8} {'of copy':>7}")  # fmt: skip
    for timing in bench_attention(args) + bench_norm_rope(args):
        print(timing.row(copy_gbps))
    if not args.skip_quant:
        from tandem.kernels.quant_matmul import benchmark_w4a16

        print("\nw4a16_matmul against bf16 torch.matmul (N=K=4096, group 128)")
        print(f"{'batch':>5} {'w4a16 ms':>9} {'bf16 ms':>9} {'speedup':>8}")
        for t in benchmark_w4a16():
            print(f"{t.batch:>5} {t.w4a16_ms:9.4f} {t.bf16_ms:9.4f} {t.speedup:7.2f}x")
    return 0
