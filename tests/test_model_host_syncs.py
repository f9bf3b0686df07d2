"""The eager model makes the host wait for the device at most once per forward, not once per layer, and
grouped attention reads each KV head without repeating it.

A host sync cannot be observed on a CPU, so the ops that force one on CUDA are counted instead: reading a
tensor's value on the host (`int(t)`, `t.item()`, `t.tolist()`: aten._local_scalar_dense), `nonzero`,
`masked_select`, boolean-mask indexing and copies from the device to the CPU. A TorchDispatchMode sees
every aten call the model makes on tensors, in the order it makes them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_export.model import ops
from llama_export.model.transformer import Transformer
from tests.helpers import tiny_config

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default}


class SyncCounter(TorchDispatchMode):
    """Records each aten call that would make the host wait for a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.syncs.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):  # a boolean mask: nonzero inside
                self.syncs.append(f"{func} with a boolean mask")
        elif func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            self.syncs.append(str(func) + " to the CPU")
        return func(*args, **kwargs)


def _model(n_layers: int) -> Transformer:
    cfg = dataclasses.replace(tiny_config("gqa"), n_layers=n_layers)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def _ragged_step(model: Transformer, use_step: bool) -> list[str]:
    """Syncs of one ragged prefill (rows of 5, 3 and 1 tokens after 0, 2 and 7 cached) through `step`
    (host lengths) or `forward` (lengths as tensors, as a device would hold them)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 5))
    cache_lengths, token_lengths = torch.tensor([0, 2, 7]), torch.tensor([5, 3, 1])
    keys, values = model.empty_cache(3, 16)
    with SyncCounter() as counter, torch.inference_mode():
        if use_step:
            model.step(tokens.numpy(), cache_lengths.numpy(), token_lengths.numpy(), keys, values)
        else:
            model(tokens, cache_lengths, token_lengths, keys, values)
    return counter.syncs


def test_the_counter_sees_what_a_per_layer_plan_did():
    """The counter is not blind to the two patterns attention used once per layer."""
    start, lengths, k = torch.tensor([0, 2, 7]), torch.tensor([5, 3, 1]), torch.randn(3, 5, 2, 16)
    with SyncCounter() as counter:
        int((start + lengths).max())
    with SyncCounter() as bool_index:
        k[torch.arange(5)[None, :] < lengths[:, None]]
    assert counter.syncs and bool_index.syncs


@pytest.mark.parametrize("use_step", [True, False], ids=["step", "forward"])
def test_syncs_do_not_grow_with_the_layers(use_step):
    two, six = _ragged_step(_model(2), use_step), _ragged_step(_model(6), use_step)
    assert len(two) == len(six), (two, six)
    if use_step:  # the lengths came from the host: nothing to wait for
        assert two == []
    else:  # one copy of the lengths to the host, for all layers
        assert len(two) <= 1, two


def test_grouped_attention_repeats_no_kv_head():
    model = _model(2)
    assert model.shape.local_heads > model.shape.local_kv_heads  # GQA

    class Repeats(TorchDispatchMode):
        calls: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.repeat_interleave.self_int, aten.repeat_interleave.Tensor,
                        aten.repeat.default) and args[0].dim() == 4:
                self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, model.cfg.vocab_size, (2, 4))
    keys, values = model.empty_cache(2, 8)
    with Repeats() as r:
        model.step(tokens.numpy(), [0, 0], [4, 2], keys, values)
    assert r.calls == []
