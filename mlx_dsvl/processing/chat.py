"""The "deepseek" chat template and the chat processor (text + images -> model inputs).

Template (``SeparatorStyle.DeepSeek`` of the original ``conversation.py``), roles ``User`` and
``Assistant``, ``sep = "\\n\\n"``, ``sep2 = "<｜end▁of▁sentence｜>"``::

    {system}\\n\\nUser: {q1}\\n\\nAssistant: {a1}<｜end▁of▁sentence｜>User: {q2}\\n\\nAssistant:

No system part when the system prompt is empty; message ``i`` (system excluded) ends with
``sep`` for even ``i`` and ``sep2`` for odd ``i`` (by position, like the original), or is
``"{Role}:"`` alone when its stripped text is empty; texts and the whole prompt are stripped.
Tokenization follows the original ``VLChatProcessor.process_one``: the whole prompt is encoded
(BOS first), then each image-tag id is expanded (:mod:`.image_tokens`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .image import ImageInput, ImageProcessor
from .image_tokens import ImageTokens

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
SEP = "\n\n"
IMAGE_TAG = "<image_placeholder>"  # the released checkpoints' tag (processor_config.json may name another)
SEP2 = "<｜end▁of▁sentence｜>"
_ROLE_NAMES = {"system": "system", "user": "User", "assistant": "Assistant"}

Message = Mapping[str, Any]


def _check_message(index: int, message: Any) -> tuple[str, str]:
    """Validate one message; return ``(canonical_role, content)``."""
    if not isinstance(message, Mapping):
        raise ValueError(
            f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    if "role" not in message or "content" not in message:
        raise ValueError(
            f"message {index} must have 'role' and 'content' keys, got keys {sorted(message)}"
        )
    role, content = message["role"], message["content"]
    if not isinstance(role, str) or role.strip().lower() not in _ROLE_NAMES:
        raise ValueError(
            f"message {index} has unknown role {role!r}; expected 'system', 'user' or 'assistant' "
            "(case-insensitive)"
        )
    if not isinstance(content, str):
        raise ValueError(f"message {index} content must be a str, got {type(content).__name__}")
    return _ROLE_NAMES[role.strip().lower()], content


def format_conversation(conversation: Sequence[Message], system_prompt: str | None = None) -> str:
    """Render ``[{"role", "content"}, ...]`` (roles case-insensitive, a system message only
    first) with the "deepseek" template; ending with ``"Assistant:"`` after a user message.

    ``system_prompt`` (``None``: :data:`DEFAULT_SYSTEM_PROMPT`) applies when the conversation has
    no system message; an empty one (either way) means no system part.
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise ValueError("conversation must be a list of {'role', 'content'} dicts")
    checked = [_check_message(i, m) for i, m in enumerate(conversation)]
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    if checked and checked[0][0] == "system":
        system = checked.pop(0)[1]
    for i, (role, _) in enumerate(checked):
        if role == "system":
            raise ValueError(
                f"a system message is only allowed first (found one at message {i + 1})"
            )
    if not checked:
        raise ValueError("conversation has no user or assistant message")
    if checked[-1][0] == "User":
        checked.append(("Assistant", ""))

    seps = (SEP, SEP2)
    prompt = system + SEP if system else ""
    for i, (role, content) in enumerate(checked):
        text = content.strip()
        prompt += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return prompt.strip()


