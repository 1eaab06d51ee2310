"""The native CPU decode op against the torch backend, and the backend registry."""

from __future__ import annotations

import pytest
import torch
from tandem.engine.attention import (
    AttentionMetadata,
    PrefillSpan,
    cpu_native,
    create_attention_backend,
)
from tandem.engine.attention.cpu_native import CpuNativeAttentionBackend, paged_decode_attention
from tandem.engine.attention.torch_attn import TorchAttentionBackend

needs_op = pytest.mark.skipif(
    cpu_native.load_paged_decode() is None, reason="the native op does not compile here"
)
NUM_LAYERS, LAYER = 3, 1


def make_decode_batch(lens, block_size, num_kv_heads, head_dim, dtype, prefill_len=0, seed=0):
    """A cache of random K/V, rows of the given lengths on shuffled blocks (the last row
    owns block 0), one new token per row, and optionally a fresh prefill span after them.

    Returns (kv_cache, meta, generator); each row's new token sits at its last position.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2 + -(-prefill_len // block_size)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    order, free = perm[: sum(need) - 1], perm[sum(need) - 1 :]
    order.insert(sum(need) - need[-1], 0)  # the last row's first block is block 0
    shape = (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    nd, max_blocks = len(lens), max(need)
    tables = torch.zeros(nd, max_blocks, dtype=torch.int64)
    taken = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(order[taken : taken + n])
        taken += n
    seq_lens = torch.tensor(lens)
    slot_block = tables[torch.arange(nd), (seq_lens - 1) // block_size]
    slot_offset = (seq_lens - 1) % block_size
    mask = torch.arange(max_blocks * block_size)[None] < seq_lens[:, None]
    spans = []
    if prefill_len:
        spans.append(
            PrefillSpan(nd, prefill_len, prefill_len, torch.empty(0, dtype=torch.int64), None)
        )
        pos = torch.arange(prefill_len)
        slot_block = torch.cat([slot_block, torch.tensor(free)[pos // block_size]])
        slot_offset = torch.cat([slot_offset, pos % block_size])
    num_tokens = nd + prefill_len
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        slot_block=slot_block,
        slot_offset=slot_offset,
        num_decodes=nd,
        decode_block_tables=tables,
        decode_seq_lens=seq_lens,
        decode_mask=mask.view(nd, 1, 1, -1),
        prefills=spans,
    )
    return kv_cache, meta, gen


def run_both(kv_cache, meta, gen, num_heads, num_kv_heads, head_dim, dtype):
    """Both backends' forward on the same inputs (each on its own copy of the cache)."""
    n = meta.num_tokens
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    cache_ref, cache_native = kv_cache.clone(), kv_cache.clone()
    if dtype == torch.float32:
        ref = TorchAttentionBackend().forward(LAYER, q, k, v, cache_ref, meta, scale)
    else:  # the reference runs in float32 on the same (rounded) inputs
        ref = TorchAttentionBackend().forward(
            LAYER, q.float(), k.float(), v.float(), cache_ref.float(), meta, scale
        )
    native = CpuNativeAttentionBackend().forward(LAYER, q, k, v, cache_native, meta, scale)
    return ref, native


def random_lens(block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    fixed = [1, block_size, block_size + 1, 2 * block_size - 1]
    return fixed + torch.randint(1, 300, (12,), generator=gen).tolist()


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_native_decode_matches_torch(group, head_dim, block_size, dtype):
    num_kv_heads = 2 if group == 4 else 3
    lens = random_lens(block_size, seed=group * head_dim + block_size)
    kv_cache, meta, gen = make_decode_batch(lens, block_size, num_kv_heads, head_dim, dtype)
    ref, native = run_both(kv_cache, meta, gen, group * num_kv_heads, num_kv_heads, head_dim, dtype)
    assert native.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)
    else:  # one bfloat16 rounding of the output
        torch.testing.assert_close(native.float(), ref, rtol=1e-2, atol=1e-2)


