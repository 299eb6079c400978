"""A tiny, deterministic stand-in for the DeepSeek-VL tokenizer, plus processor configs.

Tests cannot download the real byte-level BPE tokenizer, so this builds a small one with the same
layout: byte-level (every UTF-8 string round-trips), the special tokens at the real ids (BOS
100000, EOS 100001, ``<image_placeholder>`` 100015; or elsewhere, for tests that must not share
that assumption), and a ``LlamaTokenizerFast`` config with BOS prepended, no EOS, pad = EOS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TAG = "<image_placeholder>"
BOS_ID = 100000
EOS_ID = 100001
IMAGE_ID = 100015
LLM_VOCAB_SIZE = 102400

# Specials at their fixed ids. 100002..100014 are plausible reserved names: the tests only
# rely on BOS, EOS and the image tag, whose ids match the released tokenizer.
RESERVED_TOKENS: dict[int, str] = {
    100002: "<｜fim▁hole｜>",
    100003: "<｜fim▁begin｜>",
    100004: "<｜fim▁end｜>",
    100005: "<pad>",
    100006: "<|User|>",
    100007: "<|Assistant|>",
    100008: "<|EOT|>",
    100009: "<｜reserved▁9｜>",
    100010: "<｜reserved▁10｜>",
    100011: "<｜reserved▁11｜>",
    100012: "<｜reserved▁12｜>",
    100013: "<｜reserved▁13｜>",
    100014: "<｜reserved▁14｜>",
}
SPECIAL_TOKENS: dict[int, str] = {BOS_ID: BOS_TOKEN, EOS_ID: EOS_TOKEN, **RESERVED_TOKENS, IMAGE_ID: IMAGE_TAG}


def special_tokens(bos_id: int = BOS_ID, eos_id: int = EOS_ID, image_id: int = IMAGE_ID) -> dict[int, str]:
    """id -> content of every special token, BOS, EOS and the image tag at the given ids."""
    chosen = {bos_id: BOS_TOKEN, eos_id: EOS_TOKEN, image_id: IMAGE_TAG}
    if len(chosen) != 3:
        raise ValueError(f"BOS, EOS and the image tag need three different ids, got {bos_id}, {eos_id}, {image_id}")
    for i in chosen:
        if not 1000 <= i < LLM_VOCAB_SIZE:  # above the learned vocabulary, inside the LLM's
            raise ValueError(f"special id {i} must be in [1000, {LLM_VOCAB_SIZE})")
    return dict(sorted({**{i: t for i, t in RESERVED_TOKENS.items() if i not in chosen}, **chosen}.items()))

NUM_MERGES = 400  # merges learned on top of the 256 byte symbols

# Built-in training text: chat-template words, English, Chinese and emoji.
_CORPUS = [
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language.",
    "User: Describe this image in detail.\n\nAssistant: The image shows a cat sitting on a "
    "wooden table next to a window. The light is warm and the colors are soft.",
    "User: What is written on the sign?\n\nAssistant: The sign says \"Open every day from 9 "
    "to 5\". There is a phone number below it: 555-0123.",
    "User: Which image is brighter?\n\nAssistant: The second image is brighter than the first "
    "one, because the sky is clear and the sun is shining.",
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words. "
    "Language models read text one token at a time, and vision encoders read images patch "
    "by patch.",
    "这是一张图片。图片中有一只猫坐在桌子上。请描述这张图片的内容。",
    "你好！我是一个有帮助的语言和视觉助手。我可以理解用户提供的图片，并用自然语言回答问题。",
    "今天天气很好，我们去公园散步吧。北京是中国的首都，上海是一个大城市。",
    "表格中的数据显示，第一季度的销售额增长了百分之十二。",
    "😀😃😄😁 🐱🐶🐭 🌞🌧️❄️ 👍👏🎉 ❤️🔥✨ 🚀🌍📷",
    "Great job 👍! Let's go 🚀. I love cats 🐱 and dogs 🐶. 我喜欢猫🐱和狗🐶。",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -42 1e-6",
]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Newlines and digits stand alone, then GPT-2 style byte-level splitting."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\r\n]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _learn_bpe(corpus: Sequence[str] | None = None, merges: int = NUM_MERGES) -> dict:
    """Train byte-level BPE on ``corpus`` (default: the built-in text); returns the
    ``tokenizer.json`` dict."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeat the corpus so that rarer pairs still reach min_frequency.
    tok.train_from_iterator(_CORPUS * 3 if corpus is None else corpus, trainer=trainer)
    return json.loads(tok.to_str())


