import json

import pytest

from vlprompt.common.io import atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_json_round_trip(tmp_path):
    target = tmp_path / "sub" / "r.json"
    atomic_write_json(target, {"a": 1, "é": [1.5, None]})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1, "é": [1.5, None]}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.txt"
    atomic_write_text(target, "old")

    def boom(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]
