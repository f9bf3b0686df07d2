"""What the benchmarks share: the synthetic model's shape, its random weights, the memory-bandwidth
measurement their decode bounds divide by, running each step or system in its own process (so its peak
RSS is its own: `run_child`/`child_main` for a script's steps, `run_worker` for peers_worker.py), and the
record of a run (`BenchmarkRecord`, `write_record`): every script that prints a final table writes it,
with `--record DIR`, as one JSON file that `benchmarks/report.py` turns into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Bytes per weight a decode step reads, by precision class: fp32, and ggml's 32-weight blocks with an
# fp16 scale (q8_0: 34 bytes, q4_0: 18 bytes per block), the densest layout of each class measured here.
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 34 / 32, "int4": 18 / 32}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--dim --layers --heads --vocab (default: the 134M-parameter model of the benchmarks)."""
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)


def model_config(args, *, max_seq_len: int):
    """MHA, SwiGLU hidden size as Meta derives it with multiple_of 256."""
    from llama_export.config import ModelConfig, meta_ffn_hidden_dim

    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                       vocab_size=args.vocab, hidden_dim=meta_ffn_hidden_dim(args.dim, 256, None),
                       max_seq_len=max_seq_len)


def random_state(cfg, seed: int = 0) -> dict:
    """Random weights by Meta name and layout: N(0, 0.02) matrices, unit norm weights."""
    import torch

    from llama_export.model.checkpoint import expected_shapes

    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s))
            for n, s in expected_shapes(cfg).items()}


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second (read + written) of a large out-of-cache tensor copy, best of `repeats`."""
    import torch

    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes_per_token(cfg, precision: str) -> float:
    """Bytes of weights one decode step reads: every layer projection and the output projection (tied
    or not) at the precision's bytes per weight, norms in fp32, one embedding row in fp32."""
    hd = cfg.head_dim
    layer = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim
    projections = cfg.n_layers * layer + cfg.vocab_size * cfg.dim
    return projections * BYTES_PER_WEIGHT[precision] + (2 * cfg.n_layers + 1 + 1) * cfg.dim * 4


def run_worker(worker: str, model: Path, workload: Path, out: Path, threads: int, *,
               python: str = sys.executable, label: str | None = None) -> dict | None:
    """peers_worker.py WORKER MODEL WORKLOAD OUT in a fresh `python` process; its result, or None (with
    the error's last lines printed) when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([python, str(HERE / "peers_worker.py"), worker, str(model), str(workload), str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {label or worker}: failed ({proc.returncode}): {' | '.join(tail)}", flush=True)
        return None
    return json.loads(Path(out).read_text())


def agreement(ids: list[list[int]], ref: list[list[int]]) -> str:
    """'same/total' greedy ids, and where the first difference is."""
    same = sum(a == b for x, y in zip(ids, ref) for a, b in zip(x, y))
    total = sum(len(y) for y in ref)
    first = next((i for x, y in zip(ids, ref) for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
    return f"{same}/{total}" + ("" if first is None else f" (1st diff @{first})")


def peak_rss(field: str = "VmHWM") -> int:
    """Bytes: VmHWM, this process image's high-water mark (ru_maxrss would also count the parent's
    pages as they were at fork, which exec does not reset); `field="VmRSS"`: its resident set now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child_main(steps: dict[str, Callable[[dict], dict]]) -> bool:
    """In a process `run_child` started (`SCRIPT --child STEP ARGS_JSON`): run steps[STEP](args) and print
    its result, plus `seconds` and `peak_rss` (bytes), as one RESULT line. False in any other process."""
    if len(sys.argv) != 4 or sys.argv[1] != "--child":
        return False
    t0 = time.perf_counter()
    res = steps[sys.argv[2]](json.loads(sys.argv[3]))
    res.update(seconds=time.perf_counter() - t0, peak_rss=peak_rss())
    print("RESULT " + json.dumps(res), flush=True)
    return True


