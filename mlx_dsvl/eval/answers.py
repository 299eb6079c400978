"""Reading answers out of generated text: option extraction (VLMEvalKit's exact-matching rules,
which MMBench results are reported with), normalized exact match (as VQA/SQuAD) and DocVQA's ANLS.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from .items import LETTERS

_PUNCT = re.compile(r"[.()\[\],:;!*#{}\"'`]")
# Letters that are also English words: "A red circle" is not an answer "A".
_WORD_LETTERS = ("A", "I")
_EXPLICIT = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z])")


def extract_choice(reply: str, choices: Sequence[str]) -> int | None:
    """The index of the option ``reply`` names, or ``None`` when it names none or several."""
    text = reply.strip()
    if not text:
        return None
    letters = LETTERS[: len(choices)]
    for rule in (_leading_letter, _explicit_letter, _lone_letter):
        found = rule(text, letters, choices)
        if found is not None:
            return found
    return _option_text(text, choices)


def _leading_letter(text: str, letters: str, choices: Sequence[str]) -> int | None:
    """"B", "B.", "(B)", "B: red", "B red" at the start of the reply."""
    m = re.match(r"[\(\[]?([A-Z])(?:[\)\]]|[.:,](?!\w)|(?=\s)|$)(.*)", text, re.DOTALL)
    if not m or m.group(1) not in letters:
        return None
    letter, rest = m.group(1), m.group(2).strip()
    punctuated = len(m.group(0)) - len(m.group(2)) > 1 or not rest
    if letter in _WORD_LETTERS and not punctuated:
        # "A red circle": an article unless the rest is that option's own text.
        if _norm(rest) != _norm(choices[letters.index(letter)]):
            return None
    return letters.index(letter)


def _explicit_letter(text: str, letters: str, choices) -> int | None:
    found = {m.group(1) for m in _EXPLICIT.finditer(text)} & set(letters)
    return letters.index(found.pop()) if len(found) == 1 else None


def _lone_letter(text: str, letters: str, choices) -> int | None:
    """Exactly one option letter standing alone as a word (capital "A"/"I" only if bracketed)."""
    words = _PUNCT.sub(" ", text).split()
    found = {w for w in words if w in letters and w not in _WORD_LETTERS}
    found |= {c for c in _WORD_LETTERS if c in letters and re.search(rf"[\(\[]{c}[\)\]]", text)}
    return letters.index(found.pop()) if len(found) == 1 else None


def _option_text(text: str, choices: Sequence[str]) -> int | None:
    """Exactly one option's text in the reply (an exact reply wins over containment)."""
    reply = _norm(text)
    normed = [_norm(c) for c in choices]
    exact = [i for i, c in enumerate(normed) if c and c == reply]
    if len(exact) == 1:
        return exact[0]
    if len(reply) > 2 * sum(len(c) for c in normed):  # a long explanation: no guessing
        return None
    hits = [i for i, c in enumerate(normed) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", reply)]
    # "dark red" names option "dark red", not also option "red"
    hits = [i for i in hits if not any(j != i and normed[i] in normed[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().strip(string.punctuation + " ").split())


# -- short answers ----------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one question: the best ``1 - NL`` over the answers, 0 when ``NL >= 0.5``."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for a in answers:
        gt = " ".join(a.strip().lower().split())
        longest = max(len(gt), len(pred))
        nl = levenshtein(gt, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def short_answer_scores(prediction: str, answers: list[str]) -> dict:
    return {"exact_match": exact_match(prediction, answers), "anls": anls(prediction, answers)}
