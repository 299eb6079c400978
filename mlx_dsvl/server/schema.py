"""OpenAI chat-completions shapes: the request model, its checks, and the response bodies.

Whatever would change the answer and that this server does not do (``n > 1``, tools,
``logit_bias``, ...) is refused with a 400 naming the field, never ignored.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from ..sampling import SamplingError, SamplingOptions
from ..streaming import MAX_TOP_LOGPROBS, TokenLogprobs


class APIError(Exception):
    """An error that becomes an OpenAI-style ``{"error": {...}}`` response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request --------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # new OpenAI fields that do not change the answer


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None  # "auto" | "low" | "high": DeepSeek-VL has one resolution


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: Any | None = None
    function_call: Any | None = None


class StreamOptions(_Model):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Model):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: StrictFloat | None = None  # extensions (mlx-lm, vLLM): ...
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    ignore_eos: StrictBool = False  # extension (vLLM): fixed-length replies for benchmarks
    user: str | None = None
    response_format: Any | None = None  # checked and compiled by mlx_dsvl.grammar
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None  # with logprobs: the likeliest alternatives, 0-20
    # Fields that change the answer; accepted only at their neutral values (see UNSUPPORTED).
    n: StrictInt | None = None
    tools: Any | None = None
    tool_choice: Any | None = None
    functions: Any | None = None
    function_call: Any | None = None
    logit_bias: Any | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    audio: Any | None = None
    modalities: Any | None = None
    prediction: Any | None = None
    reasoning_effort: Any | None = None
    web_search_options: Any | None = None


