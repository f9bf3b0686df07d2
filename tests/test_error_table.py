"""Every way a user can get it wrong ends in exit 2, one line naming the cause, no traceback, and
earlier results untouched; the table in docs/errors.md is generated from these cases.

Each case prepares its bad input in a scratch folder and drives the CLI as a user would (its own
process per case, see `tests/cli_processes.py`). After every case, every file of the shared workspace
(checkpoints, an earlier export, an earlier --json result, the contents of the full and read-only file
systems) must be byte-identical, and nothing may have been added to it.

    LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest tests/test_error_table.py    rewrites docs/errors.md
    pytest tests/test_error_table.py                                     checks it is current
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_export.export.exporter import ExportOptions, export
from llama_export.model.meta_format import save_meta_checkpoint
from tests.cli_processes import CliProcesses
from tests.helpers import REPO, hf_model_from_meta, random_meta_state, tiny_config, write_hf, write_meta

TABLE = REPO / "docs" / "errors.md"

WRONG = "silently wrong before"
TRACE = "traceback before"
LOST = "lost or left over before"
ALREADY = "one line already"


# ---- the shared workspace ------------------------------------------------------------------------

@dataclass
class Workspace:
    root: Path
    meta: Path
    hf: Path
    export: Path  # graphs/meta/tp1-fp32, an earlier export
    result: Path  # an earlier --json result
    full: Path | None  # a full tmpfs holding an earlier export (None: mounting not permitted)
    ro: Path | None  # a read-only tmpfs
    state: dict = field(default_factory=dict)


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _fill(path: Path) -> None:
    """Fill the file system at `path` to the last byte."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    cfg = tiny_config("mha")
    state = random_meta_state(cfg, seed=3)
    meta = write_meta(root / "meta", cfg, state)
    hf = write_hf(root / "hf", hf_model_from_meta(cfg, state))
    exp = export(ExportOptions(checkpoint=meta, out=root / "graphs", tp=1, progress=False))
    result = root / "results" / "run.json"
    result.parent.mkdir()
    result.write_text(json.dumps({"earlier": "result"}))
    full = root / "full" if _mount(root / "full", "size=2m") else None
    ro = root / "ro" if _mount(root / "ro", "size=1m,ro") else None
    try:
        if full is not None:
            shutil.copytree(exp, full / "meta" / "tp1-fp32")
            _fill(full)
        yield Workspace(root, meta, hf, exp, result, full, ro, {"cfg": cfg, "state": state})
    finally:
        for m in (full, ro):
            if m is not None:
                subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.fixture(scope="module")
def cli():
    c = CliProcesses()
    yield c
    c.close()


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# ---- helpers for making bad inputs ---------------------------------------------------------------

def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


_DELETE = object()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _run(ckpt: Path, *extra: str) -> list[str]:
    return ["run", "--checkpoint", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *extra]


def _run_ort(art: Path, *extra: str) -> list[str]:
    return ["run", "--backend", "ort", "--artifacts", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
            *extra]


def _edited(fmt: str, changes: dict):
    """A copy of the HF ("hf": config.json) or Meta ("meta": params.json) checkpoint with fields changed."""
    def make(w: Workspace, s: Path) -> list[str]:
        c = _copy(getattr(w, fmt), s / fmt)
        _edit_json(c / {"hf": "config.json", "meta": "params.json"}[fmt], **changes)
        return _run(c)
    return make


def hf_config(**changes):
    return _edited("hf", changes)


def meta_params(**changes):
    return _edited("meta", changes)


def raw_file(which: str, data: bytes):
    def make(w: Workspace, s: Path) -> list[str]:
        src = {"config.json": w.hf, "params.json": w.meta}[which]
        c = _copy(src, s / "ckpt")
        (c / which).write_bytes(data)
        return _run(c)
    return make


def manifest(mutate: Callable[[dict], None]):
    def make(w: Workspace, s: Path) -> list[str]:
        c = _copy(w.export, s / "exp")
        d = json.loads((c / "manifest.json").read_text())
        mutate(d)
        (c / "manifest.json").write_text(json.dumps(d))
        return _run_ort(c)
    return make


def meta_weight(dtype: torch.dtype, *, tp: int = 1):
    def make(w: Workspace, s: Path) -> list[str]:
        state = dict(w.state["state"])
        name = "layers.1.feed_forward.w2.weight"
        state[name] = state[name].to(dtype)
        params = json.loads((w.meta / "params.json").read_text())
        save_meta_checkpoint(s / "meta", state, params)
        return _run(s / "meta", "--tp", str(tp))
    return make


def hf_weights(mutate: Callable[[dict], None]):
    def make(w: Workspace, s: Path) -> list[str]:
        c = _copy(w.hf, s / "hf")
        tensors = load_file(c / "model.safetensors")
        mutate(tensors)
        save_file(tensors, c / "model.safetensors", metadata={"format": "pt"})
        return _run(c)
    return make


