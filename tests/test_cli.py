"""The tandem command: flags and their help come from the config fields."""

from __future__ import annotations

import dataclasses

import pytest
from tandem.engine.config import CacheConfig, EngineConfig, parse_size
from tandem.services.cli import build_parser, engine_options


def test_help_comes_from_config_field_docs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps lines, even at hyphens
    for f in dataclasses.fields(CacheConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert "".join(f.metadata["help"].split()) in text


def test_flags_map_to_engine_options():
    args = build_parser().parse_args(
        [
            "generate",
            "some/model",
            "--block-size",
            "32",
            "--no-enable-prefix-caching",
            "--kv-cache-memory",
            "2GiB",
            "--dtype",
            "bfloat16",
        ]
    )
    options = engine_options(args)
    assert options == {
        "model": "some/model",
        "block_size": 32,
        "enable_prefix_caching": False,
        "kv_cache_memory": "2GiB",
        "dtype": "bfloat16",
    }
    config = EngineConfig.from_options(**options)
    assert config.cache.block_size == 32 and config.model.model == "some/model"


def test_bad_flag_values_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--dtype", "float8"])
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_options(block_size=12)
    with pytest.raises(ValueError, match="kv_connector"):
        EngineConfig.from_options(role="decode")


def test_parse_size():
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_size("lots")
