"""files.py: atomic writes, JSON with a chosen error class, digests."""

import hashlib
import json
import os

import pytest

from hones_core.errors import HonesError, RankingsSchemaError
from hones_core.files import atomic_write, bytes_digest, digest, json_bytes, read_json, write_json


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "state.json"
    atomic_write(path, b"old")
    assert path.read_bytes() == b"old"

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"                   # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]   # and no temporary file


def test_json_round_trip_and_errors_name_the_file(tmp_path):
    path = write_json(tmp_path / "a.json", {"ü": [1, 2]})
    assert path.read_bytes() == '{\n "ü": [\n  1,\n  2\n ]\n}\n'.encode()      # UTF-8, indent 1, final newline
    assert read_json(path) == {"ü": [1, 2]}
    assert json_bytes([1], indent=None) == b"[1]\n"
    with pytest.raises(HonesError, match="missing.json is missing"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RankingsSchemaError, match="shown name is not valid JSON"):
        read_json(tmp_path / "bad.json", shown="shown name", error=RankingsSchemaError)


def test_digests_are_sha256_and_ignore_key_order():
    assert digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
    assert digest({"a": 1}) == hashlib.sha256(json.dumps({"a": 1}, sort_keys=True).encode()).hexdigest()[:16]
    assert bytes_digest(b"x") == hashlib.sha256(b"x").hexdigest()
    assert bytes_digest(b"x", length=12) == hashlib.sha256(b"x").hexdigest()[:12]