def run_child(script: str, step: str, **args) -> dict:
    """`script --child step args` in a fresh process (the repository on PYTHONPATH); the step's result,
    or exit naming the step after printing the end of its output."""
    proc = subprocess.run([sys.executable, script, "--child", step, json.dumps(args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"step {step} {args} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- the record of a run ---------------------------------------------------------------------------
# One JSON file per recorded run, in benchmarks/results/; docs/benchmarks.md and the README's summary are
# generated from them (`python benchmarks/report.py`). Times are UTC.
RESULTS = HERE / "results"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}Z)?")
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Line = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, pattern=r"^[^\n]*$")]
Cell = str | int | float | bool | None


class ResultTable(BaseModel):
    """Figures as a table: column names and rows of cells (text, numbers, yes/no, or None for none)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    title: str = ""
    columns: list[Line] = Field(min_length=1)
    rows: list[list[Cell]] = Field(min_length=1)

    @model_validator(mode="after")
    def _rows_fit(self) -> ResultTable:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {i} has {len(row)} cells for {len(self.columns)} columns")
            for cell in row:
                if isinstance(cell, str) and "\n" in cell:
                    raise ValueError(f"row {i}: a cell holds a line break: {cell!r}")
        return self


class BenchmarkRecord(BaseModel):
    """One recorded run of one benchmark: when, where, what was run, on what code, and its figures."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    schema_version: Literal[1] = 1
    benchmark: Annotated[str, StringConstraints(pattern=r"^(bench_[a-z0-9_]+\.py|llama-export [a-z]+)$")]
    """The script (`bench_lean.py`, in benchmarks/) or, for figures measured with the tool itself, the
    command (`llama-export plan`)."""
    title: Line
    """What this run measured, in one line."""
    date: str | None
    """When it ran (UTC): `2026-11-30T09:05Z`, or a day `2026-11-30`; None where it was not recorded."""
    date_note: str = ""
    """What is known of the date where `date` is None (required then)."""
    documented: str | None = None
    """Where `date` is None: the day the figures were first written down (an upper bound of the date)."""
    machine: Text
    """The machine and its state: cores, memory, load average, what else was running."""
    command: str | None
    """The exact command line; None where it was not recorded."""
    command_note: str = ""
    """How the command is known, or why it is not (required where `command` is None)."""
    code: str | None
    """The code measured: a git commit (and whether the tree had changes), or a description; None: unknown."""
    summary: str = ""
    """The headline figures in one line, for the summary tables (the newest record that has one is shown)."""
    tables: list[ResultTable] = Field(min_length=1)
    notes: list[Text] = []
    """Conditions and what the figures mean, one markdown paragraph or list item each."""
    source: str = ""
    """Where the figures come from when they were not written by the script (e.g. an earlier document)."""

    @field_validator("date", "documented")
    @classmethod
    def _iso_date(cls, v: str | None) -> str | None:
        if v is not None:
            if not _DATE.fullmatch(v):
                raise ValueError(f"{v!r} is not YYYY-MM-DD or YYYY-MM-DDTHH:MMZ (UTC)")
            datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))  # a real day and time
        return v

    @model_validator(mode="after")
    def _explained(self) -> BenchmarkRecord:
        if self.date is None and not self.date_note.strip():
            raise ValueError("date is null: date_note must say what is known of it")
        if self.command is None and not self.command_note.strip():
            raise ValueError("command is null: command_note must say why")
        if "\n" in self.summary:
            raise ValueError("summary is one line")
        return self

    @property
    def sort_key(self) -> str:
        """Newest first sorts by this, descending; undated records come last."""
        return self.date or ""


def table(columns: Sequence[str], rows: Iterable[Sequence[Cell]], title: str = "") -> ResultTable:
    return ResultTable(title=title, columns=list(columns), rows=[list(r) for r in rows])


def load_record(path: Path) -> BenchmarkRecord:
    """A record file, validated; ValueError naming the file and the field otherwise."""
    try:
        return BenchmarkRecord.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except ValidationError as e:
        raise ValueError(f"{path}: not a valid benchmark record:\n{e}") from None


def load_records(directory: Path = RESULTS) -> dict[str, BenchmarkRecord]:
    """Every `*.json` record in `directory`, by file name."""
    return {p.name: load_record(p) for p in sorted(Path(directory).glob("*.json"))}


