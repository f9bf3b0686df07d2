"""Start-up file verification with and without the records of `artifact.verified` (part of the time to
the first token).

On one existing export directory (read only: records go to a temporary LLAMA_EXPORT_CACHE_DIR), in
rounds that run every setting once, in turn, so the machine's drift hits all alike:

    sha256 only      what every start did before: hash each of the rank's files (`sha256_file` in a loop)
    first start      `verify_rank` with no records: hash, then write the records
    rehash           `verify_rank(rehash=True)` with records present (what `--rehash` costs)
    recorded         `verify_rank` with records: stat each file, read the record file, hash nothing

Reported: the median wall time per setting and its ratio to "sha256 only". With `--cli`, also the wall
time of a whole `llama-export run --backend ort ... --max-new-tokens 1` process with and without
`--rehash` (median, ratio). Files are read from the page cache once the first round has read them
(the cold-disk cost is not measured: dropping the page cache would disturb other work on the machine).

    python benchmarks/bench_verify.py --artifacts graphs/demo/tp1-fp32 [--rank 0 --rounds 7 --cli 3]
                                      [--record benchmarks/results]

--record DIR also writes the figures as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import add_record_arguments, table, write_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True, help="an export directory (not modified)")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cli", type=int, default=0, metavar="ROUNDS", help="also time whole `run` processes")
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    from llama_export.artifact.manifest import load_manifest, rank_files, resolve_inside, sha256_file, verify_rank
    from llama_export.artifact.verified import CACHE_ENV

    m = load_manifest(args.artifacts, verify_hashes=False)
    files = rank_files(m, args.rank)
    size = sum(resolve_inside(args.artifacts, rel).stat().st_size for rel, _ in files)
    print(f"{args.artifacts} rank {args.rank}: {len(files)} files, {size / 2**20:.0f} MiB; {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    cache = Path(tempfile.mkdtemp(prefix="bench_verify_cache."))
    os.environ[CACHE_ENV] = str(cache)

    def sha256_only() -> None:
        for rel, want in files:
            assert sha256_file(resolve_inside(args.artifacts, rel)) == want

    def first_start() -> None:
        shutil.rmtree(cache / "verified", ignore_errors=True)
        verify_rank(m, args.artifacts, args.rank)

    settings = {
        "sha256 only": sha256_only,
        "first start": first_start,
        "rehash": lambda: verify_rank(m, args.artifacts, args.rank, rehash=True),
        "recorded": lambda: verify_rank(m, args.artifacts, args.rank),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    try:
        sha256_only()  # warm the page cache so that no setting pays the first read alone
        for _ in range(args.rounds):
            for name, fn in settings.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        if not list((cache / "verified").glob("*.json")):
            sys.exit("no records were written (files changed within the settle time?); nothing to compare")
        base = statistics.median(times["sha256 only"])
        rows = []
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:12s} median {med * 1e3:9.2f} ms  ({med / base:.4f}x sha256 only; "
                  f"min {min(ts) * 1e3:.2f}, max {max(ts) * 1e3:.2f})")
            rows.append([name, round(med * 1e3, 2), round(med / base, 4), round(min(ts) * 1e3, 2), round(max(ts) * 1e3, 2)])
        tables = [table(["setting", "median ms", "vs sha256 only", "min ms", "max ms"], rows,
                        title=f"`verify_rank`, rank {args.rank}: {len(files)} files, {size / 2**20:.0f} MiB, "
                              f"{args.rounds} rounds (page cache warm)")]
        if args.cli:
            tables.append(_cli(args, m.tp))
        if args.record:
            recorded = statistics.median(times["recorded"])
            write_record(args.record, benchmark="bench_verify.py", tables=tables, notes=args.record_note,
                         load_at_start=load_at_start,
                         title=f"start-up file verification of {args.artifacts} ({size / 2**20:.0f} MiB, rank {args.rank})",
                         summary=f"a start's file verification {base * 1e3:.0f} ms → {recorded * 1e3:.2f} ms with the "
                                 f"records ({size / 2**20:.0f} MiB export)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _cli(args, tp: int):
    """Wall time of whole `run` processes (start to exit, one new token), with and without --rehash."""
    cmd = [sys.executable, "-m", "llama_export.cli", "run", "--backend", "ort", "--artifacts", str(args.artifacts),
           "--tp", str(tp), "--prompt-ids", "1,2,3", "--max-new-tokens", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)  # writes the records
    times: dict[str, list[float]] = {"--rehash": [], "recorded": []}
    for _ in range(args.cli):
        for name, extra in (("--rehash", ["--rehash"]), ("recorded", [])):
            t = time.perf_counter()
            subprocess.run(cmd + extra, check=True, env=env, capture_output=True)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["--rehash"])
    print(f"`run --tp {tp} --max-new-tokens 1` process wall time, {args.cli} rounds:")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:12s} median {med:6.2f} s  ({med / base:.3f}x --rehash; min {min(ts):.2f}, max {max(ts):.2f})")
        rows.append([name, round(med, 2), round(med / base, 3), round(min(ts), 2), round(max(ts), 2)])
    return table(["`run` process", "median s", "vs --rehash", "min s", "max s"], rows,
                 title=f"whole `run --tp {tp} --max-new-tokens 1` processes, {args.cli} rounds")


if __name__ == "__main__":
    main()
