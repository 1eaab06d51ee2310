"""The fused CPU layer ops (engine/cpu_ops.py) against their torch references: the model's
own RMSNorm, RotaryEmbedding and SiluAndMul, and the torch backend's KV-cache write.

They round where the references round, so in half precision rotary, SiLU-and-multiply
and the cache write match bit for bit; in float32 torch's vectorized exp and fused
multiply-adds differ in the last bits; the norm may differ by the order of its sum (one
unit in the last place of the dtype at most).
"""

from __future__ import annotations

import pytest
import torch
from tandem.engine import cpu_ops
from tandem.engine.attention.base import AttentionMetadata
from tandem.engine.attention.torch_attn import TorchAttentionBackend
from tandem.engine.models.cpu_fused import (
    FusedRMSNorm,
    FusedRotaryEmbedding,
    FusedSiluAndMul,
    fuse_layers,
)
from tandem.engine.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the ops do not compile here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def close_in_ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().clamp(min=1.0)
    assert ((got.float() - want.float()).abs() <= ULP[dtype] * scale).all()


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit in half precision, to the last bits in float32."""
    if got.dtype == torch.float32:
        close_in_ulps(got, want, got.dtype)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])  # 300 rows run on both threads
def test_rms_norm_matches_the_module(dtype, num_rows):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(num_rows, 576, dtype=dtype)
    residual = torch.randn(num_rows, 576, dtype=dtype)
    want, want_residual = norm(x, residual)
    got_residual = residual.clone()
    got = cpu_ops.rms_norm(x, norm.weight, norm.eps, got_residual)
    assert torch.equal(got_residual, want_residual)  # one rounded add: exact
    close_in_ulps(got, want, dtype)
    close_in_ulps(cpu_ops.rms_norm(x, norm.weight, norm.eps), norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "partial"), [(64, 1.0), (128, 1.0), (80, 0.5)])
def test_rotary_matches_the_module_bit_for_bit(dtype, head_dim, partial):
    torch.manual_seed(1)
    params = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": partial}
    rotary = RotaryEmbedding(head_dim, 512, params)
    positions = torch.randint(0, 512, (37,))
    qkv = torch.randn(37, (9 + 2 * 3) * head_dim, dtype=dtype)  # q, k, v as the model splits
    q = qkv[:, : 9 * head_dim].view(37, 9, head_dim)
    k = qkv[:, 9 * head_dim : 12 * head_dim].view(37, 3, head_dim)
    want_q, want_k = rotary(positions, q, k)
    got_q, got_k = cpu_ops.rotary_embedding(
        positions, q, k, rotary.cos, rotary.sin, rotary.rotary_dim
    )
    same(got_q, want_q)
    same(got_k, want_k)
    assert got_q.data_ptr() == q.data_ptr()  # in place


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_module(dtype):
    """Its exp is a vectorized polynomial (2e-7 relative): rounded to half precision it
    lands on torch's value or one unit away, almost always on it."""
    gate_up = torch.randn(50, 2 * 1536, dtype=dtype) * 4
    got, want = cpu_ops.silu_and_mul(gate_up), SiluAndMul()(gate_up)
    close_in_ulps(got, want, dtype)
    if dtype != torch.float32:
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 64])
def test_row_argmax_matches_torch_first_of_ties(dtype, num_rows):
    x = torch.randn(num_rows, 49152).to(dtype)
    x[0, [7, 9000]] = 50.0  # a tie: the first index wins, as with torch's max
    assert torch.equal(cpu_ops.row_argmax(x), x.float().max(dim=-1).indices)
    assert cpu_ops.row_argmax(x)[0] == 7


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_matches_the_torch_backend(dtype):
    torch.manual_seed(2)
    num_blocks, num_layers, block_size, kv_heads, head_dim = 9, 3, 16, 3, 64
    shape = (num_blocks, num_layers, 2, block_size, kv_heads, head_dim)
    want, got = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:40]
    kv = torch.randn(40, 2 * kv_heads * head_dim, dtype=dtype)  # k and v as views of one tensor
    k = kv[:, : kv_heads * head_dim].view(40, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim :].view(40, kv_heads, head_dim)
    no_decodes = torch.zeros(0, 1, dtype=torch.int64)
    meta = AttentionMetadata(40, slots // block_size, slots % block_size, 0, no_decodes,
                             no_decodes[:, 0], no_decodes.bool()[:, None, None], [])  # fmt: skip
    TorchAttentionBackend()._write_cache(1, k, v, want, meta)
    cpu_ops.reshape_and_cache(k, v, got, meta.slot_block, meta.slot_offset, 1)
    assert torch.equal(got, want) and got[:, [0, 2]].abs().sum() == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cpu_ops.rms_norm(torch.randn(4, 8), torch.ones(16), 1e-5), r"^x:"),
        (lambda: cpu_ops.silu_and_mul(torch.randn(4, 7)), r"^gate_up:"),
        (
            lambda: cpu_ops.reshape_and_cache(
                torch.randn(2, 3, 64),
                torch.randn(2, 3, 64),
                torch.zeros(4, 1, 2, 16, 3, 64),
                torch.tensor([0, 9]),
                torch.tensor([0, 1]),
                0,
            ),
            "slot_block",
        ),  # fmt: skip
    ],
)
def test_bad_arguments_raise_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fuse_layers_swaps_every_twin():
    rope = {"rope_theta": 1e4, "rope_type": "default"}
    model = torch.nn.ModuleList([RMSNorm(8, 1e-6), SiluAndMul(), RotaryEmbedding(8, 16, rope)])
    assert fuse_layers(model) == 3
    assert [type(m) for m in model] == [FusedRMSNorm, FusedSiluAndMul, FusedRotaryEmbedding]