@needs_op
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_native_decode_other_head_dims_and_fp16(head_dim, dtype):
    kv_cache, meta, gen = make_decode_batch(random_lens(16, 5), 16, 2, head_dim, dtype)
    ref, native = run_both(kv_cache, meta, gen, 4, 2, head_dim, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(native.float(), ref.float(), rtol=tol, atol=tol)


@needs_op
@pytest.mark.parametrize("group", [6, 8])
def test_native_decode_large_groups(group):
    """Groups wider than the AVX-512 kernel takes at once: done in parts (4 + 2, 4 + 4)."""
    kv_cache, meta, gen = make_decode_batch(random_lens(16, group), 16, 2, 64, torch.float32)
    ref, native = run_both(kv_cache, meta, gen, 2 * group, 2, 64, torch.float32)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)


@needs_op
@pytest.mark.parametrize("lens", [[300], [257, 3], [1, 120, 299, 64]])
def test_native_decode_few_rows_split_kv_heads(lens):
    """With fewer rows than threads want, one row's kv heads go to several tasks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kv_cache, meta, gen = make_decode_batch(lens, 16, 3, 64, torch.float32)
        ref, native = run_both(kv_cache, meta, gen, 6, 3, 64, torch.float32)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)


@needs_op
def test_native_backend_keeps_prefill_rows():
    """A mixed step: decode rows through the op, a prefill span through the parent path."""
    kv_cache, meta, gen = make_decode_batch([5, 40, 17], 16, 3, 64, torch.float32, prefill_len=21)
    ref, native = run_both(kv_cache, meta, gen, 9, 3, 64, torch.float32)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)


@needs_op
def test_block_zero_and_shuffled_tables_are_used():
    kv_cache, meta, _ = make_decode_batch([33, 20, 48], 16, 3, 64, torch.float32)
    """The batch builder's own promise, so the comparisons above cover these cases."""
    tables = meta.decode_block_tables
    assert tables[-1, 0] == 0, "the last row should own block 0"
    assert tables[:, 0].tolist() != sorted(tables[:, 0].tolist())


def decode_args(nd=2, block_size=16):
    kv_cache = torch.randn(6, NUM_LAYERS, 2, block_size, 3, 64)
    q = torch.randn(nd, 9, 64)
    tables = torch.tensor([[1, 2], [3, 4]])[:nd]
    return q, kv_cache, tables, torch.tensor([20, 32])[:nd]


@needs_op
@pytest.mark.parametrize(
    "bad, word",
    [
        (lambda a: (a[0], a[1], a[2].int(), a[3]), "block_tables"),
        (lambda a: (a[0], a[1].transpose(0, 1), a[2], a[3]), "kv_cache"),
        (lambda a: (a[0][:, :8], a[1], a[2], a[3]), "q"),
        (lambda a: (a[0].double(), a[1], a[2], a[3]), "q"),
        (lambda a: (a[0], a[1], a[2], a[3].int()), "seq_lens"),
        (lambda a: (a[0], a[1], a[2], torch.tensor([20, 33])), "seq_lens"),
        (lambda a: (a[0], a[1], a[2], torch.tensor([20, 0])), "seq_lens"),
        (lambda a: (a[0], a[1], torch.tensor([[1, 6], [3, 4]]), a[3]), "block_tables"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(bad, word):
    q, kv_cache, tables, lens = bad(decode_args())
    with pytest.raises(ValueError, match=word):
        paged_decode_attention(q, kv_cache, tables, lens, LAYER, 0.125)


@needs_op
def test_registry_picks_native_on_cpu():
    assert create_attention_backend(None, "cpu").name == "cpu"
    assert create_attention_backend("cpu").name == "cpu"
    assert create_attention_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        create_attention_backend("flash")


def test_registry_falls_back_to_torch_without_the_op(monkeypatch):
    monkeypatch.setattr(cpu_native, "load_paged_decode", lambda: None)
    assert create_attention_backend(None, "cpu").name == "torch"
    assert create_attention_backend("cpu", "cpu").name == "torch"


@needs_op
def test_engine_tokens_match_torch_backend():
    from tandem.engine import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "cpu"):
        llm = LLM(dtype="float32", attention_backend=backend, kv_cache_memory="128MiB")
        model = llm.engine.runner.model
        assert next(m.backend for m in model.modules() if hasattr(m, "backend")).name == backend
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
        del llm
    assert tokens["cpu"] == tokens["torch"]
