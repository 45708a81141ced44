"""Atomic writes: the destination is either the old file or the new one, never a partial one."""

from __future__ import annotations

import json
import threading

import pytest

from qcnn.io import write_bytes, write_json, write_text, write_with


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "result.json"
    write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    write_text(p, "x")
    assert p.read_text() == "x"
    assert sorted(f.name for f in p.parent.iterdir()) == ["result.json"]


def test_a_writer_failing_midway_keeps_the_old_file(tmp_path):
    p = tmp_path / "model.bin"
    write_bytes(p, b"old")

    def half(f):
        f.write(b"new, half written")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_with(p, half)
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["model.bin"]


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    p = tmp_path / "results.json"
    payloads = [json.dumps({"writer": i, "pad": "x" * 200_000}) for i in range(4)]
    errors, seen = [], []

    def writer(i):
        try:
            for _ in range(5):
                write_text(p, payloads[i])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def reader():
        for _ in range(200):
            if p.exists():
                seen.append(p.read_text())

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(s in payloads for s in seen)
    assert p.read_text() in payloads and [f.name for f in tmp_path.iterdir()] == ["results.json"]
