"""Images in chat rows: OpenAI's `image_url` content parts, for a vision-language model.

A part's URL may be a `data:` URL, an object-store URL (`s3://…`, read with the run's storage
credentials), a local path or `file://` URL; each is read and decoded here, when the row is
prepared, and handed to the engine as a `data:` URL — so an engine server never needs the
bucket, and an image that is not one is that row's `invalid_image` error, before any engine
time. `http(s)://` URLs are left to the engine, which fetches them itself.
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
    given = part.get("image_url")
    url = given.get("url") if isinstance(given, dict) else given
    if not isinstance(url, str) or not url:
        raise RequestRejected("invalid_image", "an image_url part without a url")
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


def _read(url: str) -> bytes:
    path = unquote(urlsplit(url).path) if url.startswith("file://") else url
    try:
        target = location(path)
        size = target.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise RequestRejected(
                "invalid_image", f"{url}: {size:,} bytes, over the {MAX_IMAGE_BYTES:,} an image may have"
            )
        return target.read_bytes()
    except RequestRejected:
        raise
    except (OSError, ValueError) as exc:
        where = "the bucket" if is_url(path) else "this machine"
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
