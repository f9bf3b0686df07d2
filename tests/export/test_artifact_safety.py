"""Tampered, truncated or unsafe artifacts give a clear error; interrupted exports leave no trace."""

from __future__ import annotations

import json
import shutil

import pytest

from llama_export.artifact.manifest import FORMAT_VERSION, load_manifest, sha256_file
from llama_export.errors import ArtifactError
from llama_export.export import exporter
from llama_export.export.exporter import ExportOptions, export
from tests.helpers import run_cli, tiny_export


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("safety"), seed=4, tp=2)


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(good[1], dst)
    return dst


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _save(path, data):
    (path / "manifest.json").write_text(json.dumps(data))


def _cli_error(path, match):
    r = run_cli("run", "--artifacts", str(path), "--backend", "ort", "--tp", "2", "--prompt-ids", "1,2,3",
                "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert match in r.stderr, r.stderr


def test_hand_edited_onnx_is_detected(copy):
    f = copy / "rank0" / "01_layers.0.attention.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* was modified or truncated after it was written; re-export"):
        load_manifest(copy)
    _cli_error(copy, "was modified or truncated")


def test_truncated_onnx_is_detected(copy):
    f = copy / "rank1" / "00_embed.onnx"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="modified or truncated"):
        load_manifest(copy)


def test_manifest_hash_mismatch(copy):
    d = _manifest(copy)
    d["ranks"][0]["segments"][0]["sha256"] = "0" * 64
    _save(copy, d)
    with pytest.raises(ArtifactError, match="sha256"):
        load_manifest(copy)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "rank0/../../x.onnx", ""])
def test_manifest_paths_may_not_leave_the_directory(copy, bad):
    d = _manifest(copy)
    d["ranks"][0]["segments"][0]["file"] = bad
    _save(copy, d)
    with pytest.raises(ArtifactError, match="leaves the export directory"):
        load_manifest(copy)


def test_symlink_out_of_the_directory_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "rank0" / "00_embed.onnx", outside)
    (copy / "rank0" / "00_embed.onnx").unlink()
    (copy / "rank0" / "00_embed.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="resolves outside"):
        load_manifest(copy)
    _cli_error(copy, "resolves outside")


def test_missing_file_and_malformed_manifest(copy):
    (copy / "rank1" / "02_layers.0.ffn.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing; re-export"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(copy)
    _save(copy, {"format": "llama_export.manifest", "format_version": FORMAT_VERSION})
    with pytest.raises(ArtifactError, match="lacks the required field"):
        load_manifest(copy)


def test_interrupted_export_leaves_earlier_artifacts_intact(good, monkeypatch):
    ckpt, path = good
    before = {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = exporter.export_rank

    def dies_on_second_rank(opts, cfg, graph, rank, root, **kw):
        calls["n"] += 1
        if rank == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return real(opts, cfg, graph, rank, root, **kw)

    monkeypatch.setattr(exporter, "export_rank", dies_on_second_rank)
    with pytest.raises(KeyboardInterrupt):
        export(ExportOptions(checkpoint=ckpt, out=path.parents[1], tp=2, progress=False))
    assert calls["n"] == 2
    after = {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()}
    assert after == before
    load_manifest(path)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_export_whose_final_swap_fails_rolls_back(good, monkeypatch):
    """The rename that puts a finished export in place fails (say, the disk is gone): the previous
    export is restored byte-identical and nothing of the new one remains."""
    from pathlib import Path

    from llama_export import files

    ckpt, path = good
    before = {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()}
    real = Path.rename

    def rename(self, target):
        if Path(target) == path and files.PARTIAL_MARKER in self.name:
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export(ExportOptions(checkpoint=ckpt, out=path.parents[1], tp=2, progress=False))
    monkeypatch.undo()
    assert {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()} == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_reexport_replaces_the_directory_whole(good):
    ckpt, path = good
    again = export(ExportOptions(checkpoint=ckpt, out=path.parents[1], tp=2, progress=False))
    assert again == path
    load_manifest(path)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_tampered_weights_file_is_detected(copy):
    seg = load_manifest(copy).rank(0).segments[1]
    data = copy / seg.data_file
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0x55
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"\.data has sha256 .* modified or truncated"):
        load_manifest(copy)


def test_checker_gives_the_same_verdict_in_a_fresh_process(good):
    """The custom-node schemas are registered by the check itself, not by whatever ran before it."""
    import subprocess
    import sys

    _, path = good
    seg = load_manifest(path).rank(0).segments[1]
    code = ("import sys; from llama_export.artifact.schema import check_model; "
            "check_model(sys.argv[1]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(path / seg.file)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr



def test_a_rank_verifies_only_its_own_files(copy):
    """Start-up is per rank: rank 0 neither reads nor judges rank 1's files."""
    from llama_export.artifact.manifest import rank_files, verify_rank

    m = load_manifest(copy)
    assert {rel.split("/")[0] for rel, _ in rank_files(m, 0)} == {"rank0"}
    seg = m.rank(1).segments[2]
    data = copy / seg.data_file
    data.write_bytes(data.read_bytes()[:-1])  # truncated
    read = []
    verify_rank(m, copy, 0, on_bytes=read.append)
    assert sum(read) == sum((copy / rel).stat().st_size for rel, _ in rank_files(m, 0))
    with pytest.raises(ArtifactError, match=rf"{seg.data_file} has sha256 .* modified or truncated"):
        verify_rank(m, copy, 1)