def build_tokenizer_json(specials: dict[int, str] | None = None, corpus: Sequence[str] | None = None,
                         merges: int = NUM_MERGES) -> dict:
    """The ``tokenizer.json`` dict; specials sit both in the BPE vocab and in ``added_tokens``, as
    the released tokenizer keeps ids >= 100000 stable.  ``corpus``/``merges``: a vocabulary of
    another size (e.g. the released one's, for benchmarks whose cost grows with it)."""
    specials = SPECIAL_TOKENS if specials is None else specials
    bos_id = next(i for i, t in specials.items() if t == BOS_TOKEN)
    data = _learn_bpe(corpus, merges)
    vocab: dict[str, int] = data["model"]["vocab"]
    assert max(vocab.values()) < min(specials), "learned vocab overlaps the special id range"
    for idx, content in specials.items():
        vocab[content] = idx
    data["added_tokens"] = [
        {
            "id": idx,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for idx, content in sorted(specials.items())
    ]
    # BOS prepended, nothing appended: what LlamaTokenizerFast(add_bos_token=True) builds.
    post = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    data["post_processor"] = json.loads(post.__getstate__())
    data["decoder"] = json.loads(decoders.ByteLevel().__getstate__())
    data["normalizer"] = None
    return data


def write_tokenizer(out_dir: str | Path, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                    image_id: int = IMAGE_ID, *, corpus: Sequence[str] | None = None,
                    merges: int = NUM_MERGES) -> None:
    """Write the tokenizer files; they load offline with ``AutoTokenizer.from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(bos_id, eos_id, image_id)
    data = build_tokenizer_json(specials, corpus, merges)
    # Sanity: the serialised file must load back with the same special ids.
    loaded = Tokenizer.from_str(json.dumps(data))
    for idx, content in specials.items():
        got = loaded.token_to_id(content)
        if got != idx:
            raise RuntimeError(f"special token {content!r} got id {got}, expected {idx}")
    text = json.dumps(data, ensure_ascii=False, indent=2)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")

    added_decoder = {
        str(idx): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for idx, content in sorted(specials.items())
    }
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [IMAGE_TAG],
    }
    _write_json(out / "tokenizer_config.json", config)
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IMAGE_TAG],
    }
    _write_json(out / "special_tokens_map.json", special_map)


def write_processor_configs(
    out_dir: str | Path,
    image_size: int,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
    do_normalize: bool,
    num_image_tokens: int = 576,
) -> None:
    """Write the processor configs with the hub's field names and each family's released values."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocessor = {
        "image_size": int(image_size),
        "min_size": 14,
        "image_mean": None if image_mean is None else [float(x) for x in image_mean],
        "image_std": None if image_std is None else [float(x) for x in image_std],
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": bool(do_normalize),
        "image_processor_type": "VLMImageProcessor",
        "processor_class": "VLChatProcessor",
    }
    _write_json(out / "preprocessor_config.json", preprocessor)
    processor = {
        "image_tag": IMAGE_TAG,
        "num_image_tokens": int(num_image_tokens),
        "sft_format": "deepseek",
        "add_special_token": False,
        "ignore_id": -100,
        "mask_prompt": True,
        "processor_class": "VLChatProcessor",
    }
    _write_json(out / "processor_config.json", processor)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
