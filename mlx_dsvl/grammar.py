"""Structured output: a response format compiled once into an llguidance grammar, and per reply a
:class:`Constraint` that masks the logits to the tokens the grammar allows and follows the
tokens sampled.

Formats (OpenAI's ``response_format``): ``{"type": "text"}`` (no constraint),
``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}``, and two that llguidance gives for free: ``{"type": "regex", "regex": ...}``
and ``{"type": "lark", "lark": ...}``.  JSON comes out with ``", "`` and ``": "`` between items and
no other whitespace (a schema's ``x-guidance`` may say otherwise), so a reply cannot spend its
budget on blanks.  A schema is compiled once per tokenizer (a pristine matcher, copied per reply).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from .streaming import GrammarError, make_detokenizer, token_bytes

if TYPE_CHECKING:
    from .processing.chat import ChatProcessor

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FORMATS = ("text", "json_object", "json_schema", "regex", "lark")
CACHED_GRAMMARS = 64  # compiled grammars kept per tokenizer


class ResponseFormatError(ValueError):
    """A response format that cannot be used: ``param`` says where (``response_format.json_schema``),
    ``problem`` what is wrong."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param, self.problem = param, problem


def grammar_source(response_format: Mapping | None) -> str | None:
    """OpenAI's ``response_format`` -> an llguidance grammar, checked; None for text.
    :class:`ResponseFormatError` names what llguidance cannot compile or does not support."""
    where = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ResponseFormatError(where, f"must be an object such as {{'type': 'json_object'}}, "
                                         f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise ResponseFormatError(f"{where}.type", f"must be one of {', '.join(FORMATS)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        where, grammar = f"{where}.type", _json_grammar({"type": "object"})
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ResponseFormatError(f"{where}.json_schema", "must be an object with 'name' and 'schema'")
        schema = spec.get("schema", {})  # OpenAI: optional (then any JSON value)
        if not isinstance(schema, (Mapping, bool)):
            raise ResponseFormatError(f"{where}.json_schema.schema",
                                      f"must be a JSON schema object, got {type(schema).__name__}")
        where, grammar = f"{where}.json_schema.schema", _json_grammar(schema)
    else:  # regex, lark: the text itself
        text = response_format.get(kind)
        if not isinstance(text, str):
            raise ResponseFormatError(f"{where}.{kind}", f"must be a string (the {kind})")
        where = f"{where}.{kind}"
        grammar = LLMatcher.grammar_from_regex(text) if kind == "regex" else LLMatcher.grammar_from_lark(text)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ResponseFormatError(where, " ".join(" ".join(messages).split()))
    return grammar


def _json_grammar(schema: Mapping | bool) -> str:
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ResponseFormatError("response_format.json_schema.schema", str(e)) from None


class Grammar:
    """A grammar compiled for one tokenizer; :meth:`constraint` starts a reply on it."""

    def __init__(self, tokenizer: LLTokenizer, source: str):
        self.vocab_size = tokenizer.vocab_size
        self._pristine = LLMatcher(tokenizer, source, log_level=0)
        if self._pristine.is_error():
            raise ResponseFormatError("response_format", self._pristine.get_error())

    def constraint(self) -> Constraint:
        return Constraint(self._pristine.deep_copy(), self.vocab_size)


class Constraint:
    """One reply's place in its grammar: the tokens allowed next, advanced by each token taken."""

    def __init__(self, matcher: LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = allocate_token_bitmask(1, vocab_size)  # [1, words] int32, refilled each step

    def allowed(self, width: int) -> mx.array:
        """The tokens the grammar allows next, as a bool mask [width] (ids past its vocabulary: no)."""
        fill_next_token_bitmask(self.matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        if allowed.size < width:  # ids past the tokenizer's (the LLM's padded vocabulary)
            allowed = np.pad(allowed, (0, width - allowed.size))
        return mx.array(allowed[:width].view(np.bool_))

    def apply(self, logits: mx.array, allowed: mx.array | None = None) -> mx.array:
        """[1, vocab] logits with every token the grammar does not allow next (or not ``allowed``,
        a mask of :meth:`along`) at -inf."""
        return mx.where(self.allowed(logits.shape[-1]) if allowed is None else allowed, logits, -mx.inf)

    def along(self, draft: Sequence[int], width: int) -> list[mx.array]:
        """The masks (:meth:`allowed`) after each leading token of ``draft`` that the grammar
        allows, the first before any: one more mask than allowed tokens.  The matcher walks the
        draft and is rolled back: it is left where it was."""
        ok = next((i for i, t in enumerate(draft) if not 0 <= t < self.vocab_size), len(draft))
        ok = self.matcher.validate_tokens(list(draft[:ok])) if ok else 0  # (an id past it: 0)
        masks = [self.allowed(width)]
        for t in draft[:ok]:
            self.advance(t)
            masks.append(self.allowed(width))
        if ok and not self.matcher.rollback(ok):
            raise GrammarError(f"the grammar could not roll back {ok} tokens: {self.matcher.get_error()}")
        return masks

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.matcher.is_stopped()


def ll_tokenizer(processor: ChatProcessor) -> LLTokenizer:
    """llguidance's view of the processor's byte-level BPE tokenizer (built once per processor).
    Built from the token bytes, so that ids the tokenizer leaves undefined are never allowed."""
    cached = getattr(processor, "_mlx_dsvl_lltokenizer", None)
    if cached is None:
        cached = processor._mlx_dsvl_lltokenizer = LLTokenizer(TokenizerWrapper(_TokenBytes(processor)))
    return cached


class _TokenBytes:
    """What ``llguidance.TokenizerWrapper`` reads of a tokenizer: each id's bytes (the engine's
    :func:`~mlx_dsvl.streaming.token_bytes`; specials flagged), EOS and BOS, and an encoder."""

    def __init__(self, processor: ChatProcessor):
        tokenizer, detok = processor.tokenizer, make_detokenizer(processor)
        self.special_token_ids = sorted(tokenizer.added_tokens_decoder)
        self.tokens = [token_bytes(detok, i) for i in range(len(detok.tokenmap))]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


_lock = threading.Lock()


def compile_format(processor: ChatProcessor, response_format: Mapping | None) -> Grammar | None:
    """The processor's compiled :class:`Grammar` for ``response_format`` (None for text), cached
    by the grammar's text, which keeps the schema's key order (it orders the reply's keys)."""
    source = grammar_source(response_format)
    if source is None:
        return None
    with _lock:
        cache: OrderedDict[str, Grammar] = processor.__dict__.setdefault("_mlx_dsvl_grammars", OrderedDict())
        grammar = cache.get(source)
        if grammar is None:
            grammar = Grammar(ll_tokenizer(processor), source)
            cache[source] = grammar
            while len(cache) > CACHED_GRAMMARS:
                cache.popitem(last=False)
        cache.move_to_end(source)
        return grammar
