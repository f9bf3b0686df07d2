"""One GPU per rank: rank processes on a node take `cuda:LOCAL_RANK`, and a run that has more ranks on
this node than visible GPUs is refused before any rank starts (two ranks on one GPU fail inside NCCL,
and an ordinal past the last GPU fails in the rank, where it would read as "another rank died").
"""

from __future__ import annotations

import os

from llama_export.errors import InputError


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible() -> str:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={v})" if v is not None else ""


def check_gpus_for_ranks(device: str, ranks: int) -> None:
    """InputError (one line) unless each of the `ranks` ranks this node will start can have a GPU of its
    own on `device` ("cpu", "cuda" or "cuda:N"). Imports torch only for a CUDA device."""
    if not device.startswith("cuda"):
        return
    import torch

    n = _gpus()
    if n == 0:
        raise InputError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if ranks > 1 and device != "cuda":
        raise InputError(f"--device {device} puts all {ranks} ranks on one GPU (NCCL needs one GPU per rank); "
                         "use --device cuda (rank r takes cuda:r)")
    if ranks > n:
        raise InputError(f"--tp {ranks} --device cuda needs one GPU per rank and {n} GPU(s) are visible"
                         f"{_visible()}; use --tp {n} or less on this machine, or --device cpu")


def rank_device(device: str, local_rank: int) -> str:
    """This rank's device ("cuda" becomes `cuda:<local_rank>`), made torch's current CUDA device (so
    that everything that uses the current device, NCCL, TensorRT contexts, Triton launches, uses it)."""
    if not device.startswith("cuda"):
        return device
    import torch

    dev = f"cuda:{local_rank}" if device == "cuda" else device
    n = _gpus()
    if torch.device(dev).index >= n:
        raise InputError(f"this rank (LOCAL_RANK={local_rank}) would use {dev} and {n} GPU(s) are visible"
                         f"{_visible()}; start at most {n} rank(s) per node with --device cuda")
    torch.cuda.set_device(torch.device(dev))
    return dev
