"""POST /slots/{id}?action=save|restore|erase against a fake engine: the HTTP contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.fake_engine import client, make_app

pytestmark = pytest.mark.unit


async def test_save_restore_erase(tmp_path: Path) -> None:
    app, engine = make_app(slot_save_path=str(tmp_path))
    async with client(app) as c:
        r = await c.post("/slots/1?action=save", json={"filename": "chat-1.bin"})
        assert r.status_code == 200
        assert r.json() == {"id_slot": 1, "filename": "chat-1.bin", "n_saved": 5,
                            "n_written": 1000, "timings": {"save_ms": 1.5}}  # fmt: skip
        (tmp_path / "chat-1.bin").write_bytes(b"x")  # what the real engine would have written
        r = await c.post("/slots/0?action=restore", json={"filename": "chat-1.bin"})
        assert r.status_code == 200
        assert r.json()["n_restored"] == 5 and r.json()["timings"] == {"restore_ms": 2.5}
        r = await c.post("/slots/2?action=erase")
        assert r.json() == {"id_slot": 2, "n_erased": 5}
    path = str(tmp_path / "chat-1.bin")
    assert engine.slot_actions == [(1, "save", path), (0, "restore", path), (2, "erase", "")]


@pytest.mark.parametrize(
    "filename",
    ["", "../escape.bin", "a/b.bin", "/etc/passwd", ".hidden", "a\\\\b", "x" * 300, None],
)
async def test_a_file_name_cannot_leave_the_directory(tmp_path: Path, filename: str | None) -> None:
    app, engine = make_app(slot_save_path=str(tmp_path / "slots"))
    (tmp_path / "slots").mkdir()
    async with client(app) as c:
        body = {} if filename is None else {"filename": filename}
        r = await c.post("/slots/0?action=save", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "filename"
    assert not engine.slot_actions


async def test_a_symbolic_link_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "slots").mkdir()
    (tmp_path / "outside.bin").write_bytes(b"x")
    (tmp_path / "slots" / "link.bin").symlink_to(tmp_path / "outside.bin")
    app, engine = make_app(slot_save_path=str(tmp_path / "slots"))
    async with client(app) as c:
        r = await c.post("/slots/0?action=restore", json={"filename": "link.bin"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "filename"
    assert not engine.slot_actions


async def test_bad_requests(tmp_path: Path) -> None:
    app, engine = make_app(slot_save_path=str(tmp_path))
    async with client(app) as c:
        for path, param in (
            ("/slots/0", "action"),
            ("/slots/0?action=dump", "action"),
            ("/slots/first?action=erase", "id_slot"),
        ):
            r = await c.post(path, json={"filename": "a.bin"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, path
        r = await c.post("/slots/0?action=restore", json={"filename": "never-saved.bin"})
        assert r.status_code == 400 and "never-saved.bin" in r.json()["error"]["message"]
        r = await c.post("/slots/9?action=erase")  # the engine says which slots there are
        assert r.status_code == 400
        r = await c.post("/slots/0?action=save", json={"filename": "a.bin", "extra": 1})
        assert r.status_code == 400


async def test_without_a_directory_save_and_restore_are_501_and_erase_works() -> None:
    app, engine = make_app()
    async with client(app) as c:
        for action in ("save", "restore"):
            r = await c.post(f"/slots/0?action={action}", json={"filename": "a.bin"})
            assert r.status_code == 501
            assert "--slot-save-path" in r.json()["error"]["message"]
        assert (await c.post("/slots/0?action=erase")).status_code == 200
    assert engine.slot_actions == [(0, "erase", "")]
