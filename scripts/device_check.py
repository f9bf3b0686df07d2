#!/usr/bin/env python3
"""The device check: every GPU path this project has, in one command, one line per check.

On a GPU machine, from the repository root (a fresh machine: the working tree and a PyPI mirror):

    pip install -e '.[gpu]' && python scripts/device_check.py --log docs/device-runs/$(date +%F)-h100.log

`.[gpu]` keeps a CUDA torch already installed (docs/gpu.md); on a machine without one it installs
PyPI's (a CUDA build on Linux). Each line is `PASS|FAIL|SKIP  <check>: <figures or reason>`:

    doctor          `llama-export doctor`'s lines (versions, GPUs, providers, TensorRT, NCCL), as INFO
    eager-<dtype>   the eager model on CUDA in fp32 / fp16 / bf16 against the CPU fp32 reference: a
                    ragged batch (rows of 24, 17 and 9 tokens), its prefill and 8 teacher-forced decode
                    steps, max abs error of the logits (CROSS_DTYPE_LOGITS_ATOL) and top-1 agreement
    eager-speed     decode tok/s of a ~0.9B config in each dtype on CUDA (figures; fails only on error)
    kernels         scripts/gpu_check_trt.py --quick: the Triton kernels and their AOT PTX vs the torch
                    references (needs triton, which a CUDA torch brings)
    ort-cuda-<dt>   `llama-export compare --backend ort --device cuda` on fp16 and fp32 exports of a tiny
                    GQA model: every segment and the logits against eager at the dtype's tolerance.
                    Without onnxruntime-gpu, onnxruntime-gpu==1.31.1 is installed from the package index
                    into a folder of its own (nothing else changes) and used for these two checks
    tp2-refused     `run --tp 2 --device cuda` with one GPU visible: exit 2 and the one-GPU-per-rank line
    tensorrt        where `import tensorrt` works: build the fp16 export's engines and compare them with
                    eager; else SKIP (its wheels fetch NVIDIA's libraries from NVIDIA's index, which a
                    machine with only a PyPI mirror cannot reach)

Exit 0 when nothing failed, 1 when a check failed, 2 without a GPU. Budget: about 5 minutes on an H100
(the ORT and TensorRT steps run the CLI in subprocesses, each with a time limit).
`--cpu` runs the same checks on the CPU where they can run there (a check of this script, not of a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT_GPU = "onnxruntime-gpu==1.31.1"
ONE_GPU_LINE = "needs one GPU per rank"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: int = 0
    log: Path | None = None

    def say(self, status: str, name: str, text: str) -> None:
        """One line: PASS / FAIL / SKIP / INFO, the check's name, its figures or reason."""
        line = f"{status:<5} {name:<14} {' '.join(text.split())}"
        if status == "FAIL":
            self.failed += 1
        self.lines.append(line)
        print(line, flush=True)
        if self.log is not None:
            with self.log.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    def run(self, name: str, check) -> None:
        """`check()` -> (status, text); an exception is a FAIL naming it."""
        t0 = time.perf_counter()
        try:
            status, text = check()
        except Exception as e:  # noqa: BLE001 - any error of a check is that check's failure
            status, text = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.say(status, name, f"{text} [{time.perf_counter() - t0:.1f} s]")


def _cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_export.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---- eager ---------------------------------------------------------------------------------------

def _tiny_model(dtype, device):
    import torch

    from llama_export.config import ModelConfig, RopeScaling
    from llama_export.model.transformer import Transformer

    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=1001, hidden_dim=688,
                      max_seq_len=256, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    torch.manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.to(device=device, dtype=dtype).eval()


