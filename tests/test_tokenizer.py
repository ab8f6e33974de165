"""Tokenizer and chat template of the embedded model against transformers; streaming detokenization."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from diptych.engine.detokenizer import IncrementalDetokenizer
from diptych.engine.loader import ModelLoadError, resolve_model
from diptych.engine.tokenizer import Tokenizer, load_tokenizer

STRINGS = [
    "Hello, world!",
    "  leading spaces and a\ttab\nand a newline",
    "Héllo wörld — café naïve façade",
    "日本語のテキストと中文字符",
    "emoji 😀🎉👍🏽 and a ﬁ ligature",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
]
# Accents, CJK and emoji: many of their characters take several byte-level tokens.
MIXED = (
    "Héllo wörld! Café naïve — 日本語のテキスト 😀🎉👍🏽 中文字符, ﬁ ligature. "
    "The capital of France is Paris. Bye."
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def reference() -> PreTrainedTokenizerBase:
    """transformers' own GGUF tokenizer, loaded separately from ours."""
    path = resolve_model(None).path
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] = ()) -> list[str]:
    """Feed ids in chunks of the given sizes (default one at a time), then flush; return every piece."""
    sizes = list(chunks) or [1] * len(ids)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(detok.add(ids[start : start + size]))
        start += size
    return [*pieces, detok.flush()]


# ---------------------------------------------------------------- tokenizer


def test_encode_decode_match_transformers(tok: Tokenizer, reference: PreTrainedTokenizerBase) -> None:
    for text in STRINGS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == reference.encode(
                text, add_special_tokens=special
            )
        ids = reference.encode(text)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_special_ids(tok: Tokenizer, reference: PreTrainedTokenizerBase) -> None:
    assert tok.bos_token_id == reference.bos_token_id
    assert tok.vocab_size == len(reference) == 49152
    assert reference.eos_token_id in tok.eos_token_ids
    assert reference.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids  # ends every ChatML turn


def test_chat_template_matches_transformers(tok: Tokenizer, reference: PreTrainedTokenizerBase) -> None:
    assert tok.has_chat_template()
    ids = tok.apply_chat_template(QUESTION)
    expected = reference.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if isinstance(expected, Mapping) else expected)
    # The template from the GGUF metadata, rendered by jinja2 alone: SmolLM2's ChatML with its system prompt.
    rendered = (
        jinja2.Environment()
        .from_string(reference.chat_template)
        .render(messages=QUESTION, add_generation_prompt=True)
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == reference.encode(rendered, add_special_tokens=False)
    without_prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt and len(ids) > len(without_prompt)


def test_load_tokenizer_once_per_process(tok: Tokenizer) -> None:
    assert load_tokenizer(resolve_model(None)) is tok


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer") as e:
        load_tokenizer(resolve_model(tmp_path))
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- incremental detokenizer


def test_streaming_reproduces_decode(tok: Tokenizer) -> None:
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are parts of a character
    prompt = tok.encode("Repeat after me:")
    sizes = np.random.default_rng(0).integers(1, 4, len(ids))
    chunked = list(sizes[: np.searchsorted(np.cumsum(sizes), len(ids)) + 1])
    for chunks in ([], chunked):
        detok = IncrementalDetokenizer(tok, prompt)
        pieces = stream(detok, ids, chunks)
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == detok.text == tok.decode(ids)
        assert not detok.stopped


@dataclass(frozen=True)
class CountingTokenizer(Tokenizer):
    """Records how many ids every decode call gets."""

    lengths: list[int] = field(default_factory=list)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_decode_cost_does_not_grow_with_output(tok: Tokenizer) -> None:
    counting = CountingTokenizer(tok.hf, tok.eos_token_ids, tok.bos_token_id, tok.vocab_size)
    ids = tok.encode(MIXED * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, tok.encode("Go:"))
    assert "".join(stream(detok, ids)) == tok.decode(ids)
    assert len(ids) > 1000 and max(counting.lengths) <= 8  # a window of recent tokens only


@pytest.mark.parametrize("stop", ["Paris.", "France is Paris", "テキスト", "😀🎉"])
def test_stop_string_across_tokens(tok: Tokenizer, stop: str) -> None:
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert not any(stop in tok.decode(ids[i : i + 1]) for i in range(len(ids)))  # it spans tokens
    full = tok.decode(ids)
    expected = full[: full.index(stop)]
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), stop=["never there", stop])
    emitted = ""
    for i in ids:
        emitted += detok.add([i])
        assert expected.startswith(emitted)  # nothing from the stop string on, ever
    assert detok.stopped
    assert emitted + detok.flush() == detok.text == expected
    assert detok.add(tok.encode(" more", add_special_tokens=False)) == ""


def test_partial_stop_match_is_emitted_in_full(tok: Tokenizer) -> None:
    ids = tok.encode(MIXED, add_special_tokens=False)
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), stop=["Paris!"])
    held_back = False
    for i in ids:
        detok.add([i])
        held_back |= detok.text.endswith(" is ") and full.startswith(detok.text + "Paris")
    assert held_back  # "Paris" waited until "." showed it is not "Paris!"
    assert detok.text + detok.flush() == full and not detok.stopped


def test_flush_releases_an_undecided_tail(tok: Tokenizer) -> None:
    ids = tok.encode("The capital is Par", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["Paris"])
    streamed = "".join(detok.add([i]) for i in ids)
    assert not streamed.endswith("Par")
    assert streamed + detok.flush() == tok.decode(ids) and not detok.stopped


def test_sentencepiece_leading_space_comes_from_the_prompt() -> None:
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    corpus = ["hello world how are you", "the world is big and the sea is deep", "hello again my friend"]
    raw.train_from_iterator(
        corpus * 3, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok = Tokenizer.from_hf(
        PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    )
    ids = tok.encode("hello world is big", add_special_tokens=False)
    prompt, output = ids[:1], ids[1:]
    expected = tok.decode(ids)[len(tok.decode(prompt)) :]
    assert expected.startswith(" ") and not tok.decode(output).startswith(" ")  # decoding alone loses it
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), output)) == expected
