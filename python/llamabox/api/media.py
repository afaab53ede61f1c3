"""Media inputs (images, audio) of a request, from the wire to the engine.

Where they come from: OpenAI content parts (``image_url`` with a ``data:`` URL or, when the
server allows it, an ``http(s)`` URL; ``input_audio``), Ollama's ``images`` (base64), llama.cpp's
``multimodal_data`` (base64). Each becomes a :class:`MediaInput` whose place in the prompt is the
engine's media marker (random per process, so no text a user writes stands for one). Every file
is checked before the engine decodes it: valid base64, at most ``--media-max-size`` bytes, a
format libmtmd decodes (read from its header), an image of at most ``--media-max-pixels``, and a
kind the projector takes. Each error is a 400 naming the message and part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.util
import io
from collections.abc import Sequence
from typing import NamedTuple

from llamabox.api.media_sniff import sniff_media
from llamabox.api.protocol import AudioPart, ChatMessage, ImagePart, MultimodalPrompt, part_param
from llamabox.api.remote_media import MediaFetchError, RemoteMediaPolicy, fetch_media
from llamabox.api.state import AppState
from llamabox.types import InvalidRequestError, MediaInput

LLAMA_CPP_MARKER = "<__media__>"  # what llama.cpp's multimodal prompts write for each file
_OFF_LOOP_BYTES = 1 << 20  # base64 longer than this is decoded on a thread
_WHITESPACE = str.maketrans("", "", " \t\r\n")
_HAVE_PILLOW = importlib.util.find_spec("PIL") is not None  # WebP, converted to PNG
_FORMATS = "PNG, JPEG, GIF, BMP" + (", WebP" if _HAVE_PILLOW else "") + " images"
_AUDIO_FORMATS = "WAV, MP3 or FLAC audio"


class MediaRef(NamedTuple):
    """One media input as the request gives it, not yet loaded."""

    source: str  # a data: or http(s) URL (url=True), else base64
    param: str  # where it is on the wire, for errors
    url: bool = True


def marker(state: AppState, param: str) -> str:
    """The engine's media marker; a 400 naming ``param`` when the model has no projector."""
    mark = state.engine.media_marker
    if mark is None:
        raise InvalidRequestError(
            f"{param}: media input needs a multimodal projector; this model has none (start the "
            "server with --mmproj FILE)",
            param=param,
        )
    return mark


def chat_refs(messages: Sequence[ChatMessage]) -> list[MediaRef]:
    """The media parts of chat messages, in prompt order."""
    refs: list[MediaRef] = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            param = part_param(part, f"messages[{i}].content[{j}]")
            if isinstance(part, ImagePart):
                refs.append(MediaRef(part.url, param))
            elif isinstance(part, AudioPart):
                refs.append(MediaRef(part.input_audio.data, param, url=False))
    return refs


def base64_refs(items: Sequence[str] | None, param: str) -> list[MediaRef]:
    """Ollama's ``images`` and llama.cpp's ``multimodal_data``: base64 strings (a data: URL is
    taken too)."""
    return [
        MediaRef(s, f"{param}[{k}]", url=s.startswith("data:")) for k, s in enumerate(items or [])
    ]


async def load_media(state: AppState, refs: Sequence[MediaRef]) -> list[MediaInput]:
    """The files of ``refs``, checked; remote ones fetched concurrently."""
    return list(await asyncio.gather(*(_load(state, ref) for ref in refs)))


async def _load(state: AppState, ref: MediaRef) -> MediaInput:
    config = state.config
    if not ref.url:
        data = await _base64(ref.source, ref.param, config.media_max_bytes)
    elif ref.source.startswith("data:"):
        header, comma, payload = ref.source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequestError(
                f"{ref.param}: a data URL must be data:<type>;base64,<data>", param=ref.param
            )
        data = await _base64(payload, ref.param, config.media_max_bytes)
    elif ref.source.startswith(("http://", "https://")):
        data = await _fetch(state, ref)
    else:
        raise InvalidRequestError(
            f"{ref.param}: the URL must be a data: URL (or http(s) with --allow-remote-media)",
            param=ref.param,
        )
    if _check(state, data, ref.param) == "webp":
        data = await asyncio.to_thread(_webp_to_png, data, ref.param)
    return MediaInput(data=data, param=ref.param)


async def _base64(text: str, param: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes + 2) // 3 * 4 + len(text) // 60 + 4:  # past the cap, newlines allowed
        raise InvalidRequestError(
            f"{param} is larger than this server's media limit of {max_bytes} bytes "
            "(--media-max-size)",
            param=param,
        )

    def decode() -> bytes:
        return base64.b64decode(text.translate(_WHITESPACE), validate=True)

    try:
        data = await asyncio.to_thread(decode) if len(text) > _OFF_LOOP_BYTES else decode()
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param} is not valid base64", param=param) from None
    if not data:
        raise InvalidRequestError(f"{param} is empty", param=param)
    return data


