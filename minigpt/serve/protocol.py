"""OpenAI's legacy completions protocol: the request as pydantic checks it, the error body,
and the response objects (https://platform.openai.com/docs/api-reference/completions).

Supported as documented: model, prompt (a string, a list of strings, token ids or a list
of them), max_tokens (0 allowed), temperature, top_p, n, stop, seed, stream (with
stream_options.include_usage), echo, logprobs, user; `top_k` is an extension (vLLM's). The
rest of the documented fields are accepted only at their neutral values (presence and
frequency penalties 0, best_of equal to n, no logit_bias, no suffix), and any other field is
refused naming it: a typo never silently changes nothing.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 16  # OpenAI allows 4; lm-evaluation-harness sends its `until` strings and the eos text, uncut
SEED_RANGE = (0, 2**63 - 1 - MAX_N)  # a generator's seed; choice c uses seed + c
NULLABLE = ("max_tokens", "temperature", "top_p", "n", "echo", "stream", "logprobs", "seed", "stop", "top_k",
            "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "suffix", "user", "stream_options")
"""Fields OpenAI documents as nullable: null means the default."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Ranges as OpenAI documents them (temperature 0-2, top_p (0, 1]);
    n up to 16, logprobs up to 20 and up to 16 stop strings here; null means a field's default."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: StrictStr | None = None
    apply_defaults: StrictBool = True
    """minigpt's extension: false sends a string prompt as it is, without a fine-tuned model's bos
    and separator (the playground's continuations already hold them)."""
    # Documented fields minigpt does not implement: accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: StrictInt | None = None
    logit_bias: dict[str, float] | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULLABLE)}
        return data

    @model_validator(mode="after")
    def _neutral_unsupported(self) -> "CompletionRequest":
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) != neutral:
                raise ValueError(f"{name}={getattr(self, name)} is not supported by minigpt; leave it at 0")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported by minigpt; leave it out (or equal to n)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by minigpt; leave it out")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by minigpt; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ProtocolError(f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise ProtocolError("stop: a stop sequence must be non-empty (an empty one matches everywhere)", "stop")
        return stops

    def prompts(self) -> list[str | list[int]]:
        """The prompts one by one: strings, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise ProtocolError("prompt: an empty list has no prompt in it", "prompt")
        return list(p)


class InspectRequest(BaseModel):
    """POST /v1/inspect (minigpt's own): the inside view of a text at one layer
    (`minigpt.serve.inside.inside_view`)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr | list[StrictInt]
    layer: StrictInt = Field(0, ge=0)


class ProtocolError(Exception):
    """A request the server refuses: the message, the offending field, the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short",
                 "value_error"}


def validation_error(errors: list[dict], fields: list[str] | None = None) -> ProtocolError:
    """pydantic's errors as one ProtocolError: the first error's field, what it needs and what
    came; 400 for a value out of range, 422 for a missing, unknown or mistyped field (`fields`:
    the request's own, named for an unknown one)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None  # the request's own field (a union's member names come after it)
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        allowed = ", ".join(fields or CompletionRequest.model_fields)
        return ProtocolError(f"unknown field {field!r}; the completions API takes: {allowed}", field, 422)
    if kind == "missing":
        return ProtocolError(f"{field} is required", field, 422)
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    message = f"{field}: {first.get('msg', 'invalid')} (got {shown})"
    if kind == "json_invalid":
        return ProtocolError(f"the body is not valid JSON: {first.get('msg')}", None, 400)
    return ProtocolError(message, field, 400 if kind in _RANGE_ERRORS else 422)

