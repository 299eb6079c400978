"""Speculative decoding for every kind of row (``Batch._judge``): sampled rows by speculative
rejection sampling -- the emitted tokens follow the sampler's distribution, checked by a
chi-square test on an 8-token vocabulary against a NumPy reference, with controls showing
the test fails for wrong rules -- grammar rows (a drafted token the grammar bars is rejected,
the matcher is left where it was; a greedy reply under a schema is token for token the
undrafted one) and log-probability rows (the same tokens and log-probabilities)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsvl
from mlx_dsvl import streaming
from mlx_dsvl.grammar import compile_format
from mlx_dsvl.sampling import SamplingOptions
from mlx_dsvl.session import ChatSession
from mlx_dsvl.streaming import Batch, Row
from mlx_dsvl.testing import PETS_FORMAT

V = 8  # the unit tests' vocabulary
TRIALS = 3000
# chi-square's 0.999 quantile by degrees of freedom (a correct rule fails one check in 1000)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
LOGITS = np.random.default_rng(7).normal(0.0, 1.2, size=(3, V)).astype(np.float32)  # k = 2 drafts
PROMPT_TAIL = [5, 6]


class Drafter:
    """What ``_judge`` reads of a drafter: ``probs``, the distributions its draft was drawn from."""

    def __init__(self, probs=None):
        self.probs = probs


def make_row(options: SamplingOptions, drafter: Drafter, constraint=None) -> Row:
    return Row(options=options, max_tokens=100, context=mx.array(PROMPT_TAIL, mx.int32), detok=None, stop=None,
               sampler=options.make_sampler(), processors=options.make_logits_processors(), drafter=drafter,
               constraint=constraint)


def reference(logits: np.ndarray, context, options: SamplingOptions) -> np.ndarray:
    """The sampler's distribution, written out: the repetition penalty on the context's tokens,
    top-k, temperature, softmax (float64)."""
    x = logits.astype(np.float64).copy()
    seen = sorted(set(context))
    x[seen] = np.where(x[seen] < 0, x[seen] * options.repetition_penalty, x[seen] / options.repetition_penalty)
    if options.top_k:
        x[np.argsort(-x)[options.top_k:]] = -np.inf
    e = np.exp((x - x.max()) / options.temperature)
    return e / e.sum()


def chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(the chi-square statistic, its 0.999 quantile); a token drawn where p is 0 fails outright."""
    n, support = counts.sum(), p > 0
    if counts[~support].any():
        return np.inf, 0.0
    expected = n * p[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), CHI2_999[int(support.sum()) - 1]


def run_trials(options: SamplingOptions, q: np.ndarray | None, draft: list[int] | None, seed: int = 0):
    """Each trial judges one draft (``draft``, or drawn from ``q``): the first emitted token,
    and the second where the first draft was kept; (first tokens, second tokens by first)."""
    rng = np.random.default_rng(seed)
    row = make_row(options, Drafter(None if q is None else mx.array(q.astype(np.float32))))
    firsts, seconds = [], {}
    for _ in range(TRIALS):
        d = draft if q is None else [int(rng.choice(V, p=qi)) for qi in q]
        n, following, _ = Batch._judge(row, [0, *d], mx.array(LOGITS))
        emitted = [*d[:n], following.item()]
        firsts.append(emitted[0])
        if n >= 1:
            seconds.setdefault(emitted[0], []).append(emitted[1])
    return np.bincount(firsts, minlength=V), {t: np.bincount(s, minlength=V) for t, s in seconds.items()}


POINT = dict(options=SamplingOptions(temperature=0.8, top_p=1.0, top_k=6, repetition_penalty=1.4, seed=1),
             q=None, draft=[int(np.argsort(-LOGITS[0])[1]), int(np.argsort(-LOGITS[1])[0])])
Q = np.random.default_rng(3).dirichlet(np.full(V, 0.7), size=2)
SAMPLED_Q = dict(options=SamplingOptions(temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=2),
                 q=Q, draft=None)


