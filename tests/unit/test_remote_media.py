"""remote_media: fetching a media URL with a size cap, a timeout, checked redirects and no
private addresses unless allowed; against a local HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from llamabox.api.remote_media import MediaFetchError, RemoteMediaPolicy, fetch_media

BODY = bytes(range(256)) * 40  # 10 kB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        path = self.path
        if path == "/file":
            self._send(200, BODY)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BODY), 3000):
                piece = BODY[i : i + 3000]
                self.wfile.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/no-length":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif path.startswith("/redirect-to?"):
            self.send_response(302)
            self.send_header("Location", path.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            time.sleep(2)
            self._send(200, BODY)
        elif path == "/empty":
            self._send(200, b"")
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LOCAL = RemoteMediaPolicy(allow_private=True, max_bytes=1 << 20, timeout_s=5)


def fetch(url: str, policy: RemoteMediaPolicy = LOCAL) -> bytes:
    return asyncio.run(fetch_media(url, policy))


def refused(url: str, policy: RemoteMediaPolicy = LOCAL) -> str:
    with pytest.raises(MediaFetchError) as e:
        fetch(url, policy)
    return str(e.value)


def test_fetches_with_length_chunked_and_until_close(base: str) -> None:
    assert fetch(base + "/file") == BODY
    assert fetch(base + "/chunked") == BODY
    assert fetch(base + "/no-length") == BODY


def test_follows_a_redirect(base: str) -> None:
    assert fetch(base + "/redirect-to?/file") == BODY
    assert fetch(f"{base}/redirect-to?{base}/chunked") == BODY


def test_http_errors_and_empty_files(base: str) -> None:
    assert "404" in refused(base + "/missing")
    assert "empty" in refused(base + "/empty")


def test_size_cap(base: str) -> None:
    small = RemoteMediaPolicy(allow_private=True, max_bytes=1000, timeout_s=5)
    for path in ("/file", "/chunked", "/no-length"):
        assert "--media-max-size" in refused(base + path, small)


def test_redirects_to_other_schemes_and_loops(base: str) -> None:
    assert "http(s)" in refused(base + "/redirect-to?file:///etc/passwd")
    assert "http(s)" in refused(base + "/redirect-to?ftp://example.com/x.png")
    assert "too many redirects" in refused(base + "/loop")


def test_timeout(base: str) -> None:
    quick = RemoteMediaPolicy(allow_private=True, max_bytes=1 << 20, timeout_s=0.5)
    t0 = time.monotonic()
    assert "--remote-media-timeout" in refused(base + "/slow", quick)
    assert time.monotonic() - t0 < 1.5


def test_private_addresses_refused_unless_allowed(base: str) -> None:
    public_only = RemoteMediaPolicy(allow_private=False, max_bytes=1 << 20, timeout_s=5)
    assert "--allow-remote-media-private" in refused(base + "/file", public_only)
    assert "--allow-remote-media-private" in refused("http://localhost:9/x.png", public_only)
    assert "--allow-remote-media-private" in refused("http://[::1]:9/x.png", public_only)
    assert "--allow-remote-media-private" in refused("http://10.1.2.3/x.png", public_only)
    assert "--allow-remote-media-private" in refused("http://169.254.169.254/", public_only)
    assert "--allow-remote-media-private" in refused("http://[::ffff:127.0.0.1]/", public_only)


def test_bad_urls() -> None:
    assert "http(s)" in refused("gopher://example.com/")
    assert "credentials" in refused("http://user:pw@example.com/x.png")
    assert "host" in refused("http:///x.png")
    assert "resolved" in refused("http://no-such-host.invalid/x.png")


def test_nothing_listening() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "cannot connect" in refused(f"http://127.0.0.1:{port}/x.png")
