"""Grouped LoRA ops for vLLM's CPU backend, installed in its engine core.

vLLM runs LoRA on CPU through ``PunicaWrapperCPU`` and the pure-PyTorch ops of
``vllm/lora/ops/torch_ops``, which have two faults this module works around:

- **Wrong answers**: they gather each token's adapter weights with ``weights[index]``, and the
  "no adapter" index -1 selects the *last* adapter slot, so a base-model row batched with adapter
  rows (or decoded after adapters were loaded) gets that adapter's delta
  (vllm-project/vllm#48421, open when this was written).
- **Slowness**: the per-token gather copies a (rank x features) matrix for every token of every
  LoRA layer and multiplies them one by one (``einsum("bi,boi->bo")``); on the bundled tiny
  model that made a mixed-adapter job ~4x slower than the base model.

The replacement reads a step's per-token adapter slots once per step (when vLLM updates its
LoRA mapping). The linear layers (``add_lora_linear``, the hot path) multiply every token by all
slots' stacked factors at once and mask each token's other slots away: a handful of matrix
products per layer slice, however many adapters the step mixes. The rarer paths (embeddings,
logits) get ``bgmv_*`` functions of the same signatures that multiply each adapter's rows by its
factors. Tokens without an adapter get exactly nothing added (the base model's output); tokens
with one get vLLM's products, summed in another order.

:class:`GroupedLoraOps` is passed to vLLM as ``worker_extension_cls``: vLLM imports it in the
engine core's worker, and ``collective_rpc("install_grouped_lora_ops")`` patches the wrapper
there. :func:`install` raises :class:`RuntimeError` where vLLM's internals are not the ones this
was written against, and the engine falls back to a zero adapter for base items
(``inference/engines/lora.py``).
"""

from __future__ import annotations

from typing import Any

import torch

Groups = list[tuple[int, torch.Tensor | None]]  # (adapter slot, its token rows; None: all rows)

_METHODS = ("update_metadata", "add_lora_linear", "token_lora_indices")
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def groups_of(indices: torch.Tensor) -> Groups:
    """Each adapter slot used by ``indices`` (one per token; -1: no adapter) with its rows."""
    if indices.numel() == 0:
        return []
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(int(slots[0]), None)]
    return [(int(slot), torch.nonzero(indices == slot).squeeze(1)) for slot in slots if slot >= 0]


