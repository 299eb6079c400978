"""The shared caches: image content hash, byte-bounded image features, the prefix-reuse rule."""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from mlx_dsvl.caches import ImageFeatureCache, PrefixCache, image_key, reusable_prefix
from mlx_dsvl.processing.image_tokens import ImageTokens

IMG = 9  # the image token id in these keys


def test_image_key_is_the_sha256_of_the_pixels():
    px = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    assert image_key(px) == hashlib.sha256(px.tobytes()).hexdigest()
    assert image_key(px) == image_key(px.copy()) != image_key(px + 1e-7)


# -- image features ---------------------------------------------------------------------------
def feature(value: float) -> mx.array:
    return mx.full((4, 2), value)  # 32 bytes


def encoder(calls):
    def encode(keys):
        calls.append(list(keys))
        return mx.stack([feature(float(ord(k))) for k in keys])
    return encode


def test_fetch_encodes_each_missing_image_once_and_counts_hits():
    cache, calls = ImageFeatureCache(1000), []
    found = cache.fetch(["a", "b", "a"], encoder(calls))
    assert calls == [["a", "b"]] and (found.hits, found.encoded) == (0, 2)
    assert [f[0, 0].item() for f in found.features] == [ord("a"), ord("b"), ord("a")]
    found = cache.fetch(["b", "c", "b"], encoder(calls))
    assert calls[-1] == ["c"] and (found.hits, found.encoded) == (2, 1)
    assert len(cache) == 3 and cache.nbytes == 96


def test_a_full_cache_keeps_within_its_bound_and_evicts_nothing_a_request_needs():
    """Room for two: x, y, then [z, x]: z evicts the least recently used, y, not x."""
    cache, calls = ImageFeatureCache(2 * 32 + 8), []
    cache.fetch(["x"], encoder(calls))
    cache.fetch(["y"], encoder(calls))
    found = cache.fetch(["z", "x"], encoder(calls))
    assert calls[-1] == ["z"] and found.hits == 1
    assert "x" in cache and "z" in cache and "y" not in cache and cache.nbytes <= cache.max_bytes
    # more images than fit in one request: all answered, the cache stays within its bound
    found = cache.fetch(["p", "q", "r"], encoder(calls))
    assert [f[0, 0].item() for f in found.features] == [ord("p"), ord("q"), ord("r")]
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes


def test_a_zero_byte_cache_keeps_nothing():
    cache, calls = ImageFeatureCache(0), []
    cache.fetch(["a"], encoder(calls))
    cache.fetch(["a"], encoder(calls))
    assert calls == [["a"], ["a"]] and len(cache) == 0 and cache.nbytes == 0


# -- the prefix-reuse rule --------------------------------------------------------------------
def prefix_key(ids, image_keys, token_id, per):
    return ImageTokens(token_id, per).keyed(ids, image_keys)


def test_prefix_key_names_each_image_run_by_its_image():
    ids = [1, IMG, IMG, 2, IMG, IMG, 3]
    assert prefix_key(ids, ["A", "B"], IMG, 2) == [1, ("image", "A"), ("image", "A"), 2,
                                                   ("image", "B"), ("image", "B"), 3]
    # an image id past the last image (a generated one) stays an id
    assert prefix_key([1, IMG, IMG, 2, IMG], ["A"], IMG, 2)[-1] == IMG


def test_keys_of_numpy_ids_compare_with_image_names():
    """A session's ids are numpy: where a dropped turn puts an image against text, the keys
    must compare (numpy ints against ("image", ...) tuples raised 'truth value ... ambiguous')."""
    layout = ImageTokens(IMG, 2)
    key = layout.keyed(np.array([1, IMG, IMG, 2]), ["A"])
    assert all(type(k) is int for k in (key[0], key[3]))
    assert reusable_prefix(layout.keyed(np.array([1, 5, 6, 2, 3]), []), key) == 1


def test_reusable_prefix_stops_at_the_first_differing_token_or_image():
    ids = [1, 2, IMG, IMG, IMG, 3, IMG, IMG, IMG, 4, 5]

    def reuse(cached_ids, cached_images, new_images, new_ids=ids, per=3):
        return reusable_prefix(prefix_key(cached_ids, cached_images, IMG, per),
                               prefix_key(new_ids, new_images, IMG, per))

    assert reuse(ids, ["A", "B"], ["A", "B"]) == len(ids) - 1  # the last token is always fed
    assert reuse(ids, ["A", "B"], ["A", "C"]) == 6  # same text, another second image
    assert reuse(ids, ["A", "B"], ["C", "B"]) == 2
    assert reuse(ids[:4], ["A", "B"], ["A", "B"]) == 4  # the cache ends inside an image
    assert reuse(ids[:8], ["A", "C"], ["A", "B"]) == 6
    assert reuse(ids[:5] + [7], ["A", "B"], ["A", "B"]) == 5  # other text after the image
    assert reuse(ids + [IMG, 8], ["A", "B"], ["A", "B"], ids + [IMG, 8]) == len(ids) + 1
    assert reuse([], [], ["A", "B"]) == 0 and reuse(ids, ["A", "B"], [], [1]) == 0


def kv(tokens: int) -> list:
    c = KVCache()
    x = mx.ones((1, 1, tokens, 4))
    c.update_and_fetch(x, x)
    return [c]


def test_prefix_cache_gives_what_reusable_prefix_allows():
    cache = PrefixCache(1 << 20)
    key = prefix_key([1, IMG, IMG, 2, 3], ["A"], IMG, 2)
    cache.store(key, kv(5))
    got, n = cache.fetch(key)  # the whole prompt cached: its last token is fed again
    assert n == 4 and got[0].offset == 4
    got, n = cache.fetch(key + [7, 8])
    assert n == 5 and got[0].offset == 5
    got, n = cache.fetch(prefix_key([1, IMG, IMG, 2, 3], ["B"], IMG, 2))  # another image
    assert n == 1 and got[0].offset == 1
    assert PrefixCache(0).fetch(key) == (None, 0)
