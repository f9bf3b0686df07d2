"""One segment, checked on its own with Polygraphy: its feeds and eager's reference outputs, saved.

`llama-export compare --polygraphy DIR` hands the prefill step of every rank and segment to a
`SegmentDump`, which writes (with Polygraphy's own `save_json` and `RunResults.save`):

    DIR/rank<r>/<segment>.inputs.json    [{input name: array}]: what the segment was fed   --load-inputs
    DIR/rank<r>/<segment>.eager.json     RunResults, runner "eager": eager's values of the  --load-outputs
                                         segment outputs eager computes (the tensor handed to the
                                         collective after the segment, the KV cache, the logits);
                                         other outputs (residual streams) are not compared
    DIR/rank<r>/<segment>.ort.onnx       the segment lowered for ONNX Runtime (standard ops only)
    DIR/rank<r>/<segment>.trt.onnx       the segment lowered for TensorRT (plugin nodes)
    DIR/trt_network.py                   Polygraphy network script: TensorRT parses $LLAMA_EXPORT_SEGMENT
                                         with the llama_export plugins registered
    DIR/commands.txt                     the polygraphy command for every segment, with the dtype's
                                         divergence threshold as --atol / --rtol

    polygraphy run DIR/rank0/01_layers.0.attention.ort.onnx --onnxrt \\
        --load-inputs DIR/rank0/01_layers.0.attention.inputs.json \\
        --load-outputs DIR/rank0/01_layers.0.attention.eager.json --atol 1e-4 --rtol 1e-4

The feeds are the backend's own inputs for that segment; at the first segment `compare` reports as
diverging they still agree with eager, which is where checking a segment alone says most. The lowered
graphs are written only when the segment ONNX files are at hand (an export directory, not an engine
directory) and copy the segment's weights. Arrays are numpy, or torch tensors for bf16 (numpy has no
bf16). The caller stages the directory (`files.staged_dir`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir
import torch
from torch import Tensor

from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest, Segment, resolve_inside
from llama_export.tolerances import TOLERANCES

log = logging.getLogger(__name__)
_polygraphy_lock = threading.Lock()

RUNNER = "eager"

_NETWORK_SCRIPT = '''\
"""Polygraphy network script: TensorRT parses $LLAMA_EXPORT_SEGMENT (a .trt.onnx segment) with the
llama_export plugins registered (written by `llama-export compare --polygraphy`)."""
import os

from llama_export.backends.tensorrt.build import polygraphy_network

load_network = polygraphy_network(os.environ["LLAMA_EXPORT_SEGMENT"])
'''


def _array(t):
    """A segment's value (numpy, or a torch tensor on any device) as Polygraphy stores it."""
    t = torch.as_tensor(t).detach().cpu().contiguous()
    return t if t.dtype == torch.bfloat16 else t.numpy()


class CollectiveRecorder:
    """A communicator for the eager model that also keeps each collective's input, in call order.

    Segments are cut exactly where the model calls its collectives, so the i-th tensor handed to a
    collective is eager's value of what the i-th segment with a collective hands to it.
    """

    def __init__(self, comm) -> None:
        self.comm, self.inputs = comm, []

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach())
        return self.comm.all_reduce(x)

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        self.inputs.append(x.detach())
        return self.comm.all_gather(x, dim)


def eager_references(segments: tuple[Segment, ...], collective_inputs: list[Tensor], logits: Tensor,
                     keys: list[Tensor], values: list[Tensor]) -> dict[str, Tensor]:
    """Eager's values under the names of the segment outputs that eager computes (one prefill step)."""
    refs: dict[str, Tensor] = {schema.LOGITS: logits}
    refs.update({schema.present_key(i): t for i, t in enumerate(keys)})
    refs.update({schema.present_value(i): t for i, t in enumerate(values)})
    with_collective = [s for s in segments if s.collective is not None]
    if len(with_collective) != len(collective_inputs):
        raise RuntimeError(f"eager made {len(collective_inputs)} collective calls for {len(with_collective)} cuts")
    refs.update({s.collective.input: x for s, x in zip(with_collective, collective_inputs)})
    return refs