def follows_target(case) -> bool:
    """Whether the first token and (after a kept first draft) the second pass the chi-square
    test against :func:`reference` (the context: the prompt's tail, the pending token 0, the first)."""
    options = case["options"]
    firsts, seconds = run_trials(**case)
    ok = [chi2(firsts, reference(LOGITS[0], [*PROMPT_TAIL, 0], options))]
    for first, counts in seconds.items():
        if counts.sum() >= 100:
            ok.append(chi2(counts, reference(LOGITS[1], [*PROMPT_TAIL, 0, first], options)))
    assert len(ok) >= 2  # a second token was checked
    return all(stat <= limit for stat, limit in ok)


# -- the sampler ---------------------------------------------------------------------------------
def test_a_samplers_distribution_is_what_it_draws_from():
    logprobs = mx.array(LOGITS[:1] - np.log(np.exp(LOGITS[:1]).sum()))
    for options in (SamplingOptions(temperature=0.7, top_p=1.0, top_k=5, seed=4),
                    SamplingOptions(temperature=1.3, top_p=0.8, min_p=0.05, seed=5)):
        sampler = options.make_sampler()
        p = np.array(sampler.distribution(logprobs))[0].astype(np.float64)
        if options.top_k:
            assert np.allclose(p, reference(LOGITS[0], [], options.with_(repetition_penalty=1.0)), atol=1e-6)
        draws = np.array(sampler(mx.broadcast_to(logprobs, (TRIALS, V))))
        stat, limit = chi2(np.bincount(draws, minlength=V), p)
        assert stat <= limit, options
    greedy = SamplingOptions(temperature=0.0).make_sampler().distribution(logprobs)
    assert np.array(greedy)[0].tolist() == np.eye(V)[LOGITS[0].argmax()].tolist()


# -- sampled rows: speculative rejection sampling -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", [POINT, SAMPLED_Q], ids=["point-mass-drafter", "drafter-with-q"])
def test_sampled_rows_follow_the_target_distribution_with_drafting(case):
    assert follows_target(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [POINT, SAMPLED_Q], ids=["point-mass-drafter", "drafter-with-q"])
def test_the_distribution_check_fails_for_wrong_rules(case, monkeypatch):
    """Controls: keeping every draft, or drawing a rejected position from p instead of
    max(p - q, 0), is caught by the same check."""
    with monkeypatch.context() as m:
        m.setattr(streaming, "accept_probability", lambda p_x, q_x: mx.ones_like(p_x))
        assert not follows_target(case)
    with monkeypatch.context() as m:
        m.setattr(streaming, "residual", lambda p, q: p)
        assert not follows_target(case)


def test_a_seeded_sampled_row_judges_the_same_run_to_run():
    outcomes = []
    for _ in range(2):
        row, judged = make_row(POINT["options"], Drafter()), []
        for _ in range(20):
            n, following, _ = Batch._judge(row, [0, *POINT["draft"]], mx.array(LOGITS))
            judged.append((n, following.item()))
        outcomes.append(judged)
    assert outcomes[0] == outcomes[1] and len(set(outcomes[0])) > 1


# -- grammar rows ----------------------------------------------------------------------------------
ENUM = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
    "type": "object", "properties": {"a": {"enum": ["cat", "dog"]}}, "required": ["a"], "additionalProperties": False}}}


def walked(processor, tokens):
    """A fresh constraint of :data:`ENUM` that has taken ``tokens``."""
    constraint = compile_format(processor, ENUM).constraint()
    for t in tokens:
        constraint.advance(t)
    return constraint


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_drafted_token_the_grammar_bars_is_rejected_and_the_matcher_is_left_as_it_was(chat_processor,
                                                                                       temperature):
    """After ``{"a"`` the grammar wants ``:``; a draft of ``"a"}`` keeps ``"a"`` (the logits
    favour each drafted token), rejects ``}`` although the logits favour it most, and takes a
    token the grammar allows there."""
    tokens = chat_processor.tokenizer.encode('{"a"}', add_special_tokens=False)
    brace, draft = tokens[0], tokens[1:]
    width = len(chat_processor.tokenizer)
    constraint = walked(chat_processor, [brace])  # the pending token, read and taken
    logits = np.zeros((len(draft) + 1, width), np.float32)
    logits[np.arange(len(draft)), draft] = 30.0
    options = SamplingOptions(temperature=temperature, top_p=1.0, repetition_penalty=1.0, seed=0)
    row = make_row(options, Drafter(), constraint)
    for _ in range(5 if temperature else 1):
        n, following, _ = Batch._judge(row, [brace, *draft], mx.array(logits))
        assert n == len(draft) - 1
        there = np.array(walked(chat_processor, [brace, *draft[:n]]).allowed(width))
        assert there[following.item()] and not there[draft[-1]]
        # the row's matcher is still just after "{"
        assert np.array_equal(np.array(constraint.allowed(width)), np.array(walked(chat_processor, [brace]).allowed(width)))
        assert constraint.matcher.validate_tokens(draft) == n


