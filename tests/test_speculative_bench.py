"""benchmarks/speculative.py's cases on the tiny text checkpoint (what they run, not their speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "speculative_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


def test_an_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "unused", "--cases", "schema,nope"])
    assert exit_info.value.code == 2 and "--cases" in capsys.readouterr().err


@pytest.mark.slow
def test_the_schema_case_drafts_a_json_reply_and_the_sampled_case_drafts(text_ckpt, tmp_path):
    out = tmp_path / "spec.json"
    assert bench.main(["--model", str(text_ckpt), "--cases", "schema,sampled", "--max-tokens", "200",
                       "--rounds", "1", "--check-ks", "1", "--json", str(out)]) == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())["rounds"]}
    schema = rows["schema"]
    assert schema["same_tokens"] and 0 < schema["accepted"] <= schema["drafted"] and schema["tokens"] < 200
    assert rows["sampled"]["drafted"] > 0  # the min-p cut keeps the random head off its undefined ids
