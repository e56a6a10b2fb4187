import errno
import os
import re

import pytest

from vlpbench import files
from vlpbench.files import atomic_path, atomic_write, backup_path, leftover_temporaries, staged_folder


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_gives_the_content_the_umask_mode_and_no_leftovers(tmp_path):
    target = tmp_path / "record.json"
    assert atomic_write(target, "é\n") == target
    assert target.read_bytes() == "é\n".encode("utf-8")
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert names(tmp_path) == ["record.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_temporary_file_is_hidden_beside_the_target_and_found_as_a_leftover(tmp_path):
    target = tmp_path / "frac0.1-seed0.json"
    other = tmp_path / "frac1.0-seed0.json"
    with atomic_path(target) as tmp, atomic_path(other):
        assert tmp.parent == tmp_path and tmp.exists() and tmp.stat().st_size == 0
        assert re.fullmatch(r"\.frac0\.1-seed0\.json\.[0-9a-f]{16}\.tmp", tmp.name)
        assert leftover_temporaries(target) == [tmp]  # the other file's temporary is not this one's
        tmp.write_text("{}")
    assert target.read_text() == "{}" and names(tmp_path) == sorted([other.name, target.name])
    assert leftover_temporaries(target) == [] and leftover_temporaries(tmp_path / "none" / "x.json") == []


def test_a_failing_block_removes_the_temporary_file_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "entry.u8"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert names(tmp_path) == ["entry.u8"] and target.read_bytes() == b"old"


def test_fsync_flushes_the_file_before_the_rename_and_the_folder_after_unless_turned_off(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target_existed = []
    real_fsync = os.fsync

    def recording(fd):
        target_existed.append(target.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    atomic_write(target, "1")
    assert target_existed == ([False, True] if os.name == "posix" else [False])
    target_existed.clear()
    atomic_write(tmp_path / "b.json", "2", fsync=False)
    assert target_existed == []


def test_temporary_files_can_live_in_another_folder(tmp_path):
    (tmp_path / "tmp").mkdir()
    seen = []
    with atomic_path(tmp_path / "INFO.json", tmp_dir=tmp_path / "tmp", fsync=False) as tmp:
        seen.append(tmp.parent)
        tmp.write_text("x")
    assert seen == [tmp_path / "tmp"] and names(tmp_path / "tmp") == []
    assert (tmp_path / "INFO.json").read_text() == "x"


def test_backup_keeps_the_replaced_file_and_is_renamed_back_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "frac0.01-seed0.json"
    atomic_write(target, "first", backup=backup_path)  # nothing to keep yet
    assert names(tmp_path) == [target.name]
    atomic_write(target, "second", backup=backup_path)
    (kept,) = [p for p in tmp_path.iterdir() if p != target]
    assert re.fullmatch(r"frac0\.01-seed0\.replaced-\d{8}T\d{6}\.\d{6}Z\.json\.bak", kept.name)
    assert kept.read_text() == "first" and target.read_text() == "second"

    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst) == str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "third", backup=backup_path)
    assert names(tmp_path) == sorted([kept.name, target.name]) and target.read_text() == "second"


def test_backup_names_never_collide(tmp_path, monkeypatch):
    target = tmp_path / "x.json"

    class FrozenClock:
        @staticmethod
        def now(tz):
            from datetime import datetime

            return datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=tz)

    monkeypatch.setattr(files, "datetime", FrozenClock)
    first = backup_path(target)
    assert first.name == "x.replaced-20250102T030405.000006Z.json.bak"
    first.touch()
    second = backup_path(target)
    assert second.name == "x.replaced-20250102T030405.000006Z-1.json.bak"
    second.touch()
    assert backup_path(target).name == "x.replaced-20250102T030405.000006Z-2.json.bak"


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "splits" / "siim" / "v1-abc"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staging:
            (staging / "train.csv").write_text("image_id\n")
            raise RuntimeError("build failed")
    assert not target.exists() and names(target.parent) == []

    with staged_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".v1-abc.")
        (staging / "MANIFEST.json").write_text("first")
    assert names(target.parent) == ["v1-abc"] and (target / "MANIFEST.json").read_text() == "first"

    # Another process finished first: its folder (same content) stays, the second build is dropped.
    with staged_folder(target) as staging:
        (staging / "MANIFEST.json").write_text("second")
    assert names(target.parent) == ["v1-abc"] and (target / "MANIFEST.json").read_text() == "first"
