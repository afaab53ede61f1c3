"""POST /slots/{id_slot}?action=save|restore|erase: a slot's KV cache to a file and back.

llama.cpp's server's slot persistence: ``--slot-save-path DIR`` names the directory; a request
gives only a file name, which cannot leave it (no separators, no dot files, and the resolved
path must lie in the directory). A restored slot holds the saved tokens as its cached prefix,
so the next request that starts with them is a prefix-cache hit. ``erase`` drops a slot's
cache and needs no directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route, json_response
from llamabox.api.state import AppState
from llamabox.types import InvalidRequestError

ACTIONS = ("save", "restore", "erase")
# A plain file name: no directory part, not hidden, no control characters.
_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


class SlotFileRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    filename: str | None = None


_decoder = msgspec.json.Decoder(SlotFileRequest)


def _file(state: AppState, filename: str | None) -> Path:
    directory = state.config.slot_save_path
    if directory is None:
        raise APIError(
            501,
            "This server does not save or restore slots: start it with --slot-save-path DIR",
        )
    if not filename or not _FILENAME.fullmatch(filename):
        raise InvalidRequestError(
            "filename must be a plain file name (letters, digits, '.', '_', '+', '-'; no "
            "directory, not starting with a dot)",
            param="filename",
        )
    root = Path(directory).resolve()
    path = (root / filename).resolve()
    if path.parent != root:  # a symbolic link out of the directory
        raise InvalidRequestError("filename must stay in --slot-save-path", param="filename")
    return path


async def slot_action(req: Request, state: AppState) -> Response:
    action = req.query.get("action")
    if action not in ACTIONS:
        raise InvalidRequestError(
            f"action must be one of {', '.join(ACTIONS)}, not {action!r}", param="action"
        )
    try:
        id_slot = int(req.path_params["id_slot"])
    except ValueError:
        raise InvalidRequestError("the slot id must be an integer", param="id_slot") from None
    if action == "erase":
        result = await state.engine.slot_action(id_slot, "erase")
        return json_response({"id_slot": id_slot, "n_erased": result["n_erased"]})
    body = req.decode(_decoder) if req.body.strip() else SlotFileRequest()
    path = _file(state, body.filename)
    if action == "restore" and not path.is_file():
        raise InvalidRequestError(f"no saved slot named {body.filename!r}", param="filename")
    result = await state.engine.slot_action(id_slot, action, str(path))
    # llama-server's answer: n_saved/n_written or n_restored/n_read, and the time it took
    counts = {k: v for k, v in result.items() if k != "ms"}
    timings = {f"{action}_ms": result["ms"]}
    return json_response(
        {"id_slot": id_slot, "filename": body.filename, **counts, "timings": timings}
    )


def routes() -> list[Route[AppState]]:
    return [Route("POST", "/slots/{id_slot}", slot_action)]
