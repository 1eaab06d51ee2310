"""Compile the attention and norm kernels for an H100-class GPU (sm_90) without one.

Run as its own process (``tests/test_triton_backend.py`` does): the kernels must be
defined with TRITON_INTERPRET unset, so that they go through Triton's real compiler down
to a cubin (ptxas ships in the triton wheel). That catches what the interpreter lets
through: types that differ across a loop, shapes tl.dot refuses, unsupported constructs.
Prints one line per kernel; exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from tandem.kernels import cache_write, norm_rope, paged_decode, paged_prefill  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_for_gpu(fn, pointers: dict[str, str], constexprs: dict, floats=()) -> int:
    """Bytes of cubin for ``fn``; arguments not named are 32-bit ints (strides, sizes)."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET)
    return len(kernel.asm["cubin"])


def main() -> int:
    bf16 = "*bf16"
    attn = dict(NUM_KV_HEADS=8, GROUP=4, BLOCK_SIZE=16, HEAD_PAD=128, UPCAST=False,
                PRECISION="tf32")  # fmt: skip
    cases = [
        (cache_write._reshape_and_cache_kernel,
         dict(key_ptr=bf16, value_ptr=bf16, cache_ptr=bf16, slot_ptr="*i64"),
         dict(NUM_KV_HEADS=8, HEAD_DIM=80, BLOCK_SIZE=16, HEADS_PAD=8, HEAD_PAD=128), ()),
        (paged_decode._paged_decode_kernel,
         dict(out_ptr=bf16, q_ptr=bf16, cache_ptr=bf16, tables_ptr="*i64", seq_lens_ptr="*i64"),
         dict(attn, HEAD_DIM=80, GROUP_PAD=16, TILE=64, USE_WINDOW=True), ("qk_scale",)),
        (paged_prefill._paged_prefill_kernel,
         dict(out_ptr=bf16, q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, cache_ptr=bf16,
              tables_ptr="*i64", query_start_ptr="*i64", prefix_lens_ptr="*i64"),
         dict(attn, HEAD_DIM=128, BLOCK_M=64, TILE=64, USE_WINDOW=True), ("qk_scale",)),
        (norm_rope._rms_norm_kernel,
         dict(out_ptr=bf16, x_ptr=bf16, residual_ptr=bf16, residual_out_ptr=bf16,
              weight_ptr=bf16),
         dict(HIDDEN=576, BLOCK=1024, HAS_RESIDUAL=True), ("eps",)),
        (norm_rope._rotary_kernel,
         dict(q_out_ptr=bf16, k_out_ptr=bf16, q_ptr=bf16, k_ptr=bf16, positions_ptr="*i64",
              cos_ptr="*fp32", sin_ptr="*fp32"),
         dict(NUM_HEADS=9, NUM_KV_HEADS=3, HEAD_DIM=64, HALF=32, HEADS_PAD=16,
              KV_HEADS_PAD=4, HALF_PAD=32, IS_NEOX=False), ()),
    ]  # fmt: skip
    for fn, pointers, constexprs, floats in cases:
        size = compile_for_gpu(fn, pointers, constexprs, floats)
        print(f"{fn.__name__}: {size} bytes of sm_90 cubin", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