def _ragged_logits(model, rows: list[list[int]], forced: list, steps: int):
    """Logits (fp32, CPU) of a ragged prefill of `rows` and `steps` decode steps fed `forced[i]`."""
    import numpy as np
    import torch

    from llama_export.engine.generate import pad_prompts

    ids, lengths = pad_prompts(rows)
    keys, values = model.empty_cache(len(rows), int(lengths.max()) + steps + 1)
    logits, keys, values = model.step(ids, np.zeros_like(lengths), lengths, keys, values)
    out, cached = [logits.float().cpu()], lengths.copy()
    for i in range(steps):
        logits, keys, values = model.step(forced[i][:, None], cached, np.ones_like(lengths), keys, values)
        out.append(logits.float().cpu())
        cached = cached + 1
    return torch.stack(out)


def eager_checks(rep: Report, device: str) -> None:
    import torch

    from llama_export.config import Precision
    from llama_export.tolerances import CROSS_DTYPE_LOGITS_ATOL

    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 1001, (n,), generator=g).tolist() for n in (24, 17, 9)]
    steps = 8
    ref_model = _tiny_model(torch.float32, "cpu")
    # greedy tokens of the reference, fed to every dtype (teacher forcing keeps them on one sequence)
    forced, probe = [], _ragged_logits(ref_model, rows, [], 0)[0]
    for i in range(steps):
        forced.append(probe.argmax(-1).numpy())
        probe = _ragged_logits(ref_model, rows, forced, i + 1)[-1]
    ref = _ragged_logits(ref_model, rows, forced, steps)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name, dt in dtypes.items():
        def check(name=name, dt=dt):
            got = _ragged_logits(_tiny_model(dt, device), rows, forced, steps)
            err = (got - ref).abs().max().item()
            agree = got.argmax(-1) == ref.argmax(-1)
            tol = CROSS_DTYPE_LOGITS_ATOL[Precision(name)]
            # where the reference's best token leads by more than 2 tol, the logits' error cannot swap it:
            # a disagreement there is a failure; elsewhere a near-tie may go either way in a low precision
            top2 = ref.topk(2, dim=-1).values
            decisive = (top2[..., 0] - top2[..., 1]) > 2 * tol
            ok = err <= tol and bool(agree[decisive].all())
            return ("PASS" if ok else "FAIL",
                    f"{device} vs cpu fp32, ragged 24/17/9 + {steps} steps: max abs {err:.2e} (tol {tol:.0e}), "
                    f"top-1 {agree.float().mean().item():.3f} ({int(decisive.sum())} of {agree.numel()} decisive: "
                    f"{agree[decisive].float().mean().item():.3f})")
        rep.run(f"eager-{name}", check)


def eager_speed(rep: Report, device: str) -> None:
    import numpy as np
    import torch

    from llama_export.config import ModelConfig
    from llama_export.model.transformer import Transformer

    def check():
        cfg = ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                          max_seq_len=512)
        figures = []
        for name, dt in {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.items():
            model = Transformer(cfg).to(device=device, dtype=dt).eval()
            ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 128))
            best = 0.0
            for _ in range(2):  # the first round warms up
                keys, values = model.empty_cache(1, 128 + 33)
                logits, keys, values = model.step(ids, np.zeros(1, np.int64), np.full(1, 128), keys, values)
                cur, cached = logits.argmax(-1).cpu().numpy()[:, None], np.full(1, 128)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(32):
                    logits, keys, values = model.step(cur, cached, np.ones(1, np.int64), keys, values)
                    cur, cached = logits.argmax(-1).cpu().numpy()[:, None], cached + 1
                best = max(best, 32 / (time.perf_counter() - t0))
            figures.append(f"{name} {best:.1f}")
            del model, keys, values
            if device == "cuda":
                torch.cuda.empty_cache()
        return "PASS", f"{cfg.num_parameters() / 1e9:.2f}B, batch 1, decode tok/s: " + ", ".join(figures)
    rep.run("eager-speed", check)


# ---- Triton kernels ------------------------------------------------------------------------------