def argv(*args: str):
    """Arguments with {meta}, {hf}, {export}, {result}, {root}, {scratch} filled in."""
    def make(w: Workspace, s: Path) -> list[str]:
        keys = {"meta": w.meta, "hf": w.hf, "export": w.export, "result": w.result, "root": w.root, "scratch": s}
        return [a.format(**keys) for a in args]
    return make


def then(prepare: Callable[[Workspace, Path], None], make: Callable[[Workspace, Path], list[str]]):
    def both(w: Workspace, s: Path) -> list[str]:
        prepare(w, s)
        return make(w, s)
    return both


def _write(rel: str, data: bytes | str):
    def prepare(w: Workspace, s: Path) -> None:
        p = s / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return prepare


def _garbage_tokenizer(w: Workspace, s: Path) -> list[str]:
    c = _copy(w.meta, s / "meta")
    (c / "tokenizer.model").write_bytes(b"this is not a sentencepiece model\n" * 20)
    return ["run", "--checkpoint", str(c), "--prompt", "def ", "--max-new-tokens", "2"]


def _hf_index(weight_map_file: str):
    def make(w: Workspace, s: Path) -> list[str]:
        c = _copy(w.hf, s / "hf")
        names = list(load_file(c / "model.safetensors"))
        (c / "model.safetensors").rename(c / "part-1.safetensors")
        wm = {n: "part-1.safetensors" for n in names}
        wm[names[0]] = weight_map_file
        (c / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return _run(c)
    return make


def _demo_with(name: str, text: str):
    """The demo model (sentencepiece tokenizer) with one text file replaced."""
    def make(w: Workspace, s: Path) -> list[str]:
        from llama_export.demo import DEMO_DIR

        c = _copy(DEMO_DIR, s / "demo")
        (c / name).write_text(text)
        return ["run", "--checkpoint", str(c), "--prompt", "def ", "--max-new-tokens", "2"]
    return make


def _hf_text_with(**tokenizer_config):
    """The HF checkpoint with Llama 3 style text files (tokenizer.json, ...) and a tokenizer_config.json
    edited; run as a chat."""
    def make(w: Workspace, s: Path) -> list[str]:
        from tests.llama3_text import write_hf_files

        c = _copy(w.hf, s / "hf")
        write_hf_files(c)
        _edit_json(c / "tokenizer_config.json", **tokenizer_config)
        return ["run", "--checkpoint", str(c), "--chat", "hi", "--max-new-tokens", "2"]
    return make


def _truncated(name: str):
    def make(w: Workspace, s: Path) -> list[str]:
        c = _copy(w.meta if name.endswith(".pth") else w.hf, s / "ckpt")
        f = c / name
        f.write_bytes(f.read_bytes()[: max(1000, f.stat().st_size // 2)] if name.endswith(".pth")
                      else f.read_bytes()[:1000])
        return _run(c)
    return make


def _meta_without(name: str):
    def make(w: Workspace, s: Path) -> list[str]:
        state = {k: v for k, v in w.state["state"].items() if k != name}
        write_meta(s / "meta", w.state["cfg"], state)
        return _run(s / "meta")
    return make


def _gguf(*, name: str = "m.gguf", **kwargs):
    """The tiny MHA model as a GGUF (tests/gguf_helpers.write_gguf with `kwargs`), run with --prompt-ids."""
    def make(w: Workspace, s: Path) -> list[str]:
        from tests.gguf_helpers import write_gguf

        return _run(write_gguf(s / name, w.state["cfg"], w.state["state"], **kwargs))
    return make


def _gguf_bytes(edit: Callable[[bytes], bytes]):
    """A GGUF of the tiny model whose bytes `edit` changes."""
    def make(w: Workspace, s: Path) -> list[str]:
        p = Path(_gguf()(w, s)[2])  # _run's arguments: the checkpoint is the third
        p.write_bytes(edit(p.read_bytes()))
        return _run(p)
    return make


def _two_ggufs(w: Workspace, s: Path) -> list[str]:
    _gguf(name="a.gguf")(w, s)
    _gguf(name="b.gguf")(w, s)
    return _run(s)


def _busy_target(w: Workspace, s: Path) -> list[str]:
    """Another process holds the target's lock while the export starts (two exports, one target)."""
    import sys

    # SIGINT ends the holder below; a process started from a background job inherits SIGINT ignored,
    # so the holder installs Python's handler itself.
    code = ("import signal, sys, time; from llama_export import files\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "with files._target_lock(__import__('pathlib').Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(w.export)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    w.state["cleanup"] = holder
    return ["export", "--checkpoint", str(w.meta), "--out", str(w.root / "graphs"), "--tp", "1", "--no-validate",
            "--no-progress"]


def _export(*extra: str) -> Callable[[Workspace, Path], list[str]]:
    return argv("export", "--checkpoint", "{meta}", "--out", "{root}/graphs", "--no-progress", *extra)


# ---- helpers of the newcomer's model / input / output cases ----------------------------------------

def _demo_nan(*args: str):
    """The demo model (it has a tokenizer) with one NaN weight; `args` after `--checkpoint DIR`, with
    {scratch} filled in."""
    def make(w: Workspace, s: Path) -> list[str]:
        from llama_export.demo import DEMO_DIR

        c = _copy(DEMO_DIR, s / "demo")
        state = torch.load(c / "consolidated.00.pth", weights_only=True)
        state["layers.0.feed_forward.w2.weight"][0, 0] = float("nan")
        torch.save(state, c / "consolidated.00.pth")
        (s / "t.txt").write_text("def main():\n    return 1\n")
        return [args[0], "--checkpoint", str(c), *(a.format(scratch=s) for a in args[1:])]
    return make


def _plus(make: Callable[[Workspace, Path], list[str]], *extra: str):
    """`make`'s arguments with `extra` after them."""
    def more(w: Workspace, s: Path) -> list[str]:
        return [*make(w, s), *extra]
    return more


def _set_weight(name: str, value: float):
    def mutate(t: dict) -> None:
        t[name][0, 0] = value
    return mutate


# ---- the cases -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # WRONG / TRACE / LOST: what happened before this issue
    what: str  # the case, as the table says it
    make: Callable[[Workspace, Path], list[str]]  # prepares the input, returns the CLI arguments
    expect: str  # part of the one error line
    fsize: int | None = None  # RLIMIT_FSIZE for the process (bytes)
    needs: str | None = None  # "full" / "ro": a mounted tmpfs; "no-cuda": torch without CUDA
    env: dict[str, str] | None = None  # set in the process's environment


CASES: tuple[Case, ...] = (
    # -- would have been silently wrong --
    Case("hf-fewer-layers", WRONG, "HF config.json names fewer layers than the weights hold",
         hf_config(num_hidden_layers=1), "unexpected ['model.layers.1."),
    Case("hf-float-layers", WRONG, "HF `num_hidden_layers: 2.0` (a float)", hf_config(num_hidden_layers=2.0),
         "num_hidden_layers=2.0 should be a valid integer"),
    Case("hf-bool-layers", WRONG, "HF `num_hidden_layers: true`", hf_config(num_hidden_layers=True),
         "num_hidden_layers=True should be a valid integer"),
    Case("hf-rope-theta-0", WRONG, "HF `rope_theta: 0` (NaN logits)",
         hf_config(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta=0 should be greater than 1"),
    Case("hf-eps-negative", WRONG, "HF `rms_norm_eps: -1`", hf_config(rms_norm_eps=-1),
         "rms_norm_eps=-1 should be greater than 0"),
    Case("hf-gelu", WRONG, "HF `hidden_act: gelu`", hf_config(hidden_act="gelu"), "hidden_act='gelu' should be 'silu'"),
    Case("hf-bias", WRONG, "HF `attention_bias: true`", hf_config(attention_bias=True),
         "attention_bias=True should be False"),
    Case("meta-theta-0", WRONG, "Meta `rope_theta: 0`", meta_params(rope_theta=0), "rope_theta=0 should be greater than 1"),
    Case("meta-eps-nan", WRONG, "Meta `norm_eps: NaN`", meta_params(norm_eps=float("nan")),
         "norm_eps=nan should be a finite number"),
    Case("meta-int64-weight", WRONG, "Meta .pth weight of int64", meta_weight(torch.int64), "has dtype int64"),
    Case("meta-bool-weight", WRONG, "Meta .pth weight of bool", meta_weight(torch.bool), "has dtype bool"),
    Case("meta-fp8-weight", WRONG, "Meta .pth weight of fp8 (e4m3, no scales)", meta_weight(torch.float8_e4m3fn),
         "has dtype float8_e4m3fn"),
    Case("hf-int-weight", WRONG, "HF safetensors weight of int32",
         hf_weights(lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.int32))),
         "has dtype I32"),
    Case("hf-extra-tensor", WRONG, "HF safetensors with a tensor the config does not know",
         hf_weights(lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64))),
         "unexpected ['model.layers.0.self_attn.q_proj.bias']"),
    # -- tracebacks before: malformed values --
    Case("hf-string", TRACE, "HF `hidden_size: \"64\"` (a string)", hf_config(hidden_size="64"),
         "hidden_size='64' should be a valid integer"),
    Case("hf-null", TRACE, "HF `vocab_size: null`", hf_config(vocab_size=None), "vocab_size=None should be a valid integer"),
    Case("hf-list", TRACE, "HF `intermediate_size: [176]`", hf_config(intermediate_size=[176]),
         "intermediate_size=[176] should be a valid integer"),
    Case("hf-missing", TRACE, "HF config.json without `hidden_size`", hf_config(hidden_size=_DELETE),
         "lacks the required field 'hidden_size'"),
    Case("hf-huge", TRACE, "HF `num_hidden_layers: 10**20`", hf_config(num_hidden_layers=10**20),
         "should be less than or equal to 1024"),
    Case("hf-zero-context", TRACE, "HF `max_position_embeddings: 0`", hf_config(max_position_embeddings=0),
         "max_position_embeddings=0 should be greater than or equal to 2"),
    Case("hf-rope-yarn", TRACE, "HF rope_type yarn (unsupported)",
         hf_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type='yarn'"),
    Case("hf-llama3-incomplete", TRACE, "HF llama3 RoPE scaling without its factors",
         hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
         "rope_type 'llama3' needs low_freq_factor"),
    Case("hf-not-utf8", TRACE, "config.json that is not UTF-8", raw_file("config.json", b'{"hidden_size": "\xff"}'),
         "is not valid JSON"),
    Case("hf-truncated", TRACE, "config.json cut short", raw_file("config.json", b'{"hidden_size": 64, "num_hid'),
         "is not valid JSON"),
    Case("hf-top-list", TRACE, "config.json holding a list", raw_file("config.json", b"[1, 2]"),
         "the top level should be an object"),
    Case("hf-index-escape", TRACE, "safetensors index pointing outside the checkpoint",
         _hf_index("../elsewhere.safetensors"), "should match pattern"),
    Case("meta-string", TRACE, "Meta `dim: \"64\"`", meta_params(dim="64"), "dim='64' should be a valid integer"),
    Case("meta-zero-heads", TRACE, "Meta `n_heads: 0`", meta_params(n_heads=0), "n_heads=0 should be greater than or equal to 1"),
    Case("meta-vocab-minus-1", TRACE, "Meta `vocab_size: -1` (LLaMA 1)", meta_params(vocab_size=-1), "LLaMA 1 wrote -1"),
    Case("meta-gqa", TRACE, "Meta `n_kv_heads: 3` with 4 heads", meta_params(n_kv_heads=3),
         "n_heads=4 is not divisible by n_kv_heads=3"),
    Case("meta-not-utf8", TRACE, "params.json that is not UTF-8", raw_file("params.json", b'{"dim": 64, "x": "\xfe"}'),
         "is not valid JSON"),
    Case("manifest-string-tp", TRACE, "manifest `tp: \"1\"`", manifest(lambda d: d.__setitem__("tp", "1")),
         "tp='1' should be a valid integer"),
    Case("manifest-null-dim", TRACE, "manifest `model.dim: null`", manifest(lambda d: d["model"].__setitem__("dim", None)),
         "model.dim=None should be a valid integer"),
    Case("manifest-ranks", TRACE, "manifest `ranks: {}`", manifest(lambda d: d.__setitem__("ranks", {})),
         "ranks={} should be a valid array"),
    Case("manifest-kind", TRACE, "manifest segment of an unknown kind",
         manifest(lambda d: d["ranks"][0]["segments"][0].__setitem__("kind", "moe")), "kind='moe' should be"),
    Case("manifest-sha", TRACE, "manifest sha256 that is not a hash",
         manifest(lambda d: d["ranks"][0]["segments"][0].__setitem__("sha256", "xyz")), "segments[0].sha256='xyz' should match pattern"),
    Case("manifest-name", TRACE, "manifest model_name that is a path",
         manifest(lambda d: d.__setitem__("model_name", "../../etc")), "model_name='../../etc' must be one folder name"),
    Case("manifest-variant", TRACE, "manifest variant that contradicts tp/dtype",
         manifest(lambda d: d.__setitem__("variant", "tp2-fp16")), "does not match tp=1"),
    Case("manifest-layer", TRACE, "manifest segment layer past the model's layers",
         manifest(lambda d: d["ranks"][0]["segments"][0].__setitem__("layer", 7)), "layer=7 but the model has n_layers=2"),
    Case("generation-eos-string", TRACE, "generation_config.json `eos_token_id: \"2\"`",
         _demo_with("generation_config.json", '{"eos_token_id": "2"}'), "eos_token_id='2' must be a token id"),
    Case("generation-not-json", TRACE, "generation_config.json that is not JSON",
         _demo_with("generation_config.json", "{eos_token_id: 2}"), "generation_config.json is not valid JSON"),
    Case("tokenizer-config-template", TRACE, "tokenizer_config.json `chat_template: 5`",
         _hf_text_with(chat_template=5), "chat_template=5 must be a string or a list of {name, template}"),
    Case("tokenizer-config-token", TRACE, "tokenizer_config.json `eos_token: [\"</s>\"]`",
         _hf_text_with(eos_token=["</s>"]), "eos_token=['</s>'] must be a string or {\"content\": ...}"),
    Case("tokenizer-garbage", TRACE, "a tokenizer.model that is not one", _garbage_tokenizer,
         "is not a tokenizer this tool reads"),
    Case("batch-dir", TRACE, "`--batch` naming a folder",
         argv("run", "--checkpoint", "{meta}", "--batch", "{scratch}"), "cannot read it (Is a directory)"),
    Case("batch-binary", TRACE, "`--batch` file that is not UTF-8",
         then(_write("p.txt", b"\xff\xfe\x00"), argv("run", "--checkpoint", "{meta}", "--batch", "{scratch}/p.txt")),
         "is not UTF-8 text"),
    Case("device-cuda", TRACE, "`--device cuda` where torch has no CUDA", argv(*_run(Path("{meta}")), "--device", "cuda"),
         "sees no CUDA device", needs="no-cuda"),
    Case("device-bogus", TRACE, "`--device tpu:0`", argv(*_run(Path("{meta}")), "--device", "tpu:0"), "is not a device"),
    Case("model-unknown", ALREADY, "`--model gpt5` (no model of that name)", argv("export", "--model", "gpt5"),
         "no model is called 'gpt5'; use one of demo, smollm2"),
    Case("temperature-nan", TRACE, "`--temperature nan`", argv(*_run(Path("{meta}")), "--temperature", "nan"),
         "argument --temperature: nan is outside [0, 1000]"),
    Case("top-p-zero", TRACE, "`--top-p 0`", argv(*_run(Path("{meta}")), "--top-p", "0"), "0 is outside (0, 1]"),
    Case("seed-2-64", TRACE, "`--seed 2**64`", argv(*_run(Path("{meta}")), "--seed", str(2**64)),
         "argument --seed: 18446744073709551616 is outside"),
    Case("new-tokens-2-63", TRACE, "`--max-new-tokens 2**63`", argv(*_run(Path("{meta}"))[:-1], str(2**63)),
         "argument --max-new-tokens: 9223372036854775808 is outside"),
    Case("prompt-id-2-63", TRACE, "`--prompt-ids` with an id of 2**63",
         argv("run", "--checkpoint", "{meta}", "--prompt-ids", f"1,{2**63}"), "is not a token id"),
    Case("tp-2-63", TRACE, "`--tp 2**63`", argv(*_run(Path("{meta}")), "--tp", str(2**63)), "argument --tp:"),
    Case("compare-steps-0", TRACE, "`compare --steps 0`",
         argv("compare", "--artifacts", "{export}", "--checkpoint", "{meta}", "--steps", "0"),
         "argument --steps: 0 is outside"),
    Case("compare-steps-context", TRACE, "`compare --steps` past the context",
         argv("compare", "--artifacts", "{export}", "--checkpoint", "{meta}", "--steps", "100"),
         "need 109 positions but the context is max_seq_len=64"),
    Case("export-steps-context", TRACE, "`export --steps` past the context (checked before exporting)",
         _export("--steps", "60"), "need 66 positions but the context is max_seq_len=64"),
    Case("export-max-batch-0", TRACE, "`export --max-batch 0`", _export("--max-batch", "0"), "argument --max-batch"),
    Case("export-out-file", TRACE, "`export --out` that is a file", argv("export", "--checkpoint", "{meta}", "--out",
         "{result}", "--no-progress"), "is a file, not a folder"),
    Case("json-dir", TRACE, "`--json` naming a folder", argv(*_run(Path("{meta}")), "--json", "{root}/results"),
         "is a folder; give a file name"),
    Case("json-under-file", TRACE, "`--json` inside a file", argv(*_run(Path("{meta}")), "--json", "{result}/x.json"),
         "is a file, not a folder"),
    Case("json-too-big", TRACE, "`--json` larger than `ulimit -f` allows (EFBIG)",
         argv(*_run(Path("{meta}")), "--json", "{result}", "--logits"), "File too large", fsize=2000),
    Case("json-full", TRACE, "`--json` on a full disk", argv(*_run(Path("{meta}")), "--json", "{root}/full/r.json"),
         "No space left on device", needs="full"),
    Case("json-read-only", TRACE, "`--json` on a read-only file system",
         argv(*_run(Path("{meta}")), "--json", "{root}/ro/r.json"), "the file system is read-only", needs="ro"),
    Case("export-read-only", TRACE, "`export --out` on a read-only file system",
         argv("export", "--checkpoint", "{meta}", "--out", "{root}/ro", "--no-progress"),
         "the file system is read-only", needs="ro"),
    Case("compare-plot-read-only", TRACE, "`compare --plot` on a read-only file system (checked before comparing)",
         argv("compare", "--artifacts", "{export}", "--checkpoint", "{meta}", "--plot", "{root}/ro/p.png"),
         "the file system is read-only", needs="ro"),
    Case("tp2-rank-weights", TRACE, "TP=2: both ranks find an int64 weight (one line, not a gloo traceback)",
         meta_weight(torch.int64, tp=2), "of 2: layers.1.feed_forward.w2.weight"),
    # -- one line already (kept here so that they stay one line) --
    Case("no-checkpoint", ALREADY, "`--checkpoint` that does not exist", argv(*_run(Path("{scratch}/nope"))),
         "does not exist"),
    Case("not-a-checkpoint", ALREADY, "`--checkpoint` of a folder without params.json/config.json",
         then(_write("x.txt", "hi"), argv(*_run(Path("{scratch}")))), "neither params.json"),
    Case("pth-truncated", ALREADY, "a truncated consolidated.00.pth", _truncated("consolidated.00.pth"),
         "truncated or corrupt"),
    Case("safetensors-truncated", ALREADY, "a truncated model.safetensors", _truncated("model.safetensors"),
         "truncated or corrupt"),
    Case("meta-missing-tensor", ALREADY, "a Meta checkpoint missing a tensor",
         _meta_without("layers.1.feed_forward.w2.weight"), "missing ['layers.1.feed_forward.w2.weight']"),
    Case("meta-shape", ALREADY, "params.json whose dim does not match the weights", meta_params(dim=128),
         "params.json implies"),
    Case("hf-shape", ALREADY, "config.json whose intermediate_size does not match the weights",
         hf_config(intermediate_size=200), "config.json implies"),
    Case("tp-3", ALREADY, "`--tp 3` for 4 heads", argv(*_run(Path("{meta}")), "--tp", "3"), "valid tp: 1, 2, 4"),
    Case("token-outside-vocab", ALREADY, "`--prompt-ids` with an id outside the vocabulary",
         argv("run", "--checkpoint", "{meta}", "--prompt-ids", "1,2,101"), "token id 101 is outside the vocabulary [0, 101)"),
    Case("beyond-context", ALREADY, "prompt + `--max-new-tokens` beyond the context",
         argv(*_run(Path("{meta}"))[:-1], "62"), "exceeds the context limit max_seq_len=64"),
    # -- GGUF checkpoints --
    Case("gguf-not-gguf", ALREADY, "`--checkpoint` a .gguf file that is not a GGUF",
         then(_write("m.gguf", "hello"), argv(*_run(Path("{scratch}/m.gguf")))), "is not a GGUF file"),
    Case("gguf-truncated", ALREADY, "a truncated GGUF", _gguf_bytes(lambda b: b[: len(b) - 1000]),
         "the GGUF is truncated"),
    Case("gguf-header-cut", ALREADY, "a GGUF cut inside its header", _gguf_bytes(lambda b: b[:200]),
         "truncated or corrupt"),
    Case("gguf-other-arch", ALREADY, "a GGUF of another architecture (general.architecture)",
         _gguf(metadata={"general.architecture": "qwen2"}), "this tool reads LLaMA-family GGUFs"),
    Case("gguf-unsupported-type", ALREADY, "a GGUF weight of a type this tool does not dequantize (IQ4_NL)",
         _gguf(tensor=lambda n, a: (np.zeros((a.shape[0], a.shape[1] // 32 * 18), np.uint8), "IQ4_NL")
               if n == "blk.0.ffn_up.weight" and a.shape[1] % 32 == 0 else (a, "F32")), "which this tool does not dequantize"),
    Case("gguf-missing-tensor", ALREADY, "a GGUF missing a tensor", _gguf(skip_tensors=("blk.1.ffn_down.weight",)),
         "missing ['blk.1.ffn_down.weight']"),
    Case("gguf-shape", ALREADY, "a GGUF whose llama.feed_forward_length does not match the weights",
         _gguf(metadata={"llama.feed_forward_length": 200}), "the llama.* metadata implies"),
    Case("gguf-missing-key", ALREADY, "a GGUF without llama.block_count", _gguf(skip=("llama.block_count",)),
         "lacks the required field 'llama.block_count'"),
    Case("gguf-two-files", ALREADY, "`--checkpoint` a folder holding two .gguf files", _two_ggufs,
         "holds 2 GGUF files (a.gguf, b.gguf)"),
    # -- lost or left over before --
    Case("export-full", LOST, "`export` onto a full disk: no partial folder, the earlier export there intact",
         argv("export", "--checkpoint", "{meta}", "--out", "{root}/full", "--name", "meta", "--tp", "1",
              "--no-progress", "--no-validate"), "No space left on device", needs="full"),
    Case("export-busy", LOST, "two exports to one target: the second is refused, not raced", _busy_target,
         "is being written by another llama-export process"),
    # -- what a newcomer hit on a fresh clone: the command line (argv, output, help, environment) --
    Case("logits-without-json", ALREADY, "`run --logits` without `--json` (the logits go into the JSON file)",
         argv("run", "--checkpoint", "{meta}", "--prompt-ids", "1,2", "--logits"), "--logits goes into the --json"),
    Case("prompt-not-utf8", TRACE, "`--prompt` with bytes that are not UTF-8",
         argv("run", "--checkpoint", "{meta}", "--prompt", "def \udcff"), "argument --prompt: is not valid UTF-8"),
    Case("chat-not-utf8", TRACE, "`--chat` with bytes that are not UTF-8",
         argv("run", "--checkpoint", "{meta}", "--chat", "\udce9t\udce9"), "argument --chat: is not valid UTF-8"),
    Case("system-not-utf8", TRACE, "`--system` with bytes that are not UTF-8",
         argv("run", "--checkpoint", "{meta}", "--chat", "hi", "--system", "\udcc3"), "argument --system: is not valid UTF-8"),
    Case("threads-above-cores", WRONG, "`--threads 100000`, more than this process's cores (ran 50x slower)",
         argv(*_run(Path("{meta}")), "--threads", "100000"), "cores this process may use; use at most"),
    Case("stale-rank-env", WRONG, "`RANK=1 WORLD_SIZE=2` left in the shell (waited 46 s, blamed another rank)",
         argv(*_run(Path("{meta}"))), "unset RANK and WORLD_SIZE", env={"RANK": "1", "WORLD_SIZE": "2"}),
    Case("plan-no-tp-fits", WRONG, "`plan --memory-limit` below what any TP degree needs (suggested a larger --tp)",
         argv("plan", "--config", "{hf}/config.json", "--memory-limit", "1GiB", "--no-progress"), "no valid --tp fits"),
    Case("build-beyond-gpu-memory", TRACE, "`build` of engines whose prefill profile and KV cache do not fit the "
         "GPU (out of device memory inside TensorRT)",
         argv("build", "--artifacts", "{export}", "--out", "{scratch}/engines", "--gpu-memory", "1MiB"),
         "use --max-seq-len"),
    Case("json-onto-manifest", LOST, "`--json` onto the export's manifest.json",
         argv(*_run_ort(Path("{export}")), "--json", "{export}/manifest.json"), "which this command reads"),
    Case("json-onto-config", LOST, "`--json` onto the checkpoint's config.json",
         argv(*_run(Path("{hf}")), "--json", "{hf}/config.json"), "which this command reads"),
    Case("json-onto-params", LOST, "`--json` onto the checkpoint's params.json",
         argv(*_run(Path("{meta}")), "--json", "{meta}/params.json"), "which this command reads"),
    Case("json-in-export", LOST, "`--json` into the export folder being run",
         argv(*_run_ort(Path("{export}")), "--json", "{export}/run.json"), "lies inside"),
    Case("json-onto-batch", LOST, "`--json` onto the `--batch` prompts file",
         then(_write("p.txt", "def \n"), argv("run", "--checkpoint", "{meta}", "--batch", "{scratch}/p.txt", "--json",
                                             "{scratch}/p.txt")), "p.txt, which this command reads"),
    Case("eval-json-onto-text", LOST, "`eval --json` onto the `--text` file",
         then(_write("t.txt", "def f(x):\n    return x\n"), argv("eval", "--checkpoint", "{meta}", "--text",
                                                                  "{scratch}/t.txt", "--json", "{scratch}/t.txt")),
         "t.txt, which this command reads"),
    Case("compare-json-in-export", LOST, "`compare --json` into the export being compared",
         argv("compare", "--artifacts", "{export}", "--checkpoint", "{meta}", "--json", "{export}/cmp.json"),
         "lies inside"),
    # -- what a newcomer hit on a fresh clone: the model, its inputs and its outputs --
    Case("eager-artifacts", WRONG, "`run --backend eager --artifacts EXPORT` (ran the demo model)",
         argv("run", "--backend", "eager", "--artifacts", "{export}", "--prompt-ids", "1,2,3"),
         "--backend eager runs a checkpoint, not the export"),
    Case("eval-eager-artifacts", WRONG, "`eval --backend eager --artifacts EXPORT` (scored the demo model)",
         then(_write("t.txt", "def f():\n"), argv("eval", "--artifacts", "{export}", "--text", "{scratch}/t.txt")),
         "--backend eager runs a checkpoint, not the export"),
    Case("ort-checkpoint", WRONG, "`run --backend ort --artifacts EXPORT --checkpoint CKPT` (ignored the checkpoint)",
         argv(*_run_ort(Path("{export}")), "--checkpoint", "{meta}"), "drop --checkpoint"),
    Case("nan-weights-run", WRONG, "a NaN weight: `run` printed token 0 again and again, exit 0",
         hf_weights(_set_weight("model.layers.0.mlp.down_proj.weight", float("nan"))),
         "non-finite logits (NaN or Inf) in the prefill of request 0"),
    Case("nan-weights-json", WRONG, "a NaN weight: `run --json` wrote bare NaN (invalid JSON)",
         _demo_nan("run", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json", "{scratch}/r.json"),
         "non-finite logits (NaN or Inf) in the prefill"),
    Case("fp16-overflow", WRONG, "a weight past fp16's range run with `--dtype fp16` (Inf logits)",
         _plus(hf_weights(_set_weight("model.layers.1.mlp.down_proj.weight", 1e6)), "--dtype", "fp16"),
         "or fp16 overflowed"),
    Case("nan-weights-eval", WRONG, "a NaN weight: `eval` reported perplexity nan, exit 0",
         _demo_nan("eval", "--text", "{scratch}/t.txt", "--no-progress"),
         "non-finite logits (NaN or Inf) in scoring request 0, predicting its continuation's token 1"),
    Case("batch-blank-line", WRONG, "a blank line in a `--batch` file (dropped, later rows renumbered)",
         then(_write("p.txt", "def f():\n\nclass A:\n"), argv("run", "--checkpoint", "{meta}", "--batch", "{scratch}/p.txt")),
         "p.txt: line 2 is blank"),
    Case("batch-trailing-blank", WRONG, "an empty line after the final newline of a `--batch` file",
         then(_write("p.txt", "def f():\nclass A:\n\n"), argv("run", "--checkpoint", "{meta}", "--batch", "{scratch}/p.txt")),
         "p.txt: line 3 is blank"),
    Case("batch-10mb-line", WRONG, "a 10 MB line in a `--batch` file (18 s and 1.7 GiB before it was refused)",
         then(_write("p.txt", "x" * 10_000_000 + "\n"), argv("run", "--batch", "{scratch}/p.txt")),
         "so at least 625,000 tokens) exceeds the context limit max_seq_len=256"),
    Case("eval-text-binary", ALREADY, "an `eval --text` file that is not UTF-8",
         then(_write("t.txt", b"def \xff\n"), argv("eval", "--text", "{scratch}/t.txt")), "t.txt is not UTF-8 text (byte 4)"),
)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def _normalize(line: str, w: Workspace, scratch: Path) -> str:
    line = line.replace(str(scratch), "<scratch>").replace(str(w.root), "<ws>")
    line = re.sub(r"pid \d+", "pid <n>", line)
    line = re.sub(r"the \d+ cores this process may use; use at most \d+", "the <n> cores this process may use; "
                  "use at most <n>", line)
    return re.sub(r"rank \d+ of (\d+): ", r"rank <r> of \1: ", line)  # ranks failing alike: either is named


_RESULTS: dict[str, tuple[int, str]] = {}
_WRITING = os.environ.get("LLAMA_EXPORT_WRITE_ERROR_TABLE") == "1"
_FAULTS_MARKER = "\n## Faults"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, ws: Workspace, cli: CliProcesses, tmp_path: Path):
    if case.needs == "full" and ws.full is None or case.needs == "ro" and ws.ro is None:
        pytest.skip("mounting a tmpfs is not permitted here (needs root); the EFBIG case covers a full disk")
    if case.needs == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    before = _snapshot(ws.root)
    try:
        args = case.make(ws, tmp_path)
        r = cli.run(*args, fsize=case.fsize, env=case.env)
    finally:
        holder = ws.state.pop("cleanup", None)
        if holder is not None:
            holder.send_signal(signal.SIGINT)  # its lock's `finally` removes the lock file
            holder.wait(timeout=30)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = _one_line(r.stderr)
    assert line.startswith("error: "), line
    assert case.expect in line, line
    assert _snapshot(ws.root) == before, "the workspace changed"
    _RESULTS[case.id] = (r.returncode, _normalize(line, ws, tmp_path))
    if not _WRITING:  # this case's row of the committed table is what it printed
        assert _committed_rows()[case.id] == _row(case, *_RESULTS[case.id]), (
            f"docs/errors.md is out of date for {case.id}: LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest "
            "tests/test_error_table.py")


def test_there_are_enough_cases_of_every_kind():
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} == {WRONG, TRACE, LOST, ALREADY}
    assert len({c.id for c in CASES}) == len(CASES)


def render_table(results: dict[str, tuple[int, str]]) -> str:
    head = ["# What a user sees when something is wrong", "",
            "Generated by `tests/test_error_table.py` (`LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest "
            "tests/test_error_table.py` rewrites it; the test fails when it is out of date). Every case runs "
            "the CLI in its own process and asserts exit code 2, exactly one line on stderr, no traceback, and "
            "that every earlier file of the workspace (checkpoints, an earlier export, an earlier `--json` "
            "result, a full and a read-only file system) is byte-identical afterwards. `<ws>` is that "
            "workspace, `<scratch>` the case's own folder.", "",
            "Signals and dying ranks are covered by `tests/test_faults.py` (see the end of this page).", "",
            "| before | case | exit | message |", "| --- | --- | --- | --- |"]
    return "\n".join(head + [_row(c, *results.get(c.id, (None, None))) for c in CASES]) + "\n"


def _row(case: Case, code: int | None, line: str | None) -> str:
    """The case's row of the table (`line` None: the case could not run here)."""
    if line is None:
        line, code = "(skipped here: needs a tmpfs mount)", "-"
    return f"| {case.kind} | {case.what} | {code} | `{line.replace('|', '/')}` |"


def _table_rows() -> list[str]:
    """The case rows of the committed docs/errors.md, in order."""
    head = (TABLE.read_text() if TABLE.is_file() else "").partition(_FAULTS_MARKER)[0]
    return [ln for ln in head.splitlines() if ln.startswith("| ") and not ln.startswith(("| before", "| ---"))]


def _committed_rows() -> dict[str, str]:
    """Case id -> its row in the committed docs/errors.md (rows are in CASES order, one per case)."""
    return dict(zip([c.id for c in CASES], _table_rows()))


def test_table_is_current():
    """The committed table has one row per case, in CASES order, each for that case (each case checks
    that its row holds what it printed). With LLAMA_EXPORT_WRITE_ERROR_TABLE=1 it is rewritten from a
    run of the whole module instead."""
    committed = TABLE.read_text() if TABLE.is_file() else ""
    if _WRITING:
        if len(_RESULTS) < len(CASES):
            pytest.fail("write the table from a run of the whole module where every case ran (as root, without CUDA)")
        tail = committed.partition(_FAULTS_MARKER)[2]
        TABLE.write_text(render_table(_RESULTS) + (_FAULTS_MARKER + tail if tail else ""))
        return
    assert len(_table_rows()) == len(CASES), \
        "docs/errors.md needs a row per case: LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest tests/test_error_table.py"
    rows = _committed_rows()
    stale = [c.id for c in CASES if not rows[c.id].startswith(f"| {c.kind} | {c.what} | ")]
    assert not stale, (f"docs/errors.md is out of date for {stale}: "
                       "LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest tests/test_error_table.py")
