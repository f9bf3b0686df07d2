"""What a newcomer met on the command line that is not an error: output into a closed pipe or a
terminal that cannot show it, `--prompt-ids` without `--json`, `--help`'s defaults, duplicate
variants, and how much an `export` argument error costs. (The errors are cases of
tests/test_error_table.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_export import cli
from tests.helpers import REPO, run_cli


def test_prompt_ids_without_json_prints_the_generated_ids(tmp_path):
    """One row of ids per line, comma-separated as --prompt-ids takes them; the same as --json's."""
    out = tmp_path / "r.json"
    r = run_cli("run", "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    tokens = json.loads(out.read_text())["batches"][0]["tokens"]
    assert len(tokens) == 2 and all(len(row) == 3 for row in tokens)
    assert r.stdout.splitlines() == [",".join(map(str, row)) for row in tokens]


def test_run_json_holds_the_logits_only_when_asked(tmp_path):
    """Every step's full logits (vocabulary floats per row and step) are opt-in: `--logits`."""
    args = ["run", "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "3"]
    assert run_cli(*args, "--json", str(tmp_path / "ids.json")).returncode == 0
    assert run_cli(*args, "--json", str(tmp_path / "all.json"), "--logits").returncode == 0
    (ids,), (full,) = (json.loads((tmp_path / f).read_text())["batches"] for f in ("ids.json", "all.json"))
    assert ids["tokens"] == full["tokens"] and len(ids["steps"]) == len(full["steps"]) == 3
    assert all(set(s) == {"tokens"} for s in ids["steps"])
    assert all(len(s["logits"]) == 2 and len(s["logits"][0]) == 1536 for s in full["steps"])  # demo vocabulary


def test_a_closed_pipe_ends_quietly_like_a_shell_tool():
    """`llama-export run ... | true`: the reader is gone before the first write; no message, not even
    Python's "Exception ignored ... BrokenPipeError" at exit, and 141 = 128 + SIGPIPE."""
    p = subprocess.Popen([sys.executable, "-m", "llama_export.cli", "run", "--prompt", "def ", "--max-new-tokens", "8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    p.stdout.close()  # the read end: the child holds none, so its first write to stdout fails with EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=240) == 141, err
    assert err == ""


def test_text_the_terminal_cannot_show_is_escaped_and_the_json_is_exact(tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("run", "--prompt", "café ", "--max-new-tokens", "4", "--json", str(out),
                env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("caf\\xe9 ")  # the echoed prompt, escaped
    assert json.loads(out.read_text())["batches"][0]["prompt_ids"][0]  # written in full, parsed back


# ---- --help states the defaults the dataclasses define ---------------------------------------------

def _help_defaults(command: str) -> dict[str, str]:
    """option -> the `(default: ...)` its help shows (the last one, whitespace collapsed)."""
    text = cli.build_parser(command)._subparsers._group_actions[0].choices[command].format_help()
    out, option = {}, None
    for line in text.splitlines():
        if m := re.match(r"^  (-\w, )?(--[\w-]+)", line):
            option = m.group(2)
            line = line[m.end():]
        if option is not None:
            out[option] = out.get(option, "") + " " + line.strip()
    return {o: " ".join(found[-1].split()) for o, h in out.items() if (found := re.findall(r"\(default: ([^)]*)\)", h))}


def _expected() -> dict[str, dict[str, str]]:
    from llama_export.backends.tensorrt.build import BuildOptions
    from llama_export.commands.evaluate import EvalOptions
    from llama_export.commands.run import RunOptions
    from llama_export.config import WeightQuant
    from llama_export.engine.generate import SamplingConfig
    from llama_export.export.options import ExportOptions
    from llama_export.validate.settings import VALIDATION, CompareSettings

    s, e, c, q = SamplingConfig(), ExportOptions(checkpoint=Path(".")), CompareSettings(), WeightQuant(bits=4)
    return {
        "run": {"--max-new-tokens": str(RunOptions.max_new_tokens), "--temperature": str(s.temperature),
                "--top-p": str(s.top_p), "--seed": str(s.seed), "--backend": "eager", "--tp": "1",
                "--dtype": str(e.dtype.value), "--device": RunOptions.device},
        "eval": {"--batch": str(EvalOptions.batch), "--device": EvalOptions.device},
        "export": {"--tp": " ".join(map(str, cli.DEMO_TPS)) + " for the built-in demo model, "
                   + " ".join(map(str, cli.CHECKPOINT_TPS)) + " for a --checkpoint",
                   "--steps": str(VALIDATION.steps), "--max-batch": str(e.max_batch), "--out": str(e.out),
                   "--block-size": str(q.block_size), "--dtype": str(e.dtype.value)},
        "compare": {"--steps": str(c.steps), "--seed": str(c.seed), "--backend": "ort"},
        "build": {"--workspace-gib": str(BuildOptions().workspace_gib)},
    }


@pytest.mark.parametrize("command", ["run", "eval", "export", "compare", "plan", "build"])
def test_help_shows_every_default_and_it_is_the_dataclass_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no help line wrapped (argparse breaks at hyphens)
    shown = _help_defaults(command)
    parser = cli.build_parser(command)._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, True, "==SUPPRESS=="):
            option = action.option_strings[-1]
            assert option in shown, f"{command} {option}: its help does not state its default"
            if not (command == "export" and option == "--tp"):
                assert shown[option] == cli._shown(action.default), (command, option)
    for option, want in _expected().get(command, {}).items():
        assert shown.get(option) == want, (command, option, shown.get(option), want)


# ---- export: arguments checked before the heavy imports; each variant once --------------------------

@pytest.mark.parametrize("bad", [["--tp", "0"], ["--max-batch", "0"], ["--dtype", "fp12"], ["--threads", "0"]])
def test_a_bad_export_argument_fails_before_torch_is_imported(bad):
    code = ("import sys\nfrom llama_export import cli\n"
            f"try:\n    cli.main(['export', *{bad!r}])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'onnx_ir' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.split() == ["2", "False", "False"], (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: argument {bad[0]}:"), r.stderr


def test_duplicate_variants_are_exported_once_in_the_order_asked(monkeypatch, tmp_path):
    import llama_export.job as job

    asked = []

    def run_job(base, tps, dtypes, **kwargs):
        asked.append(([*tps], [str(d) for d in dtypes]))
        return []

    monkeypatch.setattr(job, "run_job", run_job)
    monkeypatch.setattr(job, "format_table", lambda reports: "")
    assert cli.main(["export", "--tp", "2", "1", "2", "1", "--dtype", "fp32", "int4", "fp32", "int4",
                     "--out", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--dtype", "fp16", "fp16", "--out", str(tmp_path)]) == 0
    assert asked == [([2, 1], ["fp32", "int4-fp32"]), ([1], ["fp16"])]