# -- whole replies on the tiny checkpoint ------------------------------------------------------------
STORY = "Tell me a story about a cat and a dog"  # the text checkpoint's replies to it loop


def send(model, processor, draft, text=STORY, **options):
    """One turn of a fresh session: its chunks."""
    return list(ChatSession(model, processor, draft=draft, num_draft_tokens=4).send(text, [], **options))


def tokens(chunks):
    return [c.token for c in chunks]


@pytest.fixture(scope="module")
def text_model(text_ckpt):
    return mlx_dsvl.load(text_ckpt, dtype="float32")


def test_sampled_replies_draft_accept_and_repeat_with_their_seed(text_model):
    """A sampled reply (temperature, top-p) drafts with prompt lookup and
    keeps some drafts; the same seed gives the same reply (not the undrafted one's tokens)."""
    opts = dict(max_tokens=40, temperature=0.1, top_p=0.95, repetition_penalty=1.0, seed=3)
    first, again = send(*text_model, "ngram", **opts), send(*text_model, "ngram", **opts)
    assert tokens(first) == tokens(again)
    assert 0 < first[-1].accepted_tokens <= first[-1].drafted_tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", ["text_ckpt", "text_hybrid_ckpt"])
def test_greedy_replies_under_a_schema_are_the_same_with_prompt_lookup(family, request):
    model, processor = mlx_dsvl.load(request.getfixturevalue(family), dtype="float32")
    opts = dict(max_tokens=200, temperature=0.0, repetition_penalty=1.0, response_format=PETS_FORMAT)
    plain, drafted = (send(model, processor, d, "List four pets as JSON.", **opts) for d in (None, "ngram"))
    assert tokens(drafted) == tokens(plain) and drafted[-1].finish_reason == plain[-1].finish_reason == "stop"
    assert len(json.loads("".join(c.text for c in drafted))["pets"]) == 4
    assert drafted[-1].accepted_tokens > 0


def test_sampled_replies_under_a_schema_draft_and_parse(text_model):
    chunks = send(*text_model, "ngram", "List four pets as JSON.", max_tokens=200, temperature=0.5, seed=1,
                  response_format=PETS_FORMAT)
    assert chunks[-1].finish_reason == "stop" and chunks[-1].accepted_tokens > 0
    assert len(json.loads("".join(c.text for c in chunks))["pets"]) == 4


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_greedy_logprobs_are_the_same_with_prompt_lookup(text_model, penalty):
    """Each kept token's log-probability and top alternatives come from the verify forward at
    its position: equal to float32 rounding to one token at a time."""
    opts = dict(max_tokens=60, temperature=0.0, repetition_penalty=penalty, logprobs=3)
    plain, drafted = (send(*text_model, d, **opts) for d in (None, "ngram"))
    assert tokens(drafted) == tokens(plain) and drafted[-1].accepted_tokens > 0
    want, got = ([lp for c in chunks for lp in c.logprobs] for chunks in (plain, drafted))
    assert [lp.token for lp in got] == [lp.token for lp in want] and len(got) > 10
    for g, w in zip(got, want):
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        assert np.allclose([g.logprob, *(v for _, v in g.top)], [w.logprob, *(v for _, v in w.top)],
                           rtol=1e-5, atol=1e-5)