def dump_record(record: BenchmarkRecord) -> str:
    """The record as JSON: two-space indentation, one table row per line (diffs stay readable)."""
    data = record.model_dump()
    tables = data.pop("tables")
    notes = data.pop("notes")
    head = json.dumps(data, indent=2, ensure_ascii=False)[:-2]  # without the closing "\n}"
    out = [head + ",", '  "tables": [']
    for i, t in enumerate(tables):
        out.append("    {")
        out.append(f'      "title": {json.dumps(t["title"], ensure_ascii=False)},')
        out.append(f'      "columns": {json.dumps(t["columns"], ensure_ascii=False)},')
        out.append('      "rows": [')
        out.append(",\n".join(f"        {json.dumps(r, ensure_ascii=False)}" for r in t["rows"]))
        out.append("      ]")
        out.append("    }" + ("," if i < len(tables) - 1 else ""))
    out.append("  ],")
    out.append(f'  "notes": {json.dumps(notes, indent=4, ensure_ascii=False)[:-1]}  ]' if notes else '  "notes": []')
    out.append("}")
    return "\n".join(out) + "\n"


def add_record_arguments(ap: argparse.ArgumentParser) -> None:
    """--record DIR (off by default, so that a run writes nothing into the repository) and --record-note."""
    ap.add_argument("--record", type=Path, metavar="DIR", default=None,
                    help="also write this run's figures as a JSON record into DIR (benchmarks/results for the "
                         "recorded runs; then `python benchmarks/report.py` regenerates docs/benchmarks.md)")
    ap.add_argument("--record-note", action="append", default=[], metavar="TEXT",
                    help="a note for the record (e.g. what else ran on the machine); repeatable")


def machine_description(load_at_start: float | None = None) -> str:
    """Cores, memory, CPU model, OS, and the 1-minute load average (at the start, if given, and now)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    loads = f"{load_at_start:.1f} at the start, {load:.1f} at the end" if load_at_start is not None else f"{load:.1f}"
    return (f"{usable} usable cores of {os.cpu_count()} ({cpu}){mem}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average (1 min) {loads}")


def code_state() -> str | None:
    """The checkout's commit, and whether tracked files had changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"commit {head[:12]}" + (" with uncommitted changes" if dirty else "")


def invocation(env: Sequence[str] = ("OMP_NUM_THREADS",)) -> str:
    """This process's command line as one would type it from the repository root (with the environment
    variables in `env` that are set), e.g. `OMP_NUM_THREADS=2 python benchmarks/bench_lean.py --rounds 3`."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    prefix = [f"{k}={shlex.quote(os.environ[k])}" for k in env if k in os.environ]
    return " ".join([*prefix, "python", shlex.join([str(script), *sys.argv[1:]])])


def record_name(record: BenchmarkRecord) -> str:
    """`lean-2026-11-30T09-05`: the script's name without `bench_`, then the date."""
    stem = record.benchmark.removesuffix(".py").removeprefix("bench_").replace("llama-export ", "").replace("_", "-")
    return f"{stem}-{(record.date or 'undated').replace(':', '-').removesuffix('Z')}"


def write_record(directory: Path, *, benchmark: str, title: str, tables: Sequence[ResultTable],
                 summary: str = "", notes: Sequence[str] = (), load_at_start: float | None = None) -> Path:
    """Write this run's record (now, this machine, this command line, this checkout) into `directory`
    as `<name>-<date>.json`; the path written. A script calls it with the figures it has printed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record = BenchmarkRecord(benchmark=benchmark, title=title, date=now.strftime("%Y-%m-%dT%H:%MZ"),
                             machine=machine_description(load_at_start), command=invocation(), code=code_state(),
                             summary=summary, tables=list(tables), notes=[n for n in notes if n.strip()])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = record_name(record)
    path = directory / f"{name}.json"
    n = 2
    while path.exists():
        path = directory / f"{name}-{n}.json"
        n += 1
    path.write_text(dump_record(record), encoding="utf-8")
    print(f"record written: {path}", flush=True)
    return path
