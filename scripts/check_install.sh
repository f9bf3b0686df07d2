#!/usr/bin/env bash
# What pip's resolver would install for the extras, in fresh virtualenvs (dry runs: nothing is installed
# but a stand-in torch). Checks that
#   .[test]  resolves to the CPU set: torch 2.13.0 and onnxruntime 1.32.0 (what CI and the README install)
#   .[gpu]   beside an installed CUDA torch keeps that torch and pulls onnxruntime-gpu, not onnxruntime.
# The CUDA torch is a stand-in: a metadata-only wheel named torch 2.11.0+cu130 (what pip sees of an
# installed torch is its name and version; a real CUDA torch is a multi-GB download).
# Usage: bash scripts/check_install.sh   (about a minute; needs the package index)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
report() {  # the resolved names and versions of a dry run's report, one per line, lower case
    python3 -c 'import json,sys; [print(i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"]]' "$1"
}
fail() { echo "FAIL: $*" >&2; exit 1; }

python3 -m venv "$work/a"
(cd "$root" && "$work/a/bin/pip" install --quiet --dry-run --report "$work/test.json" -e '.[test]' 2>/dev/null)
report "$work/test.json" > "$work/test.txt"
grep -Eq '^torch 2\.13\.0(\+cpu)?$' "$work/test.txt" || fail ".[test] resolves torch to $(grep '^torch ' "$work/test.txt")"
grep -q '^onnxruntime 1.32.0$' "$work/test.txt" || fail ".[test] resolves onnxruntime to $(grep '^onnxruntime ' "$work/test.txt")"
! grep -q '^onnxruntime-gpu ' "$work/test.txt" || fail ".[test] pulls onnxruntime-gpu"
echo "ok: .[test] -> $(grep -E '^(torch|onnxruntime) ' "$work/test.txt" | tr '\n' ' ')"

mkdir -p "$work/fake/torch"
echo '__version__ = "2.11.0+cu130"' > "$work/fake/torch/__init__.py"
printf '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n[project]\nname = "torch"\nversion = "2.11.0+cu130"\n[tool.setuptools]\npackages = ["torch"]\n' > "$work/fake/pyproject.toml"
python3 -m venv "$work/b"
"$work/b/bin/pip" install --quiet --no-deps "$work/fake" 2>/dev/null
(cd "$root" && "$work/b/bin/pip" install --quiet --dry-run --report "$work/gpu.json" -e '.[gpu]' 2>/dev/null)
report "$work/gpu.json" > "$work/gpu.txt"
! grep -q '^torch ' "$work/gpu.txt" || fail ".[gpu] replaces the installed torch 2.11.0+cu130 with $(grep '^torch ' "$work/gpu.txt")"
! grep -q '^onnxruntime ' "$work/gpu.txt" || fail ".[gpu] pulls onnxruntime (CPU) beside onnxruntime-gpu"
grep -q '^onnxruntime-gpu 1.31.1$' "$work/gpu.txt" || fail ".[gpu] does not pull onnxruntime-gpu 1.31.1"
! grep -q '^nvidia-' "$work/gpu.txt" || fail ".[gpu] pulls NVIDIA libraries: $(grep '^nvidia-' "$work/gpu.txt" | tr '\n' ' ')"
echo "ok: .[gpu] beside torch 2.11.0+cu130 keeps it -> $(grep -E '^onnxruntime' "$work/gpu.txt" | tr '\n' ' ')"
