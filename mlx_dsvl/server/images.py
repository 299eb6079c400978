"""Where the server may take images from, and how much of them (the rules: README, "Serve").

Remote URLs are off by default: fetching lets a client make the server request any address it can
reach. Local paths must stay inside the allowed folder once symbolic links are resolved.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from ..processing.image import ImageLoadError, load_image
from .schema import APIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),", re.S)


class ImagePolicy:
    """Fetches image bytes from a URL under the server's rules; errors are :class:`APIError`."""

    def __init__(self, allow_remote: bool = False, local_dir: str | None = None,
                 max_bytes: int = MAX_IMAGE_BYTES, timeout: float = 10.0):
        self.allow_remote = allow_remote
        self.local_dir = Path(os.path.realpath(local_dir)) if local_dir else None
        if self.local_dir is not None and not self.local_dir.is_dir():
            raise ValueError(f"--allow-local-images: {local_dir} is not a folder")
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)

    def _too_large(self, size: int, param: str) -> APIError:
        return APIError(413, f"{param}: the image is {size / 2**20:.1f} MB, more than the "
                             f"{self.max_bytes / 2**20:g} MB limit", param=param, code="image_too_large")

    async def fetch(self, url: str, param: str) -> bytes:
        """The encoded image behind ``url`` (not decoded yet)."""
        scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
        if url[:5].lower() == "data:":
            return self._data_url(url, param)
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError(400, f"{param}: remote image URLs are disabled on this server (start it "
                                    "with --allow-remote-images to allow them); send the image as a "
                                    "data: URL", param=param, code="remote_images_disabled")
            return await self._remote(url, param)
        if scheme in ("", "file") or re.fullmatch(r"[a-zA-Z]", scheme):  # plain, file://, C:\...
            return self._local(url, param)
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r} (use a data: URL)",
                       param=param)

    def _data_url(self, url: str, param: str) -> bytes:
        m = _DATA_URL.match(url)
        if not m or "base64" not in m.group("params").lower().split(";"):
            raise APIError(400, f"{param}: malformed data URL (expected data:image/...;base64,...)",
                           param=param)
        payload = "".join(url[m.end():].split())  # MIME line breaks (base64's own output)
        if len(payload) * 3 // 4 > self.max_bytes + 3:  # before decoding it
            raise self._too_large(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URL is not valid base64", param=param) from None

    async def _remote(self, url: str, param: str) -> bytes:
        """The whole fetch (connect, redirects, every read) within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._download(url, param), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise APIError(400, f"{param}: fetching the image took longer than {self.timeout:g} s",
                           param=param, code="image_fetch_failed") from None
        except httpx.HTTPError as e:
            raise APIError(400, f"{param}: could not fetch the image ({type(e).__name__})",
                           param=param, code="image_fetch_failed") from None

    async def _download(self, url: str, param: str) -> bytes:
        data = bytearray()
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True,
                                     max_redirects=3) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(400, f"{param}: fetching the image gave HTTP {r.status_code}",
                                   param=param, code="image_fetch_failed")
                size = int(r.headers.get("content-length") or 0)
                if size > self.max_bytes:
                    raise self._too_large(size, param)
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise self._too_large(len(data), param)
        return bytes(data)

    def _local(self, url: str, param: str) -> bytes:
        if self.local_dir is None:
            raise APIError(400, f"{param}: local image paths are disabled on this server (start it "
                                "with --allow-local-images DIR to allow files inside DIR); send the "
                                "image as a data: URL", param=param, code="local_images_disabled")
        if url[:7].lower() == "file://":
            parts = urlparse(url)
            if parts.netloc.lower() not in ("", "localhost"):
                raise APIError(400, f"{param}: file:// URLs on another host ({parts.netloc}) are not "
                                    "served", param=param, code="path_not_allowed")
            path = unquote(parts.path)
        else:
            path = url
        try:
            real = Path(os.path.realpath(self.local_dir / path))  # an absolute path replaces the base
            inside = real.is_relative_to(self.local_dir)
            if inside and real.is_file():
                size = real.stat().st_size
                if size > self.max_bytes:
                    raise self._too_large(size, param)
                with open(real, "rb") as f:
                    return f.read()
        except (OSError, ValueError) as e:  # unreadable, a NUL in the path, ...
            raise APIError(400, f"{param}: cannot read the image file ({type(e).__name__})",
                           param=param) from None
        if not inside:
            raise APIError(400, f"{param}: the image path is outside the folder this server may "
                                "read images from", param=param, code="path_not_allowed")
        raise APIError(400, f"{param}: no such image file in the allowed folder", param=param)


def decode_image(data: bytes, param: str) -> Image.Image:
    """Bytes -> RGB PIL image; corrupt data or past the decompression-bomb limit -> 400."""
    try:
        return load_image(data, name=param)
    except ImageLoadError as e:
        raise APIError(400, str(e), param=param, code="invalid_image") from None
