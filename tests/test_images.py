"""Image parts at the ingress: what is accepted, and the 400 each bad image gets."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from expertmesh.cluster.api import openai_protocol as op
from expertmesh.cluster.api.images import ImageLimits, decode_image, load_image
from PIL import Image


def encoded(fmt: str, size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def load(url: str, **limits):
    return asyncio.run(load_image(url, ImageLimits(**limits), "messages.0.content.1"))


@pytest.mark.parametrize(
    "fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_png_jpeg_webp_decode_to_rgb(fmt, mime):
    img = load(data_url(encoded(fmt), mime))
    assert img.mode == "RGB" and img.size == (32, 24)


def test_a_grey_or_palette_image_becomes_rgb():
    assert load(data_url(encoded("PNG", mode="L"))).mode == "RGB"


def bad(url: str, **limits) -> op.APIError:
    with pytest.raises(op.APIError) as e:
        load(url, **limits)
    assert e.value.status == 400 and e.value.param == "messages.0.content.1"
    assert e.value.code == "invalid_image"
    return e.value


def test_each_bad_image_gets_a_400_naming_the_problem():
    png = encoded("PNG")
    assert "base64" in bad("data:image/png;base64,@@@not base64@@@").message
    assert "decoded" in bad(data_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)).message
    assert "decoded" in bad(data_url(png[: len(png) // 2])).message  # truncated
    text = bad(data_url(b"hello world")).message  # no image format at all
    assert "not a known image format" in text and "object at 0x" not in text
    assert "GIF" in bad(data_url(encoded("GIF"), "")).message
    assert "image/gif" in bad(data_url(encoded("GIF"), "image/gif")).message
    assert "bytes" in bad(data_url(png), max_bytes=len(png) - 1).message
    assert "pixels" in bad(data_url(png), max_pixels=100).message
    assert "data:" in bad("http://127.0.0.1:9/cat.png").message  # remote: off by default
    assert "data: URL" in bad("file:///etc/passwd").message
    assert "data:image" in bad("data:image/png,rawbytes").message


def test_the_pixel_limit_is_checked_before_decoding():
    huge = encoded("PNG", size=(8000, 8000), mode="L")  # small file, 64 Mpx
    assert "8000x8000" in bad(data_url(huge)).message


def test_decode_image_checks_bytes_too():
    with pytest.raises(op.APIError):
        decode_image(encoded("PNG"), ImageLimits(max_bytes=10), "x")


@pytest.fixture
def image_host():
    """A local HTTP server: /cat.png, /big.png (over the cap), /slow.png (past the timeout)."""
    import http.server
    import threading
    import time

    png = encoded("PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(2)
            body = png * 100 if self.path == "/big.png" else png
            if self.path == "/missing.png":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_when_allowed_have_a_size_cap_and_a_timeout(image_host):
    remote = dict(allow_remote=True, fetch_timeout_s=1.0)
    assert load(f"{image_host}/cat.png", **remote).size == (32, 24)
    assert "bytes" in bad(f"{image_host}/big.png", max_bytes=2000, **remote).message
    assert "Timeout" in bad(f"{image_host}/slow.png", **remote).message
    assert "404" in bad(f"{image_host}/missing.png", **remote).message
