"""Where images sit in the token ids: the one owner of the image-token layout (host side, numpy).

The tokenizer encodes each image tag as one id; :meth:`ImageTokens.expand` replaces it by
``per_image`` copies of itself, so image ``k`` of a prompt is its ``k``-th run of ``per_image``
image ids (two adjacent images make one long run).  The original's ``add_special_token`` (the
tag's id kept in front of the copies) is not supported: no release sets it, and the original
model could not merge its ids either.  The model fills the image positions in the same order
(``DeepseekVL.get_input_embeddings``); this module answers the host's questions: how many
images, where each starts, which images a range of positions overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class ImageSpan(NamedTuple):
    """Images ``first .. stop - 1`` overlap a range of positions; the range's first image
    position is token ``skip`` of those images' tokens laid end to end (``skip > 0``: the range
    begins inside image ``first``).  ``first == stop``: no image position in the range."""

    first: int
    stop: int
    skip: int


@dataclass(frozen=True)
class ImageTokens:
    """The layout: image ``k`` is the ``k``-th run of ``per_image`` copies of ``token_id``."""

    token_id: int
    per_image: int

    def expand(self, ids: np.ndarray) -> np.ndarray:
        """Tokenizer ids ``[T0]`` -> ids with each image id replaced by ``per_image`` copies."""
        ids = np.asarray(ids)
        pieces: list[np.ndarray] = []
        start = 0
        for pos in np.flatnonzero(ids == self.token_id):
            pieces.append(ids[start:pos])
            pieces.append(np.full((self.per_image,), self.token_id, dtype=ids.dtype))
            start = pos + 1
        pieces.append(ids[start:])
        return np.concatenate(pieces)

    def is_image(self, ids: Sequence[int]) -> np.ndarray:
        """``[T]`` bool: True at image positions."""
        return np.asarray(ids) == self.token_id

    def positions(self, ids: Sequence[int]) -> np.ndarray:
        """Indices of the image positions, in order."""
        return np.flatnonzero(self.is_image(ids))

    def count(self, ids: Sequence[int]) -> int:
        """Images the ids hold room for (whole runs of ``per_image``)."""
        return int(self.is_image(ids).sum()) // self.per_image

    def runs(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` per image: its first position and one past its last (adjacent
        images apart; a last image short of ``per_image`` positions as far as it goes)."""
        pos = self.positions(ids)
        n = self.per_image
        return [(int(pos[k]), int(pos[min(k + n, len(pos)) - 1]) + 1) for k in range(0, len(pos), n)]

    def start_of(self, ids: Sequence[int], image: int) -> int | None:
        """Position of image ``image``'s first token, or None when the ids hold fewer images."""
        pos = self.positions(ids)
        k = image * self.per_image
        return int(pos[k]) if k < len(pos) else None

    def overlap(self, ids: Sequence[int], start: int, end: int,
                num_images: int | None = None) -> ImageSpan:
        """The images whose positions overlap ``ids[start:end]``.

        ``num_images``: the images there are; image positions past them (ids that hold more
        image positions than images) count as the last image's, whose last token they take.
        """
        pos = self.positions(np.asarray(ids)[:end])
        rank = int(np.searchsorted(pos, start))  # image positions before ``start``
        if rank == len(pos) or num_images == 0:
            return ImageSpan(0, 0, 0)
        first, stop = rank // self.per_image, (len(pos) - 1) // self.per_image + 1
        if num_images is not None:
            first, stop = min(first, num_images - 1), min(stop, num_images)
        return ImageSpan(first, stop, rank - first * self.per_image)

    def image_index(self, ids: Sequence[int]) -> np.ndarray:
        """``[T]`` int: the image each position belongs to, -1 at text positions."""
        is_image = self.is_image(ids)
        index = np.full(is_image.shape, -1, dtype=np.int64)
        index[is_image] = np.arange(int(is_image.sum())) // self.per_image
        return index

    def keyed(self, ids: Sequence[int], image_keys: Sequence[Any]) -> list[Any]:
        """The ids with each position of image ``k`` replaced by ``("image", image_keys[k])``
        (the prefix caches' keys); image ids past the last image (a generated one) stay ids."""
        out: list[Any] = np.asarray(ids).tolist()  # Python ints: they compare with the tuples
        index = self.image_index(ids)
        for i in np.flatnonzero((index >= 0) & (index < len(image_keys))).tolist():
            out[i] = ("image", image_keys[index[i]])
        return out
