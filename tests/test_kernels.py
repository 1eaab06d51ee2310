"""Every Triton kernel in tandem.kernels against its torch reference (kernels/reference.py),
and each reference once against an independent computation.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here and in
conftest.py before the first kernel module is imported); with CUDA the same tests run the
compiled kernels. The interpreter is slow, so the grid is small but covers block
boundaries (lengths 1, block_size, block_size + 1), several GQA ratios, head sizes 64, 80,
96 and 128 (80 and 96 padded to 128 and masked) and float32, bfloat16 and float16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tandem import kernels  # noqa: E402
from tandem.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "bf16", "fp16")
HEAD_DIMS = (64, 80, 96, 128)
# Kernel against reference (which computes in float32 and rounds once): float32 differs
# by summation order only; a half type by about one rounding of the output (bfloat16 keeps
# 8 bits: 2^-8 relative, about 4e-3 at |x| ~ 1; float16 keeps 11).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NUM_LAYERS, LAYER = 3, 1


def close(actual, expected, dtype=None):
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def paged_cache(lens, block_size, num_kv_heads, head_dim, dtype, seed=0, spare=2):
    """A random cache whose sequences of ``lens`` tokens sit on shuffled blocks (the last
    sequence's first block is block 0, what the tables' padding also points to).

    Returns (kv_cache, block_tables [num_seqs, max_blocks] int64, generator)."""
    gen = torch.Generator().manual_seed(seed)
    need = [max(-(-n // block_size), 1) for n in lens]
    num_blocks = sum(need) + spare
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    order.insert(sum(need) - need[-1], 0)
    shape = (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    kv_cache = rand(*shape, dtype=dtype, gen=gen)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    taken = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(order[taken : taken + n])
        taken += n
    return kv_cache, tables.to(DEVICE), gen


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen):
    """q, k, v as the model makes them: strided views into one projection output."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = rand(num_tokens, sum(sizes), dtype=dtype, gen=gen).split(sizes, dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))  # fmt: skip


