#!/usr/bin/env python3
"""Eager model on a CUDA GPU (fp32 / fp16 / bf16) against the CPU fp32 reference, plus timings.

One prepared check for a lent GPU machine (torch with CUDA; nothing else needed):

    PYTHONPATH=. python scripts/gpu_check_eager.py [--json report.json]

Prints, per dtype, the max abs / cosine / top-1 agreement of the final logits over a prefill and 8
teacher-forced decode steps (tiny GQA model with Llama-3.1 RoPE scaling), then prefill latency and
decode tokens/s of a ~0.5B-parameter config per dtype, as ratios to fp32. Exit 1 if a tolerance fails,
2 if no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from llama_export.config import ModelConfig, Precision, RopeScaling
from llama_export.model.transformer import Transformer
from llama_export.tolerances import CROSS_DTYPE_LOGITS_ATOL

DEVICE = "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.to(device=device, dtype=dtype).eval()


def _step(model: Transformer, tokens: torch.Tensor, cached: int, keys, values):
    """One forward of an unpadded batch after `cached` tokens (graph contract v2); returns the cache too."""
    b, s = tokens.shape
    lengths = torch.full((b,), s, dtype=torch.int64, device=tokens.device)
    logits, keys, values = model(tokens, torch.full_like(lengths, cached), lengths, keys, values)
    return logits, keys, values, cached + s


def _forced(model: Transformer, prompt: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    keys, values = model.empty_cache(prompt.shape[0], prompt.shape[1] + len(tokens) + 1)
    out, cur, cached = [], prompt, 0
    with torch.inference_mode():
        for nxt in [None, *tokens]:
            if nxt is not None:
                cur = nxt.unsqueeze(1)
            logits, keys, values, cached = _step(model, cur, cached, keys, values)
            out.append(logits.float().cpu())
    return out


def accuracy(report: dict) -> bool:
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=1001, hidden_dim=688,
                      max_seq_len=256, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    ref_model = _model(cfg, torch.float32, "cpu")
    # Reference greedy tokens (teacher forcing keeps all dtypes on the same sequence).
    keys, values = ref_model.empty_cache(2, prompt.shape[1] + 8)
    forced, cur, cached = [], prompt, 0
    with torch.inference_mode():
        for _ in range(8):
            logits, keys, values, cached = _step(ref_model, cur, cached, keys, values)
            cur = logits.argmax(-1, keepdim=True)
            forced.append(cur[:, 0])
    ref = _forced(ref_model, prompt, forced[:-1])
    ok = True
    for name, dt in DTYPES.items():
        got = _forced(_model(cfg, dt, DEVICE), prompt.to(DEVICE), [t.to(DEVICE) for t in forced[:-1]])
        err = max((a - b).abs().max().item() for a, b in zip(got, ref))
        cos = min(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
                  for a, b in zip(got, ref))
        top1 = sum((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(got, ref)) / len(ref)
        tol = CROSS_DTYPE_LOGITS_ATOL[Precision(name)]  # a cross-dtype comparison: against CPU fp32
        passed = err <= tol and top1 == 1.0
        ok &= passed
        report["accuracy"][name] = {"max_abs": err, "min_cosine": cos, "top1": top1, "tolerance": tol,
                                    "pass": passed}
        print(f"eager cuda {name:4} vs cpu fp32: max abs {err:.3e} (tol {tol:.0e}) cosine {cos:.6f} "
              f"top-1 {top1:.3f} {'PASS' if passed else 'FAIL'}")
    return ok


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timings(report: dict, quick: bool) -> None:
    cfg = ModelConfig(dim=2048, n_layers=8 if quick else 16, n_heads=16, n_kv_heads=4, vocab_size=32000,
                      hidden_dim=5632, max_seq_len=512)
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), device=DEVICE)
    base = None
    print(f"timing config: {cfg.num_parameters() / 1e6:.0f}M parameters, batch 1, prompt 128, 64 new tokens")
    for name, dt in DTYPES.items():
        model = _model(cfg, dt, DEVICE)
        with torch.inference_mode():
            for _ in range(2):  # warm-up
                _step(model, prompt, 0, *model.empty_cache(1, 128 + 64))
            _sync()
            t0 = time.perf_counter()
            logits, keys, values, cached = _step(model, prompt, 0, *model.empty_cache(1, 128 + 64))
            _sync()
            prefill = time.perf_counter() - t0
            cur = logits.argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(64):
                logits, keys, values, cached = _step(model, cur, cached, keys, values)
                cur = logits.argmax(-1, keepdim=True)
            _sync()
            decode_tps = 64 / (time.perf_counter() - t0)
        base = base or (prefill, decode_tps)
        report["timings"][name] = {"prefill_ms": prefill * 1e3, "decode_tok_s": decode_tps}
        print(f"eager cuda {name:4}: prefill {prefill * 1e3:7.2f} ms ({base[0] / prefill:.2f}x fp32), "
              f"decode {decode_tps:7.1f} tok/s ({decode_tps / base[1]:.2f}x fp32)")
        del model
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--quick", action="store_true", help="smaller timing model")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run the accuracy part on the CPU (script check)")
    args = ap.parse_args()
    if args.dry_run_cpu:
        global DEVICE
        DEVICE = "cpu"
        return 0 if accuracy({"accuracy": {}}) else 1
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False")
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "accuracy": {}, "timings": {}}
    print(f"device: {report['device']}, torch {torch.__version__}")
    ok = accuracy(report)
    timings(report, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