def _stacked(weights: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's (out, in) matrix of vLLM's stacked (slots, 1, out, in) LoRA weights."""
    w = weights[slot]
    return w[0] if w.dim() == 3 else w


def _products(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    x = x.to(dtype)
    out = []
    for slot, rows in groups_of(indices):
        w = _stacked(weights, slot).to(dtype)
        out.append((rows, (x if rows is None else x.index_select(0, rows)) @ w.T))
    return out


def _write(target: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor, add: bool) -> None:
    if rows is None:
        if add:
            target += value
        else:
            target.copy_(value)
    elif add:
        target.index_add_(0, rows, value)
    else:
        target.index_copy_(0, rows, value)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """``output[t, :r] = scaling * inputs[t] @ A[slot(t)].T``; 0 for tokens without one."""
    rank = lora_b_weights.shape[-2]
    target = output_tensor[: lora_indices_tensor.shape[0], :rank]
    target.zero_()
    for rows, value in _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype):
        _write(target, rows, scaling * value, add=False)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """``output[t] (+)= inputs[t] @ B[slot(t)].T``; nothing added for tokens without one."""
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, common, add_inputs
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """``output[t, offset:offset+size] (+)= inputs[t] @ B[slot(t)].T`` (see bgmv_expand)."""
    target = output_tensor[: lora_indices_tensor.shape[0], slice_offset : slice_offset + slice_size]
    if not add_inputs:
        target.zero_()
    for rows, value in _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype):
        _write(target, rows, value[:, :slice_size], add=True)


class _Plan:
    """How one step's tokens use the adapter slots (from vLLM's per-token slot indices)."""

    def __init__(self, indices: torch.Tensor, layout: tuple[Any, ...] = ()) -> None:
        self.indices = indices
        self.layout = layout  # the adapter id in each slot
        self.count = int(indices.shape[0])
        slots = torch.unique(indices).tolist() if self.count else []
        self.active = any(slot >= 0 for slot in slots)
        self.single = int(slots[0]) if len(slots) == 1 and slots[0] >= 0 else None
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, slots: int) -> torch.Tensor:
        """(tokens, slots, 1): 1 where the token uses that slot (none for -1)."""
        mask = self._masks.get(slots)
        if mask is None:
            wanted = torch.arange(slots, device=self.indices.device)
            mask = (self.indices.unsqueeze(1) == wanted).to(torch.float32).unsqueeze(2)
            self._masks[slots] = mask
        return mask


def _update_metadata(original: Any) -> Any:
    def update_metadata(
        self: Any, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any
    ) -> None:
        original(self, mapping, lora_index_to_id, *args, **kwargs)
        self._inference_plan = _Plan(self.token_lora_indices, tuple(lora_index_to_id))

    return update_metadata


def _all_zero(wrapper: Any, plan: _Plan, weights: torch.Tensor) -> bool:
    """Whether every slot of these stacked weights is zero; checked once per slot layout
    (the weights change only when adapters move in or out of slots)."""
    cache: dict[int, tuple[tuple[Any, ...], bool]] | None = getattr(
        wrapper, "_inference_zero", None
    )
    if cache is None:
        cache = wrapper._inference_zero = {}
    known = cache.get(id(weights))
    if known is None or known[0] != plan.layout or not plan.layout:
        known = (plan.layout, not bool(weights.any()))
        cache[id(weights)] = known
    return known[1]


def _add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: Any = None,
    add_inputs: bool = True,
    **kwargs: Any,
) -> None:
    """``y[t, slice i] += scale * x[t] @ A_i[slot(t)].T @ B_i[slot(t)].T`` for every slice
    (vLLM's ``add_lora_linear``), nothing for tokens without an adapter.

    When every token uses one adapter: that adapter's two products. Otherwise all slots at
    once: ``x @ A_all.T`` (tokens x slots*rank), each token's other slots masked to zero, then
    ``@ B_all``: two matrix products per slice, whatever the number of adapters (a few times
    the exact arithmetic, far fewer operations than one product per adapter)."""
    # vLLM calls update_metadata whenever the tokens' slots change: the plan is this step's.
    plan = getattr(self, "_inference_plan", None)
    if plan is None:
        plan = self._inference_plan = _Plan(self.token_lora_indices)
    flat = y.view(-1, y.shape[-1])
    count = plan.count
    if not add_inputs:
        flat[:count].zero_()
    if not plan.active:
        return
    rows = x.view(-1, x.shape[-1])[:count].to(torch.float32)
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        target = flat[:count, offset : offset + size]
        offset += size
        if _all_zero(self, plan, b):
            continue  # a layer slice no loaded adapter adapts (k_proj of q/v adapters)
        slots, rank, features, out = a.shape[0], a.shape[-2], a.shape[-1], b.shape[-2]
        if plan.single is not None:
            shrunk = rows @ _stacked(a, plan.single).to(torch.float32).T
            b_rows = _stacked(b, plan.single).T  # (rank, out)
        else:
            all_a = a.reshape(slots * rank, features).to(torch.float32)
            shrunk = (rows @ all_a.T).view(count, slots, rank) * plan.mask(slots)
            shrunk = shrunk.view(count, slots * rank)
            b_rows = b.reshape(slots, out, rank).transpose(1, 2).reshape(slots * rank, out)
        if scale != 1.0:
            shrunk = shrunk * scale
        # As vLLM's expand: in the output's dtype, added in place (one pass over the output).
        target.addmm_(shrunk.to(target.dtype), b_rows[:, :size].to(target.dtype))


def missing() -> list[str]:
    """What :func:`install` needs and this vLLM lacks (empty: it can install)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:
        return [str(exc)]
    wrapper = punica_cpu.PunicaWrapperCPU
    lacking = [f"PunicaWrapperCPU.{name}" for name in _METHODS if not hasattr(wrapper, name)]
    lacking += [f"torch_ops.{name}" for name in _OPS if not hasattr(lora_ops, name)]
    lacking += [f"punica_cpu.{name}" for name in _OPS if not hasattr(punica_cpu, name)]
    return lacking


def install() -> str:
    """Patch vLLM's CPU LoRA wrapper and ops in this process (idempotent); what was done."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    wrapper = punica_cpu.PunicaWrapperCPU
    lacking = missing()
    if lacking:
        raise RuntimeError(f"vLLM's CPU LoRA internals changed (missing {lacking})")
    if getattr(wrapper, "_inference_grouped", False):
        return "already installed"
    for name in _OPS:
        setattr(lora_ops, name, globals()[name])
        setattr(punica_cpu, name, globals()[name])
    wrapper.update_metadata = _update_metadata(wrapper.update_metadata)  # type: ignore[method-assign]
    wrapper.add_lora_linear = _add_lora_linear  # type: ignore[method-assign]
    wrapper._inference_grouped = True  # type: ignore[attr-defined]
    return "installed"


EXTENSION = f"{__name__}.GroupedLoraOps"


class GroupedLoraOps:
    """vLLM ``worker_extension_cls``: lets the engine install the grouped ops in its worker."""

    def install_grouped_lora_ops(self) -> str:
        return install()
