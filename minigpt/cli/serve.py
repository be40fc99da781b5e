"""`minigpt serve`: the model behind an OpenAI-compatible completions API (minigpt.serve)."""
from __future__ import annotations

import argparse
from pathlib import Path

from minigpt.cli.common import MODEL_HELP, add_dtype, add_threads
from minigpt.ops import BACKENDS


def _serve(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ValueError(f"minigpt serve needs the serve extra ({err.name} is not installed): "
                         f"pip install -e \".[serve]\" (or pip install \"minigpt[serve]\")") from None
    from minigpt.serve import serve

    name = args.model_name or Path(getattr(args, "model_given", args.model)).resolve().name
    serve(args.model, host=args.host, port=args.port, model_name=name, api_key=args.api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, device=args.device, dtype=args.dtype, backend=args.backend,
          raw_prompts=args.raw_prompts, max_tokens_limit=args.max_tokens_limit)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's completions API (pip install -e '.[serve]')",
                       description="An OpenAI-compatible server: POST /v1/completions (streamed as server-sent events "
                                   "with stream=true), GET /v1/models, GET /health. Requests decode together "
                                   "(continuous batching); SIGTERM or Ctrl-C finishes the requests in flight first.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None,
                   help="the name clients pass as `model` (default: the last part of --model, e.g. headlines "
                        "for runs/headlines)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request (as the openai client sends it)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; one more gets 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the most tokens one completion may ask for (a completion may outgrow the context and "
                        "slide on, so this bounds how long one request can hold a row)")
    p.add_argument("--raw-prompts", action="store_true",
                   help="do not add a fine-tuned model's bos and separator to prompts, nor default to its stop")
    p.add_argument("--backend", choices=BACKENDS, default="sdpa")
    p.add_argument("--device", default="cpu")
    add_dtype(p)
    add_threads(p)
    p.set_defaults(func=_serve)
