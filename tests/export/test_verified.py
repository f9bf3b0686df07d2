"""Files verified once are not hashed again until they change (`artifact.verified`, `verify_files`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from llama_export.artifact import manifest as manifest_mod
from llama_export.artifact import verified
from llama_export.artifact.manifest import load_manifest, rank_files, verify_files, verify_rank
from llama_export.artifact.verified import CACHE_ENV, Stamp, VerifiedFiles
from llama_export.demo import DEMO_DIR
from llama_export.errors import ArtifactError
from tests.helpers import run_cli

SETTLE_NS = 50_000_000  # the tests' settle time: longer than the kernel's timestamp tick (<= 10 ms)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh record folder and a settle time short enough to wait out."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_NS", SETTLE_NS)
    return tmp_path / "cache"


@pytest.fixture
def hashed(monkeypatch):
    """The paths `sha256_file` reads, in order."""
    calls = []
    real = manifest_mod.sha256_file

    def counting(path, **kwargs):
        calls.append(path.name)
        return real(path, **kwargs)

    monkeypatch.setattr(manifest_mod, "sha256_file", counting)
    return calls


def _export(root, contents: dict[str, bytes]) -> list[tuple[str, str]]:
    """Files under `root` and their (relative path, sha256) list, settled (older than SETTLE_NS)."""
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    time.sleep(2 * SETTLE_NS / 1e9)
    return [(rel, hashlib.sha256(data).hexdigest()) for rel, data in contents.items()]


FILES = {"rank0/00_full.onnx": b"graph" * 100, "rank0/00_full.onnx.data": bytes(range(256)) * 400}


def test_second_verify_of_unchanged_files_reads_nothing(tmp_path, cache, hashed):
    files = _export(tmp_path / "x", FILES)
    verify_files(tmp_path / "x", files)
    assert hashed == ["00_full.onnx", "00_full.onnx.data"]
    verified_bytes = []
    verify_files(tmp_path / "x", files, on_bytes=verified_bytes.append)
    assert hashed == ["00_full.onnx", "00_full.onnx.data"]  # no new reads
    assert sum(verified_bytes) == sum(len(d) for d in FILES.values())  # progress still completes
    verify_files(tmp_path / "x", files, rehash=True)  # --rehash
    assert hashed[2:] == ["00_full.onnx", "00_full.onnx.data"]
    records = list((cache / "verified").glob("*.json"))
    assert len(records) == 1 and str((tmp_path / "x").resolve()) in records[0].read_text()


def test_modified_in_place_with_mtime_restored_is_hashed_and_fails(tmp_path, cache, hashed):
    files = _export(tmp_path / "x", FILES)
    verify_files(tmp_path / "x", files)
    f = tmp_path / "x" / "rank0/00_full.onnx.data"
    before = f.stat()
    with open(f, "r+b") as fh:  # same size, one byte changed
        fh.seek(1000)
        fh.write(b"\xff")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(ArtifactError, match=r"00_full.onnx.data has sha256 .* modified or truncated"):
        verify_files(tmp_path / "x", files)
    assert hashed[-1] == "00_full.onnx.data"
    with pytest.raises(ArtifactError, match="modified or truncated"):  # and a failure records nothing
        verify_files(tmp_path / "x", files)


def test_truncated_file_fails(tmp_path, cache):
    files = _export(tmp_path / "x", FILES)
    verify_files(tmp_path / "x", files)
    os.truncate(tmp_path / "x" / "rank0/00_full.onnx", 10)
    with pytest.raises(ArtifactError, match=r"00_full.onnx has sha256 .* modified or truncated"):
        verify_files(tmp_path / "x", files)


def test_replaced_by_an_identical_looking_copy_is_hashed(tmp_path, cache, hashed):
    """A new file at the path (rename over it, as an editor saves) is a new inode and ctime."""
    files = _export(tmp_path / "x", FILES)
    verify_files(tmp_path / "x", files)
    f = tmp_path / "x" / "rank0/00_full.onnx"
    new = tmp_path / "new"
    new.write_bytes(f.read_bytes())
    shutil.copystat(f, new)
    os.replace(new, f)
    verify_files(tmp_path / "x", files)
    assert hashed[-1] == "00_full.onnx"


def test_a_file_changed_just_before_it_is_hashed_is_not_recorded(tmp_path, cache, hashed, monkeypatch):
    """Within the settle time a later write could leave the ctime as it is, so no record is trusted."""
    monkeypatch.setattr(verified, "SETTLE_NS", 3_600 * 10**9)
    files = _export(tmp_path / "x", FILES)
    verify_files(tmp_path / "x", files)
    verify_files(tmp_path / "x", files)
    assert len(hashed) == 4
    assert not (cache / "verified").exists()  # nothing to write, nothing written


@pytest.mark.parametrize("spoil", ["a file", "unreadable records", "garbage records"])
def test_a_cache_that_cannot_be_used_still_verifies(tmp_path, cache, hashed, monkeypatch, spoil):
    files = _export(tmp_path / "x", FILES)
    if spoil == "a file":  # LLAMA_EXPORT_CACHE_DIR is a file: no folder can be made in it (also as root)
        cache.write_text("not a folder")
    else:
        verify_files(tmp_path / "x", files)
        (record,) = (cache / "verified").glob("*.json")
        if spoil == "garbage records":
            record.write_text('{"format": "llama_export.verified", "version": 1, "files": [1, 2]}')
        else:
            record.unlink()
            record.mkdir()  # reading it fails (IsADirectoryError), and so does writing it
        hashed.clear()
    verify_files(tmp_path / "x", files)
    verify_files(tmp_path / "x", files)
    assert len(hashed) == (2 if spoil == "garbage records" else 4)  # garbage is rewritten, then used
    (tmp_path / "x" / "rank0/00_full.onnx").write_bytes(b"bad")
    with pytest.raises(ArtifactError, match="modified or truncated"):
        verify_files(tmp_path / "x", files)


def test_records_of_another_export_do_not_count(tmp_path, cache, hashed):
    """A copy of an export (another folder, other inodes) is hashed, and so is the same export moved."""
    files = _export(tmp_path / "a", FILES)
    verify_files(tmp_path / "a", files)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    time.sleep(2 * SETTLE_NS / 1e9)
    verify_files(tmp_path / "b", files)
    assert len(hashed) == 4
    os.rename(tmp_path / "a", tmp_path / "c")  # same inodes, another path
    verify_files(tmp_path / "c", files)
    assert len(hashed) == 6
    assert len(list((cache / "verified").glob("*.json"))) == 3
    other = [(rel, "0" * 64) for rel, _ in files]  # a manifest that expects other contents at the paths
    with pytest.raises(ArtifactError, match="modified or truncated"):
        verify_files(tmp_path / "b", other)


def test_ranks_writing_at_once_keep_each_others_records(tmp_path, cache, hashed):
    """Two ranks load the (empty) records, then each saves its own files: both are kept."""
    files = _export(tmp_path / "x", {"rank0/a": b"a" * 10, "rank1/b": b"b" * 10})
    rank0, rank1 = VerifiedFiles(tmp_path / "x"), VerifiedFiles(tmp_path / "x")
    now = time.time_ns()
    for rec, (rel, sha) in zip((rank0, rank1), files):
        path = (tmp_path / "x" / rel).resolve()
        rec.add(path, sha, Stamp.of(path.stat()), seen_ns=now)
    rank0.save()
    rank1.save()
    verify_files(tmp_path / "x", files)
    assert hashed == []



def test_records_locked_by_another_process_are_given_up_not_waited_for(tmp_path, cache, monkeypatch):
    """A writer holding the record lock longer than the wait: `save` gives up (nothing recorded, no error)
    after `_LOCK_WAIT_S`, and saves once the lock is free."""
    import subprocess
    import sys

    monkeypatch.setattr(verified, "_LOCK_WAIT_S", 0.2)
    files = _export(tmp_path / "x", {"rank0/a": b"a" * 10})
    rec = VerifiedFiles(tmp_path / "x")
    path = (tmp_path / "x" / files[0][0]).resolve()
    rec.add(path, files[0][1], Stamp.of(path.stat()), seen_ns=time.time_ns())
    lock = rec._lock().lock_file
    holder = subprocess.Popen([sys.executable, "-c", "import sys, filelock; l = filelock.FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); sys.stdin.read()", lock],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        rec.save()
        assert time.monotonic() - t0 < 5
        assert VerifiedFiles(tmp_path / "x")._read() == {}
    finally:
        holder.communicate("")
    rec.save()
    assert set(VerifiedFiles(tmp_path / "x")._read()) == {str(path)}


# ---- through the commands: a record is used by rank processes and by compare; --rehash ignores it ----------

@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    """A TP=1 export of the demo model (it has a tokenizer, for eval) whose weights were changed after
    export: (folder, the changed file's relative path)."""
    from llama_export.export.exporter import ExportOptions, export

    path = export(ExportOptions(checkpoint=DEMO_DIR, out=tmp_path_factory.mktemp("verified_cli"), tp=1,
                                progress=False))
    rel, _ = rank_files(load_manifest(path, verify_hashes=False), 0)[-1]
    with open(path / rel, "r+b") as fh:
        fh.seek((path / rel).stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x01]))
    return path, rel