def kernel_check(rep: Report) -> None:
    def check():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "kernels.json"
            r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_trt.py"), "--quick", "--json",
                                str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            if r.returncode == 2:
                return "SKIP", _last_line(r.stdout + r.stderr)
            rows = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
            bad = [row.get("check") for row in rows if not row.get("ok")]
            summary = f"{len(rows) - len(bad)}/{len(rows)} kernel checks passed"
            if r.returncode == 0:
                return "PASS", summary
            return "FAIL", summary + (f"; first failure: {bad[0]}" if bad else f"; {_last_line(r.stdout + r.stderr)}")
    rep.run("kernels", check)


# ---- ONNX Runtime on CUDA ------------------------------------------------------------------------

def _ort_env(rep: Report, device: str, work: Path) -> dict | None:
    """Environment for subprocesses that import an onnxruntime with the CUDA provider: the installed one,
    or onnxruntime-gpu installed into a folder of its own first on PYTHONPATH; None (and a SKIP/FAIL
    line) when there is none."""
    probe = "import onnxruntime as o; print(o.__version__, ' '.join(o.get_available_providers()))"
    have = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if device == "cpu" or (have.returncode == 0 and "CUDAExecutionProvider" in have.stdout):
        return {}
    target = work / "ort-gpu"
    t0 = time.perf_counter()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          ORT_GPU], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        rep.say("FAIL", "ort-install", f"pip install {ORT_GPU} failed: {_last_line(pip.stderr)}")
        return None
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    have = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    rep.say("PASS" if have.returncode == 0 else "FAIL", "ort-install",
            f"{ORT_GPU} into {target}: {have.stdout.strip() or _last_line(have.stderr)} "
            f"[{time.perf_counter() - t0:.1f} s]")
    return env if have.returncode == 0 else None


def _tiny_exports(work: Path) -> dict[str, Path]:
    """(dtype -> export folder) of a tiny GQA checkpoint written here: fp16 and fp32, TP=1."""
    import torch

    from llama_export.config import ModelConfig, RopeScaling
    from llama_export.model.checkpoint import expected_shapes
    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=503, hidden_dim=352,
                      max_seq_len=128, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
    g = torch.Generator().manual_seed(3)
    state = {n: (1 + 0.1 * torch.randn(s, generator=g)) if n.endswith("norm.weight")
             else torch.randn(s, generator=g) / s[-1] ** 0.5 for n, s in expected_shapes(cfg).items()}
    ckpt = work / "ckpt"
    save_meta_checkpoint(ckpt, state, to_meta_params(cfg, multiple_of=16))  # 16: hidden_dim 352 from dim 128
    out = {}
    for dt in ("fp16", "fp32"):
        r = _cli("export", "--checkpoint", str(ckpt), "--name", "tiny", "--tp", "1", "--dtype", dt, "--out",
                 str(work / "graphs"), "--no-progress", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"export {dt} failed: {_last_line(r.stderr)}")
        out[dt] = work / "graphs" / "tiny" / f"tp1-{dt}"
    return out


def ort_checks(rep: Report, device: str, work: Path, exports: dict[str, Path]) -> None:
    env = _ort_env(rep, device, work)
    for dt, path in exports.items():
        def check(dt=dt, path=path):
            if env is None:
                return "SKIP", "no onnxruntime with the CUDA provider"
            js = work / f"compare-ort-{dt}.json"
            r = _cli("compare", "--backend", "ort", "--device", device, "--artifacts", str(path), "--checkpoint",
                     str(work / "ckpt"), "--json", str(js), env=env, timeout=300)
            if not js.is_file():
                return "FAIL", f"exit {r.returncode}: {_last_line(r.stderr)}"
            doc = json.loads(js.read_text())
            worst = max((d.get("max_abs") or float("inf")) for d in doc["logits"]) if doc["logits"] else float("nan")
            text = (f"{device}, {len(doc['segments'])} segments: logits max abs {worst:.2e} (tol {doc['tolerance']}), "
                    f"greedy agreement {doc['greedy_agreement']}")
            if dt == "fp32" and device == "cuda":
                text += " (fp32 GroupQueryAttention runs on the CPU provider)"
            return ("PASS" if doc["pass"] and r.returncode == 0 else "FAIL"), text
        rep.run(f"ort-{device}-{dt}", check)


