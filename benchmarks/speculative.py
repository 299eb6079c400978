"""Speculative decoding (``--draft ngram``, ``--draft-model``) against none, side by side in one process.

    python benchmarks/speculative.py --model /tmp/dsvl-1.3b --max-tokens 40 --json spec.json
    python benchmarks/speculative.py --model 7B --quantize 4 --draft-model 1.3B --check-ks 1-8 --json d.json

Per round and case, one greedy chat turn without drafting and one with (the same loaded model,
prompt and machine load): decode tokens/s, and with drafting the tokens drafted and accepted.
Cases (``--cases``): ``lookup``, the n-gram drafter on the prompt's reply (on random weights a
greedy reply often loops: say so when quoting it); ``rejected``, a drafter whose every guess is a
token the model does not choose (what back-off must keep at >= 0.9x); ``schema``, the n-gram
drafter on a greedy JSON reply under a schema whose array of objects repeats its keys (the reply
ends when the JSON does, ``--max-tokens`` at most); ``sampled``, the n-gram drafter on a sampled
reply (temperature 0.7, top-p 1, min-p 0.1, seed 0: rejection sampling keeps the distribution, not the
tokens, so "same tokens" is not expected there).  With ``--draft-model`` the cases are
``draft-model`` (that model drafting, float32 unless ``--draft-quantize``) and ``identical`` (the
target drafting for itself: everything accepted, the acceptance ceiling).  Then the cost of one
forward of k + 1 tokens against one token on the prompt's cache (what a check costs against a
decode step), for each k of ``--check-ks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mlx_dsvl.testing import PETS_FORMAT  # (no MLX)

PROMPT = "Tell me a story about a cat and a dog"
# each case's prompt and sampling options (greedy, no penalty, unless changed)
TURNS = {"lookup": {}, "rejected": {}, "schema": dict(text="List four pets as JSON.", response_format=PETS_FORMAT),
         "sampled": dict(temperature=0.7, top_p=1.0, min_p=0.1, seed=0)}


def turn(model, processor, draft: str | None, k: int, n: int, draft_model=None, text: str = PROMPT,
         **options) -> dict:
    from mlx_dsvl.session import ChatSession

    chat = ChatSession(model, processor, draft=draft, num_draft_tokens=k, on_truncate=None, draft_model=draft_model)
    options = dict(temperature=0.0, repetition_penalty=1.0) | options
    chunks = list(chat.send(text, [], max_tokens=n, **options))
    last = chunks[-1]
    return dict(tokens=last.generation_tokens, tps=last.generation_tps, drafted=last.drafted_tokens,
                accepted=last.accepted_tokens, ids=[c.token for c in chunks if c.token is not None])


class Rejected:
    """A drafter that proposes k copies of a token the model did not choose (the last one's
    neighbour), to measure what a check with nothing accepted costs under back-off."""

    def __init__(self, drafter):
        self.inner = drafter

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, generated, limit):
        return [(generated[-1] + 1) % 1000] * min(self.inner.k, limit) if generated else []


def rejecting(*args, **kwargs) -> Rejected | None:
    """``make_drafter`` for the ``rejected`` case."""
    from mlx_dsvl.drafting import make_drafter

    drafter = make_drafter(*args, **kwargs)
    return None if drafter is None else Rejected(drafter)


def check_cost(model, processor, k: int, repeats: int) -> dict:
    """Seconds of one forward of 1 and of k + 1 tokens onto the prompt's cache (trimmed back)."""
    import mlx.core as mx

    from mlx_dsvl.models.deepseek_vl import lm_head
    from mlx_dsvl.session import ChatSession

    chat = ChatSession(model, processor, on_truncate=None)
    list(chat.send(PROMPT, [], max_tokens=2, temperature=0.0))
    lm, out = model.language_model, {}
    for length in (1, k + 1, 1, k + 1):
        ids = mx.array([[chat.cached_ids[-1]] * length])
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(lm_head(lm, lm.model(ids, chat.cache)))
            best = min(best, time.perf_counter() - tic)
            for c in chat.cache:
                c.trim(length)
        out[length] = min(out.get(length, best), best)
    return dict(one_s=out[1], check_s=out[k + 1], ratio=out[k + 1] / out[1])


def parse_ks(text: str | None, default: int) -> list[int]:
    """``--check-ks``: "1-8" or "2,4" (None: ``default``)."""
    if not text:
        return [default]
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None, help="a drafter's folder: the draft-model and identical cases")
    p.add_argument("--draft-quantize", type=int, choices=(4, 8), default=None)
    p.add_argument("--check-ks", default=None, help="k values of the check cost: 1-8 or 2,4 (default: K)")
    p.add_argument("--cases", default="lookup,rejected",
                   help=f"prompt-lookup cases, comma-separated, of {','.join(TURNS)} (default lookup,rejected)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every case (0: the check cost only)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    if not set(cases) <= set(TURNS):
        p.error(f"--cases: expected some of {','.join(TURNS)}, got {args.cases!r}")

    import mlx_dsvl
    from mlx_dsvl import session as session_module
    from mlx_dsvl.drafting import make_drafter

    model, processor = mlx_dsvl.load(args.model, dtype="float32", quantize=args.quantize)
    drafters = {case: ("ngram", None) for case in cases}
    if args.draft_model:
        drafters = {"draft-model": (None, mlx_dsvl.load(args.draft_model, dtype="float32", quantize=args.draft_quantize)),
                    "identical": (None, (model, processor))}
    k, n = args.num_draft_tokens, args.max_tokens
    turn(model, processor, None, k, 4)  # warm up
    results = []
    for r in range(args.rounds):
        for case, (draft, draft_model) in drafters.items():
            session_module.make_drafter = rejecting if case == "rejected" else make_drafter
            options = TURNS.get(case, {})
            plain = turn(model, processor, None, k, n, **options)
            drafted = turn(model, processor, draft, k, n, draft_model=draft_model, **options)
            row = dict(round=r, case=case, plain_tps=plain["tps"], draft_tps=drafted["tps"],
                       speedup=drafted["tps"] / plain["tps"] if plain["tps"] else None,
                       tokens=drafted["tokens"], drafted=drafted["drafted"], accepted=drafted["accepted"],
                       same_tokens=plain["ids"] == drafted["ids"])
            results.append(row)
            print(f"round {r} {case:11s}: {row['plain_tps']:.2f} -> {row['draft_tps']:.2f} tokens/s "
                  f"({row['speedup']:.2f}x), {row['tokens']} tokens, drafted {row['drafted']}, accepted "
                  f"{row['accepted']}, same tokens: {row['same_tokens']}", flush=True)
    session_module.make_drafter = make_drafter
    costs = {}
    for kk in parse_ks(args.check_ks, k):
        costs[kk] = cost = check_cost(model, processor, kk, repeats=3)
        print(f"forward of {kk + 1} tokens vs 1 on the prompt's cache: {cost['check_s'] * 1e3:.1f} ms vs "
              f"{cost['one_s'] * 1e3:.1f} ms ({cost['ratio']:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, quantize=args.quantize, draft_model=args.draft_model,
                           draft_quantize=args.draft_quantize, max_tokens=n, num_draft_tokens=k,
                           prompt=PROMPT, turns={c: TURNS.get(c, {}) for c in drafters}, rounds=results, check_cost=costs), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
