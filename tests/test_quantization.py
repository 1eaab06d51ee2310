"""Weight-only quantization: the int4 packing, RTN error bounds, the quantized layers, and
the w8a16 / w4a16 Triton kernels against their torch references (under
TRITON_INTERPRET=1 on the CPU; compiled on a GPU when one is present)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.quantization import (  # noqa: E402
    QuantEmbedding,
    QuantLinear,
    create_quantization_method,
    quantize_model,
    weight_bytes,
)
from tandem.engine.quantization.rtn import pack_int4, quantize_int4, quantize_int8  # noqa: E402
from tandem.kernels import quant_reference as ref  # noqa: E402
from tandem.services.cli import build_parser, engine_options  # noqa: E402
from torch import nn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_pack_int4_round_trips_and_puts_even_k_in_the_low_nibble():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))
    assert torch.equal(ref.unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even K"):
        pack_int4(codes[:, :5])


def _expand(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group_size, dim=1)[:, :k]


# Bound on |w - dequantize(quantize(w))| in units of the group's scale: 1/2 from rounding,
# plus the rounding of the scale to 16 bits (int4 spans 15 steps, so up to 15 * 2^-8).
SCALE_BOUND = {torch.float32: 0.5001, torch.bfloat16: 0.56, torch.float16: 0.51}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("k", (128, 200))  # 200: a last group shorter than the others
def test_rtn_error_is_at_most_half_a_step(dtype, group_size, k):
    torch.manual_seed(0)
    weight = (torch.randn(24, k) * torch.rand(24, 1) * 3).to(dtype)
    weight[3] = 0  # an all-zero row: scales must not be 0, codes must give back 0
    weight[5] += 1.0  # an all-positive row: the range still holds 0
    w = weight.float()
    q8, s8 = quantize_int8(weight, group_size)
    assert q8.shape == (24, k) and s8.shape == (24, -(-k // group_size)) and s8.dtype == dtype
    assert q8.abs().max() <= 127
    err8 = (ref.dequantize_int8(q8, s8, group_size, torch.float32) - w).abs()
    assert (err8 <= SCALE_BOUND[dtype] * _expand(s8, group_size, k) + 1e-7).all()
    q4, s4, z4 = quantize_int4(weight, group_size)
    assert q4.shape == (24, k // 2) and z4.dtype == torch.uint8 and z4.max() <= 15
    err4 = (ref.dequantize_int4(q4, s4, z4, group_size, torch.float32) - w).abs()
    assert (err4 <= SCALE_BOUND[dtype] * _expand(s4, group_size, k) + 1e-7).all()
    assert err4[3].max() == 0 and err8[3].max() == 0
    # int4 has 16 levels to int8's 255: its steps are coarser, its error larger
    assert err4.mean() > 4 * err8.mean()


@pytest.mark.parametrize("bits", (8, 4))
def test_dequantize_in_16_bits_rounds_once(bits):
    weight = torch.randn(16, 96).to(torch.bfloat16)  # scales in bfloat16, as in the engine
    method = create_quantization_method(f"int{bits}", 32)
    qw = method.quantize(weight)
    exact = qw.dequantize(torch.float32)
    assert torch.equal(qw.dequantize(torch.bfloat16), exact.to(torch.bfloat16))
    rows = torch.tensor([7, 0, 7])
    assert torch.equal(qw.dequantize(torch.float32, rows=rows), exact[rows])


# Kernel vs reference: the kernel rounds the dequantized weight to the activation dtype
# and accumulates in float32; the reference computes all of it in float32.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
# (M, N, K): one token; N and K off the block and group grid; M past the small-batch tile.
SHAPES = ((1, 64, 128), (5, 70, 200), (19, 33, 96))


def _random_case(bits, m, n, k, group_size, dtype):
    torch.manual_seed(m * 1000 + n + k + bits)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    qw = create_quantization_method(f"int{bits}", group_size).quantize(weight)
    x = torch.randn(m, k, dtype=dtype)
    return x.to(DEVICE), qw.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_kernel_matches_reference(dtype, bits, shape, group_size):
    from tandem.kernels import quant_matmul

    x, qw = _random_case(bits, *shape, group_size, dtype)
    if bits == 8:
        expected = ref.w8a16_matmul(x, qw.qweight, qw.scales, group_size)
        got = quant_matmul.w8a16_matmul(x, qw.qweight, qw.scales, group_size)
    else:
        expected = ref.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, group_size)
        got = quant_matmul.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, group_size)
    assert got.shape == shape[:2] and got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("bits", (8, 4))
def test_kernel_split_k_sums_the_slices(bits):
    from tandem.kernels import quant_matmul

    x, qw = _random_case(bits, 3, 40, 448, 64, torch.bfloat16)  # 7 K tiles over 3 slices
    zeros = getattr(qw, "zeros", None)
    expected = quant_matmul.quant_matmul(x, qw.qweight, qw.scales, zeros, 64, bits, split_k=1)
    got = quant_matmul.quant_matmul(x, qw.qweight, qw.scales, zeros, 64, bits, split_k=3)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.bfloat16])


def test_kernel_wrappers_name_the_bad_argument():
    from tandem.kernels import quant_matmul

    x, qw = _random_case(4, 2, 32, 64, 32, torch.float16)
    args = (qw.qweight, qw.scales, qw.zeros)
    with pytest.raises(ValueError, match="^x:"):
        quant_matmul.w4a16_matmul(x.t().contiguous().t(), *args, 32)  # column-major x
    with pytest.raises(ValueError, match="^scales:"):
        quant_matmul.w4a16_matmul(x, qw.qweight, qw.scales.float(), qw.zeros, 32)
    with pytest.raises(ValueError, match="^zeros:"):
        quant_matmul.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros[:, :1], 32)
    with pytest.raises(ValueError, match="^qweight:"):
        quant_matmul.w8a16_matmul(x, qw.qweight, qw.scales, 32)  # int4 codes as int8
    with pytest.raises(ValueError, match="^group_size:"):
        quant_matmul.w4a16_matmul(x, *args, 16)


def _tiny_model() -> nn.Module:
    from tandem.engine.attention import create_attention_backend
    from tandem.engine.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, create_attention_backend("torch"))
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("name", ("int8", "int4"))
def test_quantize_model_replaces_every_linear_and_shares_the_tied_table(name):
    model = _tiny_model()
    hidden = torch.randn(3, 96)
    ids = torch.tensor([0, 299, 5])
    expected_logits, expected_rows = model.compute_logits(hidden), model.model.embed_tokens(ids)
    summary = quantize_model(model, create_quantization_method(name, 32))
    assert not any(isinstance(m, nn.Linear | nn.Embedding) for m in model.modules())
    assert summary.num_linear == 2 * 4 + 1 and summary.num_embedding == 1
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.weight_q is model.model.embed_tokens.weight_q  # stored once
    assert model.lm_head.weight_q.bits == 8  # the vocabulary table stays int8 under int4
    assert summary.bytes_after == weight_bytes(model) < summary.bytes_before / 2.5
    # the tied table in int8: logits and embedding rows stay within a small error
    torch.testing.assert_close(model.compute_logits(hidden), expected_logits, atol=2e-2, rtol=0)
    torch.testing.assert_close(model.model.embed_tokens(ids), expected_rows, atol=2e-3, rtol=0)


def test_quant_linear_keeps_the_bias_and_leading_dims():
    linear = nn.Linear(64, 24)
    quant = QuantLinear(create_quantization_method("int8", 64).quantize(linear.weight), linear.bias)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(quant(x), linear(x), atol=2e-2, rtol=0)


def test_options_are_validated_and_reach_the_cli(capsys):
    config = EngineConfig.from_options(quantization="int4", quantization_group_size=64)
    assert (config.model.quantization, config.model.quantization_group_size) == ("int4", 64)
    with pytest.raises(ValueError, match="quantization must be"):
        EngineConfig.from_options(quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size"):
        EngineConfig.from_options(quantization="int8", quantization_group_size=48)
    with pytest.raises(ValueError, match="unknown method"):
        create_quantization_method("fp8")
    args = build_parser().parse_args(
        ["generate", "--quantization", "int4", "--quantization-group-size", "64"]
    )
    assert engine_options(args) == {"quantization": "int4", "quantization_group_size": 64}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "--quantization {int8,int4}" in help_text and "--quantization-group-size" in help_text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_w4a16_benchmark_runs_on_the_gpu():
    from tandem.kernels.quant_matmul import benchmark_w4a16

    rows = benchmark_w4a16(batch_sizes=(1, 16), n=1024, k=1024)
    assert [r.batch for r in rows] == [1, 16]
    assert all(r.w4a16_ms > 0 and r.bf16_ms > 0 for r in rows)


# Compiles the kernel down to sm_90 machine code in a process without TRITON_INTERPRET
# (the interpreter accepts what the compiler may refuse), through the helper the attention
# kernels' test uses.
_COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
from compile_kernels_sm90 import compile_for_gpu
from tandem.kernels.quant_matmul import _quant_matmul_kernel
for dt, int4, split, block_m in (("bf16", 1, 1, 16), ("bf16", 1, 4, 16), ("fp16", 0, 1, 64),
                                 ("fp32", 1, 1, 64)):
    out = "*fp32" if split > 1 else "*" + dt
    ptrs = dict(x_ptr="*" + dt, qweight_ptr="*u8" if int4 else "*i8", scales_ptr="*" + dt,
                zeros_ptr="*u8", out_ptr=out)
    consts = dict(INT4=bool(int4), SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    print(dt, int4, split, compile_for_gpu(_quant_matmul_kernel, ptrs, consts), "bytes")
"""


def _ptxas_available() -> bool:
    import triton

    return (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton ships no ptxas")
def test_kernel_compiles_for_a_gpu(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    tests_dir = str(pathlib.Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-P", "-c", _COMPILE, tests_dir], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bytes") == 4, proc.stdout
