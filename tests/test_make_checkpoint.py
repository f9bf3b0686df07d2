"""scripts/make_checkpoint.py: published layouts, loadable output, one model in both formats.

References: the published Llama-3.1-8B `model.safetensors.index.json` (total size and where the shard
boundaries fall), `safetensors.torch.save_file` (byte-identical files) and `transformers`
(the HF output loads as a LlamaForCausalLM that matches the eager model from the Meta output).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_export.config import ModelConfig, Precision
from llama_export.model.checkpoint import build_model, expected_shapes
from llama_export.model.hf_format import hf_name
from llama_export.tolerances import TOLERANCES

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_checkpoint", REPO / "scripts" / "make_checkpoint.py")
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)

# A tiny tied GQA model with Llama-3.2-style RoPE scaling (factor 32), in both spellings.
TINY_HF = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 132, "tie_word_embeddings": True,
    "max_position_embeddings": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64, "rope_type": "llama3"},
}
TINY_META = {
    "dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 132, "multiple_of": 64,
    "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
    "rope_scaling_factor": 32.0, "max_seq_len": 128,
    "rope_scaling": {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def test_llama_3_1_8b_shards_as_published() -> None:
    cfg = ModelConfig.from_hf_config(mc.PRESETS["llama-3.1-8b"][0])
    shards = mc.hf_shards(cfg, shard_bytes=mc.HF_SHARD_BYTES)
    where = {hf: i + 1 for i, shard in enumerate(shards) for hf, _, _ in shard}
    assert len(shards) == 4
    assert sum(2 * mc._numel(s) for shard in shards for _, _, s in shard) == 16_060_522_496  # index total_size
    # Boundaries of the published weight map: layer 8 ends shard 1; layer 20 is split after gate_proj;
    # layer 31 after up_proj; the last shard holds down_proj of layer 31, the norms and lm_head.
    assert where["model.layers.8.post_attention_layernorm.weight"] == 1
    assert where["model.layers.9.self_attn.q_proj.weight"] == 2
    assert where["model.layers.20.mlp.gate_proj.weight"] == 2 and where["model.layers.20.mlp.up_proj.weight"] == 3
    assert where["model.layers.31.mlp.up_proj.weight"] == 3 and where["model.layers.31.mlp.down_proj.weight"] == 4
    assert where["model.norm.weight"] == 4 and where["lm_head.weight"] == 4


@pytest.mark.parametrize("preset", sorted(mc.PRESETS))
def test_presets_hf_and_meta_describe_one_model(preset: str) -> None:
    hf, params, _ = mc.PRESETS[preset]
    a, b = ModelConfig.from_hf_config(hf), ModelConfig.from_meta_params(params, max_seq_len=131072)
    assert a == ModelConfig(**{**b.to_dict(), "rope_scaling": b.rope_scaling,
                               "tie_word_embeddings": hf["tie_word_embeddings"]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    (root / "config.json").write_text(json.dumps(TINY_HF))
    (root / "params.json").write_text(json.dumps(TINY_META))
    assert mc.main(["--config", str(root / "config.json"), "--out", str(root / "hf"), "--max-shard-bytes",
                    "60000", "--no-progress"]) == 0
    assert mc.main(["--config", str(root / "params.json"), "--format", "meta", "--meta-shards", "2", "--tied",
                    "--out", str(root / "meta"), "--no-progress"]) == 0
    return root


def test_hf_output_loads_with_declared_shapes(tiny: Path) -> None:
    cfg = ModelConfig.from_hf_config(TINY_HF)
    index = json.loads((tiny / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    want = {hf_name(n): s for n, s in expected_shapes(cfg).items() if n != "output.weight"}  # tied: no lm_head
    got, total = {}, 0
    for f in files:
        with safe_open(str(tiny / "hf" / f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                t = h.get_tensor(k)
                assert t.dtype == torch.bfloat16 and index["weight_map"][k] == f
                got[k] = tuple(t.shape)
                total += t.numel() * 2
    assert got == want and index["metadata"]["total_size"] == total


def test_hf_files_are_what_safetensors_writes(tiny: Path, tmp_path: Path) -> None:
    for f in sorted((tiny / "hf").glob("*.safetensors")):
        save_file(load_file(f), tmp_path / "re.safetensors", metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / "re.safetensors").read_bytes(), f.name


def test_meta_output_is_the_same_model_and_matches_transformers(tiny: Path) -> None:
    pieces = [torch.load(f, weights_only=True) for f in sorted((tiny / "meta").glob("consolidated.*.pth"))]
    assert len(pieces) == 2  # Meta's split: the embedding along dim 1, the output along dim 0; tied copies
    assert torch.equal(torch.cat([p["output.weight"] for p in pieces], 0),
                       torch.cat([p["tok_embeddings.weight"] for p in pieces], 1))
    meta, hf = build_model(tiny / "meta"), build_model(tiny / "hf")
    sm, sh = meta.state_dict(), hf.state_dict()
    assert sm.keys() == sh.keys() and all(torch.equal(sm[k], sh[k]) for k in sm)
    w = sm["layers.1.feed_forward.w13.weight"]  # w1 and w3 packed (parallel/plan.py)
    assert abs(w.std().item() - 64**-0.5) < 0.01  # the reserved regions were filled, not left empty

    transformers = pytest.importorskip("transformers")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 132, (2, 100), generator=torch.Generator().manual_seed(0))  # past the original 64
    with torch.no_grad():
        ref = ref_model(tokens).logits[:, -1]
        got, _, _ = meta(tokens, torch.zeros(2, dtype=torch.int64), torch.full((2,), 100), *meta.empty_cache(2, 100))
    assert (ref - got).abs().max().item() < TOLERANCES[Precision.FP32].logits_atol  # same dtype, other kernels


# About 7 MB of bf16 weights: more than the 1 MiB file systems below hold.
BIGGER_HF = {**TINY_HF, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4}
BIGGER_META = {**TINY_META, "dim": 256, "n_layers": 4, "multiple_of": 256}


@pytest.fixture
def small_mount(tmp_path):
    """A 1 MiB tmpfs (and a read-only one), unmounted afterwards."""
    import subprocess

    mounts = []
    for name, options in (("full", "size=1m"), ("ro", "size=1m,ro")):
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.decode().strip()}; needs root)")
        mounts.append(path)
    yield tmp_path
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.mark.parametrize("fmt,config,where,expect", [
    ("hf", BIGGER_HF, "full", "No space left on device"),
    ("meta", BIGGER_META, "full", "No space left on device"),  # written through a memory map: no SIGBUS
    ("hf", BIGGER_HF, "ro", "the file system is read-only"),
])
def test_a_full_or_read_only_destination_is_one_line_and_leaves_nothing(small_mount, fmt, config, where, expect):
    import subprocess
    import sys

    cfg = small_mount / "config.json"
    cfg.write_text(json.dumps(config))
    out = small_mount / where / "ckpt"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_checkpoint.py"), "--config", str(cfg),
                        "--format", fmt, "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert list((small_mount / where).iterdir()) == []  # no checkpoint, no staging folder
