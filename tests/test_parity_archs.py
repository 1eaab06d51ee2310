"""Parity with transformers for every supported architecture, on tiny random models.

Each architecture gets a tiny random checkpoint (hidden 64, 2 layers, vocab 1000) saved
with ``save_pretrained`` and one transformers greedy reference; the engine then runs the
same batch under each configuration of ``parity.CONFIGURATIONS``. The prompts are token
ids below 1000, so the default model's tokenizer (vocab 49152) can stand in for one.

Weights are drawn with std 0.2 instead of transformers' 0.02, and norm weights and
biases are drawn too (transformers starts them at 1 and 0): near-uniform logits would
make near-ties common, and a bias or norm weight left unloaded must change the output.
"""

from __future__ import annotations

import pytest
import torch
from parity import CONFIGURATIONS, Tolerance, check_configuration, hf_greedy
from tandem.engine.llm import LLM

VOCAB_SIZE = 1000
NUM_NEW_TOKENS = 16
WEIGHT_STD = 0.2
# Tiny float32 models: the two sides differ by summation order only (<= 1.2e-5 observed
# over all architectures and configurations), so 1e-4 leaves ~9x headroom yet catches a
# subtle error (exact GELU in place of GPT-2's tanh form moves logprobs by 2e-4). Logits
# drawn with std 0.2 keep the top two tokens >3e-3 apart on these prompts; a divergence is
# only excused as a near-tie within 1e-2, and in one sequence of the nine at most.
TOLERANCE = Tolerance(logprob=1e-4, tie_gap=1e-2, max_divergent=1)

_LLAMA_LIKE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
_LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=64,
)  # fmt: skip


def make_config(arch: str):
    """A tiny transformers config of each architecture (and variant) under test."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**{**_LLAMA_LIKE, "num_key_value_heads": 4}, attention_bias=True)
    if arch == "llama3_gqa":
        return tf.LlamaConfig(**_LLAMA_LIKE, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True)
    if arch == "mistral":
        # The window (128) is below max_position_embeddings: the engine caps the length.
        return tf.MistralConfig(**_LLAMA_LIKE, sliding_window=128)
    if arch == "qwen2_tied":
        return tf.Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**_LLAMA_LIKE, head_dim=32)  # q width 128 != hidden 64
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    opt = dict(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
    if arch == "opt":
        return tf.OPTConfig(**opt)
    if arch == "opt_350m_style":  # projected embeddings, layer norm after each block
        return tf.OPTConfig(**opt, word_embed_proj_dim=32, do_layer_norm_before=False)
    raise ValueError(arch)


ARCHS = ("llama", "llama3_gqa", "mistral", "qwen2_tied", "qwen3", "gpt2", "opt", "opt_350m_style")


def make_model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1 or name.endswith("bias"):
                param.normal_(0.0, WEIGHT_STD)
            else:  # norm weights
                param.normal_(1.0, WEIGHT_STD)
    return model


def make_prompts() -> list[list[int]]:
    """Nine prompts of 3..70 tokens; four share a 40-token prefix (one is its first 32)."""
    gen = torch.Generator().manual_seed(1)

    def rand(n: int) -> list[int]:
        return torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist()

    prefix = rand(40)
    return [rand(3), rand(70), prefix + rand(6), prefix + rand(13), prefix + rand(27),
            rand(9), rand(17), rand(33), prefix[:32]]  # fmt: skip


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts()


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory, prompts):
    """(arch, model folder, transformers references) for one architecture."""
    model = make_model(request.param)
    model_dir = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(model_dir, safe_serialization=True)
    return request.param, str(model_dir), hf_greedy(model, prompts, NUM_NEW_TOKENS)


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_parity(case, configuration, prompts, default_model_dir):
    arch, model_dir, references = case
    reports = check_configuration(
        configuration, model_dir, prompts, references, TOLERANCE,
        tokenizer=str(default_model_dir), kv_cache_memory="64MiB",  # 1GiB default: slow to zero
    )  # fmt: skip
    for report in reports:
        print(f"{arch} {configuration}: {report.summary()}")


def test_mistral_sliding_window_caps_max_model_len(tmp_path, default_model_dir):
    make_model("mistral").save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), tokenizer=str(default_model_dir), dtype="float32")
    assert llm.engine.runtime.max_model_len == 128  # the window, not the 256 positions
    with pytest.raises(ValueError, match="max_model_len=128"):
        llm.generate({"prompt_token_ids": [5] * 128}, use_tqdm=False)


@pytest.mark.parametrize(("arch", "prefix"), [("gpt2", "transformer."), ("opt", "model.")])
def test_checkpoint_names_without_prefix(arch, prefix):
    """Checkpoints of the bare model (GPT2Model, OPTModel) name tensors without a prefix."""
    from tandem.engine.attention import create_attention_backend
    from tandem.engine.models import get_model_class

    hf_model = make_model(arch)
    state = {
        n.removeprefix(prefix): t for n, t in hf_model.state_dict().items() if n.startswith(prefix)
    }
    if arch == "gpt2":  # a causal-mask buffer that old GPT-2 checkpoints carry
        state["h.0.attn.bias"] = torch.ones(1, 1, 256, 256)
    model_cls = get_model_class([type(hf_model).__name__])
    model = model_cls(hf_model.config, create_attention_backend("torch"))
    loaded = model.load_weights(state.items())
    assert loaded == {n for n, _ in model.named_parameters()}  # lm_head is tied
    assert torch.equal(model.lm_head.weight, hf_model.lm_head.weight)


def test_sliding_window_limit():
    """Only a window that some layer uses and that is shorter than the context caps it."""
    import transformers as tf
    from tandem.engine.models.layers import sliding_window_limit

    assert sliding_window_limit(tf.MistralConfig(sliding_window=4096)) == 4096
    assert sliding_window_limit(tf.MistralConfig(sliding_window=None)) is None
    assert sliding_window_limit(tf.MistralConfig(max_position_embeddings=4096)) is None
    assert sliding_window_limit(tf.Qwen2Config(sliding_window=4096)) is None  # switched off
    sliding = dict(use_sliding_window=True, sliding_window=4096, num_hidden_layers=4)
    assert sliding_window_limit(tf.Qwen3Config(**sliding, max_window_layers=2)) == 4096
    assert sliding_window_limit(tf.Qwen3Config(**sliding, max_window_layers=4)) is None
