"""Records -> accuracy overall and per category, with 95% Wilson intervals.

Under circular evaluation the question, not the row, is counted, right only when every rotation
is (MMBench's rule); a question with a skipped row is skipped as a whole.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n``; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(k: int, n: int) -> dict[str, object]:
    lo, hi = wilson(k, n)
    return {"items": n, "correct": k, "accuracy": k / n if n else None,
            "ci95": [round(lo, 6), round(hi, 6)]}


def questions(records: Iterable[dict], circular: bool) -> tuple[list[dict], int]:
    """One entry per question (rotations folded in) and the number of skipped questions."""
    if not circular:
        recs = list(records)
        return [r for r in recs if "skipped" not in r], sum("skipped" in r for r in recs)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r.get("group") or r["id"]].append(r)
    out, skipped = [], 0
    for rows in groups.values():
        if any("skipped" in r for r in rows):
            skipped += 1
            continue
        rows.sort(key=lambda r: r.get("rotation", 0))
        q = dict(rows[0])
        q["correct"] = all(r["correct"] for r in rows)
        q["first_correct"] = rows[0]["correct"]
        q["rotations"] = len(rows)
        out.append(q)
    return out, skipped


def summarize(records: Iterable[dict], circular: bool = False) -> dict[str, object]:
    """Accuracy (and what else the records hold) overall, per category and per l2-category."""
    records = list(records)
    qs, skipped = questions(records, circular)
    out: dict[str, object] = accuracy(sum(q["correct"] for q in qs), len(qs))
    out["rows"] = sum("skipped" not in r for r in records)
    out["skipped"] = skipped
    if circular:
        out["accuracy_first_rotation"] = _mean(q["first_correct"] for q in qs)
    mc = [r for r in records if "skipped" not in r and r.get("type") == "mc"]
    if any("matched" in r for r in mc):
        out["unmatched"] = sum(not r["matched"] for r in mc if "matched" in r)
    if any("correct_norm" in r for r in mc):
        out["accuracy_norm"] = _mean(r["correct_norm"] for r in mc if "correct_norm" in r)
    short = [q for q in qs if q.get("type") == "short"]
    if short:
        out["short_answers"] = len(short)
        out["exact_match"] = _mean(q["exact_match"] for q in short)
        out["anls"] = _mean(q["anls"] for q in short)
    for key, name in (("category", "categories"), ("l2_category", "l2_categories")):
        by = _by(qs, key)
        if by:
            out[name] = by
    return out


def _by(qs: list[dict], key: str) -> dict[str, object] | None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for q in qs:
        if q.get(key) is not None:
            groups[q[key]].append(q)
    if not groups:
        return None
    res = {}
    for name in sorted(groups):
        g = groups[name]
        res[name] = accuracy(sum(q["correct"] for q in g), len(g))
        short = [q for q in g if q.get("type") == "short"]
        if short:
            res[name]["anls"] = _mean(q["anls"] for q in short)
    return res


def _mean(values: Iterable) -> float | None:
    v = [float(x) for x in values]
    return sum(v) / len(v) if v else None
