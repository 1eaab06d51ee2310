"""Loading the tokenizer and the ids that end a sequence.

The engine and the router tokenize with the same local tokenizer folder (usually the
folder ``model_loader.resolve_model_path`` returns); ``eos_token_ids`` feeds the runtime
stop set, which is never written back into the config.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

from tandem.engine.model_loader import ModelNotFoundError, hf_offline

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: pathlib.Path | str) -> PreTrainedTokenizerBase:
    """The fast (Rust-backed) tokenizer of a local folder."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"tokenizer folder {path} does not exist")
    hf_offline()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        # transformers reports a folder without tokenizer files in several ways; one
        # error type lets callers tell a bad path from a bug.
        raise ModelNotFoundError(f"no usable tokenizer files in {path}: {exc}") from exc
    if not tokenizer.is_fast:
        # Incremental detokenization and offsets rely on the Rust tokenizer's behaviour.
        raise ModelNotFoundError(f"{path} has only a slow tokenizer; a tokenizer.json is needed")
    return tokenizer


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_dir: pathlib.Path) -> frozenset[int]:
    """The ids that end generation: the tokenizer's EOS plus generation_config.json's.

    Instruct models often stop on a different token from the tokenizer's EOS (e.g. an
    end-of-turn token), and generation_config.json is where that is recorded.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = pathlib.Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        ids.update(_as_ids(json.loads(generation_config.read_text()).get("eos_token_id")))
    return frozenset(ids)


def load_eos_token_ids(
    tokenizer_path: pathlib.Path | str, model_dir: pathlib.Path | str
) -> frozenset[int]:
    """``eos_token_ids`` of the tokenizer in ``tokenizer_path`` (for a process, the engine
    core, that needs the ids but not the tokenizer)."""
    return eos_token_ids(load_tokenizer(tokenizer_path), pathlib.Path(model_dir))


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
