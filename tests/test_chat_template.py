"""The "deepseek" prompt template and the chat processor.

Expected prompts are written out by hand from the template rules (``SeparatorStyle.DeepSeek``
in the original ``conversation.py``: the system prompt, "User: ..." and "Assistant:" joined by
blank lines, a finished reply closed by the end-of-sentence token instead), not produced by our
code.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_dsvl.processing import DEFAULT_SYSTEM_PROMPT, format_conversation

IMAGE_ID, BOS_ID, EOS_ID = 100015, 100000, 100001
N_IMG = 576

SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
EOS = "<｜end▁of▁sentence｜>"


def user(text, role="user"):
    return {"role": role, "content": text}


def assistant(text, role="assistant"):
    return {"role": role, "content": text}


def small_image(seed, width=40, height=30):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def runs_of(ids, value):
    """Lengths of the maximal runs of ``value`` in a 1-D sequence."""
    runs, current = [], 0
    for x in list(ids) + [None]:
        if x == value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# ----------------------------------------------------------------------------- template


def test_default_system_prompt_text():
    assert DEFAULT_SYSTEM_PROMPT == SYSTEM


def test_single_turn():
    got = format_conversation([user("Describe this image.")])
    assert got == SYSTEM + "\n\nUser: Describe this image.\n\nAssistant:"


def test_single_turn_with_empty_assistant_and_stripping():
    got = format_conversation([user("  Describe this image. \n"), assistant("")])
    assert got == SYSTEM + "\n\nUser: Describe this image.\n\nAssistant:"


def test_multi_turn_uses_end_of_sentence_separator():
    conv = [user("Hello!"), assistant("Hi! This is Tony."), user("Who are you?")]
    expected = (
        SYSTEM
        + "\n\nUser: Hello!\n\nAssistant: Hi! This is Tony.<｜end▁of▁sentence｜>"
        + "User: Who are you?\n\nAssistant:"
    )
    assert format_conversation(conv) == expected


def test_closing_assistant_answer_keeps_eos():
    got = format_conversation([user("Q1"), assistant(" A1 ")])
    assert got == SYSTEM + "\n\nUser: Q1\n\nAssistant: A1" + EOS


def test_custom_system_message():
    conv = [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert format_conversation(conv) == "Be brief.\n\nUser: Hi\n\nAssistant:"
    got = format_conversation([user("Hi")], system_prompt="Be brief.")
    assert got == "Be brief.\n\nUser: Hi\n\nAssistant:"


def test_empty_system_prompt_means_none():
    conv = [{"role": "system", "content": ""}, user("Hi")]
    assert format_conversation(conv) == "User: Hi\n\nAssistant:"
    assert format_conversation([user("Hi")], system_prompt="") == "User: Hi\n\nAssistant:"
    conv2 = [{"role": "system", "content": ""}, user("Hi"), assistant("Hello."), user("Bye")]
    expected = "User: Hi\n\nAssistant: Hello.<｜end▁of▁sentence｜>User: Bye\n\nAssistant:"
    assert format_conversation(conv2) == expected


def test_role_spellings():
    conv = [user("Hi", "User"), assistant("Yo", "Assistant"), user("Ok", "USER")]
    expected = SYSTEM + "\n\nUser: Hi\n\nAssistant: Yo<｜end▁of▁sentence｜>User: Ok\n\nAssistant:"
    assert format_conversation(conv) == expected
    conv = [{"role": "SYSTEM", "content": "S"}, user("Hi", "uSeR"), assistant("", "ASSISTANT")]
    assert format_conversation(conv) == "S\n\nUser: Hi\n\nAssistant:"


def test_images_placeholders_stay_in_text():
    text = "<image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich image is brighter?"
    expected = (
        SYSTEM + "\n\nUser: <image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\n"
        "Which image is brighter?\n\nAssistant:"
    )
    assert format_conversation([user(text)]) == expected


@pytest.mark.parametrize(
    "conv,match",
    [
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "human", "content": "hi"}], "unknown role"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"content": "hi"}], "'role' and 'content'"),
        ([{"role": "user", "content": None}], "content must be a str"),
        (["User: hi"], "must be a dict"),
        ("User: hi", "list of"),
        ([user("hi"), {"role": "system", "content": "late"}], "system message"),
        ([], "no user or assistant"),
    ],
)
def test_malformed_conversations(conv, match):
    with pytest.raises(ValueError, match=match):
        format_conversation(conv)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_layout(processor_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mlx_dsvl.processing import ChatProcessor
    from mlx_dsvl.random_tokenizer import build_tokenizer_json

    tok = ChatProcessor.from_pretrained(processor_dir).tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    # the ids are tokenizer.json's own (transformers 5.x's AutoTokenizer turned this byte-level
    # BPE, labelled LlamaTokenizerFast like DeepSeek's, into a SentencePiece-style one)
    raw = Tokenizer.from_file(str(processor_dir / "tokenizer.json"))
    for text in ("hello world", "naïve café 中文 🙂", " two  spaces\nand lines\n\n", "User: 12345"):
        assert tok.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert tok.encode("<image_placeholder>") == [BOS_ID, IMAGE_ID]
    assert tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>") == EOS_ID
    assert max(tok.get_vocab().values()) < 102400
    text = "Hello, world! 你好，世界。今天天气很好 😀🐱🚀 ❤️ naïve café\n\nUser: 12345"
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and EOS_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text
    assert build_tokenizer_json() == build_tokenizer_json()  # deterministic


# ----------------------------------------------------------------------------- processor


def test_processor_attributes(chat_processor):
    assert chat_processor.image_token_id == IMAGE_ID
    assert chat_processor.pad_id == EOS_ID
    assert chat_processor.num_image_tokens == N_IMG
    assert chat_processor.image_processor.image_size == 384


def test_two_images_expand_to_two_runs(chat_processor):
    text = "<image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich image is brighter?"
    out = chat_processor([user(text)], [small_image(0), small_image(1, 50, 20)])
    ids = np.array(out["input_ids"])  # [1, T]
    assert ids.dtype == np.int32 and ids.shape[0] == 1
    ids = ids[0]
    assert ids[0] == BOS_ID
    assert runs_of(ids.tolist(), IMAGE_ID) == [N_IMG, N_IMG]
    # Collapsing each run back to one id gives exactly the tokenizer's encoding of the prompt.
    ids_list = ids.tolist()
    collapsed = [x for i, x in enumerate(ids_list) if not (x == IMAGE_ID == ids_list[i - 1])]
    assert collapsed == chat_processor.tokenizer.encode(out["prompt"])
    assert out["prompt"] == format_conversation([user(text)])
    assert out["num_images"] == 2
    pixels = np.array(out["pixel_values"])
    assert pixels.shape == (1, 2, 3, 384, 384) and pixels.dtype == np.float32
    expected = chat_processor.image_processor([small_image(0), small_image(1, 50, 20)])
    assert np.array_equal(pixels[0], expected)


def test_text_only(chat_processor):
    out = chat_processor([user("Hi there")])
    assert out["pixel_values"] is None and out["num_images"] == 0
    ids = np.array(out["input_ids"])[0].tolist()
    assert ids == chat_processor.tokenizer.encode(SYSTEM + "\n\nUser: Hi there\n\nAssistant:")
    assert IMAGE_ID not in ids


def test_images_from_message_field(chat_processor, tmp_path):
    path = tmp_path / "a.png"
    small_image(3).save(path)
    first = {"role": "User", "content": "<image_placeholder> What is it?", "images": [str(path)]}
    conv = [first, assistant("")]
    out = chat_processor(conv)
    assert out["num_images"] == 1
    assert runs_of(np.array(out["input_ids"])[0].tolist(), IMAGE_ID) == [N_IMG]


@pytest.mark.parametrize("n_tags,n_images", [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_placeholder_image_count_mismatch(chat_processor, n_tags, n_images):
    text = "<image_placeholder> " * n_tags + "Compare."
    images = [small_image(k) for k in range(n_images)]
    with pytest.raises(ValueError, match=rf"{n_tags} image placeholder.*{n_images} image"):
        chat_processor([user(text)], images)


def test_batch_left_padding(chat_processor):
    samples = [
        ([user("Hi")], None),
        (
            [user("<image_placeholder> and <image_placeholder>: which is brighter?")],
            [small_image(1), small_image(2)],
        ),
        ([user("<image_placeholder> Describe it in detail, please.")], [small_image(3)]),
    ]
    batch = chat_processor.batch(samples)
    ids = np.array(batch["input_ids"])  # [B, T]
    mask = np.array(batch["attention_mask"])  # [B, T]
    pixels = np.array(batch["pixel_values"])  # [B, Nmax, 3, S, S]
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert batch["image_counts"] == [0, 2, 1]
    assert pixels.shape == (3, 2, 3, 384, 384)
    singles = [chat_processor(conv, imgs) for conv, imgs in samples]
    seq_len = max(int(s["input_ids"].shape[1]) for s in singles)
    assert ids.shape == (3, seq_len)
    for b, single in enumerate(singles):
        real = np.array(single["input_ids"])[0]
        n_pad = seq_len - real.shape[0]
        assert np.array_equal(ids[b, n_pad:], real)  # real tokens identical, at the right end
        assert np.all(ids[b, :n_pad] == EOS_ID)  # pads on the left
        assert np.all(mask[b, :n_pad] == 0) and np.all(mask[b, n_pad:] == 1)
        assert ids[b, n_pad] == BOS_ID
        n = batch["image_counts"][b]
        if n:
            assert np.array_equal(pixels[b, :n], np.array(single["pixel_values"])[0])
        assert not pixels[b, n:].any()  # zero padding for missing images
    assert mask[1].all()  # the longest sample is not padded
    assert batch["prompts"] == [s["prompt"] for s in singles]


def test_batch_text_only_has_no_pixels(chat_processor):
    batch = chat_processor.batch([([user("a")], None), ([user("a longer question")], [])])
    assert batch["pixel_values"] is None and batch["image_counts"] == [0, 0]


def test_bos_added_even_without_template_post_processor(tmp_path, processor_dir):
    """transformers 5 drops ``add_bos_token`` when tokenizer.json exists: BOS must still lead."""
    import json

    from mlx_dsvl.processing import ChatProcessor

    for path in processor_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    tok_json = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json["post_processor"] = {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    proc = ChatProcessor.from_pretrained(tmp_path)
    ids = np.array(proc([user("<image_placeholder> hi")], [small_image(0)])["input_ids"])[0]
    assert ids[0] == BOS_ID and (ids == BOS_ID).sum() == 1
    assert runs_of(ids.tolist(), IMAGE_ID) == [N_IMG]


def test_from_pretrained_missing_tokenizer(tmp_path, processor_dir):
    from mlx_dsvl.processing import ChatProcessor

    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((processor_dir / name).read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json") as info:
        ChatProcessor.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        ChatProcessor.from_pretrained(tmp_path / "absent")