# -- reshape_and_cache -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(1, 64, 16), (3, 80, 8)])
def test_reshape_and_cache_matches_reference(dtype, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(head_dim)
    kv_cache = rand(5, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    num_slots = 5 * block_size
    middle = [s for s in torch.randperm(num_slots, generator=gen).tolist() if 0 < s < num_slots - 1]
    slots = torch.tensor([0, num_slots - 1] + middle[:11])  # distinct; the first and last slot
    _, k, v = qkv_views(13, 2, num_kv_heads, head_dim, dtype, gen)
    expected = kv_cache.clone()
    ref.reshape_and_cache(k, v, expected, slots.to(DEVICE), LAYER)
    kernels.reshape_and_cache(k, v, kv_cache, slots.to(DEVICE), LAYER)
    assert torch.equal(kv_cache, expected)  # a copy: exact


def test_reshape_and_cache_reference_is_a_slot_by_slot_copy():
    gen = torch.Generator().manual_seed(0)
    kv_cache = rand(4, NUM_LAYERS, 2, 8, 2, 16, gen=gen)
    slots = torch.tensor([9, 0, 31, 17])
    k, v = rand(4, 2, 16, gen=gen), rand(4, 2, 16, gen=gen)
    expected = kv_cache.clone()
    for i, s in enumerate(slots.tolist()):
        expected[s // 8, LAYER, 0, s % 8] = k[i]
        expected[s // 8, LAYER, 1, s % 8] = v[i]
    ref.reshape_and_cache(k, v, kv_cache, slots.to(DEVICE), LAYER)
    assert torch.equal(kv_cache, expected)


# -- paged decode attention ------------------------------------------------------------------
def run_decode(lens, block_size, num_kv_heads, group, head_dim, dtype, window=None, seed=0):
    kv_cache, tables, gen = paged_cache(lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q, _, _ = qkv_views(len(lens), group * num_kv_heads, num_kv_heads, head_dim, dtype, gen)
    seq_lens = torch.tensor(lens, device=DEVICE)
    args = (q, kv_cache, tables, seq_lens, LAYER, head_dim**-0.5, window)
    out = kernels.paged_decode_attention(*args)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref.paged_decode_attention(*args), dtype)


def boundary_lens(block_size):
    return [1, block_size, block_size + 1, 2 * block_size - 1, 37]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_head_dims_and_dtypes(head_dim, dtype):
    run_decode(boundary_lens(16), 16, 2, 4, head_dim, dtype, seed=head_dim)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(2, 1), (2, 2), (3, 3), (1, 8)])
def test_decode_gqa_ratios_and_block_sizes(num_kv_heads, group, block_size):
    lens = boundary_lens(block_size) + [130, 70]  # 130: three tiles of the loop
    run_decode(lens, block_size, num_kv_heads, group, 64, torch.float32, seed=group)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_decode_sliding_window(window):
    run_decode([1, 3, 16, 17, 90], 16, 2, 2, 64, torch.float32, window=window)


def test_decode_reference_matches_torch_backend():
    """The reference against the engine's SDPA-based decode path, on the same cache."""
    from tandem.engine.attention import AttentionMetadata
    from tandem.engine.attention.torch_attn import TorchAttentionBackend

    lens = [1, 16, 17, 40]
    kv_cache, tables, gen = paged_cache(lens, 16, 2, 64, torch.float32)
    kv_cache, tables = kv_cache.cpu(), tables.cpu()
    q = torch.randn(4, 6, 64, generator=gen)
    seq_lens = torch.tensor(lens)
    # the backend writes the new token's K/V first: give it the values already there
    slot_block = tables[torch.arange(4), (seq_lens - 1) // 16]
    slot_offset = (seq_lens - 1) % 16
    k = kv_cache[slot_block, LAYER, 0, slot_offset]
    v = kv_cache[slot_block, LAYER, 1, slot_offset]
    mask = torch.arange(tables.shape[1] * 16)[None] < seq_lens[:, None]
    meta = AttentionMetadata(
        num_tokens=4, slot_block=slot_block, slot_offset=slot_offset, num_decodes=4,
        decode_block_tables=tables, decode_seq_lens=seq_lens, decode_mask=mask.view(4, 1, 1, -1),
        prefills=[],
    )  # fmt: skip
    expected = TorchAttentionBackend().forward(LAYER, q, k, v, kv_cache.clone(), meta, 0.125)
    actual = ref.paged_decode_attention(q, kv_cache, tables, seq_lens, LAYER, 0.125)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# -- paged prefill attention -----------------------------------------------------------------
def run_prefill(spans, block_size, num_kv_heads, group, head_dim, dtype, window=None, seed=0):
    """spans: (prefix_len, chunk_len) per sequence."""
    prefixes = [p for p, _ in spans]
    kv_cache, tables, gen = paged_cache(prefixes, block_size, num_kv_heads, head_dim, dtype, seed)
    starts = torch.tensor([0] + [c for _, c in spans]).cumsum(0)
    q, k, v = qkv_views(int(starts[-1]), group * num_kv_heads, num_kv_heads, head_dim, dtype, gen)
    args = (q, k, v, kv_cache, tables, starts.to(DEVICE), torch.tensor(prefixes, device=DEVICE),
            LAYER, head_dim**-0.5, window)  # fmt: skip
    out = kernels.paged_prefill_attention(*args)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref.paged_prefill_attention(*args), dtype)


# (prefix, chunk): a first chunk of one token; a whole prompt over two query tiles; a
# prefix of exactly one block; a prefix one token past a block; a chunk of one token.
PREFILL_SPANS = [(0, 1), (0, 35), (16, 5), (17, 16), (40, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_head_dims_and_dtypes(head_dim, dtype):
    run_prefill(PREFILL_SPANS, 16, 2, 2, head_dim, dtype, seed=head_dim)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(2, 1), (3, 3), (1, 8)])
def test_prefill_gqa_ratios_and_block_sizes(num_kv_heads, group, block_size):
    # 70 queries: two query tiles of a GPU launch (five in the interpreter)
    spans = [(block_size, 3), (block_size + 1, 2 * block_size + 1), (70, 9), (5, 70)]
    run_prefill(spans, block_size, num_kv_heads, group, 64, torch.float32, seed=group)


@pytest.mark.parametrize("window", [1, 7, 20])
def test_prefill_sliding_window(window):
    run_prefill([(0, 20), (17, 18), (50, 3)], 16, 2, 2, 64, torch.float32, window=window)


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_reference_matches_sdpa(window):
    """The reference on one sequence against SDPA over its contiguous K/V with a causal
    mask shifted by the prefix (and a band mask for the window)."""
    prefix, chunk, bs = 21, 11, 8
    kv_cache, tables, gen = paged_cache([prefix], bs, 2, 32, torch.float32)
    kv_cache, tables = kv_cache.cpu(), tables.cpu()
    q, k, v = (torch.randn(chunk, h, 32, generator=gen) for h in (6, 2, 2))
    blocks = tables[0, : -(-prefix // bs)]
    keys = torch.cat([kv_cache[blocks, LAYER, 0].reshape(-1, 2, 32)[:prefix], k])
    values = torch.cat([kv_cache[blocks, LAYER, 1].reshape(-1, 2, 32)[:prefix], v])
    ones = torch.ones(chunk, prefix + chunk, dtype=torch.bool)
    mask = ones.tril(prefix)
    if window is not None:
        mask &= ~ones.tril(prefix - window)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
        scale=0.2, enable_gqa=True,
    ).transpose(0, 1)  # fmt: skip
    starts, prefixes = torch.tensor([0, chunk]), torch.tensor([prefix])
    actual = ref.paged_prefill_attention(
        q, k, v, kv_cache, tables, starts, prefixes, LAYER, 0.2, window
    )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# -- rms norm and rotary ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [576, 64])
def test_rms_norm_matches_reference(dtype, with_residual, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = rand(7, 2 * hidden, dtype=dtype, gen=gen)[:, :hidden]  # a strided view
    weight = rand(hidden, dtype=dtype, gen=gen)
    residual = rand(7, hidden, dtype=dtype, gen=gen) if with_residual else None
    out = kernels.rms_norm(x, weight, 1e-6, residual)
    expected = ref.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        if DEVICE == "cuda" or dtype != torch.bfloat16:
            assert torch.equal(out[1], expected[1])  # the sum is rounded the same way
        else:  # the interpreter truncates float32 to bfloat16 instead of rounding
            close(out[1], expected[1], dtype)
        out, expected = out[0], expected[0]
    assert out.dtype == dtype
    close(out, expected, dtype)


def test_rms_norm_reference_matches_model_layer():
    from tandem.engine.models.layers import RMSNorm

    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x, r = torch.randn(5, 96).bfloat16(), torch.randn(5, 96).bfloat16()
    out, summed = norm(x, r)
    ref_out, ref_summed = ref.rms_norm(x, norm.weight.detach(), 1e-5, r)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(ref_out.float(), out.float(), rtol=1.6e-2, atol=1.6e-2)
    x32 = torch.randn(5, 96)
    torch.testing.assert_close(ref.rms_norm(x32, norm.weight.detach(), 1e-5), norm(x32))


def rope_tables(rotary_dim, max_positions=64):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    freqs = torch.outer(torch.arange(max_positions).double(), inv_freq)
    return freqs.cos().float(), freqs.sin().float()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (80, 40)])
def test_rotary_matches_reference(dtype, is_neox, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim)
    q, k, _ = qkv_views(9, 6, 2, head_dim, dtype, gen)
    cos, sin = (t.to(DEVICE) for t in rope_tables(rotary_dim))
    positions = torch.tensor([0, 1, 2, 15, 16, 17, 40, 62, 63], device=DEVICE)
    q_out, k_out = kernels.rotary_embedding(positions, q, k, cos, sin, is_neox)
    q_ref, k_ref = ref.rotary_embedding(positions, q, k, cos, sin, is_neox)
    close(q_out, q_ref, dtype)
    close(k_out, k_ref, dtype)
    # the dims past rotary_dim pass through untouched
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_rotary_reference_matches_model_layer_and_complex_rotation():
    from tandem.engine.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(32, 64, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.tensor([0, 3, 17, 63])
    q, k = torch.randn(4, 3, 32), torch.randn(4, 1, 32)
    q_ref, k_ref = ref.rotary_embedding(positions, q, k, rope.cos, rope.sin, True)
    q_rope, k_rope = rope(positions, q, k)
    torch.testing.assert_close(q_ref, q_rope)
    torch.testing.assert_close(k_ref, k_rope)
    # gpt-j: adjacent pairs are complex numbers turned by e^(i * position * freq)
    _, k_gptj = ref.rotary_embedding(positions, q, k, rope.cos, rope.sin, False)
    turn = torch.polar(torch.ones_like(rope.cos), torch.atan2(rope.sin, rope.cos))[positions]
    expected = torch.view_as_real(torch.view_as_complex(k.view(4, 1, 16, 2)) * turn[:, None])
    torch.testing.assert_close(k_gptj, expected.flatten(-2))


# -- argument checks -------------------------------------------------------------------------
def decode_args():
    kv_cache = torch.randn(6, NUM_LAYERS, 2, 16, 2, 64, device=DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE)
    tables = torch.tensor([[1, 2], [3, 4]], device=DEVICE)
    return [q, kv_cache, tables, torch.tensor([20, 32], device=DEVICE), LAYER, 0.125]


def with_arg(args, index, value):
    return [value if i == index else a for i, a in enumerate(args)]


@pytest.mark.parametrize(
    ("index", "bad", "word"),
    [
        (0, lambda a: a[0][:, :3], "q"),  # 3 heads over 2 kv heads
        (0, lambda a: a[0].double(), "q"),
        (0, lambda a: a[0].transpose(1, 2).contiguous().transpose(1, 2), "q"),  # strided dim
        (1, lambda a: a[1].transpose(0, 1), "kv_cache"),
        (1, lambda a: a[1].bfloat16(), "q"),  # dtypes differ
        (2, lambda a: a[2].int(), "block_tables"),
        (2, lambda a: a[2][:1], "block_tables"),
        (3, lambda a: a[3].int(), "seq_lens"),
        (4, lambda a: NUM_LAYERS, "layer_idx"),
    ],
)
def test_decode_rejects_bad_arguments_naming_them(index, bad, word):
    args = decode_args()
    with pytest.raises(ValueError, match=f"^{word}:"):
        kernels.paged_decode_attention(*with_arg(args, index, bad(args)))


@pytest.mark.skipif(DEVICE != "cpu", reason="value checks run on CPU tensors only")
@pytest.mark.parametrize(
    ("index", "value", "word"),
    [(3, [20, 33], "seq_lens"), (3, [0, 5], "seq_lens"), (2, [[1, 6], [3, 4]], "block_tables")],
)
def test_decode_rejects_out_of_range_values(index, value, word):
    args = decode_args()
    with pytest.raises(ValueError, match=f"^{word}:"):
        kernels.paged_decode_attention(*with_arg(args, index, torch.tensor(value)))


def test_prefill_cache_norm_and_rotary_reject_bad_arguments():
    q, kv_cache, tables, _, _, _ = decode_args()
    k = v = torch.randn(2, 2, 64, device=DEVICE)
    starts, prefixes = torch.tensor([0, 2], device=DEVICE), torch.tensor([3], device=DEVICE)
    prefill = [q, k, v, kv_cache, tables[:1], starts, prefixes, LAYER, 0.125]
    with pytest.raises(ValueError, match="^k:"):
        kernels.paged_prefill_attention(*with_arg(prefill, 1, k[:, :1]))
    with pytest.raises(ValueError, match="^prefix_lens:"):
        kernels.paged_prefill_attention(*with_arg(prefill, 6, prefixes.int()))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="^query_start_loc:"):
            kernels.paged_prefill_attention(*with_arg(prefill, 5, torch.tensor([0, 3])))
    with pytest.raises(ValueError, match="^slot_mapping:"):
        kernels.reshape_and_cache(k, v, kv_cache, torch.tensor([0, 1], device=DEVICE).int(), 0)
    with pytest.raises(ValueError, match="^value:"):
        kernels.reshape_and_cache(k, v.half(), kv_cache, torch.tensor([0, 1], device=DEVICE), 0)
    with pytest.raises(ValueError, match="^weight:"):
        kernels.rms_norm(q[:, 0], torch.ones(65, device=DEVICE), 1e-6)
    cos = torch.ones(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="^positions:"):
        kernels.rotary_embedding(torch.tensor([0, 1], device=DEVICE).int(), q, k, cos, cos)
    with pytest.raises(ValueError, match="^sin:"):
        kernels.rotary_embedding(torch.tensor([0, 1], device=DEVICE), q, k, cos, cos[:, :16])
