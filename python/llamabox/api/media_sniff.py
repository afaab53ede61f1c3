"""What a media file is, read from its first bytes: kind, format and (images) pixel size.

Enough to refuse what libmtmd cannot decode and to bound an image's pixels before anything
decodes it (a 40 kB PNG may claim 30000x30000). Never decodes pixel data; never raises: a file
it does not know, or a header cut short, is None.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["MediaInfo", "sniff_media"]


class MediaInfo(NamedTuple):
    kind: str  # "image" | "audio"
    format: str  # png, jpeg, gif, bmp, webp, wav, mp3, flac
    width: int | None
    height: int | None


def sniff_media(data: bytes) -> MediaInfo | None:
    try:
        return _sniff(data)
    except (struct.error, IndexError, ValueError):
        return None


def _sniff(data: bytes) -> MediaInfo | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack_from("<HH", data, 6)
        return MediaInfo("image", "gif", w, h)
    if data.startswith(b"BM"):
        return _bmp(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return MediaInfo("audio", "wav", None, None)
    if data.startswith(b"fLaC"):
        return MediaInfo("audio", "flac", None, None)
    if data.startswith(b"ID3") or _mpeg_frame(data):
        return MediaInfo("audio", "mp3", None, None)
    return None


def _png(data: bytes) -> MediaInfo | None:
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    w, h = struct.unpack_from(">II", data, 16)
    return MediaInfo("image", "png", w, h)


# SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC): the frame headers with the image's size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: no length


def _jpeg(data: bytes) -> MediaInfo:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS before any frame header
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF and i + 9 <= len(data):
            h, w = struct.unpack_from(">HH", data, i + 5)
            return MediaInfo("image", "jpeg", w, h)
        if length < 2:
            break
        i += 2 + length
    return MediaInfo("image", "jpeg", None, None)


def _bmp(data: bytes) -> MediaInfo | None:
    if len(data) < 18:
        return None
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12 and len(data) >= 22:  # BITMAPCOREHEADER
        w, h = struct.unpack_from("<HH", data, 18)
        return MediaInfo("image", "bmp", w, h)
    if header >= 40 and len(data) >= 26:
        w, h = struct.unpack_from("<ii", data, 18)
        return MediaInfo("image", "bmp", abs(w), abs(h))  # negative height: top-down
    return None


def _webp(data: bytes) -> MediaInfo:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return MediaInfo("image", "webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return MediaInfo("image", "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return MediaInfo("image", "webp", w, h)
    return MediaInfo("image", "webp", None, None)


def _mpeg_frame(data: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, a version and a layer that exist, a bitrate
    and a sample rate that are not the reserved values."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 0x3, (data[1] >> 1) & 0x3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 0x3
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 0x3
