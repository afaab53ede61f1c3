"""media_sniff: kind, format and pixel size from a file's first bytes; never an exception."""

from __future__ import annotations

import io
import random
import struct
import wave
import zlib

import pytest

from llamabox.api.media_sniff import MediaInfo, sniff_media


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def jpeg(width: int, height: int) -> bytes:
    app0 = b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof0 = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\0\x02\x11\x01\x03\x11\x01"
    return (
        b"\xff\xd8"
        + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
        + b"\xff\xff"  # a fill byte
        + b"\xff\xc0" + struct.pack(">H", len(sof0) + 2) + sof0
        + b"\xff\xda\0\x08"
    )  # fmt: skip


def bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 160)
    return buf.getvalue()


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(payload))
        + b"WEBPVP8L"
        + struct.pack("<I", len(payload))
        + payload
    )


def webp_vp8x(width: int, height: int) -> bytes:
    payload = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + payload


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png(640, 480), MediaInfo("image", "png", 640, 480)),
        (jpeg(1920, 1080), MediaInfo("image", "jpeg", 1920, 1080)),
        (b"GIF89a" + struct.pack("<HH", 33, 44) + b"\0" * 8, MediaInfo("image", "gif", 33, 44)),
        (bmp(100, -50), MediaInfo("image", "bmp", 100, 50)),
        (webp_vp8l(300, 200), MediaInfo("image", "webp", 300, 200)),
        (webp_vp8x(4000, 3000), MediaInfo("image", "webp", 4000, 3000)),
        (wav(), MediaInfo("audio", "wav", None, None)),
        (b"fLaC\0\0\0\x22" + b"\0" * 34, MediaInfo("audio", "flac", None, None)),
        (b"ID3\x04\0\0\0\0\0\0", MediaInfo("audio", "mp3", None, None)),
        (b"\xff\xfb\x90\x64" + b"\0" * 100, MediaInfo("audio", "mp3", None, None)),
    ],
)
def test_known_formats(data: bytes, expected: MediaInfo) -> None:
    assert sniff_media(data) == expected


def test_real_files_from_pillow() -> None:
    from tests.fixtures.tiny_mmproj import make_test_image

    for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP"):
        info = sniff_media(make_test_image(None, 37, 21, seed=0, format=fmt))  # type: ignore[arg-type]
        assert info == MediaInfo("image", fmt.lower(), 37, 21), fmt


@pytest.mark.parametrize(
    "data", [b"", b"hello world", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF", b"\xff\xd8\xff"]
)
def test_unknown_or_cut_short(data: bytes) -> None:
    info = sniff_media(data)
    assert info is None or info.width is None


def test_jpeg_without_a_frame_header_has_no_size() -> None:
    assert sniff_media(b"\xff\xd8\xff\xe0\0\x04ab\xff\xd9") == MediaInfo(
        "image", "jpeg", None, None
    )


def test_fuzz_never_raises() -> None:
    rng = random.Random(0)
    riff = b"RIFF\0\0\0\0WEBP"
    prefixes = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"fLaC", b"ID3"]
    prefixes += [riff + b"VP8 ", riff + b"VP8L", riff + b"VP8X", b"\xff\xfb"]
    for i in range(3000):
        prefix = prefixes[i % len(prefixes)]
        data = prefix + rng.randbytes(rng.randrange(0, 64))
        info = sniff_media(data)
        assert info is None or isinstance(info, MediaInfo)
