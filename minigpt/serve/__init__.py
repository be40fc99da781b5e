"""`minigpt serve`: an OpenAI-compatible completions server with continuous batching.

    pip install -e ".[serve]"
    minigpt serve --model runs/headlines          # then: openai.OpenAI(base_url="http://127.0.0.1:8000/v1")

`engine` is the decoding loop (no HTTP), `protocol` the request and error objects, `app`
the FastAPI routes; `load_state` and `serve` below are what the command calls. Needs the
`serve` extra (FastAPI and uvicorn); the rest of minigpt never imports this package.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def load_state(model: str | Path, *, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 256, device: str = "cpu", dtype: str = "float32",
               backend: str = "sdpa", raw_prompts: bool = False, max_tokens_limit: int = 4096):
    """The server's state for a model folder (any model argument: `resolve_model_dir`).

    A fine-tuned completion model's finetune.json (bos, separator, stop) becomes the prompt
    defaults unless `raw_prompts`; a fine-tuned classifier is refused (it answers with labels,
    not text: `minigpt predict` serves it).
    """
    from minigpt.device import decode_dtype
    from minigpt.finetune.export import META_FILE, read_meta
    from minigpt.model_dir import load_for_decoding, resolve_model_dir
    from minigpt.serve.app import PromptDefaults, ServerState
    from minigpt.serve.engine import Engine
    from minigpt.tokenizer import load_tokenizer

    decode_dtype(dtype)  # a bad --dtype is refused before the model is read
    folder = resolve_model_dir(model)
    defaults = PromptDefaults()
    if (folder / META_FILE).is_file():
        meta = read_meta(folder)
        if meta.task != "completion":
            raise ValueError(f"{folder} is a fine-tuned {meta.task} model: it answers with labels, not text; "
                             f"serve its base model, or score texts with `minigpt predict {folder} FILE`")
        if not raw_prompts:
            defaults = PromptDefaults(bos=meta.bos, separator=meta.separator, stop=(meta.stop,) if meta.stop else ())
            log.info("prompts get the fine-tuning's bos %r and separator %r, and stop at %r unless a request "
                     "says otherwise (--raw-prompts turns this off)", meta.bos, meta.separator, meta.stop)
    net = load_for_decoding(folder, device=device, dtype=dtype, backend=backend)
    tokenizer = load_tokenizer(folder)
    engine = Engine(net, tokenizer, max_batch=max_batch, max_queue=max_queue)
    name = model_name or Path(model).resolve().name
    return ServerState(engine=engine, tokenizer=tokenizer, model_name=name, source=str(folder), api_key=api_key,
                       defaults=defaults, max_tokens_limit=max_tokens_limit)


def check_address(host: str, port: int) -> None:
    """ValueError unless `port` is a port number and host:port can be bound now (uvicorn would
    otherwise take 99999 as given and fail to bind only after the model loaded)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer in 0..65535 (0 picks a free one); e.g. --port 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"host={host!r} is not an address this machine can bind ({err.strerror}); use 127.0.0.1 "
                         f"(this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; another server may be using that "
                             f"port: stop it, or choose another --port") from None


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Load `model` and serve it until SIGTERM or Ctrl-C (requests in flight are finished first)."""
    import uvicorn

    from minigpt.serve.app import create_app

    check_address(host, port)  # before the model loads: a port in use is known at once
    state = load_state(model, **options)
    log.info("serving %s as %r on http://%s:%d/v1 (max_batch=%d, max_queue=%d)%s", model, state.model_name, host,
             port, state.engine.max_batch, state.engine.max_queue, "; an API key is required" if state.api_key else "")
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again with the
    # handler it found; this one lets the process end normally (exit 0) instead of dying of it.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: log.info("stopped on SIGTERM"))
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
