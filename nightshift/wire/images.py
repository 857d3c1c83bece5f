"""Images in chat rows: OpenAI's `image_url` content parts, for a vision-language model.

Where a part's URL may point is the run's media policy (nightshift.wire.media): a `data:` URL always;
a path, `file://` URL or bucket object in the operator's own run, and in a Batch API tenant's
row only under what the operator opened. When the row is prepared, a `data:` URL is decoded and
checked whole and a file's or object's size is looked up (`checked_images`); when the engine
admits the row, each source is read (bounded), checked whole and handed over as a `data:` URL
(`with_images_resolved`) — so only the rows in flight hold their images in memory, an engine
server never needs the bucket, and an image that is not one is that row's `invalid_image`
error, never generated. A trusted row's `http(s)://` URLs are left to the engine, which fetches
them itself; a tenant's are fetched here under the policy, never by the engine.
"""

from __future__ import annotations

import base64
import binascii
import io

from nightshift.errors import RequestRejected
from nightshift.wire.media import MediaPolicy, read, size_checked

# Formats an image part may be in: the ones OpenAI's vision input takes, and no exotic decoder.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
TENANT = MediaPolicy()  # the default: data: URLs only


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


def checked_images(messages: list, policy: MediaPolicy = TENANT) -> int:
    """How many images the conversation holds, each allowed by `policy`, each `data:` URL checked
    whole and each file or object found within bounds — RequestRejected (media_not_allowed,
    too_many_images, invalid_image) for a part that is not."""
    parts = image_parts(messages)
    _within_count(parts, policy)
    for part in parts:
        url = _url_of(part)
        if url.startswith("data:"):
            _checked_image(_decoded(url, policy), "the data: URL", policy)
        elif not policy.engine_fetches(url):
            size_checked(url, policy)
    return len(parts)


def with_images_resolved(messages: list, policy: MediaPolicy = TENANT) -> tuple[list, int]:
    """The conversation with every image part's URL as a checked `data:` URL (a trusted row's
    http(s) left as given), and how many images it holds; RequestRejected for one that is not."""
    parts = image_parts(messages)
    if not parts:
        return messages, 0
    _within_count(parts, policy)
    resolved = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": [_resolved(part, policy) for part in content]}
        resolved.append(message)
    return resolved, len(parts)


def _within_count(parts: list, policy: MediaPolicy) -> None:
    if len(parts) > policy.max_items:
        raise RequestRejected("too_many_images", f"{len(parts)} images in one row: at most {policy.max_items}")


def _resolved(part, policy: MediaPolicy) -> dict:
    if not (isinstance(part, dict) and part.get("type") == "image_url"):
        return part
    given, url = part.get("image_url"), _url_of(part)
    if policy.engine_fetches(url):
        return part
    inline = url.startswith("data:")
    data = _decoded(url, policy) if inline else read(url, policy)
    mime = _checked_image(data, "the data: URL" if inline else url, policy)
    detail = {"detail": given["detail"]} if isinstance(given, dict) and "detail" in given else {}
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}", **detail},
    }


def _decoded(url: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestRejected("invalid_image", "a data: URL of an image must be base64 (data:image/png;base64,…)")
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise RequestRejected("invalid_image", f"the data: URL: over the {policy.max_bytes:,} bytes an image may have")
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


def _checked_image(data: bytes, shown: str, policy: MediaPolicy) -> str:
    """The MIME type of image bytes that decode whole (Pillow, IMAGE_FORMATS only, at most
    policy.max_pixels); else the row's invalid_image."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_bytes:
        raise RequestRejected("invalid_image", f"{shown}: over the {policy.max_bytes:,} bytes an image may have")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > policy.max_pixels:  # from the header, before decoding
                raise RequestRejected(
                    "invalid_image",
                    f"{shown}: {image.width}×{image.height} pixels, over the {policy.max_pixels:,} an image may have",
                )
            image.load()  # the whole image: a truncated file fails here, not in the engine
            kind = image.format or "PNG"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, RequestRejected):
            raise
        formats = ", ".join(IMAGE_FORMATS)
        raise RequestRejected("invalid_image", f"{shown} is not a {formats} image Pillow can read: {exc}") from None
    return Image.MIME.get(kind, f"image/{kind.lower()}")