def check_unicode(prompt: str) -> None:
    """``ValueError`` for text the tokenizer cannot encode: lone surrogates, such as Python's
    stand-ins for the bytes of a command-line argument that were not UTF-8."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        start = prompt.rfind("\n", 0, e.start) + 1
        end = prompt.find("\n", e.end)
        line = prompt[start:end if end >= 0 else len(prompt)]
        raise ValueError(f"the prompt is not UTF-8 text: {prompt[e.start:e.end]!r} in {line!r} (a byte "
                         "that is not UTF-8, typed in a terminal set to another encoding?)") from None


def place_images(prompt: str, n_images: int, tag: str = IMAGE_TAG) -> str:
    """With images but no placeholder, one placeholder per image goes before the text (as the
    original demo does)."""
    if n_images and tag not in prompt:
        return tag * n_images + prompt
    return prompt


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _images_from_messages(conversation: Sequence[Message]) -> list[ImageInput]:
    """Collect the original-style ``"images"`` lists attached to messages, in order."""
    found: list[ImageInput] = []
    for message in conversation:
        if isinstance(message, Mapping) and message.get("images"):
            found.extend(message["images"])
    return found


class ChatProcessor:
    """Turns conversations and images into ``input_ids`` and ``pixel_values`` (MLX arrays), with
    a ``transformers`` tokenizer (DeepSeek's byte-level BPE) and an :class:`ImageProcessor`."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor,
        image_tag: str = IMAGE_TAG,
        num_image_tokens: int = 576,
        system_prompt: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_tag = image_tag
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        # Look the id up once: get_vocab() builds a fresh 100k-entry dict on every call.
        image_id = tokenizer.get_vocab().get(image_tag)
        if image_id is None:
            raise ValueError(f"image tag {image_tag!r} is not in the tokenizer vocabulary")
        self.image_tokens = ImageTokens(int(image_id), int(num_image_tokens))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ChatProcessor:
        """Load the tokenizer, ``processor_config.json`` and ``preprocessor_config.json``."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # heavy, only needed here
        from transformers.utils import logging as transformers_logging

        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder not found: {root}")
        for name in ("tokenizer_config.json",):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root}: missing tokenizer file {name}")
        if not any((root / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(f"{root}: missing tokenizer file tokenizer.json")
        json_files = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "processor_config.json")
        parsed = {n: _read_json(root / n) for n in json_files if (root / n).is_file()}  # damaged: named
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its notes on DeepSeek's files are noise here
        try:
            if (root / "tokenizer.json").is_file():
                # DeepSeek's tokenizer_config names LlamaTokenizerFast, but tokenizer.json is a
                # byte-level BPE: transformers 5.x's AutoTokenizer (before 5.2x) builds a
                # LlamaTokenizer that replaces its pre-tokenizer with SentencePiece's Metaspace
                # and silently drops spaces and splits non-ASCII differently
                # (huggingface/transformers#45488).  The generic class uses tokenizer.json as is.
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root), local_files_only=True)
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        except Exception as exc:  # transformers raises many types; add the folder to the message
            raise ValueError(f"{root}: could not load the tokenizer: {exc}") from exc
        finally:
            transformers_logging.set_verbosity(verbosity)
        image_processor = ImageProcessor.from_pretrained(root)
        cfg: dict[str, Any] = parsed.get("processor_config.json", {})
        if not isinstance(cfg, dict):
            raise ValueError(f"{root / 'processor_config.json'}: not a JSON object")
        sft_format = cfg.get("sft_format", "deepseek")
        if sft_format != "deepseek":
            raise ValueError(
                f"{root / 'processor_config.json'}: unsupported sft_format {sft_format!r}"
            )
        if cfg.get("add_special_token", False):
            raise ValueError(f"{root / 'processor_config.json'}: add_special_token true is not supported "
                             "(no release sets it; the original model could not merge its ids either)")
        return cls(
            tokenizer,
            image_processor,
            image_tag=cfg.get("image_tag", IMAGE_TAG),
            num_image_tokens=cfg.get("num_image_tokens", 576),
        )

    @property
    def image_token_id(self) -> int:
        """Tokenizer id of the image tag (100015 for DeepSeek-VL)."""
        return self.image_tokens.token_id

    @property
    def num_image_tokens(self) -> int:
        """Image ids per image (576 in every release)."""
        return self.image_tokens.per_image

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad id, else EOS (100001 for DeepSeek-VL)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def format(self, conversation: Sequence[Message]) -> str:
        """The prompt string for ``conversation`` with this processor's system prompt."""
        return format_conversation(conversation, system_prompt=self.system_prompt)

    def tokenize(self, prompt: str, bos: bool = True) -> np.ndarray:
        """Prompt -> ``[T]`` int32 ids: BOS first, each image id expanded to its copies.

        The original's transformers 4.x always prepended BOS; transformers 5 leaves it to
        ``tokenizer.json``'s post-processor, so BOS is added here if missing.  ``bos=False``
        encodes a continuation: no special tokens added.
        """
        check_unicode(prompt)
        ids = np.asarray(self.tokenizer.encode(prompt, add_special_tokens=bos), dtype=np.int64)  # [T0]
        bos_id = self.tokenizer.bos_token_id
        if bos and bos_id is not None and (ids.size == 0 or ids[0] != bos_id):
            ids = np.concatenate([np.array([bos_id], dtype=np.int64), ids])
        return self.image_tokens.expand(ids).astype(np.int32)

    def _prepare(self, conversation: Sequence[Message], images: Iterable[ImageInput] | None):
        """One sample -> ``(prompt, ids [T] int32, pixels [N, 3, S, S] float32)``."""
        prompt = self.format(conversation)
        ids = self.tokenize(prompt)
        image_list = _images_from_messages(conversation) if images is None else list(images)
        n_tags = self.image_tokens.count(ids)
        if n_tags != len(image_list):
            raise ValueError(
                f"the prompt has {n_tags} image placeholder(s) {self.image_tag!r} "
                f"but {len(image_list)} image(s) were given"
            )
        pixels = self.image_processor(image_list)  # [N, 3, S, S]
        return prompt, ids, pixels

    def __call__(
        self, conversation: Sequence[Message], images: Iterable[ImageInput] | None = None
    ) -> dict[str, Any]:
        """One conversation -> ``input_ids`` [1, T], ``pixel_values`` [1, N, 3, S, S] in [0, 1]
        (None without images), ``prompt``, ``num_images``.  ``images``: one per placeholder, in
        order; ``None`` takes the original-style ``"images"`` lists of the messages."""
        prompt, ids, pixels = self._prepare(conversation, images)
        n = pixels.shape[0]
        return {
            "input_ids": mx.array(ids[None, :]),  # [1, T]
            "pixel_values": mx.array(pixels[None]) if n else None,  # [1, N, 3, S, S]
            "prompt": prompt,
            "num_images": n,
        }

    def batch(
        self, samples: Sequence[tuple[Sequence[Message], Iterable[ImageInput] | None]]
    ) -> dict[str, Any]:
        """Several ``(conversation, images)`` pairs -> one left-padded batch: ``input_ids`` and
        ``attention_mask`` [B, T] (pad id on the left, mask 0 there), ``pixel_values``
        [B, Nmax, 3, S, S] (row b's images first, zeros after; None without images),
        ``image_counts`` and ``prompts``."""
        if not samples:
            raise ValueError("batch() needs at least one (conversation, images) sample")
        prepared = [self._prepare(conv, imgs) for conv, imgs in samples]
        lengths = [ids.shape[0] for _, ids, _ in prepared]
        counts = [int(px.shape[0]) for _, _, px in prepared]
        bsz, seq_len, n_max = len(prepared), max(lengths), max(counts)

        input_ids = np.full((bsz, seq_len), self.pad_id, dtype=np.int32)  # [B, T]
        attention_mask = np.zeros((bsz, seq_len), dtype=np.int32)  # [B, T]
        pixel_values = np.zeros((bsz, n_max, *self.image_processor.default_shape), dtype=np.float32)
        for b, (_, ids, px) in enumerate(prepared):
            input_ids[b, seq_len - ids.shape[0] :] = ids
            attention_mask[b, seq_len - ids.shape[0] :] = 1
            pixel_values[b, : px.shape[0]] = px
        return {
            "input_ids": mx.array(input_ids),
            "attention_mask": mx.array(attention_mask),
            "pixel_values": mx.array(pixel_values) if n_max else None,
            "image_counts": counts,
            "prompts": [p for p, _, _ in prepared],
        }


class PromptTokens:
    """Token ids of the successive prompts of one conversation, re-encoding only the new end.

    The template puts the end-of-sentence token (:data:`SEP2`, a special token) after every
    assistant reply, and the tokenizer splits special tokens out before it encodes the text
    between them, so the ids of a prompt up to its last ``SEP2`` are the ids of that prefix
    alone.  A later prompt that starts with the same prefix is encoded as those ids plus the
    continuation's: the same ids as ``tokenize(prompt)`` (tests check it), without re-reading
    the whole conversation every turn.
    """

    def __init__(self, processor: ChatProcessor):
        self.processor = processor
        self._prefix = ""
        self._prefix_ids = np.zeros((0,), np.int32)

    def __call__(self, prompt: str) -> np.ndarray:
        if self._prefix and prompt.startswith(self._prefix):
            rest = self.processor.tokenize(prompt[len(self._prefix):], bos=False)
            ids = np.concatenate([self._prefix_ids, rest])
        else:
            ids = self.processor.tokenize(prompt)
        self._remember(prompt, ids)
        return ids

    def _remember(self, prompt: str, ids: np.ndarray) -> None:
        """Keep the prompt up to its last SEP2 (and its ids) when the two correspond."""
        cut = prompt.rfind(SEP2) + len(SEP2)
        eos = np.flatnonzero(ids == self.processor.tokenizer.eos_token_id)
        whitespace_next = cut < len(prompt) and prompt[cut].isspace()  # a token may absorb it
        if cut < len(SEP2) or whitespace_next or eos.size != prompt.count(SEP2):
            self._prefix = ""
            return
        self._prefix, self._prefix_ids = prompt[:cut], ids[: eos[-1] + 1]
