"""Fetching a remote media URL (``--allow-remote-media``), on the event loop without blocking it.

A small HTTP/1.1 client on asyncio streams, because what matters here is what it refuses:
schemes other than http(s) (at every redirect too), hosts that resolve to loopback, private,
link-local or otherwise non-public addresses (unless ``--allow-remote-media-private``), bodies
over the size cap (by Content-Length before reading, and while reading), and anything past the
timeout, redirects included. It connects to the address it checked, not to the name again, so
a DNS answer that changes between the check and the connect cannot send it elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

__all__ = ["MediaFetchError", "RemoteMediaPolicy", "fetch_media"]

_MAX_HEADER_BYTES = 64 * 1024
_CHUNK = 64 * 1024


class MediaFetchError(Exception):
    """Why a URL was not fetched, as a sentence for the API user."""


@dataclass(frozen=True)
class RemoteMediaPolicy:
    allow_private: bool
    max_bytes: int
    timeout_s: float
    max_redirects: int = 3


async def fetch_media(url: str, policy: RemoteMediaPolicy) -> bytes:
    """The body of ``url`` (following at most ``policy.max_redirects`` redirects)."""
    try:
        return await asyncio.wait_for(_follow(url, policy), policy.timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        raise MediaFetchError(
            f"fetching the URL timed out after {policy.timeout_s:g} s (--remote-media-timeout)"
        ) from None


async def _follow(url: str, policy: RemoteMediaPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        status, location, body = await _get(url, policy)
        if location is None:
            if not 200 <= status < 300:
                raise MediaFetchError(f"the server answered HTTP {status}")
            if not body:
                raise MediaFetchError("the server sent an empty file")
            return body
        url = urljoin(url, location)
    raise MediaFetchError(f"too many redirects (more than {policy.max_redirects})")


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _resolve(host: str, port: int, policy: RemoteMediaPolicy) -> list[str]:
    """The addresses to connect to, in the resolver's order; every one must be allowed."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise MediaFetchError(f"the URL's host '{host}' cannot be resolved") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise MediaFetchError(f"the URL's host '{host}' cannot be resolved")
    if not policy.allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not _public(ip):
                raise MediaFetchError(
                    f"the URL's host resolves to a private or local network address ({ip}); "
                    "start the server with --allow-remote-media-private to allow it"
                )
    return list(dict.fromkeys(addresses))


async def _get(url: str, policy: RemoteMediaPolicy) -> tuple[int, str | None, bytes]:
    """One GET: the status, the redirect target (a 3xx with a Location) and the body."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        what = f"'{parts.scheme}:'" if parts.scheme else "no scheme"
        raise MediaFetchError(f"only http(s) URLs are fetched (redirected or given {what})")
    if parts.username is not None or parts.password is not None:
        raise MediaFetchError("URLs with credentials are not fetched")
    host = parts.hostname
    if not host:
        raise MediaFetchError("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaFetchError("the URL's port is not a number") from None
    addresses = await _resolve(host, port, policy)
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await _connect(addresses, port, tls, host)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        host_header = host if ":" not in host else f"[{host}]"
        if parts.port:
            host_header += f":{parts.port}"
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: llamabox\r\n"
                "Accept: image/*, audio/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
            ).encode("latin-1", "replace")
        )
        await writer.drain()
        status, headers = await _head(reader)
        if 300 <= status < 400 and "location" in headers:
            return status, headers["location"], b""
        if not 200 <= status < 300:
            return status, None, b""
        return status, None, await _body(reader, headers, policy.max_bytes)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise MediaFetchError(f"the connection to {host} failed ({e.__class__.__name__})") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def _connect(
    addresses: list[str], port: int, tls: ssl.SSLContext | None, host: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the first of the checked addresses that answers."""
    error: BaseException | None = None
    for address in addresses:
        try:
            return await asyncio.open_connection(
                address, port, ssl=tls, server_hostname=host if tls else None
            )
        except (OSError, ssl.SSLError) as e:
            error = e
    raise MediaFetchError(f"cannot connect to {host}:{port} ({error.__class__.__name__})")


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = b""
    while not raw.endswith(b"\r\n\r\n"):
        line = await reader.readline()
        if not line:
            raise MediaFetchError("the server closed the connection before answering")
        raw += line
        if len(raw) > _MAX_HEADER_BYTES:
            raise MediaFetchError("the server's answer has too large a header")
        if raw in (b"\r\n", b"\n"):
            raw = b""  # a stray empty line before the status line
    text = raw.decode("latin-1").split("\r\n")
    first = text[0].split(" ", 2)
    if len(first) < 2 or not first[0].startswith("HTTP/") or not first[1].isdigit():
        raise MediaFetchError("the server's answer is not HTTP")
    headers: dict[str, str] = {}
    for field in text[1:]:
        name, colon, value = field.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(first[1]), headers


def _too_large(max_bytes: int) -> MediaFetchError:
    return MediaFetchError(f"the remote file is larger than {max_bytes} bytes (--media-max-size)")


async def _body(reader: asyncio.StreamReader, headers: dict[str, str], max_bytes: int) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _chunked(reader, max_bytes)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise MediaFetchError("the server sent a bad Content-Length")
        if int(length) > max_bytes:
            raise _too_large(max_bytes)
        return await reader.readexactly(int(length))
    body = bytearray()
    while chunk := await reader.read(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


async def _chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readline()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MediaFetchError("the server sent a bad chunked body") from None
        if size == 0:
            return bytes(body)
        if len(body) + size > max_bytes:
            raise _too_large(max_bytes)
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
