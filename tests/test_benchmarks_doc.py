"""docs/benchmarks.md (and README.md's summary table) are generated from the benchmark records, and
the records are what the schema says: the measurements cannot drift from the documentation.

Cheap: no benchmark runs. `python benchmarks/report.py` regenerates the files when this fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


report = _module("benchmarks_report", BENCH / "report.py")  # puts benchmarks/ on sys.path for bench_common
bench_common = sys.modules["bench_common"]
RECORDS = sorted((BENCH / "results").glob("*.json"))
# Words of the team's own bookkeeping, not of the tool: "issue 13", "this stop", "run M", "a helper's job".
# ("session" alone is ONNX Runtime's; "stop" alone is a stop token.)
INTERNAL = re.compile(r"(?i:\bissues? \d+|\bissue's\b|\b(this|previous|last|next) stop\b|\bstop's\b|"
                      r"\bhelper's\b|\bthis session\b)|\b[Rr]uns? [A-M](-[A-M])?\b")


def test_benchmarks_doc_is_what_the_records_generate():
    records = bench_common.load_records()
    doc = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert doc == report.render_doc(records), "docs/benchmarks.md is stale: run `python benchmarks/report.py`"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == report.splice_readme(readme, records), \
        "README.md's benchmark summary is stale: run `python benchmarks/report.py`"
    assert report.main(["--check"]) == 0


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_record_is_valid(path: Path):
    record = bench_common.load_record(path)
    assert record.benchmark in {s.benchmark for s in report.SECTIONS}
    if record.benchmark.endswith(".py"):
        assert (BENCH / record.benchmark).is_file()
    stem = bench_common.record_name(record).rsplit("-" + (record.date or "undated").split("-")[0], 1)[0]
    assert path.name.startswith(stem + "-"), f"{path.name}: name it after what it is ({stem}-<date>...)"
    text = path.read_text(encoding="utf-8")
    assert not INTERNAL.search(text), f"{path.name}: internal vocabulary {INTERNAL.search(text).group(0)!r}"


def test_there_are_records_and_every_section_has_its_description():
    assert len(RECORDS) >= 10
    for s in report.SECTIONS:
        assert (BENCH / "about" / f"{s.slug}.md").is_file(), s.slug


def test_user_facing_text_has_no_internal_vocabulary():
    """The README, docs/, and the benchmarks' and scripts' docstrings and --help texts."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((BENCH / "about").glob("*.md")),
                 *sorted(BENCH.glob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]:
        m = INTERNAL.search(path.read_text(encoding="utf-8"))
        assert m is None, f"{path.relative_to(ROOT)}: {m.group(0)!r}"


def test_a_written_record_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / "bench_generate.py"), "--tp", "1", "--record", str(tmp_path)])
    t = bench_common.table(["system", "decode tok/s", "ok"], [["ours | ORT", 56.0, True], ["eager", 24, None]],
                           title="a tiny fake table")
    path = bench_common.write_record(tmp_path, benchmark="bench_generate.py", title="a fake run", tables=[t],
                                     summary="56 tok/s", notes=["a note"], load_at_start=1.5)
    assert path.parent == tmp_path and path.name.startswith("generate-")
    again = bench_common.write_record(tmp_path, benchmark="bench_generate.py", title="a fake run", tables=[t])
    assert again != path  # two runs in the same minute get two files

    record = bench_common.load_record(path)
    assert record.tables == [t] and record.notes == ["a note"] and record.summary == "56 tok/s"
    assert record.command == "python benchmarks/bench_generate.py --tp 1 --record " + str(tmp_path)
    assert "load average (1 min) 1.5 at the start" in record.machine
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ", record.date)
    assert bench_common.load_record(path) == bench_common.BenchmarkRecord.model_validate_json(
        bench_common.dump_record(record))

    text = "\n".join(report.render_record(path.name, record))
    assert "| ours \\| ORT | 56.0 | yes |" in text and "| eager | 24 | — |" in text
    assert "*a tiny fake table*" in text and "a note" in text and f"`{record.command}`" in text

    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    shutil.copy(path, results / path.name)
    records = bench_common.load_records(results)
    doc = report.render_doc(records)
    newest, undated = doc.index("UTC: a fake run"), doc.index("Date not recorded: 134M fp32 model, prompt 128")
    assert newest < undated  # newest first
    assert report.main(["--check", "--results", str(results)]) == 1  # the committed doc lacks it


@pytest.mark.parametrize("change, message", [
    ({"tables": [{"title": "", "columns": ["a", "b"], "rows": [[1]]}]}, "row 0 has 1 cells for 2 columns"),
    ({"date": "2026-11-30 09:05"}, "is not YYYY-MM-DD"),
    ({"date": "2026-02-30"}, "day is out of range"),
    ({"date": None}, "date_note must say"),
    ({"command": None, "command_note": ""}, "command_note must say"),
    ({"benchmark": "lean"}, "benchmark"),
    ({"load": 1.0}, "Extra inputs are not permitted"),
    ({"tables": []}, "at least 1 item"),
])
def test_bad_records_are_refused(tmp_path, change, message):
    good = json.loads((BENCH / "results" / "lean-2026-11-30T09-05.json").read_text(encoding="utf-8"))
    bench_common.BenchmarkRecord.model_validate(good)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**good, **change}), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_common.load_record(path)
