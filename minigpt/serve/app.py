"""The HTTP side of `minigpt serve`: an OpenAI-compatible completions API on FastAPI.

    POST /v1/completions   the legacy completions protocol (`minigpt.serve.protocol`), streamed
                           as server-sent events ending with `data: [DONE]` when stream=true
    POST /v1/inspect       minigpt's own: one layer's attention per head, the logit lens and the
                           model card for a text (`minigpt.serve.inside`)
    GET  /v1/models        the one model served
    GET  /health           {"status": "ok", ...}: liveness, rows decoding and requests waiting
    GET  /                 the playground (static/index.html): sample, see each token's
                           probability and alternatives, look inside

Every request becomes one `Sequence` per (prompt, choice) on the shared `Engine`; its events
come back from the engine's thread through the request's asyncio queue. Errors are OpenAI's
error object with 400/401/404/422/429 (never a traceback); a client that disconnects frees
its rows at the next decoding step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.serve.engine import Engine, QueueFull, Sampling, Sequence, TokenInfo
from minigpt.serve.inside import inside_view, model_card
from minigpt.serve.protocol import CompletionRequest, InspectRequest, ProtocolError, error_body, validation_error

STATIC = Path(__file__).parent / "static"
DISCONNECT_CHECK_S = 0.25
"""How often a request looks whether its client went away (its rows are then freed)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptDefaults:
    """What a fine-tuned completion model was trained with (its finetune.json), applied to every
    text prompt unless the server runs with --raw-prompts."""

    bos: str = ""
    """Put before a prompt that does not already start with it."""
    separator: str = ""
    """Put after a prompt that does not already end with it."""
    stop: tuple[str, ...] = ()
    """Stop sequences of a request that gives none."""

    def apply(self, prompt: str) -> str:
        if self.bos and not prompt.startswith(self.bos):
            prompt = self.bos + prompt
        if self.separator and not prompt.endswith(self.separator):
            prompt = prompt + self.separator
        return prompt


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    model_name: str
    source: str = ""
    """Where the model came from (the folder served), for the model card."""
    api_key: str | None = None
    max_tokens_limit: int = 4096
    """The most tokens one completion may ask for (it may outgrow the context and slide on)."""
    defaults: PromptDefaults = field(default_factory=PromptDefaults)
    created: int = field(default_factory=lambda: int(time.time()))


class _Mailbox:
    """Events from the engine's thread to the event loop's queues, one wake-up per batch.

    The engine delivers every row's token each step; waking the event loop once per event
    (`call_soon_threadsafe`, a write to its self-pipe each) costs more than the tokens of a
    small model. Events are queued here under a lock, and the loop is woken only when the
    box goes from empty to not empty; one callback then hands out all that came."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self._lock:
            self._pending.append((queue, item))
            wake = len(self._pending) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


def _error(err: ProtocolError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`'s model; starting and stopping it starts and stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mailbox = _Mailbox(asyncio.get_running_loop())
        state.engine.start()
        yield
        state.engine.stop(timeout=30)

    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        model = InspectRequest if request.url.path == "/v1/inspect" else CompletionRequest
        return _error(validation_error(exc.errors(), list(model.model_fields)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ProtocolError(f"{request.method} {request.url.path}: {exc.detail}", None, exc.status_code,
                                    kind=kind))

    @app.exception_handler(ProtocolError)
    async def _refused(request: Request, exc: ProtocolError) -> JSONResponse:
        return _error(exc)

    # The key is checked by a dependency of every /v1 route, not by an HTTP middleware:
    # Starlette's BaseHTTPMiddleware would hide a client's disconnect from the endpoint.
    async def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {state.api_key}".encode()):
            what = "no API key was given" if not header else "the API key is wrong"
            raise ProtocolError(f"{what}: send the header 'Authorization: Bearer <key>' with the key the server "
                                f"was started with (--api-key)", None, 401, code="invalid_api_key")

    keyed = [Depends(require_key)]

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/inspect", dependencies=keyed)
    async def inspect(body: InspectRequest) -> dict:
        _check_model(state, body.model)
        tokenizer, engine = state.tokenizer, state.engine
        ids = _encode(tokenizer, body.prompt) if isinstance(body.prompt, str) else body.prompt  # as the model saw it
        context, layers = engine.model.config.block_size, engine.model.config.n_layer
        if not ids:
            raise ProtocolError("prompt: it is empty; give the text to look inside", "prompt")
        dropped = max(0, len(ids) - context)
        ids = ids[dropped:]  # a text past the context: its last `context` tokens, what the model sees
        if body.layer >= layers:
            raise ProtocolError(f"layer: {body.layer} is out of range; this model has layers 0..{layers - 1}", "layer")
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            raise ProtocolError(f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
        # On the engine's thread, between steps: the view attaches hook points for its forward.
        view = await asyncio.wrap_future(engine.call(lambda: inside_view(engine.model, tokenizer, ids, body.layer)))
        return {**view, "dropped": dropped,
                "model": {"name": state.model_name, **model_card(engine.model, state.source, tokenizer)}}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": state.model_name, "running": state.engine.busy_rows,
                "waiting": state.engine.waiting}

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict:
        # OpenAI's model object, plus minigpt's model card (clients ignore fields they do not know).
        card = model_card(state.engine.model, state.source, state.tokenizer)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "minigpt", "minigpt": card}]}

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        job = _Job(state, body)
        job.submit(request.app.state.mailbox)
        if body.stream:
            return StreamingResponse(job.stream(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await job.response(request))

    return app


def _encode(tokenizer, text: str) -> list[int]:
    """`text`'s ids; text the tokenizer cannot encode (a character a char model never saw) is a 400."""
    try:
        return tokenizer.encode(text)
    except ValueError as err:
        raise ProtocolError(f"prompt: {err}", "prompt") from None


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise ProtocolError(f"the model {name!r} does not exist; this server serves {state.model_name!r} "
                            f"(GET /v1/models)", "model", 404, code="model_not_found")


