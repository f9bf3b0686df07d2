"""Train the built-in demo model: a small LLaMA on the Python standard library's own source.

Every machine with Python has the corpus offline. The run is deterministic given `--seed` (and the
same Python stdlib, whose sha256 the model card records, and the same torch build): one CPU thread,
`torch.use_deterministic_algorithms(True)`, a seeded `torch.Generator` for the batches, and a
sentencepiece tokenizer trained single-threaded on the corpus lines in file order.

Writes to `--out` (default `llama_export/demo`): `params.json` + `consolidated.00.pth` (Meta format,
fp16), `tokenizer.model`, and `MODEL_CARD.md` (how it was trained, greedy samples).

    python scripts/train_demo.py              # the committed demo model, ~15 min on one CPU core
    python scripts/train_demo.py --steps 5 --max-corpus-bytes 300000 --out /tmp/demo   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor

from llama_export.config import ModelConfig, meta_ffn_hidden_dim
from llama_export.model.checkpoint import build_model, checkpoint_state
from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params
from llama_export.engine.batch import generate
from llama_export.model.transformer import Transformer
from llama_export.parallel.plan import check_tp

REPO = Path(__file__).resolve().parent.parent

# Directories of the stdlib left out of the corpus: tests (huge, repetitive), vendored or legacy
# trees, generated codec tables and the pydoc topic dump (data rather than code).
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "encodings", "pydoc_data",
     "turtledemo", "ensurepip", "lib-dynload"}
)
SAMPLE_PROMPTS = ("def ", "import os\n", "class ", "    return ", "for i in range(")
BOS_ID, EOS_ID = 1, 2


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the run; the CLI flags are these fields (defaults defined here only)."""

    out: Path = REPO / "llama_export" / "demo"
    seed: int = 0
    steps: int = 900
    max_corpus_bytes: int = 6_000_000
    vocab_size: int = 1536
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    multiple_of: int = 64
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.02
    log_every: int = 25
    sample_tokens: int = 48
    threads: int = 1


