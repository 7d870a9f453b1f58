from __future__ import annotations

import os
import stat

import pytest

from hbi_runtime.fileio import write_atomic


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_plain_open_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "sub" / "manifest.json", '{"a": 1}\n')
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert path.read_text() == '{"a": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_replaces_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "engines.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines.json"]
