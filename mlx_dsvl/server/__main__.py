"""``python -m mlx_dsvl.server``: serve DeepSeek-VL over OpenAI's chat-completions API.

The model runs on the main thread (the scheduler's loop), uvicorn on a thread of its own; Ctrl-C
or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..blas import ensure_fast_blas
from ..model_options import add_model_arguments, check_draft_args, load_draft_from_args, load_from_args
from ..sampling import add_arguments

# MLX, fastapi and uvicorn are imported in the functions: after the BLAS re-execution and
# main's check that the server's extra is installed.

API_KEY_ENV = "MLX_DSVL_API_KEY"
MB = 1024 * 1024


def _number(kind, low, high=math.inf, above: bool = False):
    """An argparse ``type``: a finite ``kind`` within [low, high] (``above``: (low, high])."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            bound = f"{'>' if above else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}"
                                             if kind is float else f"must be {bound}, got {text}")
        return value

    return parse


COUNT, SIZE_MB, POSITIVE = _number(int, 1), _number(float, 0), _number(float, 0, above=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.server",
        description="An OpenAI-compatible chat-completions server for DeepSeek-VL (MLX).")
    a = p.add_argument
    add_model_arguments(p, "model")
    a("--served-model-name", default=None,
      help="the model id in /v1/models (default: the hub id, or the folder's name)")
    a("--host", default="127.0.0.1",
      help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    a("--port", type=_number(int, 0, 65535), default=8080, help="port; 0 = any free one (default: 8080)")
    a("--api-key", default=os.environ.get(API_KEY_ENV),
      help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    add_model_arguments(p, "dtype", "adapter", "device", "quantize", "quantize_vision")
    a("--4bit", dest="quantize", action="store_const", const=4, help="the same as --quantize 4")
    add_model_arguments(
        p, "kv_bits", "kv_group_size", "max_context", "memory_limit",
        kv_bits={"help": "keep KV caches quantized to 4 or 8 bits: the decode batch's (attention reads the "
                         "packed keys and values) and the prefix cache's entries, whose quantized bytes "
                         "count against --cache-mb (default: not quantized)"},
        max_context={"type": _number(int, 2),
                     "help": "context in tokens: longer prompts are refused, replies end at it (default: 4096)"},
        memory_limit={"help": "memory the server may use, in GB: the options not given among --quantize, "
                              "--quantize-vision, --kv-bits and --max-context are chosen so that --max-batch conversations of "
                              "--max-context tokens, --cache-mb and --image-cache-mb fit it (default: what the "
                              "machine can give)"})
    add_model_arguments(
        p, "draft", "draft_model", "num_draft_tokens",
        draft={"help": "speculative decoding inside the batch: ngram = prompt lookup, each request's own "
                       "conversation proposing tokens; greedy requests get the same tokens as without, sampled "
                       "ones the same distribution; usage reports accepted and rejected prediction tokens "
                       "(default: none)"},
        num_draft_tokens={"type": COUNT})
    # --temperature, --top-p, --repetition-penalty, --max-tokens: what a request sets none of
    add_arguments(p, lead="a request's default: ", skip=("seed",))
    a("--max-batch", type=COUNT, default=8, help="requests decoded together (default: 8)")
    a("--max-queue", type=_number(int, 0), default=64,
      help="requests waiting for a batch slot before new ones get 503 (default: 64)")
    a("--cache-mb", type=SIZE_MB, default=1024,
      help="prefix (KV) cache for follow-up requests, in MB; 0 = off (default: 1024)")
    a("--image-cache-mb", type=SIZE_MB, default=256,
      help="encoded-image cache, in MB; 0 = off (default: 256)")
    a("--max-body-mb", type=POSITIVE, default=50, help="largest request body, in MB (default: 50)")
    a("--max-image-mb", type=POSITIVE, default=20, help="largest image, in MB (default: 20)")
    a("--allowed-hosts", metavar="NAMES", default="",
      help="comma-separated Host names to answer to besides loopback ones (behind a proxy, or a "
           "name on the network); '*' = any (default: loopback names only on a loopback --host, "
           "any name on another --host)")
    a("--allowed-origins", metavar="URLS", default="",
      help="comma-separated web page origins (https://app.example) allowed to call the server "
           "from a browser (CORS) (default: none)")
    a("--allow-remote-images", action="store_true",
      help="fetch http(s) image URLs (off by default: it lets clients make this server fetch any "
           "address it can reach)")
    a("--remote-timeout", type=POSITIVE, default=10.0, help="time limit of one image fetch (connecting and the whole download), in s (default: 10)")
    a("--allow-local-images", metavar="DIR", default=None,
      help="allow file:// and plain image paths, only inside DIR (symbolic links resolved)")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
      help="uvicorn's log level (info: one line per request)")
    return p


def say(message: str) -> None:
    print(f"[mlx-dsvl server] {message}", file=sys.stderr, flush=True)


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    path = Path(args.model).expanduser()
    return path.resolve().name if path.is_dir() else args.model


def bound_port(server, asked: int) -> int:
    """The port uvicorn listens on (``--port 0``: the one the system chose)."""
    for listener in getattr(server, "servers", ()):
        for sock in listener.sockets:
            return sock.getsockname()[1]
    return asked


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..device import describe_device, select_device
    from ..streaming import kv_cache_options
    from .app import ServerConfig, create_app
    from .images import ImagePolicy
    from .scheduler import Scheduler
    from .schema import SamplingParams
    from .security import allowed_hosts, is_loopback_name

    defaults = SamplingParams.from_args(args)
    check_draft_args(args)
    images = ImagePolicy(args.allow_remote_images, args.allow_local_images,
                         int(args.max_image_mb * MB), args.remote_timeout)
    device = select_device(args.device)
    say(f"loading {args.model} on {describe_device()} ...")
    tic = time.perf_counter()
    model, processor = load_from_args(args)
    draft_model = load_draft_from_args(args, (model, processor))
    say(f"model{'s' if draft_model else ''} loaded in {time.perf_counter() - tic:.1f} s")
    if args.max_context <= processor.num_image_tokens + 1:
        raise ValueError(f"--max-context {args.max_context} cannot hold one image "
                         f"({processor.num_image_tokens} tokens) and a question")
    kv = kv_cache_options(args.kv_bits, args.kv_group_size,
                          head_dim=model.language_model.layers[0].self_attn.head_dim)
    scheduler = Scheduler(model, processor, max_batch=args.max_batch, max_queue=args.max_queue,
                          cache_bytes=int(args.cache_mb * MB),
                          image_cache_bytes=int(args.image_cache_mb * MB), device=device, kv=kv,
                          draft=args.draft, num_draft_tokens=args.num_draft_tokens, draft_model=draft_model)
    name = served_name(args)
    config = ServerConfig(model_name=name, model_aliases=(args.model,), max_context=args.max_context,
                          defaults=defaults, api_key=args.api_key,
                          max_body_bytes=int(args.max_body_mb * MB), images=images,
                          hosts=allowed_hosts(args.host, args.allowed_hosts.split(",")),
                          origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()))
    app = create_app(scheduler, processor, config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5))

    def http():
        try:
            server.run()
        finally:
            scheduler.stop()  # the HTTP side is gone (stopped, or it could not listen)

    thread = threading.Thread(target=http, name="uvicorn", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port} (see above)", file=sys.stderr)
        return 1
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = bound_port(server, args.port)
    say(f"listening on http://{host}:{port} (OpenAI base URL http://{host}:{port}/v1, "
        f"model {name!r}{', API key required' if args.api_key else ''})")
    if not is_loopback_name(args.host) and not args.api_key:
        say(f"warning: listening on {args.host} without --api-key: anyone who can reach this "
            "address can use the model")
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    try:
        scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        say("shutting down")
        server.should_exit = True
        thread.join(timeout=10)
    return 0


def main(argv=None) -> int:
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: the server needs {e.name}: pip install -e '.[server]'", file=sys.stderr)
        return 1
    from ..loading import ModelLoadError

    try:
        return serve(args)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, ValueError) and e.args else e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
