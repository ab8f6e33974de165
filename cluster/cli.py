"""The `diptych` command line: generate, chat, up, gateway."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterator, Sequence

from diptych.cluster.config import ConfigError
from diptych.cluster.up import add_up_parser, cmd_gateway, cmd_up
from diptych.engine.config import ModelConfigError
from diptych.engine.detokenizer import IncrementalDetokenizer
from diptych.engine.llm_engine import EngineConfig, LLMEngine, RequestError
from diptych.engine.loader import ModelLoadError
from diptych.engine.messages import GenerateRequest, SamplingParams, SamplingParamsError
from diptych.engine.tokenizer import Tokenizer, load_tokenizer

USER_ERRORS = (ConfigError, ModelLoadError, ModelConfigError, RequestError, SamplingParamsError, ValueError)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2)"
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diptych", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print the completion of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--no-chat-template", action="store_true", help="complete the raw text")
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat with streaming output")
    chat.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    _sampling_args(chat)
    add_up_parser(sub)
    return parser


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def stream_completion(
    engine: LLMEngine, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[str]:
    """Run one request on the local engine, yielding text as it becomes safe to print."""
    request_id = uuid.uuid4().hex
    engine.add_request(GenerateRequest(request_id, tuple(prompt_ids), params))
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=params.stop)
    finished = False
    while not finished:
        for delta in engine.step():
            if delta.request_id != request_id:
                continue
            yield detok.add(delta.token_ids)
            finished = delta.finished or detok.stopped
    if detok.stopped:
        engine.abort_request(request_id)
    else:
        yield detok.flush()


def _engine(args: argparse.Namespace) -> tuple[LLMEngine, Tokenizer]:
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device))
    assert engine.source is not None
    return engine, load_tokenizer(engine.source)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_from(args)
    engine, tokenizer = _engine(args)
    if args.no_chat_template or not tokenizer.has_chat_template():
        ids = tokenizer.encode(args.prompt)
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    for text in stream_completion(engine, tokenizer, ids, params):
        print(text, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_from(args)
    engine, tokenizer = _engine(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("diptych chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages)
        reply = []
        for text in stream_completion(engine, tokenizer, ids, params):
            reply.append(text)
            print(text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "up": cmd_up, "gateway": cmd_gateway}
    try:
        return handlers[args.command](args)
    except USER_ERRORS as e:
        print(f"diptych: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
