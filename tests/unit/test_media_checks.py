"""api/media.py's checks of a media file and llama.cpp's multimodal prompts, without an engine."""

from __future__ import annotations

import asyncio
import base64
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from tests.fixtures.tiny_mmproj import make_test_image, make_test_png

from llamabox.api import media
from llamabox.config import ServerConfig
from llamabox.types import EngineConfig, InvalidRequestError

PNG = make_test_png(None, 8, 8, seed=0)


def state(vision: bool = True, audio: bool = False, **config: Any) -> Any:
    engine = SimpleNamespace(
        media_marker="<M>", model_info=SimpleNamespace(vision=vision, audio=audio)
    )
    return SimpleNamespace(
        config=ServerConfig(engine=EngineConfig(model="m"), **config), engine=engine
    )


def check_error(st: Any, data: bytes) -> str:
    with pytest.raises(InvalidRequestError) as e:
        media._check(st, data, "messages[0].content[1]")
    assert e.value.param == "messages[0].content[1]"
    return str(e.value)


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def test_good_files_pass() -> None:
    assert media._check(state(), PNG, "p") == "png"
    assert media._check(state(audio=True, vision=False), b"fLaC" + b"\0" * 40, "p") == "flac"


def test_each_refusal_names_the_part_and_says_why() -> None:
    assert "--media-max-size" in check_error(state(media_max_bytes=100), PNG)
    assert "--media-max-pixels" in check_error(state(media_max_pixels=10_000), bmp_header(200, 100))
    assert "not a file" in check_error(state(), b"hello, world")
    assert "audio" in check_error(state(), b"fLaC" + b"\0" * 40)
    assert "image" in check_error(state(vision=False, audio=True), PNG)
    assert "size" in check_error(state(), bmp_header(0, 10))


def test_webp_without_pillow_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    webp = make_test_image(None, 8, 8, seed=0, format="WEBP")
    assert media._check(state(), webp, "p") == "webp"
    monkeypatch.setattr(media, "_HAVE_PILLOW", False)
    assert "llamabox[media]" in check_error(state(), webp)


def test_webp_becomes_png() -> None:
    webp = make_test_image(None, 9, 7, seed=0, format="WEBP")
    png = media._webp_to_png(webp, "p")
    assert png.startswith(b"\x89PNG") and media.sniff_media(png) == ("image", "png", 9, 7)
    with pytest.raises(InvalidRequestError):
        media._webp_to_png(webp[:40], "p")


def test_base64_is_strict_and_capped() -> None:
    good = base64.b64encode(PNG).decode()
    assert asyncio.run(media._base64(good[:20] + "\n" + good[20:], "p", 1 << 20)) == PNG
    for bad in ("%%%", "abc", ""):
        with pytest.raises(InvalidRequestError):
            asyncio.run(media._base64(bad, "p", 1 << 20))
    with pytest.raises(InvalidRequestError, match="--media-max-size"):
        asyncio.run(media._base64("A" * 4000, "p", 1000))


def test_multimodal_prompt_markers() -> None:
    st = state()
    files = [base64.b64encode(PNG).decode()] * 2
    text, loaded = asyncio.run(media.multimodal_prompt(st, "a <__media__> b <M> c", files))
    assert text == "a <M> b <M> c" and [m.param for m in loaded] == [
        "multimodal_data[0]",
        "multimodal_data[1]",
    ]
    text, _ = asyncio.run(media.multimodal_prompt(st, "no markers", files[:1]))
    assert text == "<M>no markers"
    with pytest.raises(InvalidRequestError, match="2 media markers"):
        asyncio.run(media.multimodal_prompt(st, "<__media__><__media__>", files[:1]))


def test_no_projector() -> None:
    st = state()
    st.engine.media_marker = None
    with pytest.raises(InvalidRequestError, match="--mmproj") as e:
        media.marker(st, "images")
    assert e.value.param == "images"


def test_remote_urls_off_by_default() -> None:
    ref = media.MediaRef("https://example.com/x.png", "messages[0].content[0]")
    with pytest.raises(InvalidRequestError, match="--allow-remote-media"):
        asyncio.run(media.load_media(state(), [ref]))
    ref = media.MediaRef("file:///etc/passwd", "messages[0].content[0]")
    with pytest.raises(InvalidRequestError, match="data:"):
        asyncio.run(media.load_media(state(), [ref]))