@pytest.fixture
def forged(tampered, tmp_path, monkeypatch):
    """A record folder (set in the environment) whose record vouches for the changed file: what a
    record-trusting start cannot tell from an intact export."""
    path, rel = tampered
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    want = dict(rank_files(load_manifest(path, verify_hashes=False), 0))[rel]
    data = (path / rel).resolve()
    stamp = Stamp.of(data.stat())
    record = VerifiedFiles(path)
    record.add(data, want, stamp, seen_ns=stamp.ctime_ns + verified.SETTLE_NS)
    record.save()
    return path, rel


def test_load_manifest_uses_the_records_unless_rehash(forged):
    path, rel = forged
    load_manifest(path)  # trusts the record (the trust model: changes through the file system only)
    verify_rank(load_manifest(path, verify_hashes=False), path, 0)
    with pytest.raises(ArtifactError, match=f"{rel} has sha256 .* modified or truncated"):
        verify_rank(load_manifest(path, verify_hashes=False), path, 0, rehash=True)
    with pytest.raises(ArtifactError, match="modified or truncated"):  # the record found wrong is gone
        load_manifest(path)


def test_rehash_flag_of_run_eval_and_compare(forged, tmp_path):
    path, rel = forged
    run = ("run", "--backend", "ort", "--artifacts", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "1")
    ok = run_cli(*run)
    assert ok.returncode == 0, ok.stderr  # the rank process trusted the record
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello world")
    for args in (("compare", "--artifacts", str(path)),
                 ("eval", "--backend", "ort", "--artifacts", str(path), "--text", str(text)), run):
        r = run_cli(*args, "--rehash")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{rel} has sha256" in r.stderr and "modified or truncated" in r.stderr, r.stderr


