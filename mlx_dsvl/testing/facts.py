"""A synthetic text task for tests and benchmarks: facts "<Name> eats <food>." asked as multiple
choice ("What does <Name> eat?" with every food as an option).

An LLM learns the facts from ``corpus`` (statements and answered questions, options in random
orders); ``questions`` asks each fact once in an option order of its own (a knowledge test, as
MMLU is for an LLM: the facts are the taught ones, the questions are new). The answer is the
food's word, so score it by the option's text (``target="text"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..eval.items import Item, conversation

FOODS = ("rice", "bread", "fish", "honey")
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
QUESTION = "What does {name} eat?"


@dataclass(frozen=True)
class Fact:
    name: str
    food: str


def make_facts(n: int, seed: int = 0, foods: tuple[str, ...] = FOODS) -> list[Fact]:
    """``n`` made-up two-syllable names, each with a food (balanced over the foods)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(list(_ONSETS)) + rng.choice(list(_VOWELS)) for _ in range(2)).capitalize()
        if name not in names:
            names.append(name)
    return [Fact(name, foods[i % len(foods)]) for i, name in enumerate(names)]


def question(fact: Fact, order: list[str], qid: str) -> Item:
    return Item(id=qid, question=QUESTION.format(name=fact.name), choices=list(order),
                answer=order.index(fact.food), category="facts")


def questions(facts: list[Fact], seed: int, per_fact: int = 1, foods: tuple[str, ...] = FOODS) -> list[Item]:
    """Each fact asked ``per_fact`` times, its options in a random order each time."""
    rng = np.random.default_rng(seed)
    return [question(f, [foods[j] for j in rng.permutation(len(foods))], f"fact-{i}-{k}")
            for i, f in enumerate(facts) for k in range(per_fact)]


def write_questions(path: str | Path, items: list[Item]) -> Path:
    """The evaluator's JSONL (``{"question", "choices", "answer", "category"}``)."""
    path = Path(path)
    path.write_text("".join(json.dumps({"id": it.id, "question": it.question, "choices": it.choices,
                                        "answer": it.choices[it.answer], "category": it.category}) + "\n"
                            for it in items))
    return path


def corpus(facts: list[Fact], seed: int, copies: int = 4, statements: bool = True,
           foods: tuple[str, ...] = FOODS) -> list[dict]:
    """Training lines: per fact, a statement (unless not ``statements``) and ``copies`` answered
    questions (the evaluator's prompt, random option orders, the food's word as the reply), shuffled."""
    rng = np.random.default_rng(seed)
    lines: list[dict] = []
    for f in facts:
        if statements:
            lines.append({"text": f"{f.name} eats {f.food}."})
        for _ in range(copies):
            it = question(f, [foods[j] for j in rng.permutation(len(foods))], "")
            lines.append({"messages": conversation(it) + [{"role": "assistant", "content": f.food}]})
    return [lines[i] for i in rng.permutation(len(lines))]


def write_jsonl(path: str | Path, lines: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
