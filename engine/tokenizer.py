"""The model's tokenizer and chat template, from a HF directory or a GGUF file, loaded once per process."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from diptych.engine.loader import ModelLoadError, ModelSource

# Stands in for an assistant reply so the text the template puts after a turn can be found.
_TURN_MARKER = "diptych-turn-marker"
TOKENIZER_CACHE = Path.home() / ".cache" / "diptych" / "tokenizers"


@dataclass(frozen=True)
class Tokenizer:
    hf: PreTrainedTokenizerBase  # the transformers tokenizer underneath
    eos_token_ids: tuple[int, ...]  # eos plus the id the chat template ends a turn with
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of spaces: decoding must be the same piecewise as whole, for streaming.
        text = self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # a flat id list decodes to one string
        return text

    def has_chat_template(self) -> bool:
        return self.hf.chat_template is not None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        if not self.has_chat_template():
            raise ValueError("this model's tokenizer has no chat template")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template writes BOS and the other special tokens itself.
        return self.encode(str(text), add_special_tokens=False)

    @classmethod
    def from_hf(cls, hf: PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
        eos = [hf.eos_token_id, *extra_eos_ids, _turn_end_id(hf)]
        return cls(
            hf=hf,
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
            bos_token_id=hf.bos_token_id,
            vocab_size=len(hf),
        )


@functools.cache
def load_tokenizer(source: ModelSource) -> Tokenizer:
    """Parsing a GGUF tokenizer takes seconds, hence the cache (one per source per process)."""
    try:
        if source.kind == "gguf":
            hf = _gguf_tokenizer(source.path)
        else:
            hf = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ... on a bad tokenizer
        raise ModelLoadError(f"{source.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    return Tokenizer.from_hf(hf, _generation_eos_ids(source))


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Converting a GGUF's vocabulary takes ~8 s on a small CPU, and every worker process needs it: convert
    once, keep the result under ~/.cache/diptych keyed by the file's identity, and load that (< 1 s)."""
    stat = path.stat()
    cache = TOKENIZER_CACHE / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        hf.save_pretrained(staging)
        os.replace(staging, cache)  # atomic: concurrent processes never read a half-written copy
    except OSError:  # read-only home, or another process won the race: the converted one is fine
        shutil.rmtree(staging, ignore_errors=True)
    return hf


def _generation_eos_ids(source: ModelSource) -> list[int]:
    """A HF directory may list more stop ids in generation_config.json (Llama 3: end of turn, of message)."""
    file = source.path / "generation_config.json"
    if source.kind != "hf" or not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{file}: not a valid generation config ({e})") from None
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


def _turn_end_id(hf: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant reply (<|im_end|>, <|eot_id|>)."""
    if hf.chat_template is None:
        return None
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = str(hf.apply_chat_template(turn, tokenize=False))
    except (TemplateError, ValueError):  # some templates insist on other roles or orders
        return None
    if _TURN_MARKER not in text:
        return None
    after = hf.encode(text[text.index(_TURN_MARKER) + len(_TURN_MARKER) :], add_special_tokens=False)
    added = hf.added_tokens_decoder
    return after[0] if after and after[0] in added and added[after[0]].special else None