def test_tensorrt_plans_are_hashed_once_and_a_changed_plan_says_rebuild(tmp_path, cache, hashed):
    """The TensorRT runner reads its engines through the same records (`runner.read_plans`)."""
    from llama_export.backends.tensorrt.build import EngineRecord
    from llama_export.backends.tensorrt.runner import read_plans

    plans = {"rank0/layer0.plan": b"engine-0" * 64, "rank0/layer1.plan": b"engine-1" * 64}
    files = _export(tmp_path / "engines", plans)
    entries = [EngineRecord(0, rel.split("/")[1].removesuffix(".plan"), "0" * 64, rel, sha, "key", None, {}, ())
               for rel, sha in files]
    assert read_plans(tmp_path / "engines", entries) == list(plans.values())
    assert hashed == ["layer0.plan", "layer1.plan"]
    assert read_plans(tmp_path / "engines", entries) == list(plans.values())
    assert hashed == ["layer0.plan", "layer1.plan"]  # unchanged: read, not hashed again
    read_plans(tmp_path / "engines", entries, rehash=True)
    assert hashed == ["layer0.plan", "layer1.plan"] * 2
    (tmp_path / "engines" / "rank0/layer1.plan").write_bytes(b"engine-X" * 64)
    with pytest.raises(ArtifactError, match=r"layer1.plan has sha256 .* modified or truncated after it was "
                                            r"written; rebuild \(`llama-export build`\)"):
        read_plans(tmp_path / "engines", entries)