class _Job:
    """One completions request: its choices on the engine, and their answer."""

    def __init__(self, state: ServerState, body: CompletionRequest) -> None:
        self.state, self.body = state, body
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        tokenizer = state.tokenizer
        if body.max_tokens > state.max_tokens_limit:
            raise ProtocolError(f"max_tokens: {body.max_tokens} is more than this server allows "
                                f"({state.max_tokens_limit}, its --max-tokens-limit)", "max_tokens")
        defaults = state.defaults if body.apply_defaults else PromptDefaults()
        stop = body.stops() or list(defaults.stop)
        self.prompts: list[list[int]] = []
        self.prompt_texts: list[str] = []
        vocab = getattr(tokenizer, "vocab_size", None)
        block_size = state.engine.model.config.block_size
        for i, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                text = defaults.apply(prompt)
                ids = _encode(tokenizer, text)
            else:
                ids, text = prompt, None
                bad = [t for t in ids if vocab is not None and not 0 <= t < vocab]
                if bad:
                    raise ProtocolError(f"prompt: token id {bad[0]} is outside the tokenizer's 0..{vocab - 1}", "prompt")
                text = tokenizer.decode(ids)
            if not ids:
                raise ProtocolError("prompt: it is empty, so there is nothing to continue; give some text"
                                    + (f" (or, to sample from nothing, the end-of-text token as token ids: "
                                       f"[{tokenizer.eos_id}])" if getattr(tokenizer, "eos_id", None) is not None
                                       else ""), "prompt")
            if len(ids) > block_size:  # a completion may outgrow the context: it then slides, as `generate` does
                raise ProtocolError(f"this model's maximum context length is {block_size} tokens, but prompt {i} has "
                                    f"{len(ids)}; shorten it (or keep its last {block_size} tokens)", "prompt",
                                    code="context_length_exceeded")
            self.prompts.append(ids)
            self.prompt_texts.append(text)
        n = body.n
        self.sampling = [
            Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                     stop=tuple(stop), seed=None if body.seed is None else body.seed + c,
                     logprobs=body.logprobs, echo=body.echo)
            for c in range(len(self.prompts) * n)
        ]
        self.sequences: list[Sequence] = []
        self.events: asyncio.Queue | None = None

    def submit(self, mailbox: _Mailbox) -> None:
        self.events = queue = asyncio.Queue()
        for c, sampling in enumerate(self.sampling):
            ids = self.prompts[c // self.body.n]
            seq = Sequence(ids, sampling, lambda event, c=c: mailbox.post(queue, (c, event)))
            try:
                self.state.engine.submit(seq)
            except QueueFull as err:
                self.cancel()
                raise ProtocolError(f"the server is busy ({err}); retry later", None, 429,
                                    kind="rate_limit_exceeded", code="queue_full") from None
            except ValueError as err:
                self.cancel()
                raise ProtocolError(str(err), "prompt") from None
            self.sequences.append(seq)

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancel()

    async def _events(self, request) -> AsyncIterator[list[tuple[int, tuple]]]:
        """Lists of (choice, event), each what has arrived since the last, until every choice is
        done; cancels them all if the client goes away."""
        open_choices = len(self.sequences)
        checked = time.monotonic()
        try:
            while open_choices:
                if time.monotonic() - checked > DISCONNECT_CHECK_S:  # also while tokens keep coming
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    arrived = [await asyncio.wait_for(self.events.get(), timeout=DISCONNECT_CHECK_S)]
                except asyncio.TimeoutError:
                    continue
                while not self.events.empty():
                    arrived.append(self.events.get_nowait())
                open_choices -= sum(event[0] in ("done", "error") for _, event in arrived)
                yield arrived
        finally:
            self.cancel()  # a client that went away, or an error: free the rows

    async def response(self, request) -> dict:
        choices = [_Choice(self, c) for c in range(len(self.sequences))]
        async for arrived in self._events(request):
            for c, event in arrived:
                choices[c].add(event)
        for choice in choices:
            if choice.error:
                raise ProtocolError(f"decoding failed: {choice.error}", None, 500, kind="server_error")
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_name,
                "choices": [ch.whole() for ch in choices], "usage": self._usage(choices)}

    async def stream(self, request) -> AsyncIterator[str]:
        choices = [_Choice(self, c) for c in range(len(self.sequences))]
        async for arrived in self._events(request):
            # What arrived together goes out together: under load a chunk may carry several
            # tokens of a choice (its text and logprobs joined), so the stream keeps up.
            pieces = [piece for c, event in arrived if (piece := choices[c].add(event)) is not None]
            yield "".join(_sse(self._chunk([{k: v for k, v in piece.items() if k != "_echo"}]))
                          for piece in _merge(pieces))
            failed = next((ch.error for ch in choices if ch.error), None)
            if failed is not None:  # as OpenAI streams an error: the client raises APIError
                self.cancel()
                yield _sse(error_body(f"decoding failed: {failed}", "server_error"))
                return
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            yield _sse(self._chunk([], usage=self._usage(choices)))
        yield "data: [DONE]\n\n"

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_name,
                 "choices": choices}
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            chunk["usage"] = usage
        return chunk

    def _usage(self, choices: list["_Choice"]) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(ch.generated) for ch in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _merge(pieces: list[dict]) -> list[dict]:
    """Consecutive pieces of one choice, none of them final, as one piece; the echoed prompt
    always goes out alone, first (a client tells it from the completion by that)."""
    out: list[dict] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last["index"] == piece["index"] and last["finish_reason"] is None \
                and piece["finish_reason"] is None and not last.get("_echo") and not piece.get("_echo"):
            last["text"] += piece["text"]
            if last["logprobs"] is not None and piece["logprobs"] is not None:
                for key, values in piece["logprobs"].items():
                    last["logprobs"][key] = last["logprobs"][key] + values
            continue
        out.append(dict(piece))
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Choice:
    """One choice's text and log-probabilities, built from its engine events.

    Log-probabilities cover every token the model produced, the one that completed a stop
    string and an end-of-text token included (as OpenAI's did, and as lm-evaluation-harness's
    `[ctxlen:-1]` slices expect); `text_offset` is where each token starts in the returned
    text, read off a running decode, so a character split across tokens does not shift it."""

    def __init__(self, job: _Job, index: int) -> None:
        self.job, self.index = job, index
        self.text = ""
        self.tokens: list[TokenInfo] = []
        self.ids: list[int] = []  # what the offsets are read from: the echoed prompt's, then the generated
        self.generated: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.offsets: list[int] = []

    def add(self, event: tuple) -> dict | None:
        """Record `event`; return the streamed chunk's choice for it (None when there is nothing to send)."""
        kind = event[0]
        if kind == "prompt":
            infos = event[1]
            text = self.job.prompt_texts[self.index // self.job.body.n]
            self.text += text
            return {**self._piece(text, infos), "_echo": True}
        if kind == "token":
            info, piece = event[1], event[2]
            self.generated.append(info.id)
            self.text += piece
            return self._piece(piece, [info]) if piece or self.job.body.logprobs is not None else None
        if kind == "done":
            self.finish = event[1]
            return {"index": self.index, "text": "", "logprobs": None, "finish_reason": self.finish}
        self.error, self.finish = event[1], "error"
        return None

    def _piece(self, text: str, infos: list[TokenInfo]) -> dict:
        return {"index": self.index, "text": text, "logprobs": self._logprobs(infos), "finish_reason": None}

    def _logprobs(self, infos: list[TokenInfo]) -> dict | None:
        if self.job.body.logprobs is None:
            return None
        decode = self.job.state.tokenizer.decode
        start = len(self.tokens)
        for info in infos:
            self.offsets.append(len(decode(self.ids)) if self.ids else 0)
            self.ids.append(info.id)
            self.tokens.append(info)
        return self._arrays(start)

    def _arrays(self, start: int = 0) -> dict:
        tokens = self.tokens[start:]
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [t.top for t in tokens], "text_offset": self.offsets[start:]}

    def whole(self) -> dict:
        """The choice as the non-streamed response gives it."""
        logprobs = self._arrays() if self.job.body.logprobs is not None else None
        return {"text": self.text, "index": self.index, "logprobs": logprobs, "finish_reason": self.finish}
