"""The memory budget: the weights prediction against loaded models, the planner's choices on the
real configs, and ``--memory-limit`` through the command line."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_dsvl
from mlx_dsvl.config import ModelConfig
from mlx_dsvl.generate import main as generate_main
from mlx_dsvl.loading import load_config
from mlx_dsvl.memory_budget import (
    GB,
    BudgetError,
    Choice,
    MemoryModel,
    apply_budget,
    min_context,
    plan,
)
from mlx_dsvl.model_options import add_model_arguments
from mlx_dsvl.random_checkpoint import ARCHS


def real(arch: str, dtype=mx.bfloat16, gpu: bool = True) -> MemoryModel:
    return MemoryModel(ModelConfig.from_dict(ARCHS[arch][0]), dtype, gpu=gpu)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits,vision_bits", [(None, None), (8, None), (4, None), (None, 8), (None, 4), (4, 8), (8, 4)])
@pytest.mark.parametrize("folder", ["tiny_dir", "tiny_hybrid_dir"])
def test_weights_prediction_is_exact(folder, bits, vision_bits, dtype, request):
    path = request.getfixturevalue(folder)
    model, _ = mlx_dsvl.load(path, dtype=dtype, quantize=bits, quantize_vision=vision_bits)
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    predicted = MemoryModel(load_config(path), getattr(mx, dtype)).weights(llm_bits=bits, vision_bits=vision_bits)
    assert predicted == loaded


def test_building_the_memory_model_allocates_nothing():
    mx.clear_cache()
    before = mx.get_active_memory()
    memory = real("7b", mx.float32)
    assert mx.get_active_memory() - before < 1e6
    assert memory.weights() > 28e9  # the 7B in float32, which this machine could not hold


def test_real_size_weights_match_the_measured_figures():
    # docs/PERFORMANCE.md "Memory": resident weights with a 4-bit LLM, bfloat16 / float32
    assert real("1.3b").weights(llm_bits=4) / GB == pytest.approx(1.55, abs=0.005)
    assert real("7b").weights(llm_bits=4) / GB == pytest.approx(4.73, abs=0.005)
    assert real("1.3b", mx.float32).weights() / GB == pytest.approx(7.85, abs=0.005)
    assert real("7b", mx.float32).weights(llm_bits=4) / GB == pytest.approx(6.00, abs=0.005)


def test_kv_cache_bytes():
    # docs/PERFORMANCE.md: the 1.3B's float32 cache over 716 tokens (768 slots) is 0.30 GB, and an
    # 8-bit cache of 4096 tokens with bfloat16 scales 24 x 4096 x 2048 x 2 x 1.0625 B
    assert real("1.3b", mx.float32).kv_cache(716) == 24 * 768 * 2048 * 2 * 4
    assert real("1.3b").kv_cache(4096, kv_bits=8) == 24 * 4096 * 2048 * 2 * 1.0625
    assert real("1.3b").kv_cache(4096, kv_bits=8, rows=3) == 3 * real("1.3b").kv_cache(4096, kv_bits=8)


def test_transients_near_the_measured_ones():
    # docs/PERFORMANCE.md: 1.3B prefill activations 0.32 GB above weights and an 8-bit cache of
    # 4096 tokens (float32, CPU); the 7B's towers 0.70 GB above their weights (float32, CPU)
    cpu = real("1.3b", mx.float32, gpu=False)
    assert 0.30 <= cpu.prefill_peak(4096, kv_bits=8) / GB <= 0.40
    assert 0.65 <= real("7b", mx.float32, gpu=False).vision_peak() / GB <= 0.95


def test_7b_on_an_8gb_mac_gets_a_4bit_llm():
    """5.5 GB (Metal's working set on 8 GB): the 4-bit LLM alone is 4.73 GB; with unquantized
    towers (0.8 GB) even a 4-bit cache of 4096 tokens does not fit, so the context shrinks; with
    quantized vision it fits whole."""
    p = plan(real("7b"), int(5.5 * GB), vision_bits=None)
    assert (p.choice.llm_bits, p.choice.kv_bits) == (4, 4) and p.peak <= 5.5 * GB and p.reduced
    assert min_context(real("7b").config) <= p.choice.context < 4096
    line = p.line()
    assert line.startswith("memory limit 5.5 GB: 4-bit LLM, unquantized vision, 4-bit KV, ")
    assert "-token context; predicted peak 5." in line and "; cost: first-token logits move by up to ~" in line
    # 8-bit towers (0.46 GB instead of 0.84) make room for the whole context
    assert plan(real("7b"), int(5.5 * GB)).choice == Choice(4, 8, 4, 4096)


def test_7b_from_8_to_24_gb():
    """8 GB: the 4-bit LLM (8-bit is 7.3 GB alone) leaves room for a plain cache; 10.7 GB (a 16 GB
    Mac): the 8-bit LLM; 16 GB (a 24 GB Mac): the bfloat16 LLM (14.7 GB) with a 4-bit cache, whose
    measured cost (2.5% of the largest logit) is just below the 8-bit LLM's (2.6%); 24 GB: nothing
    reduced."""
    assert plan(real("7b"), 8 * GB).choice == Choice(4, None, None, 4096)
    assert plan(real("7b"), int(10.7 * GB)).choice == Choice(8, None, None, 4096)
    assert plan(real("7b"), 16 * GB).choice == Choice(None, None, 4, 4096)
    full = plan(real("7b"), 24 * GB)
    assert full.choice == Choice(context=4096) and not full.reduced
    assert full.line().endswith("cost: none (nothing quantized)")


def test_1_3b_from_2_to_6_gb():
    """2 GB: 4-bit LLM (1.55 GB) and a 4-bit cache; 3 GB: 8-bit LLM and cache; 6 GB: bfloat16
    (3.9 GB) and a plain 0.8 GB cache fit unreduced."""
    assert plan(real("1.3b"), 2 * GB).choice == Choice(4, None, 4, 4096)
    assert plan(real("1.3b"), 3 * GB).choice == Choice(8, None, 8, 4096)
    assert plan(real("1.3b"), 6 * GB).choice == Choice(context=4096)


def test_every_choice_that_fits_is_no_more_accurate_than_the_chosen_one():
    memory, limit = real("7b"), int(8 * GB)
    chosen = plan(memory, limit).choice
    for llm in (None, 8, 4):
        for kv in (None, 8, 4):
            c = Choice(llm, None, kv, 4096)
            if memory.peak(c) <= limit:
                assert c.cost >= chosen.cost


def test_explicit_choices_are_kept():
    p = plan(real("7b"), int(5.5 * GB), kv_bits=None, vision_bits=8)
    assert p.choice.kv_bits is None and p.choice.vision_bits == 8 and p.choice.llm_bits == 4
    assert p.choice.context < 4096  # the plain cache is kept: the context shrinks instead
    assert p.choice.context >= min_context(real("7b").config)
    with pytest.raises(BudgetError):
        plan(real("7b"), int(5.5 * GB), kv_bits=None, vision_bits=8, context=4096, fixed_context=True)
    assert plan(real("1.3b"), 40 * GB, llm_bits=8).choice.llm_bits == 8
    roomy = plan(real("1.3b"), 40 * GB, vision_bits=8)  # only the given part is quantized
    assert roomy.choice == Choice(None, 8, None, 4096) and not roomy.reduced


def test_server_rows_and_reserve_count():
    one = plan(real("1.3b"), 6 * GB)
    eight = plan(real("1.3b"), 6 * GB, rows=8)
    assert one.choice == Choice(context=4096) and eight.choice.kv_bits is not None
    assert plan(real("1.3b"), 6 * GB, reserve=int(2 * GB)).choice != Choice(context=4096)


def test_refusal_names_the_smallest_choice():
    with pytest.raises(BudgetError) as e:
        plan(real("7b"), 3 * GB)
    message = str(e.value)
    assert message.startswith("nothing fits a memory limit of 3.00 GB: the smallest choice (4-bit LLM")
    assert "needs 4." in message and message.endswith(" GB")  # the 4-bit 7B's weights alone are 4.7 GB
    with pytest.raises(BudgetError, match=r"needs 5\.\d\d GB, 1\.00 GB of it for the caches$"):
        plan(real("7b"), 3 * GB, reserve=int(1 * GB))


def args_for(path, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_arguments(p, "model", "dtype", "quantize", "kv_bits", "kv_group_size", "max_context", "memory_limit")
    return p.parse_args(["--model", str(path), *argv])


def test_default_limit_changes_nothing_that_fits(tiny_dir, capsys):
    args = args_for(tiny_dir)
    before = vars(args).copy()
    assert not apply_budget(args, args.model).reduced
    assert vars(args) == before and type(args.max_context) is type(before["max_context"])
    assert capsys.readouterr().err == ""


def test_a_given_limit_sets_the_unset_options(tiny_dir, capsys):
    memory = MemoryModel(load_config(tiny_dir), mx.float32, gpu=mx.default_device() == mx.gpu)
    full = memory.peak(Choice(context=4096))
    limit = (memory.peak(Choice(llm_bits=8, context=4096)) + 1000) / GB  # 8-bit fits, unquantized not
    assert full > limit * GB
    args = args_for(tiny_dir, "--dtype", "float32", "--memory-limit", str(limit))
    apply_budget(args, args.model)
    assert args.quantize == 8 and args.kv_bits is None and args.max_context == 4096  # head size 16: no KV groups
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[mlx-dsvl] memory limit {limit:.1f} GB: 8-bit LLM")
    args = args_for(tiny_dir, "--dtype", "float32", "--memory-limit", str(limit), "--quantize", "4")
    apply_budget(args, args.model)
    assert args.quantize == 4


def test_a_converted_folder_keeps_its_quantized_groups(tiny_dir, tmp_path, capsys):
    from mlx_dsvl.convert.to_mlx import convert_to_mlx

    folder = convert_to_mlx(str(tiny_dir), str(tmp_path / "q4"), quantize=True, q_bits=4, progress=lambda _: None)
    args = args_for(folder, "--dtype", "float32", "--memory-limit", "0.2")
    chosen = apply_budget(args, args.model)
    assert chosen.choice.llm_bits == 4 and args.quantize is None  # stored, not quantized again
    memory = MemoryModel(load_config(folder), mx.float32)
    model, _ = mlx_dsvl.load(folder, dtype="float32")
    assert memory.weights(llm_bits=4) == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert "memory limit 0.2 GB: 4-bit LLM" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_refuses_in_one_line_and_says_its_choice(text_ckpt, capsys):
    rc = generate_main(["--model", str(text_ckpt), "--prompt", "Hi", "--max-tokens", "2", "--memory-limit", "0.001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: nothing fits a memory limit of 0.00 GB: the smallest choice (4-bit LLM")
    memory = MemoryModel(load_config(text_ckpt), mx.float32, gpu=mx.default_device() == mx.gpu)
    limit = (memory.peak(Choice(llm_bits=8, context=4096)) + 1000) / GB  # 8-bit fits, unquantized not
    rc = generate_main(["--model", str(text_ckpt), "--prompt", "Hi", "--max-tokens", "2", "--dtype", "float32",
                        "--memory-limit", str(limit)])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "memory limit" in line]
    assert rc == 0 and captured.out.strip()
    assert len(notes) == 1 and notes[0].startswith(f"[mlx-dsvl] memory limit {limit:.1f} GB: 8-bit LLM")
