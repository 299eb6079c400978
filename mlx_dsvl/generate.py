"""``python -m mlx_dsvl.generate``: streaming generation and interactive chat from the shell.

``mlx_dsvl.generate`` stays the function when this module is imported (the package's
``__init__``): reach the module with ``from mlx_dsvl.generate import main``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .blas import ensure_fast_blas
from .device import select_device
from .grammar import ResponseFormatError, grammar_source
from .model_options import add_model_arguments, check_draft_args, load_draft_from_args, load_from_args
from .processing.chat import place_images
from .sampling import SamplingOptions, add_arguments
from .session import ChatSession
from .streaming import GenerationChunk


# -- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.generate",
        description="Chat with DeepSeek-VL about images (MLX).",
    )
    add_model_arguments(p, "model")
    p.add_argument("--image", action="append", default=[],
                   help="image file, repeatable: one per <image_placeholder> in the prompt, in order "
                        "(with no placeholder the images go before the text)")
    p.add_argument("--prompt", default=None, help="the user message (required unless --chat)")
    p.add_argument("--system", default=None, help="system prompt (default: DeepSeek-VL's; '' for none)")
    add_arguments(p)  # --temperature, --top-p, --repetition-penalty, --max-tokens, --seed
    add_model_arguments(p, "dtype", "adapter", "device", "quantize", "quantize_vision", "kv_bits", "kv_group_size",
                        "quantized_kv_start", "max_context", "memory_limit", "draft", "draft_model", "num_draft_tokens")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="reply with JSON that validates against the JSON schema in FILE")
    shape.add_argument("--json", action="store_true", help="reply with a JSON object (any)")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat: /image PATH attaches, /new restarts, /exit quits; "
                        "Ctrl-C stops a reply")
    p.add_argument("--verbose", action="store_true",
                   help="print prompt tokens/s, time to first token, generation tokens/s, peak memory "
                        "(and with --draft or --draft-model the tokens drafted and accepted)")
    return p


def _print_stats(last: GenerationChunk) -> None:
    print(
        f"\n==========\n"
        f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec\n"
        f"Time to first token: {last.time_to_first_token:.3f} s\n"
        f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {last.peak_memory:.3f} GB",
        file=sys.stderr,
    )
    if last.drafted_tokens:
        print(f"Drafted: {last.drafted_tokens} tokens, accepted {last.accepted_tokens} "
              f"({last.accepted_tokens / last.drafted_tokens:.0%})", file=sys.stderr)


def _reply(session: ChatSession, text: str, images: list[str], args, fmt: dict | None) -> None:
    last = None
    notices: list[str] = []
    session.on_truncate = notices.append  # told after the reply, not in the middle of it
    reply = session.send(text, images, SamplingOptions.from_args(args), response_format=fmt)
    try:
        for chunk in reply:
            print(chunk.text, end="", flush=True)
            last = chunk
        print(flush=True)
    finally:
        reply.close()  # stopped early (Ctrl-C): the session keeps the partial reply
        for n in notices:
            print(f"[mlx-dsvl] {n} (see --max-context)", file=sys.stderr)
    if args.verbose and last is not None:
        _print_stats(last)


COMMANDS = {
    "/image PATH": "attach an image to your next message (repeatable)",
    "/new": "start a new conversation",
    "/exit": "quit (also /quit or Ctrl-D)",
}


def _command(session: ChatSession, line: str, pending: list[str]) -> bool:
    """Run a /command; False for /exit.  Errors are one line and the chat goes on."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/new":
        session.reset()
        pending.clear()
        print("(new conversation)", file=sys.stderr)
    elif name == "/image":
        path = rest.strip()
        if not path:
            print("error: /image needs a path: /image PATH", file=sys.stderr)
            return True
        try:
            session.processor.image_processor([path])  # fail now, with the path, if unreadable
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return True
        pending.append(path)
        print(f"(attached {path}; {len(pending)} image(s) for the next message)", file=sys.stderr)
    else:
        usage = "; ".join(f"{c}: {what}" for c, what in COMMANDS.items())
        print(f"unknown command {line!r}. Commands: {usage}; start a message with // to send it "
              "beginning with /", file=sys.stderr)
    return True


def _chat_loop(session: ChatSession, args, fmt: dict | None) -> None:
    """A failed turn prints one line and the conversation goes on unchanged; Ctrl-C stops a reply
    (keeping its text), Ctrl-D quits."""
    pending: list[str] = list(args.image)
    print("Chat: /image PATH attaches an image to your next message, /new restarts, /exit quits.",
          file=sys.stderr)
    first = args.prompt
    while True:
        if first is not None:
            line, first = first, None
        else:
            try:
                line = input("User: ").strip()
            except EOFError:
                break
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not _command(session, line, pending):
                break
            continue
        text = place_images(line[1:] if line.startswith("//") else line, len(pending),
                            session.processor.image_tag)
        try:
            print("Assistant: ", end="", flush=True)
            _reply(session, text, pending, args, fmt)
        except (ValueError, OSError) as e:
            print(f"\nerror: {_one_line(e)}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        pending = []


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def response_format(args) -> dict | None:
    """``--json-schema FILE`` / ``--json`` as OpenAI's ``response_format``; ``ValueError`` naming
    the file when it is no JSON."""
    if args.json:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--json-schema {path}: cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--json-schema {path}: not a JSON file: {e}") from None
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def check_args(args) -> dict | None:
    """Option values a run would only trip over later: ``ValueError`` naming the flag; returns
    the response format (the schema file read once, here)."""
    SamplingOptions.from_args(args)
    fmt = response_format(args)
    try:
        grammar_source(fmt)
    except ResponseFormatError as e:
        raise ValueError(f"--json-schema {args.json_schema}: {e.problem}") from None
    check_draft_args(args)
    if args.max_context < 2:
        raise ValueError(f"--max-context must be an integer >= 2, got {args.max_context}")
    if not args.chat and args.prompt is None:
        raise ValueError("--prompt is required (or use --chat)")
    return fmt


def main(argv=None) -> int:
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    try:
        fmt = check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        select_device(args.device)
        model, processor = load_from_args(args)
        draft_model = load_draft_from_args(args, (model, processor))
        session = ChatSession(model, processor, system_prompt=args.system, max_context=args.max_context,
                              kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                              quantized_kv_start=args.quantized_kv_start, draft=args.draft,
                              num_draft_tokens=args.num_draft_tokens, draft_model=draft_model)
        if args.chat:
            _chat_loop(session, args, fmt)
        else:
            for path in args.image:  # clear errors before any work
                processor.image_processor([path])
            prompt = place_images(args.prompt, len(args.image), processor.image_tag)
            _reply(session, prompt, args.image, args, fmt)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # PromptTooLongError, ImagePositionError, ModelLoadError...
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