# ---- corpus --------------------------------------------------------------------------------------
def collect_corpus(stdlib: Path, max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's `*.py` files in sorted path order, up to `max_bytes`.

    Files are taken whole; collection stops before the first file that would pass the cap."""
    files = sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix())
    corpus, total = [], 0
    for path in files:
        rel = path.relative_to(stdlib)
        dirs = rel.parts[:-1]
        if any(d in SKIP_DIRS or d.startswith("config-") for d in dirs) or rel.name.startswith("_sysconfigdata"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        corpus.append((rel.as_posix(), text))
        total += size
    if not corpus:
        raise SystemExit(f"no stdlib sources under {stdlib} fit --max-corpus-bytes={max_bytes}")
    return corpus


def corpus_sha256(corpus: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in corpus:
        h.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return h.hexdigest()


# ---- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(corpus: list[tuple[str, str]], vocab_size: int) -> bytes:
    """A BPE sentencepiece model (serialized) that round-trips source text exactly.

    sentencepiece trains on lines: newlines never enter the vocabulary and encode through byte
    fallback as `<0x0A>`. Identity normalization, no dummy prefix and kept whitespace preserve
    indentation; whitespace-only pieces let a 4/8/12-space indent be one token. Whitespace is a
    suffix (`def▁`, `return▁`), so a prompt ending in a space ("def ") tokenizes as in the corpus
    instead of ending in a lone `▁` the model has rarely seen."""
    lines = [line for _, text in corpus for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,  # the model never pads (as Meta's LLaMA tokenizer)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        treat_whitespace_as_suffix=True,
        split_digits=True,
        character_coverage=0.9999,
        # Determinism: one thread, lines in corpus order, no sampling of the input.
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    return model.getvalue()


def tokenize(sp: spm.SentencePieceProcessor, corpus: list[tuple[str, str]]) -> Tensor:
    """One int64 stream: `<s> file </s>` for every file, in corpus order."""
    ids = sp.encode([text for _, text in corpus])
    return torch.tensor([t for doc in ids for t in (BOS_ID, *doc, EOS_ID)], dtype=torch.int64)


# ---- model and training --------------------------------------------------------------------------
def model_config(tc: TrainConfig) -> ModelConfig:
    cfg = ModelConfig(
        dim=tc.dim,
        n_layers=tc.n_layers,
        n_heads=tc.n_heads,
        n_kv_heads=tc.n_kv_heads,
        vocab_size=tc.vocab_size,
        hidden_dim=meta_ffn_hidden_dim(tc.dim, tc.multiple_of, None),
        max_seq_len=tc.seq_len,
    )
    for tp in (1, 2, 4):  # the demo must export at every degree the README uses
        check_tp(cfg, tp)
    return cfg


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual projections (wo, w2) scaled by 1/sqrt(2 n_layers); norms 1."""
    resid_std = 0.02 / math.sqrt(2 * len(model.layers))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = resid_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def all_logits(model: Transformer, tokens: Tensor) -> Tensor:
    """Logits at every position `[B, S, vocab]`: `Transformer.forward` without the last-token cut."""
    bsz, seqlen = tokens.shape
    h = model.tok_embeddings(tokens)  # [B, S, dim]
    start = torch.zeros(bsz, dtype=torch.int64)
    lengths = torch.full((bsz,), seqlen, dtype=torch.int64)
    keys, values = model.empty_cache(bsz, seqlen)  # written in place by every layer's attention
    for layer, k, v in zip(model.layers, keys, values):
        h, _, _ = layer(h, model.rope_cos, model.rope_sin, start, lengths, k, v)
    return model.output(model.norm(h))


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(stream: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    batch = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # [B, S+1]
    return batch[:, :-1], batch[:, 1:]


def loss_on(model: Transformer, x: Tensor, y: Tensor) -> Tensor:
    logits = all_logits(model, x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model: Transformer, train_ids: Tensor, val_ids: Tensor, tc: TrainConfig) -> dict[str, float]:
    """AdamW + cosine schedule on random windows; returns final train/val losses."""
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; norm weights are not decayed
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(tc.seed)
    # Fixed validation windows, evenly spaced over the held-out tail.
    n_val = 8
    val_starts = torch.linspace(0, len(val_ids) - tc.seq_len - 2, n_val).long()
    val_x, val_y = windows(val_ids, val_starts, tc.seq_len)

    recent: list[float] = []
    t0 = time.time()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        starts = torch.randint(0, len(train_ids) - tc.seq_len - 1, (tc.batch_size,), generator=gen)
        loss = loss_on(model, *windows(train_ids, starts, tc.seq_len))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        recent = (recent + [loss.item()])[-tc.log_every :]
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            elapsed = time.time() - t0
            tok_s = (step + 1) * tc.batch_size * tc.seq_len / elapsed
            print(
                f"step {step + 1:5d}/{tc.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr_at(step, tc):.2e}  {tok_s:,.0f} tok/s  {elapsed:,.0f} s",
                flush=True,
            )
    with torch.no_grad():
        val_loss = loss_on(model.eval(), val_x, val_y).item()
    return {"train_loss": sum(recent) / len(recent), "val_loss": val_loss, "train_seconds": time.time() - t0}


# ---- sampling ------------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model: Transformer, sp: spm.SentencePieceProcessor, prompt: str, n: int) -> tuple[str, list[float]]:
    """Greedy continuation of `prompt` with the KV cache; also the top-1 minus top-2 logit margins."""
    ids = [BOS_ID, *sp.encode(prompt)]
    n = min(n, model.cfg.max_seq_len - len(ids))
    steps = generate(model.step, torch.tensor([ids]), model.empty_cache(1, len(ids) + n), max_new_tokens=n).steps
    out, margins = [], []
    for s in steps:
        top = torch.from_numpy(s.logits[0]).topk(2)
        margins.append((top.values[0] - top.values[1]).item())
        nxt = int(top.indices[0])
        if nxt == EOS_ID:
            break
        out.append(nxt)
    return prompt + sp.decode(out), margins


# ---- output --------------------------------------------------------------------------------------
def retrain_command(tc: TrainConfig) -> str:
    """The exact command line (every flag spelled out, `--out` relative to the repo when inside it)."""
    args = ["python", "scripts/train_demo.py"]  # from the repo root, llama_export importable
    for f in dataclasses.fields(tc):
        value = getattr(tc, f.name)
        if f.name == "out":
            value = value.resolve()
            value = value.relative_to(REPO) if value.is_relative_to(REPO) else value
        args += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(args)


def write_model_card(path: Path, *, tc: TrainConfig, cfg: ModelConfig, corpus: list[tuple[str, str]],
                     sha: str, n_tokens: int, stats: dict[str, float], wall: float, pth_bytes: int,
                     samples: list[tuple[str, list[float]]]) -> None:
    n_bytes = sum(len(t.encode("utf-8")) for _, t in corpus)
    all_margins = [m for _, ms in samples for m in ms]
    sample_md = "\n\n".join(
        f"Prompt `{json.dumps(SAMPLE_PROMPTS[i])}` (mean margin {sum(ms) / len(ms):.2f}):\n\n```python\n{text}\n```"
        for i, (text, ms) in enumerate(samples)
    )
    card = f"""# Demo model card

A {cfg.num_parameters() / 1e6:.2f}M-parameter LLaMA trained on the Python standard library's own source
by `scripts/train_demo.py`. It is the default model of `python export.py`: its greedy output is
Python-looking text a person can judge, and its greedy tokens win by clear logit margins, so numeric
differences between backends show up as visible token changes rather than ties. It is not a useful
code model.

## Retrain

From the repository root, with `llama_export` importable (`pip install -e '.[cpu]'` or `PYTHONPATH=.`):

```
{retrain_command(tc)}
```

Deterministic given the seed: same Python stdlib (corpus sha256 below), same torch build, one thread
(`torch.set_num_threads({tc.threads})`, `torch.use_deterministic_algorithms(True)`), batches drawn
from a seeded `torch.Generator`. `tests/test_demo_training.py` checks that two short runs agree
bit for bit. A different Python version has a different stdlib and so gives a different model.

## Corpus

- Python {platform.python_version()} stdlib (`sysconfig.get_paths()["stdlib"]`), `*.py` in sorted path order,
  skipping the directories {", ".join(f"`{d}`" for d in sorted(SKIP_DIRS))}, `config-*` and
  `_sysconfigdata*`; whole files up to {tc.max_corpus_bytes:,} bytes.
- {len(corpus)} files, {n_bytes:,} bytes, first `{corpus[0][0]}`, last `{corpus[-1][0]}`.
- sha256 of the (path, text) sequence: `{sha}`.
- {n_tokens:,} tokens; each file is `<s> ... </s>`; the last {tc.val_fraction:.0%} of the stream is held out.

## Tokenizer (`tokenizer.model`)

sentencepiece {spm.__version__} BPE, vocab {cfg.vocab_size}, trained on the corpus lines (single thread,
unshuffled). Byte fallback (newline is `<0x0A>`), identity normalization, whitespace kept, no dummy
prefix, whitespace-only pieces (indents are single tokens), whitespace as a suffix (`def▁`, so a
prompt ending in a space tokenizes as in the corpus), digits split. `<unk>`=0, `<s>`=1,
`</s>`=2, no pad. Decoding reproduces the source text exactly.

## Architecture (`params.json`)

dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} query heads / {cfg.n_kv_heads} KV heads (GQA), head_dim {cfg.head_dim},
SwiGLU hidden {cfg.hidden_dim} (`multiple_of` {tc.multiple_of}), RMSNorm eps {cfg.norm_eps}, RoPE theta
{cfg.rope_theta:g} (Meta interleaved), max_seq_len {cfg.max_seq_len}, untied output. {cfg.num_parameters():,} parameters;
`consolidated.00.pth` holds them in fp16 ({pth_bytes:,} bytes). Valid tensor-parallel degrees include 1, 2
and 4 (KV heads are replicated at tp=4).

## Training

AdamW (betas 0.9/0.95, weight decay {tc.weight_decay} on matrices), lr {tc.lr:g} with {tc.warmup_steps} warmup steps
and cosine decay to {tc.min_lr_ratio:g}x, gradient clip {tc.grad_clip:g}, {tc.steps} steps of {tc.batch_size} random windows of
{tc.seq_len} tokens ({tc.steps * tc.batch_size * tc.seq_len:,} tokens), seed {tc.seed}. fp32 training, fp16 weights saved.

- Final training loss (mean of the last {min(tc.log_every, tc.steps)} steps): {stats["train_loss"]:.3f}
- Held-out loss (8 windows of the tail): {stats["val_loss"]:.3f}
- Training time: {stats["train_seconds"]:,.0f} s; whole run {wall:,.0f} s ({platform.processor() or platform.machine()}, {tc.threads} thread)
- torch {torch.__version__}, sentencepiece {spm.__version__}, Python {platform.python_version()}

## Greedy samples

{tc.sample_tokens} tokens per prompt from the saved files loaded back with `build_model` (fp16 weights, fp32 compute) and decoded with the KV
cache, `<s>` + prompt; margin = top-1 minus top-2 logit, mean over the greedy steps. Mean over all
samples: {sum(all_margins) / len(all_margins):.2f}. A model this small falls into loops under greedy decoding
(repeated lines, runs of one character); they are shown as they come, unselected.

{sample_md}
"""
    path.write_text(card)


# ---- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        kind = Path if f.name == "out" else type(default)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    tc = parse_args(argv)
    wall0 = time.time()
    torch.set_num_threads(tc.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(tc.seed)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = collect_corpus(stdlib, tc.max_corpus_bytes)
    sha = corpus_sha256(corpus)
    print(f"corpus: Python {platform.python_version()} stdlib {stdlib}, {len(corpus)} files, "
          f"{sum(len(t.encode()) for _, t in corpus):,} bytes, sha256 {sha}", flush=True)

    sp_model = train_tokenizer(corpus, tc.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = tokenize(sp, corpus)
    n_val = max(int(len(ids) * tc.val_fraction), 2 * tc.seq_len + 2)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    print(f"tokenizer: vocab {sp.get_piece_size()}, {len(ids):,} tokens "
          f"({sum(len(t.encode()) for _, t in corpus) / len(ids):.2f} bytes/token), {len(val_ids):,} held out",
          flush=True)

    cfg = model_config(tc)
    model = Transformer(cfg)
    init_weights(model)
    print(f"model: {cfg.num_parameters():,} parameters, hidden_dim {cfg.hidden_dim}; training {tc.steps} steps",
          flush=True)
    stats = train(model, train_ids, val_ids, tc)
    print(f"final: train loss {stats['train_loss']:.4f}, held-out loss {stats['val_loss']:.4f}", flush=True)

    out = tc.out
    state = {name: t.detach().to(torch.float16) for name, t in checkpoint_state(model).items()}
    save_meta_checkpoint(out, state, to_meta_params(cfg, multiple_of=tc.multiple_of))
    (out / "tokenizer.model").write_bytes(sp_model)
    pth_bytes = (out / "consolidated.00.pth").stat().st_size
    print(f"saved {out}: consolidated.00.pth {pth_bytes:,} bytes (fp16), params.json, tokenizer.model", flush=True)

    # Check what was written, not the in-memory model: reload through the project's loader.
    loaded = build_model(out)
    samples = [greedy(loaded, sp, prompt, tc.sample_tokens) for prompt in SAMPLE_PROMPTS]
    for text, margins in samples:
        print(f"--- mean margin {sum(margins) / len(margins):.2f} (min {min(margins):.2f})\n{text}", flush=True)
    all_margins = [m for _, ms in samples for m in ms]
    print(f"mean top-1 minus top-2 logit margin over {len(all_margins)} greedy steps: "
          f"{sum(all_margins) / len(all_margins):.3f}", flush=True)
    write_model_card(out / "MODEL_CARD.md", tc=tc, cfg=cfg, corpus=corpus, sha=sha, n_tokens=len(ids),
                     stats=stats, wall=time.time() - wall0, pth_bytes=pth_bytes, samples=samples)
    print(f"wrote {out / 'MODEL_CARD.md'}; total {time.time() - wall0:,.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
