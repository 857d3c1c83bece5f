"""What a row may make the machine read (nightshift.wire.media): a tenant's row reaches nothing but
data: URLs and what the operator opened; every read is bounded; the server's network is called
by no one. Each attack is tried here as a tenant would send it; docs/security.md."""

from __future__ import annotations

import base64
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nightshift.errors import RequestRejected
from nightshift.wire.images import checked_images, with_images_resolved
from nightshift.wire.media import MediaPolicy

pytestmark = pytest.mark.fast

SECRET = "the-servers-secret-7d3a"


def png(size=(8, 8)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def conversation(*urls):
    content = [{"type": "text", "text": "x"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": content}]


@pytest.fixture
def listener():
    """A loopback HTTP server that serves a PNG and records every request it gets."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path.startswith("/ok/redirect"):
                self.send_response(302)
                self.send_header("Location", "/secret/a.png")
                self.end_headers()
                return
            data = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.hits, server.url = hits, f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


@pytest.fixture
def secrets(tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "secret.png").write_bytes(png())
    return tmp_path


def test_a_tenant_row_naming_the_servers_files_buckets_or_network_is_refused_saying_nothing(secrets, listener):
    tenant = MediaPolicy()
    port = listener.url.rsplit(":", 1)[1]
    hostile = [
        f"file://{secrets}/secret.txt", str(secrets / "secret.png"), f"../../../../../..{secrets}/secret.png",
        "file:///etc/passwd", "/dev/zero", "s3://any-bucket/key.png", f"simplecache::{listener.url}/a.png",
        f"blockcache::{listener.url}/b.png", f"webhdfs://127.0.0.1:{port}/c", f"ftp://127.0.0.1:{port}/d",
        f"{listener.url}/e.png", f"http://localhost:{port}/f.png", f"file://otherhost{secrets}/secret.png",
        f"memory://{secrets}/secret.png",
    ]  # fmt: skip
    for url in hostile:
        for check in (checked_images, with_images_resolved):
            with pytest.raises(RequestRejected) as refused:
                check(conversation(url), tenant)
            assert refused.value.code == "media_not_allowed", (url, refused.value)
            assert SECRET not in str(refused.value) and "No such file" not in str(refused.value)
    assert listener.hits == [], "the server's network was called"


def test_an_opened_root_admits_its_regular_files_only(tmp_path, secrets):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    (root / "out.png").symlink_to(secrets / "secret.png")  # a link out of the root
    os.mkfifo(root / "pipe.png")  # opening a FIFO for reading would block without O_NONBLOCK
    (root / "huge.png").write_bytes(b"\0")
    os.truncate(root / "huge.png", 21 * 1024**2)
    policy = MediaPolicy(roots=(str(root),))
    messages, count = with_images_resolved(conversation(str(root / "ok.png"), f"file://{root}/ok.png"), policy)
    assert count == 2 and all(
        p["image_url"]["url"].startswith("data:image/png;base64,") for p in messages[0]["content"][1:]
    )
    for url, code in [
        (str(root / "out.png"), "media_not_allowed"),
        (str(root / "pipe.png"), "media_not_allowed"),
        (str(root), "media_not_allowed"),
        (str(root / ".." / "secret.png"), "media_not_allowed"),
        (str(root / "huge.png"), "invalid_image"),
        (str(root / "missing.png"), "invalid_image"),
    ]:
        with pytest.raises(RequestRejected) as refused:
            with_images_resolved(conversation(url), policy)
        assert refused.value.code == code, (url, refused.value)


def test_the_operators_own_run_reads_its_paths_but_never_a_device_a_chain_or_an_unbounded_file(secrets, tmp_path):
    trusted = MediaPolicy(trusted=True)
    assert checked_images(conversation(str(secrets / "secret.png")), trusted) == 1
    assert (
        with_images_resolved(conversation("https://example.com/a.png"), trusted)[0][0]["content"][1]["image_url"]["url"]
        == "https://example.com/a.png"
    )  # the engine fetches a trusted row's web images itself
    for url in ("/dev/zero", "simplecache::s3://b/k.png", "ftp://example.com/a.png"):
        with pytest.raises(RequestRejected) as refused:
            with_images_resolved(conversation(url), trusted)
        assert refused.value.code == "media_not_allowed"


def test_a_web_prefix_the_operator_opened_is_fetched_here_with_no_redirect_out_of_it(listener):
    policy = MediaPolicy(url_prefixes=(f"{listener.url}/ok/",))
    messages, _ = with_images_resolved(conversation(f"{listener.url}/ok/a.png"), policy)
    assert base64.b64decode(messages[0]["content"][1]["image_url"]["url"].split(",", 1)[1]) == png()
    for url in (f"{listener.url}/ok/redirect.png", f"{listener.url}/ok/../secret/a.png", f"{listener.url}/okay.png"):
        with pytest.raises(RequestRejected) as refused:
            with_images_resolved(conversation(url), policy)
        assert refused.value.code == "media_not_allowed", url
    assert "/secret/a.png" not in listener.hits and "/okay.png" not in listener.hits
    # a host name that resolves to a loopback address is refused, even under an opened prefix
    port = listener.url.rsplit(":", 1)[1]
    named = MediaPolicy(url_prefixes=(f"http://localhost:{port}/ok/",))
    with pytest.raises(RequestRejected, match="private address"):
        with_images_resolved(conversation(f"http://localhost:{port}/ok/b.png"), named)
    assert "/ok/b.png" not in listener.hits


def test_bounds_on_images_per_row_pixels_formats_and_inline_size():
    inline = "data:image/png;base64," + base64.b64encode(png()).decode()
    policy = MediaPolicy(max_items=3, max_pixels=100 * 100, max_bytes=50_000)
    assert checked_images(conversation(inline, inline, inline), policy) == 3
    with pytest.raises(RequestRejected) as refused:
        checked_images(conversation(*[inline] * 4), policy)
    assert refused.value.code == "too_many_images"
    big = "data:image/png;base64," + base64.b64encode(png((200, 200))).decode()
    with pytest.raises(RequestRejected, match="pixels"):
        checked_images(conversation(big), policy)
    with pytest.raises(RequestRejected, match="over the 50,000 bytes"):
        checked_images(conversation("data:image/png;base64," + "A" * 80_000), policy)
    from PIL import Image

    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, "TIFF")
    with pytest.raises(RequestRejected, match="PNG, JPEG, WEBP, GIF"):
        checked_images(conversation("data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode()), policy)


def test_allowed_sources_are_checked_when_configured():
    from pydantic import ValidationError

    from nightshift.config import BatchApiConfig, JobOptions

    assert JobOptions().media_sources == "any"
    assert JobOptions(allow_media_url=["s3://scans/in/"]).media_sources == "allowed"
    for bad in ("simplecache::s3://b/", "ftp://h/", "s3://b/../x/", "https://u:p@h/", "https://h/?sig=1"):
        with pytest.raises(ValidationError):
            BatchApiConfig(allow_media_url=[bad])
    with pytest.raises(ValidationError, match="absolute"):
        BatchApiConfig(allow_media_root=["images"])