# ---- ranks and TensorRT --------------------------------------------------------------------------

def tp2_refused(rep: Report) -> None:
    def check():
        r = _cli("run", "--backend", "eager", "--tp", "2", "--device", "cuda", "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "1", env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=120)
        line = _last_line(r.stderr)
        ok = r.returncode == 2 and ONE_GPU_LINE in line and r.stderr.count("\n") == 1
        return ("PASS" if ok else "FAIL"), f"exit {r.returncode}: {line}"
    rep.run("tp2-refused", check)


def tensorrt_check(rep: Report, work: Path, exports: dict[str, Path]) -> None:
    def check():
        probe = subprocess.run([sys.executable, "-c", "import tensorrt as t; print(t.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return "SKIP", (f"TensorRT is not importable ({_last_line(probe.stderr)}): its wheels fetch NVIDIA's "
                            "libraries from NVIDIA's index, which a machine with a PyPI mirror only cannot reach")
        engines = work / "engines"
        r = _cli("build", "--artifacts", str(exports["fp16"]), "--out", str(engines), timeout=420)
        if r.returncode != 0:
            return "FAIL", f"TensorRT {probe.stdout.strip()}: build exit {r.returncode}: {_last_line(r.stderr)}"
        js = work / "compare-trt.json"
        r = _cli("compare", "--backend", "trt", "--device", "cuda", "--artifacts", str(engines), "--checkpoint",
                 str(work / "ckpt"), "--json", str(js), timeout=300)
        if not js.is_file():
            return "FAIL", f"compare exit {r.returncode}: {_last_line(r.stderr)}"
        doc = json.loads(js.read_text())
        worst = max((d.get("max_abs") or float("inf")) for d in doc["logits"])
        return ("PASS" if doc["pass"] else "FAIL"), (f"TensorRT {probe.stdout.strip()}, fp16 engines vs eager: "
                                                    f"logits max abs {worst:.2e}, greedy {doc['greedy_agreement']}")
    rep.run("tensorrt", check)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, help="also append every line to this file")
    ap.add_argument("--cpu", action="store_true", help="run what can run on the CPU (checks this script)")
    args = ap.parse_args(argv)
    rep = Report(log=args.log)
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        rep.say("SKIP", "device", f"no GPU: torch {torch.__version__} sees no CUDA device (use --cpu to check "
                "this script on a CPU)")
        return 2
    start = time.perf_counter()
    doctor = _cli("doctor", timeout=120)
    for line in doctor.stdout.splitlines():
        rep.say("INFO", "doctor", line)
    eager_checks(rep, device)
    if device == "cuda":
        eager_speed(rep, device)
        kernel_check(rep)
    else:
        rep.say("SKIP", "eager-speed", "--cpu")
        rep.say("SKIP", "kernels", "--cpu (the interpreter runs them in tests/tensorrt/test_kernels_interpret.py)")
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        exports = {}
        try:
            exports = _tiny_exports(work)
        except Exception as e:  # noqa: BLE001 - reported as the failure of the exports these checks need
            rep.say("FAIL", "export", f"{type(e).__name__}: {e}")
        if exports:
            ort_checks(rep, device, work, exports)
        if device == "cuda":
            tp2_refused(rep)
            if exports:
                tensorrt_check(rep, work, exports)
        else:
            rep.say("SKIP", "tp2-refused", "--cpu")
            rep.say("SKIP", "tensorrt", "--cpu")
    rep.say("FAIL" if rep.failed else "PASS", "all", f"{rep.failed} check(s) failed, "
            f"{time.perf_counter() - start:.0f} s in all")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