async def _fetch(state: AppState, ref: MediaRef) -> bytes:
    config = state.config
    if not config.allow_remote_media:
        raise InvalidRequestError(
            f"{ref.param}: remote media URLs are off on this server: send the file as a data: "
            "URL (data:image/png;base64,...), or start the server with --allow-remote-media",
            param=ref.param,
        )
    policy = RemoteMediaPolicy(
        allow_private=config.allow_remote_media_private,
        max_bytes=config.media_max_bytes,
        timeout_s=config.remote_media_timeout,
    )
    try:
        return await fetch_media(ref.source, policy)
    except MediaFetchError as e:
        raise InvalidRequestError(f"{ref.param}: {e}", param=ref.param) from None


def _check(state: AppState, data: bytes, param: str) -> str:
    """The file's format, once it passes every check."""
    config, info = state.config, state.engine.model_info
    if len(data) > config.media_max_bytes:
        raise InvalidRequestError(
            f"{param} is larger than this server's media limit of {config.media_max_bytes} bytes "
            "(--media-max-size)",
            param=param,
        )
    sniffed = sniff_media(data)
    takes = _FORMATS + (f", or {_AUDIO_FORMATS}" if info.audio else "")
    if sniffed is None:
        raise InvalidRequestError(f"{param} is not a file this model can read: send {takes}", param)
    if sniffed.format == "webp" and not _HAVE_PILLOW:
        raise InvalidRequestError(
            f"{param} is WebP, which libmtmd does not decode (pip install 'llamabox[media]' lets "
            f"this server convert it): send {takes}",
            param=param,
        )
    if sniffed.kind == "audio" and not info.audio:
        raise InvalidRequestError(
            f"{param} is audio, which this model's projector does not take", param=param
        )
    if sniffed.kind == "image" and not info.vision:
        raise InvalidRequestError(
            f"{param} is an image, which this model's projector does not take", param=param
        )
    w, h = sniffed.width, sniffed.height
    if sniffed.kind == "image" and (w is None or h is None or w < 1 or h < 1):
        raise InvalidRequestError(f"{param}: the image's size cannot be read", param=param)
    if w is not None and h is not None and w * h > config.media_max_pixels:
        raise InvalidRequestError(
            f"{param} is {w}x{h} pixels, more than this server's limit of "
            f"{config.media_max_pixels} (--media-max-pixels)",
            param=param,
        )
    return sniffed.format


def _webp_to_png(data: bytes, param: str) -> bytes:
    """A WebP image as PNG (libmtmd's stb_image has no WebP decoder), on a worker thread."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # the first frame of an animation
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG", compress_level=1)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequestError(
            f"{param}: the WebP image cannot be decoded ({e})", param
        ) from None
    return out.getvalue()


async def multimodal_prompt(
    state: AppState, text: str, files: Sequence[str], param: str = "multimodal_data"
) -> tuple[str, list[MediaInput]]:
    """llama.cpp's multimodal prompt: ``text`` with a marker per base64 file of ``files``, in
    order (``<__media__>``, or the engine's own as ``/props`` gives it; with no marker at all,
    the files go first). Returns the prompt with the engine's marker in their places, and the
    files."""
    mark = marker(state, param)
    text = text.replace(LLAMA_CPP_MARKER, mark)
    n_markers = text.count(mark)
    if n_markers == 0:
        text = mark * len(files) + text
    elif n_markers != len(files):
        raise InvalidRequestError(
            f"the prompt has {n_markers} media markers ({LLAMA_CPP_MARKER}) for {len(files)} "
            f"files of {param}",
            param="prompt",
        )
    media = await load_media(state, base64_refs(files, param))
    return text, media


async def completion_media(
    state: AppState, prompt: object, files: list[str] | None
) -> tuple[str, list[MediaInput]] | None:
    """A completion request's multimodal prompt (llama.cpp's ``{prompt_string,
    multimodal_data}`` object, or a text prompt beside ``multimodal_data``) as the engine's
    prompt and its files; None when the request has no files."""
    if isinstance(prompt, MultimodalPrompt):
        if files is not None:
            raise InvalidRequestError(
                "give multimodal_data in the prompt object or beside it, not both",
                param="multimodal_data",
            )
        files, prompt = prompt.multimodal_data, prompt.prompt_string
    if not files:
        return None
    if not isinstance(prompt, str):
        raise InvalidRequestError("multimodal_data needs one text prompt", param="prompt")
    return await multimodal_prompt(state, prompt, files)
