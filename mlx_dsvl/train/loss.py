"""The training loss (token-weighted cross-entropy on the labelled positions only) and
gradient checkpointing.

The LM head runs only on the positions that carry a loss (the 102400-way softmax is the costliest
op of a small model), and frozen vision towers run under ``stop_gradient``.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..models.attention import exp_from_max


def image_embeddings(model, vis, frozen_vision: bool):
    """``vis``: pixels ``[M, 3, S, S]`` or cached tower features (tuple) -> ``[M, 576, D]``."""
    if isinstance(vis, (tuple, list)):
        feats = tuple(vis) if len(vis) > 1 else vis[0]
    else:
        feats = model.vision_features(vis)
        if frozen_vision:
            feats = tree_map(mx.stop_gradient, feats)
    return model.aligner(feats)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row ``logsumexp(logits) - logits[target]`` ([N, V] float32, [N] -> [N]).

    On MLX's CPU backend ``exp`` is much slower than ``2 ** x`` and dominates a small model's
    step over a 102400-token vocabulary; ``exp(x) = 2 ** (x log2 e)`` gives the same values (and
    gradient: the softmax) faster (docs/PERFORMANCE.md).  GPUs use ``nn.losses.cross_entropy``.
    """
    if mx.default_device() != mx.cpu:
        return nn.losses.cross_entropy(logits, targets)
    p, m = exp_from_max(logits)
    s = p.sum(axis=-1)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return m[:, 0] + mx.log(s) - picked


def make_loss(frozen_vision: bool):
    """``loss_fn(model, ids, vis, label_pos, label_ids, label_w, label_mm)`` ->
    ``(mean loss, target tokens, [multimodal loss sum, multimodal tokens])``."""

    def loss_fn(model, input_ids, vis, label_pos, label_ids, label_w, label_mm):
        img = None if vis is None else image_embeddings(model, vis, frozen_vision)
        h = model.hidden_states(input_ids, img)
        B, T, D = h.shape
        hs = mx.take(h.reshape(B * T, D), label_pos, axis=0)  # [N, D]: only where a loss is taken
        logits = model.lm_head(hs).astype(mx.float32)
        ce = cross_entropy(logits, label_ids) * label_w
        ntoks = label_w.sum()
        loss = ce.sum() / mx.maximum(ntoks, 1)  # a batch without targets (an empty share) learns nothing
        mm = mx.stack([(ce * label_mm).sum(), (label_w * label_mm).sum()])
        return loss, ntoks, mm

    return loss_fn


_CKPT_CLASSES: dict[type, type] = {}


def enable_grad_checkpoint(layers: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (per instance, not per class)."""
    for layer in layers:
        base = type(layer)
        if base in _CKPT_CLASSES.values():
            continue
        sub = _CKPT_CLASSES.get(base)
        if sub is None:
            def __call__(self, *args, __base=base, **kwargs):
                def inner(params, *a, **k):
                    self.update(params)
                    return __base.__call__(self, *a, **k)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            sub = type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__})
            _CKPT_CLASSES[base] = sub
        layer.__class__ = sub