# field -> (is the value neutral?, what to say)
UNSUPPORTED = {
    "n": (lambda v: v == 1, "only n=1 is supported (one choice per request)"),
    "tools": (lambda v: not v, "tools / function calling are not supported"),
    "tool_choice": (lambda v: v == "none", "tools / function calling are not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v == "none", "function calling is not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v == 0, "presence_penalty is not supported (use repetition_penalty)"),
    "frequency_penalty": (lambda v: v == 0, "frequency_penalty is not supported (use repetition_penalty)"),
    "audio": (lambda v: False, "audio output is not supported"),
    "modalities": (lambda v: v == ["text"], "only the 'text' output modality is supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: False, "reasoning_effort is not supported by this model"),
    "web_search_options": (lambda v: False, "web search is not supported"),
}


def _clean_loc(loc: tuple) -> tuple:
    """A pydantic error location without its union-branch labels."""
    out: list = []
    for part in loc:
        if isinstance(part, str) and (part == "str" or not re.fullmatch(r"[a-z_]+", part)):
            continue
        if out and part == out[-1] and isinstance(part, str):
            continue
        out.append(part)
    return tuple(out)


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(e: ValidationError) -> APIError:
    """The most specific error (deepest location); alternatives of a union at the same place
    are listed together."""
    errors = [(_clean_loc(err["loc"]), err["msg"]) for err in e.errors()]
    loc = max((loc for loc, _ in errors), key=len)
    messages = list(dict.fromkeys(msg for l, msg in errors if l == loc))
    param = _param(loc) or None
    text = " or ".join(messages)
    return APIError(400, f"{param}: {text}" if param else text, param=param)


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone UTF-16 surrogate ("\\ud800" is valid JSON, but no text)
        return False


def _lone_surrogate(data: Any) -> tuple | None:
    """The location of the first string (or object key) that is no text, or None."""
    todo: list = [((), data)]
    while todo:
        loc, value = todo.pop()
        if isinstance(value, str) and not _is_text(value):
            return loc
        if isinstance(value, dict):
            if not all(_is_text(k) for k in value):
                return loc
            todo.extend(((*loc, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend(((*loc, i), v) for i, v in reversed(list(enumerate(value))))
    return None


def parse_request(data: Any) -> ChatCompletionRequest:
    """JSON value -> a checked request; raises :class:`APIError` (400) naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    loc = _lone_surrogate(data)
    if loc is not None:
        param = _param(loc) or None
        raise APIError(400, f"{param or 'the request body'}: a string holds a lone UTF-16 surrogate "
                            "(such as \\ud800), which is not text", param=param)
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name, (neutral, why) in UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and not neutral(value):
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
    for i, m in enumerate(req.messages):
        for name in ("tool_calls", "function_call"):
            if getattr(m, name):
                raise APIError(400, f"messages[{i}].{name}: tool / function calls are not supported",
                               param=f"messages[{i}].{name}", code="unsupported_parameter")
    return req


def to_conversation(messages: list[Message], image_tag: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> the template's messages and ``[(image url, param)]``. The image tag
    may not be typed in text: it would take an image that was never sent."""
    conv, urls = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "system" and i > 0:
            raise APIError(400, f"{where}: a system message is only allowed first", param=f"{where}.role")
        if m.content is None:
            raise APIError(400, f"{where}.content: missing (tool calls are not supported)",
                           param=f"{where}.content")
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        text, prev_text = "", False
        for j, part in enumerate(parts):
            param = f"{where}.content" + ("" if isinstance(m.content, str) else f"[{j}]")
            if isinstance(part, ImagePart):
                if m.role != "user":
                    raise APIError(400, f"{param}: images are only allowed in user messages", param=param)
                text += image_tag
                urls.append((part.url, param))
                prev_text = False
            else:
                if image_tag in part.text:
                    raise APIError(400, f"{param}: the text contains {image_tag!r}; send images as "
                                        "image_url parts", param=param)
                text += ("\n" if prev_text else "") + part.text
                prev_text = True
        conv.append({"role": m.role, "content": text})
    if conv[-1]["role"] != "user":
        raise APIError(400, f"messages[{len(conv) - 1}]: the last message must be the user's",
                       param=f"messages[{len(conv) - 1}].role")
    return conv, urls


# -- sampling: the one place where OpenAI names meet our sampler's ----------------------------
@dataclass(frozen=True)
class SamplingParams(SamplingOptions):
    """:class:`~mlx_dsvl.sampling.SamplingOptions` plus ``stop`` (added to the template's own
    ``User:`` stop) and ``ignore_eos``; the server's defaults are an instance too."""

    stop: tuple[str, ...] = field(default=())
    ignore_eos: StrictBool = False
    top_logprobs: int | None = None  # None: no log-probabilities; k: them and k alternatives'

    def __post_init__(self):
        super().__post_init__()
        checks = (
            ("stop", all(self.stop), "must not hold an empty string"),
            ("stop", len(self.stop) <= 16, "must hold at most 16 strings"),
            ("top_logprobs", self.top_logprobs is None or 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"must be in 0..{MAX_TOP_LOGPROBS}"),
        )
        for name, ok, why in checks:
            if not ok:
                raise SamplingError(name, f"{why}, got {getattr(self, name)!r}")

    @classmethod
    def from_request(cls, req: ChatCompletionRequest, defaults: SamplingParams) -> SamplingParams:
        given = {f.name: getattr(req, f.name) for f in fields(SamplingOptions)}  # each option by its name
        if req.max_completion_tokens is not None:
            given["max_tokens"] = req.max_completion_tokens
        changes = {k: v for k, v in given.items() if v is not None}
        if req.stop is not None:
            changes["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        changes["ignore_eos"] = req.ignore_eos
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs: true", param="top_logprobs")
        changes["top_logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
        try:
            return replace(defaults, **changes)
        except SamplingError as e:
            name = e.option
            if name == "max_tokens" and req.max_completion_tokens is not None:
                name = "max_completion_tokens"
            raise APIError(400, f"{name} {e.problem}", param=name) from None


# -- responses ------------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int, *,
               drafted: int = 0, accepted: int = 0) -> dict:
    """OpenAI's usage; ``cached_tokens``: prompt tokens found in the prefix cache; ``drafted`` /
    ``accepted``: speculative decoding's tokens drafted and kept, as Predicted Outputs' accepted
    and rejected prediction tokens."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": drafted - accepted}}


def _token(piece: bytes, logprob: float) -> dict:
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def token_logprob(lp: TokenLogprobs, piece: Callable[[int], bytes]) -> dict:
    """One entry of OpenAI's ``logprobs.content``; ``piece``: a token's bytes."""
    return {**_token(piece(lp.token), lp.logprob), "top_logprobs": [_token(piece(t), v) for t, v in lp.top]}


def logprobs_body(content: list[dict] | None) -> dict | None:
    """A choice's ``logprobs``: None when not asked for."""
    return None if content is None else {"content": content, "refusal": None}


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage: dict,
                    logprobs: list[dict] | None = None) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": logprobs_body(logprobs), "finish_reason": finish_reason}],
        "usage": usage,
    }


def chunk_body(cid: str, model: str, created: int, delta: dict | None,
               finish_reason: str | None = None, usage: dict | None = None,
               include_usage: StrictBool = False, logprobs: list[dict] | None = None) -> dict:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk (no choices)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else
            [{"index": 0, "delta": delta, "logprobs": logprobs_body(logprobs), "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = usage
    return body
