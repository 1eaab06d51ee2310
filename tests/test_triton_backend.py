"""The `triton` attention backend against the `torch` one: one mixed step of real batch
metadata (decodes, a fresh prompt, chunks with a cached prefix), the registry, and the
whole engine on a tiny random Llama (greedy tokens must match).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here and in
conftest.py before the first kernel module is imported).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tandem.engine.attention import create_attention_backend  # noqa: E402
from tandem.engine.attention.torch_attn import TorchAttentionBackend  # noqa: E402
from tandem.engine.attention.triton_attn import TritonAttentionBackend  # noqa: E402
from tandem.engine.input_builder import RequestState, build_step_inputs  # noqa: E402
from tandem.engine.sampling_params import SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS, LAYER = 2, 1
# (tokens already computed, tokens scheduled): decodes at lengths 1, 16, 17 and 40, a
# fresh 21-token prompt, chunks after a one-block prefix and after a block plus one token
STEP = [(0, 1), (15, 1), (16, 1), (39, 1), (0, 21), (16, 9), (17, 16)]


def mixed_step(block_size: int, seed: int = 0):
    """The batch builder's inputs for STEP on shuffled blocks of a cache with 4 spare."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in STEP]
    pool = torch.randperm(sum(need) + 4, generator=gen).tolist()
    batch, taken = [], 0
    for i, ((computed, n), count) in enumerate(zip(STEP, need)):
        total = computed + n
        state = RequestState(f"r{i}", [7] * total, total, SamplingParams(),
                             pool[taken : taken + count], computed)  # fmt: skip
        batch.append((state, n))
        taken += count
    return build_step_inputs(batch, block_size).meta, len(pool), gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 8])
def test_mixed_step_matches_torch_backend(dtype, block_size):
    meta, num_blocks, gen = mixed_step(block_size)
    num_kv_heads, num_heads, head_dim = 2, 6, 64
    shape = (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=gen).to(dtype)
    n = meta.num_tokens
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, dim=-1)
    q = q.view(n, num_heads, head_dim)
    k, v = k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim)
    scale = head_dim**-0.5

    torch_cache = cache.clone()
    TorchAttentionBackend().forward(LAYER, q, k, v, torch_cache, meta, scale)
    # the reference output in float32 on the same (rounded) inputs
    expected = TorchAttentionBackend().forward(
        LAYER, q.float(), k.float(), v.float(), cache.float().clone(), meta, scale
    )
    dev = torch.device(DEVICE)
    triton_cache = cache.clone().to(dev)
    backend = TritonAttentionBackend(DEVICE)
    out = backend.forward(LAYER, q.to(dev), k.to(dev), v.to(dev), triton_cache, meta, scale)
    assert out.dtype == dtype
    assert torch.equal(triton_cache.cpu(), torch_cache)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol)


def test_step_args_are_built_once_per_step():
    meta, num_blocks, _ = mixed_step(16)
    cache = torch.zeros(num_blocks, NUM_LAYERS, 2, 16, 2, 64, device=DEVICE)
    backend = TritonAttentionBackend(DEVICE)
    first = backend.step_args(meta, cache)
    assert backend.step_args(meta, cache) is first  # the next layer reuses them
    assert first.query_start_loc.tolist() == [0, 21, 30, 46]
    assert first.prefix_lens.tolist() == [0, 16, 17]
    assert first.max_query_len == 21
    assert backend.step_args(mixed_step(16, seed=1)[0], cache) is not first


def test_registry_defaults_and_interpreter_requirement(monkeypatch):
    assert create_attention_backend("triton", "cpu").name == "triton"
    assert create_attention_backend(None, "cuda").name == "triton"  # no GPU touched here
    from tandem.kernels import checks

    monkeypatch.setattr(checks, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        create_attention_backend("triton", "cpu")


def test_engine_greedy_tokens_match_torch_backend(tmp_path, default_model_dir):
    """A tiny random Llama through the whole engine on both backends. A 16-token budget
    splits the prompts into chunks (prefill with a cached prefix) beside running decodes,
    and the second batch reuses the first one's cached prefix blocks."""
    import transformers as tf
    from tandem.engine import LLM

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # peaked logits: greedy choices are not near-ties
    model.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 1000, (24,), generator=gen).tolist()
    first = [prefix + [5, 6], torch.randint(3, 1000, (9,), generator=gen).tolist()]
    second = [prefix + [8] * 11, prefix[:17]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tmp_path), tokenizer=str(default_model_dir), dtype="float32",
                  attention_backend=backend, num_kv_blocks=64, block_size=8,
                  max_num_batched_tokens=16)  # fmt: skip
        layers = llm.engine.runner.model.modules()
        assert next(m.backend for m in layers if hasattr(m, "backend")).name == backend
        outs = []
        for batch in (first, second):
            prompts = [{"prompt_token_ids": p} for p in batch]
            outs += llm.generate(prompts, params, use_tqdm=False)
        assert [o.num_cached_tokens for o in outs[2:]] == [24, 16]  # prefix-cache hits
        results[backend] = [o.outputs[0] for o in outs]
    for torch_out, triton_out in zip(results["torch"], results["triton"]):
        assert triton_out.token_ids == torch_out.token_ids
        for a, b in zip(torch_out.logprobs, triton_out.logprobs):
            token = next(iter(a))
            assert abs(a[token].logprob - b[token].logprob) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_kernels_needs_a_gpu(capsys):
    from tandem.services.cli import main

    assert main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _ptxas_available() -> bool:
    import triton

    return (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton ships no ptxas")
def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs what the compiler might refuse: compile each kernel down to
    sm_90 machine code, in a process where TRITON_INTERPRET is unset (no GPU needed)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    script = pathlib.Path(__file__).parent / "compile_kernels_sm90.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bytes of sm_90 cubin") == 5, proc.stdout
