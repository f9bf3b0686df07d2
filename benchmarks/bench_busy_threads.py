"""Decode speed on a busy machine: threads per rank = all cores (torch's default before --threads) vs
fewer, and the default (`runner.threads.rank_threads`: the cores not busy at start), with another process
spinning on one core, and without it.

One invocation builds a synthetic fp32 checkpoint, then runs `llama-export run --backend eager --tp 1`
(greedy, batch 1) in rounds; each round runs every (competitor, --threads) setting once, in turn, so
that the machine's drift hits all settings alike. Reported: median decode tokens/s per setting over
the rounds, and ratios against `--threads <cores>` in the same competitor condition. The competitor
is a Python busy loop pinned to core 0 (os.sched_setaffinity).

    python benchmarks/bench_busy_threads.py [--rounds 5 --dim 512 --layers 8 --new 64] [--record DIR]

--record DIR also writes the table as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    add_model_arguments,
    add_record_arguments,
    model_config,
    random_state,
    table,
    write_record,
)

_SPIN = "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"


def decode_tok_s(ckpt: Path, threads: int | None, prompt: str, new: int, out: Path) -> float:
    flag = ["--threads", str(threads)] if threads is not None else []
    subprocess.run([sys.executable, "-m", "llama_export.cli", "run", "--checkpoint", str(ckpt), "--prompt-ids",
                    prompt, "--max-new-tokens", str(new), *flag, "--json", str(out)],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    (batch,) = json.loads(out.read_text())["batches"]
    return (new - 1) / batch["decode_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.set_defaults(dim=512, layers=8, heads=8, vocab=8000)  # 35M parameters: quick rounds
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    cores = len(os.sched_getaffinity(0))
    settings: list[int | None] = [*sorted({cores, max(1, cores - 1), 1}, reverse=True), None]
    cfg = model_config(args, max_seq_len=args.prompt + args.new + 8)
    print(f"model: {cfg.num_parameters() / 1e6:.0f}M parameters fp32; batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens; {cores} cores; {args.rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[bool, int | None], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_meta_checkpoint(root / "ckpt", random_state(cfg), to_meta_params(cfg, multiple_of=256))
        prompt = ",".join(str(i % cfg.vocab_size) for i in range(1, args.prompt + 1))
        for _ in range(args.rounds):
            for busy in (False, True):
                spinner = subprocess.Popen([sys.executable, "-c", _SPIN]) if busy else None
                try:
                    for threads in settings:
                        results.setdefault((busy, threads), []).append(
                            decode_tok_s(root / "ckpt", threads, prompt, args.new, root / "r.json"))
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
    print(f"\n{'competitor':<22} {'--threads':>9} {'decode tok/s (median)':>22} {'vs --threads ' + str(cores):>18}")
    rows = []
    for busy in (False, True):
        base = statistics.median(results[(busy, cores)])
        for threads in settings:
            med = statistics.median(results[(busy, threads)])
            label = "one core spinning" if busy else "none"
            print(f"{label:<22} {threads if threads is not None else 'default':>9} {med:22.1f} {med / base:17.2f}x")
            rows.append([label, str(threads) if threads is not None else "default", round(med, 1),
                         f"{med / base:.2f}x"])
    if args.record:
        default = [r for r in rows if r[1] == "default"]
        write_record(args.record, benchmark="bench_busy_threads.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"{cfg.num_parameters() / 1e6:.0f}M fp32 model, TP=1 eager decode by --threads, with and "
                           "without a core spinning",
                     summary=f"default threads: {default[0][3]} of `--threads {cores}` ({default[1][3]} with a core "
                             "spinning)",
                     tables=[table(["competitor", "--threads", "decode tok/s (median)", f"vs --threads {cores}"], rows,
                                   title=f"{args.rounds} interleaved rounds; prompt {args.prompt} -> {args.new} new; "
                                         f"{cores} cores")])


if __name__ == "__main__":
    main()
