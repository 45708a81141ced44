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


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "last.pt"
    code = ("import os, sys, time; sys.path.insert(0, %r); from qcnn.io import write_with; "
            "write_with(%r, lambda f: (f.write(b'half'), f.flush(), os.kill(os.getpid(), 9)))")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code % (root, str(p))], capture_output=True)
    assert r.returncode == -9
    orphans = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(orphans) == 1 and not p.exists()  # SIGKILL: nothing can clean up inside the writer
    live = tmp_path / f".last.pt.{__import__('os').getpid()}.abcd.tmp"
    live.write_bytes(b"a live writer's file")
    write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and not orphans[0].exists() and live.exists()
