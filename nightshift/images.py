"""Images in chat rows: OpenAI's `image_url` content parts, for a vision-language model.

A part's URL may be a `data:` URL, an object-store URL (`s3://…`, read with the run's storage
credentials), a local path or `file://` URL. When the row is prepared, a `data:` URL is decoded
and checked whole and a file's or object's size is looked up (`checked_images`); when the engine
admits the row, each file is read, checked whole and handed over as a `data:` URL
(`with_images_resolved`) — so only the rows in flight hold their images in memory, an engine
server never needs the bucket, and an image that is not one is that row's `invalid_image` error,
never generated. `http(s)://` URLs are left to the engine, which fetches them itself.
"""

from __future__ import annotations

import base64
import binascii
import io
from urllib.parse import unquote, urlsplit

from nightshift.openai_format import RequestRejected
from nightshift.storage import is_url, location

MAX_IMAGE_BYTES = 20 * 1024**2  # OpenAI's limit for an image of a chat request


def image_parts(messages) -> list[dict]:
    """The `image_url` content parts of a conversation, in order."""
    return [
        part
        for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"] if isinstance(part, dict) and part.get("type") == "image_url"
    ]  # fmt: skip


def all_inline(messages: list) -> bool:
    """Whether every image of the conversation is a data: URL: its content in the row itself."""
    return all(
        isinstance(url := (part.get("image_url") or {}), dict) and str(url.get("url", "")).startswith("data:")
        for part in image_parts(messages)
    )


def checked_images(messages: list) -> int:
    """How many images the conversation holds, each `data:` URL checked whole and each file or
    object found (its size within bounds) — RequestRejected("invalid_image") for one that is not."""
    parts = image_parts(messages)
    for part in parts:
        url = _url_of(part)
        if url.startswith("data:"):
            _checked_image(_decoded(url), url)
        elif not url.startswith(("http://", "https://")):
            _size_of(url)
    return len(parts)


def with_images_resolved(messages: list) -> tuple[list, int]:
    """The conversation with every image part's URL as a checked `data:` URL (http(s) left as
    given), and how many images it holds; RequestRejected("invalid_image") for one that is not."""
    parts = image_parts(messages)
    if not parts:
        return messages, 0
    resolved = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": [_resolved(part) for part in content]}
        resolved.append(message)
    return resolved, len(parts)


def _resolved(part) -> dict:
    if not (isinstance(part, dict) and part.get("type") == "image_url"):
        return part
    given, url = part.get("image_url"), _url_of(part)
    if url.startswith(("http://", "https://")):
        return part
    data = _decoded(url) if url.startswith("data:") else _read(url)
    mime = _checked_image(data, url)
    detail = {"detail": given["detail"]} if isinstance(given, dict) and "detail" in given else {}
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}", **detail},
    }


def _decoded(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestRejected("invalid_image", "a data: URL of an image must be base64 (data:image/png;base64,…)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected("invalid_image", "the data: URL's base64 does not decode") from None


def _url_of(part: dict) -> str:
    given = part.get("image_url")
    url = given.get("url") if isinstance(given, dict) else given
    if not isinstance(url, str) or not url:
        raise RequestRejected("invalid_image", "an image_url part without a url")
    return url


def _local_or_remote(url: str) -> str:
    return unquote(urlsplit(url).path) if url.startswith("file://") else url


def _size_of(url: str) -> int:
    try:
        size = location(_local_or_remote(url)).stat().st_size
    except (OSError, ValueError) as exc:
        where = "the bucket" if is_url(url) else "this machine"
        raise RequestRejected("invalid_image", f"{url}: cannot be read from {where}: {exc}") from None
    if size > MAX_IMAGE_BYTES:
        raise RequestRejected("invalid_image", f"{url}: {size:,} bytes, over the {MAX_IMAGE_BYTES:,} an image may have")
    return size


def _read(url: str) -> bytes:
    _size_of(url)
    try:
        return location(_local_or_remote(url)).read_bytes()
    except (OSError, ValueError) as exc:
        where = "the bucket" if is_url(url) else "this machine"
        raise RequestRejected("invalid_image", f"{url}: cannot be read from {where}: {exc}") from None


def _checked_image(data: bytes, url: str) -> str:
    """The MIME type of image bytes that decode whole (Pillow); else the row's invalid_image."""
    from PIL import Image, UnidentifiedImageError

    shown = url if not url.startswith("data:") else "the data: URL"
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestRejected("invalid_image", f"{shown}: over the {MAX_IMAGE_BYTES:,} bytes an image may have")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # the whole image: a truncated file fails here, not in the engine
            kind = image.format or "PNG"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestRejected("invalid_image", f"{shown} is not an image Pillow can read: {exc}") from None
    return Image.MIME.get(kind, f"image/{kind.lower()}")