class SegmentDump:
    """Writes per-segment feeds and references into `directory` (rank threads may call `add_rank` at once)."""

    def __init__(self, directory: Path, manifest: Manifest, artifacts: Path) -> None:
        self.dir, self.manifest, self.artifacts = Path(directory), manifest, Path(artifacts)
        self._commands: dict[tuple[int, int], list[str]] = {}

    def add_rank(self, rank: int, envs: Mapping[int, Mapping[str, Tensor]], reference: Mapping[str, Tensor]) -> None:
        """Every segment of `rank`: `envs[k]` holds segment k's inputs and outputs as the backend ran it."""
        for k in range(len(self.manifest.rank(rank).segments)):
            self.add(rank, k, envs[k], reference)

    def add(self, rank: int, index: int, env: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
        """Segment `index` of `rank`: its inputs and outputs as the backend ran it (`env`), and eager's
        values by name (`reference`; those missing or of another shape are left out)."""
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER

        seg: Segment = self.manifest.rank(rank).segments[index]
        d = self.dir / f"rank{rank}"
        d.mkdir(exist_ok=True)
        stem = d / seg.name
        outputs = {o.name: _array(reference[o.name]) for o in seg.outputs
                   if o.name in reference and reference[o.name].shape == env[o.name].shape}
        results = RunResults()
        results.add([outputs], runner_name=RUNNER)
        # Polygraphy's logger prints each save to stdout; it is one global, shared by the rank threads.
        with _polygraphy_lock, G_LOGGER.verbosity(G_LOGGER.WARNING):
            save_json([{s.name: _array(env[s.name]) for s in seg.inputs}], f"{stem}.inputs.json")
            results.save(f"{stem}.eager.json")
        missing = [o.name for o in seg.outputs if o.name not in outputs]
        if missing:
            log.debug("rank %d %s: no eager value for %s; polygraphy will not compare them", rank, seg.name, missing)
        lowered = self._lowered(seg, stem)
        tol = TOLERANCES[self.manifest.dtype].divergence_rel  # Polygraphy's --atol and --rtol
        rel = f"rank{rank}/{seg.name}"
        data = f"--load-inputs {rel}.inputs.json --load-outputs {rel}.eager.json --atol {tol} --rtol {tol}"
        note = [] if lowered else [f"# {rel}: no segment ONNX here (an engine directory); lower the export's {seg.file}"]
        self._commands[(rank, index)] = [*note, f"polygraphy run {rel}.ort.onnx --onnxrt {data}",
                                         f"LLAMA_EXPORT_SEGMENT={rel}.trt.onnx polygraphy run trt_network.py --trt {data}"]

    def _lowered(self, seg: Segment, stem: Path) -> bool:
        from llama_export.backends.ort.lowering import OrtLoweringPass
        from llama_export.backends.tensorrt import lowering as trt_lowering

        src = resolve_inside(self.artifacts, seg.file)
        if not src.is_file():
            return False  # an engine directory: no ONNX here
        trt_lowering.lower_file(src, Path(f"{stem}.trt.onnx"))
        model = ir.load(str(src))
        OrtLoweringPass()(model)
        dst = Path(f"{stem}.ort.onnx")
        schema.save_with_data(model, dst)  # `src`'s weights copied beside `dst`
        return True

    def finish(self, final: Path) -> None:
        """Write commands.txt (to be run from `final`, where the directory will be) and the network script."""
        (self.dir / "commands.txt").write_text(
            f"# run from {Path(final).resolve()}\n" + "".join(f"{c}\n" for k in sorted(self._commands) for c in self._commands[k]),
            encoding="utf-8")
        (self.dir / "trt_network.py").write_text(_NETWORK_SCRIPT, encoding="utf-8")
        log.info("Polygraphy feeds and eager references written to %s (commands.txt)", final)
