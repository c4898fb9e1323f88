"""Mixed batches: one adapter per batch row (``adapter_names=[...]``).

``wrapper(x, adapter_names=["a", "b", "__base__", "a"])`` runs row ``i`` of the batch
with adapter ``adapter_names[i]`` only (``"__base__"``: no adapter), whatever the active
adapters are, as PEFT does. Each row's result equals running that row alone with only
its adapter active.

How it works:

* Per call, the names become a ``row_index`` tensor: the *slot* of each row's adapter.
* Per adapted module, the adapters' layers of the stackable kinds (LoRA on linear and
  embedding layers, IA³) are stacked into rank-padded tensors with one slot per adapter
  plus a last identity slot (see :mod:`tinytune.mixed_torch`, the PyTorch path's
  tensor-only math, whose layout the fused op :mod:`tinytune.kernels.lora_mixed` takes
  unchanged). The stacks are
  the stacked parameters' storage (each parameter becomes a view of its slot, see
  :class:`SiteStacks`), so in-place changes of values, by any means, are never served
  stale; what a view cannot follow (new parameter objects, rebound ``.data``, a new
  scaling) is compared on every call for the used adapters, which are then rewritten
  in place; a changed structure (adapters, layers, ranks, dtype, device) restacks all.
  With reserved slots (:mod:`tinytune.serving`) the stacks have a fixed shape and
  adapters move between them and host memory. With autograd on and trainable adapters,
  each call wraps the stacks in an autograd function that routes their gradients back
  to the parameters.
* The module's hook site hands each call to a per-site plan published in a
  thread-local slot for the duration of the call: the plan gathers each row's factors
  and runs batched matmuls, with no Python loop over rows or adapters. Other layers
  (``modules_to_save`` copies, Conv2d LoRA, custom ``AdapterLayer`` s) run on the rows
  that use them, one call per distinct adapter at that module.

The per-call assignment is call state: it lives in thread-local slots that are cleared
in a ``finally`` block, so it never outlives the call (even when forward raises) and
never reaches another thread calling the same wrapper at the same time.

Under ``torch.compile`` every shape in the model's graph depends only on the batch shape
and the loaded adapters, never on which row uses which adapter, so changing the
assignment does not recompile; ``modules_to_save`` and custom layers then run every
loaded copy at their module on the whole batch and select rows with a mask.

Floor 7: imports ``errors``, ``util``, ``layers``, ``mixed_torch``, ``adapter``,
``dispatch``, ``stacks`` and ``serving``; reaches the adapters through
``wrapper.registry``.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
from torch import nn

from . import dispatch
from .errors import AdapterNotFoundError, AdapterStateError, MixedBatchError, suggest, wrong_type
from .layers import first_input, is_conv1d, replace_first_input
from .mixed_torch import (
    row_groups,
    torch_embedding_lora_mixed,
    torch_ia3_mixed,
    torch_lora_mixed,
    torch_lora_mixed_grouped,
    torch_lora_mixed_indexed,
)
from .mixed_torch import worth_grouping as grouping_pays
from .mixed_torch import worth_indexing as indexing_pays

from .adapter import BASE_ADAPTER_NAME
from .serving import arm_hooks, row_assignment
from .util import device_of, run_frames_eagerly, run_model
from .stacks import (
    STATES,
    AdapterSignature,
    SiteStacks,
    WrapperState,
    release_unreserved,
    state_of,
    with_grads,
)

__all__ = ["BASE_ADAPTER_NAME", "SiteStacks", "assigned_call", "clear_cache", "mixed_call"]


def clear_cache(wrapper: nn.Module) -> None:
    """Free the mixed-batch stacks of ``wrapper``.

    The stacks hold the adapters' stackable weights themselves (their parameters are
    views of them), so this first gives every such parameter its own storage again
    (a copy), then drops the stacks; the next mixed call builds them again. With
    reserved slots (``reserve_adapter_slots``) it empties every slot instead (the
    adapters move to host memory) and keeps the reserved stacks.

    Args:
        wrapper: An ``AdapterWrapper``.
    """
    state = STATES.get(wrapper)
    if state is None:
        return
    with state.lock:
        if state.pool is not None:
            state.pool.evict_all()
        else:
            release_unreserved(state)


def forget_adapter(wrapper: nn.Module, name: str, adapter: nn.Module) -> None:
    """Drop every reference the mixed-batch cache holds to a deleted adapter.

    Its parameters get storage of their own again (whoever still holds the adapter
    keeps working values); its slots are emptied. Without reserved slots the other
    adapters' stacks are rebuilt (smaller) by the next mixed call.

    Args:
        wrapper: The ``AdapterWrapper``.
        name: The adapter's name.
        adapter: The deleted ``Adapter``.
    """
    state = STATES.get(wrapper)
    if state is None:
        return
    with state.lock:
        if state.pool is not None:
            state.pool.forget(name)
            arm_hooks(wrapper, state.pool)
            return
        slot = state.slot.get(name)
        if slot is not None:
            for st in state.stacks.values():
                if st.layers[slot] is not None:
                    st.set_slot(slot, None)
        state.sigs.pop(name, None)
        state.recent.pop(name, None)
        state.names = ()  # restack (without it) on the next call
        # Free the stacks now once at least half their slots are dead (each restack is a
        # copy of the live adapters, so deleting many adapters in a row stays linear).
        dead = sum(1 for n in state.slot if n not in wrapper.adapters)
        if dead * 2 >= len(state.slot):
            release_unreserved(state)


def build_stacks(sites: dict[str, Any], names: Sequence[str]) -> dict[str, SiteStacks]:
    """Stack every site's layers of ``names``, one slot per name, in that order.

    Args:
        sites: The registry's hook sites, by module path.
        names: The adapters to stack.

    Returns:
        The stacks of every site at least one of ``names`` adapts, by module path.
    """
    stacks = {}
    # Plain tensors without autograd history, even inside inference_mode, so later calls
    # with autograd on can use them too (gradients are routed by _StackGrads).
    with torch.inference_mode(False), torch.no_grad():
        for path, site in sites.items():
            layers = [site.layers.get(name) for name in names]
            if any(layer is not None for layer in layers):
                stacks[path] = SiteStacks(layers)
    return stacks


def _rewrite(state: WrapperState, adapters: Any, name: str) -> bool:
    """Rewrite ``name``'s slots in place from its layers; ``False`` if they do not fit
    (then everything must be restacked)."""
    slot = state.slot[name]
    adapter = adapters[name]
    layers = dict(adapter.items())
    for path, st in state.stacks.items():
        layer = layers.get(path)
        if layer is not None and not st.fits(layer):
            return False
    if any(path not in state.stacks for path in layers):
        return False
    for path, st in state.stacks.items():
        layer = layers.get(path)
        if layer is not None or st.layers[slot] is not None:
            st.set_slot(slot, layer)
    return True


def _sign(state: WrapperState, adapters: Any, name: str) -> None:
    slot = state.slot[name]
    copies = any(slot in st.copied for st in state.stacks.values())
    state.sigs[name] = AdapterSignature(adapters[name], copies)


def cached_stacks(
    wrapper: Any, state: WrapperState, used: Sequence[str]
) -> tuple[dict[str, int], dict[str, SiteStacks], Any]:
    """Stacks with every used adapter in a slot, showing its current values.

    What a mixed call runs on (public for the serving benchmark, which times it alone).

    Without reserved slots, every loaded adapter has a slot. In-place changes of values
    are seen without any work (the parameters are views of the stacks); a used adapter
    whose parameters were replaced or rebound, or whose scaling changed, is rewritten in
    place; a change of structure (adapters added or deleted, a layer that does not fit
    the stacks, a dtype or device change) restacks everything.
    """
    if state.pool is not None:
        return state.pool.prepare(used)
    adapters = wrapper.adapters
    names = tuple(adapters.keys())
    rebuild = names != state.names or state.sites != wrapper.registry.sites
    if not rebuild:
        for name in used:
            sig = state.sigs[name]
            if sig.fresh(adapters[name]):
                if sig.copies:
                    slot = state.slot[name]
                    for st in state.stacks.values():
                        if slot in st.copied:
                            st.refresh(slot)
                continue
            if not _rewrite(state, adapters, name):
                rebuild = True
                break
            state.loads += 1
            _sign(state, adapters, name)
    if rebuild:
        old = state.stacks
        state.stacks = build_stacks(wrapper.registry.sites, names)
        # Parameters of adapters no longer stacked (none, unless deleted behind the
        # wrapper's back) must not keep viewing the old stacks.
        kept = {id(layer) for st in state.stacks.values() for layer in st.layers}
        for st in old.values():
            for slot, layer in enumerate(st.layers):
                if layer is not None and id(layer) not in kept:
                    st.unbind(slot)
        state.names = names
        state.slot = {name: i for i, name in enumerate(names)}
        state.sites = dict(wrapper.registry.sites)
        state.sigs = {}
        for name in names:
            _sign(state, adapters, name)
        state.loads += len(names)
        state.recent = {n: None for n in state.recent if n in state.slot}
    for name in used:
        state.recent.pop(name, None)
        state.recent[name] = None
    return state.slot, state.stacks, None


# ----------------------------------------------------------------------------------------
# the per-call plan that each hook site runs
# ----------------------------------------------------------------------------------------
class Call:
    """One mixed call: the row assignment, shared by every module."""

    __slots__ = ("row_index", "batch", "slots", "identity", "fixed", "_rows", "_groups", "segments")

    def __init__(
        self, row_index: torch.Tensor, slots: list[int], identity: int, fixed: bool = False
    ) -> None:
        self.row_index = row_index
        # A static assignment (set_row_adapters): no tensor from host data in the call, so
        # every module takes its shape-stable path, as under torch.compile.
        self.fixed = fixed
        self.batch = len(slots)
        self.slots = slots
        self.identity = identity
        self._rows: dict[int, torch.Tensor | None] = {}
        self._groups: tuple | None = None
        # The fused path's segment plans (device tensors), built by the first module that
        # needs one and shared by every later module of this forward.
        self.segments: dict = {}

    def groups(self) -> tuple:
        """Rows sorted into segments by slot, identity rows left out (eager mode only).

        Returns:
            ``(n, size, group_slots, rows, row_group, row_pos)`` (see ``row_groups``),
            ``n == 0`` if every row is a base row.
        """
        if self._groups is None:
            self._groups = row_groups(self.slots, self.identity, self.row_index.device)
        return self._groups

    def rows(self, slot: int) -> torch.Tensor | None:
        """Indices of the rows using ``slot`` (``None`` if none); eager mode only."""
        if slot not in self._rows:
            idx = [i for i, s in enumerate(self.slots) if s == slot]
            self._rows[slot] = (
                torch.tensor(idx, dtype=torch.long, device=self.row_index.device) if idx else None
            )
        return self._rows[slot]


def _check_rows(x: Any, call: Call, path: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != call.batch:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MixedBatchError(
            f"Module {path!r} received an input of shape {shape}, but adapter_names has "
            f"{call.batch} entries: per-row adapters need the batch as dimension 0 of every "
            "adapted module's input. This model reshapes or folds the batch before this "
            "module; run such rows in separate calls with set_active_adapters() instead."
        )


def _row_mask(call: Call, slot: int, like: torch.Tensor) -> torch.Tensor:
    return (call.row_index == slot).view((call.batch,) + (1,) * (like.dim() - 1))


def _row_dropout(x: torch.Tensor, p_stack: torch.Tensor, call: Call) -> torch.Tensor:
    p = p_stack.index_select(0, call.row_index).view((call.batch,) + (1,) * (x.dim() - 1))
    keep = (1.0 - p).to(x.dtype)
    mask = (torch.rand_like(x) < keep).to(x.dtype)
    return x * mask / keep


def worth_grouping(call: Call, x: torch.Tensor, a_stack: torch.Tensor) -> tuple | None:
    """The call's row segments if reading each adapter once beats a gather per row.

    Per row, the gather copies the row's factors (``r`` per feature); grouping reads
    them once per distinct adapter but copies the rows' tokens into padded segments
    (``group_size * tokens`` per feature and segment) and runs a few more small ops.
    Measured on the CPU (bench/bench_mixed.py shapes), grouping pays off when that
    traffic model gives it less than a quarter of the gather's: decode-sized rows that
    mostly share a few adapters. Eager mode only: the segments' shapes depend on the
    assignment, which compiled graphs must not.
    """
    tokens = x.numel() // max(1, x.shape[0] * x.shape[-1])
    groups = call.groups()
    if grouping_pays(call.batch, tokens, a_stack.shape[1], groups[0], groups[1]):
        return groups
    return None


def _indexed_ok(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> bool:
    """Whether a compiled call's LoRA runs on ``torch_lora_mixed_indexed``: CPU
    tensors (CUDA runs the fused kernels, or the gather), few tokens per row
    (``worth_indexing``: a decision on shapes only) and no gradient (training keeps the
    gather and its batched-matmul backward; the indexed loops are timed for inference
    only)."""
    if not x.is_cpu or not indexing_pays(x.numel() // max(1, x.shape[0] * x.shape[-1])):
        return False
    return not (
        torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or bt.requires_grad)
    )


class _CurrentCall(threading.local):
    """The mixed call in flight on this thread (``call``; ``None``: none), published by
    ``_begin`` with the sites' plans and restored by ``_end``.

    Every site's plan reads its call here, through one object, rather than through an
    attribute of its own: dynamo reaching one ``Call`` through every site's plan
    guarded, in Python, that all of them are the same object (a few hundred
    microseconds per compiled call). ``__init__`` runs in each thread on first use, so
    the attribute always exists (a guard on its presence would recompile).
    """

    def __init__(self) -> None:
        self.call: Call | None = None


_CURRENT = _CurrentCall()


class _SitePlan:
    """What one hook site does during one mixed call (see ``HookSite._pre_hook``)."""

    __slots__ = ("path", "stacks", "own_call")

    def __init__(self, path: str, stacks: SiteStacks, call: Call) -> None:
        self.path = path
        self.stacks = stacks
        self.own_call = call  # published as _CURRENT.call for the call's duration

    @property
    def call(self) -> Call:
        """The call this plan belongs to: the one in flight on this thread."""
        return _CURRENT.call

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        st = self.stacks
        call = self.call
        x = first_input(args, kwargs)
        _check_rows(x, call, self.path)
        if st.ia3_pre is None and not st.others_pre:
            return args, kwargs
        y = x
        if st.ia3_pre is not None:
            y = torch_ia3_mixed(y, st.ia3_pre, call.row_index)
        for slot, layer in st.others_pre:
            y = self._run_pre(module, layer, slot, args, kwargs, y)
        return replace_first_input(args, kwargs, y)

    # The fused path (see tinytune.dispatch): HookSite hands the module an empty batch
    # when use_fused() says so, and returns fused() instead of calling post().
    def fuse_reason(self, module: nn.Module) -> str | None:
        """Why this site's layers cannot run on the per-row kernel (``None``: they can)."""
        reason = dispatch.module_reason(module)
        if reason is None and self.stacks.dora_items:
            reason = dispatch.chain_reason(module, (self.stacks.dora_items[0][1],))
        if reason is None and (self.stacks.others_pre or self.stacks.others_post):
            others = self.stacks.others_pre + self.stacks.others_post
            reason = dispatch.unstacked_reason(module, [layer for _, layer in others])
        return reason

    def use_fused(self, module: nn.Module, x: Any) -> bool:
        """Whether this call runs on ``lora_mixed_linear`` (raises in mode ``"triton"``
        if it cannot)."""
        st = self.stacks
        params = [t for t in (st.ia3_pre, st.ia3_post) if t is not None]
        if st.lora is not None:
            params += st.lora[:2]
        dropout = (st.has_dropout or any(getattr(layer, "lora_dropout", 0.0) for _, layer in st.others_post)) and module.training
        if not dispatch.use_fused(self.path, self.fuse_reason(module), module, x, params, dropout):
            return False
        _check_rows(x, self.call, self.path)
        return True

    def fused(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` with each row's adapter applied, in one fused kernel."""
        st = self.stacks
        a = bt = scale = None
        if st.lora is not None:
            a, bt, scale = st.lora[:3]
        ranks = getattr(st, "ranks", None)
        col = None
        if getattr(st, "dora_items", ()):  # DoRA stacked with the LoRAs, scales beside them
            col = st.dora
        # Under torch.compile the op plans inside the graph (no Python cache in it).
        plans = None if torch.compiler.is_compiling() else self.call.segments
        return dispatch.mixed_linear(
            module, x, self.call.row_index, a, bt, scale, ranks, st.ia3_pre, st.ia3_post,
            plans=plans, col_scale=col,
        )

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.stacks
        call = self.call
        x = first_input(args, kwargs)
        _check_rows(x, call, self.path)
        # Without autograd, update the module's freshly computed output in place: that
        # saves a full copy of it per adapted module (about 5% of a prefill). Only a
        # forward hook that ran before this one and kept the output could tell.
        inplace = not torch.is_grad_enabled() and isinstance(output, torch.Tensor)
        dora = st.dora if st.dora_items else None
        if st.lora is not None:
            a, bt, scale, p = st.lora
            xin = _row_dropout(x, p, call) if st.has_dropout and module.training else x
            compiling = torch.compiler.is_compiling()
            groups = None if call.fixed or compiling else worth_grouping(call, xin, a)
            base = output
            if dora is not None:
                # DoRA rows: g ⊙ (W x + s·B A x) + b, g = 1 on the other rows.
                if xin is not x:  # dropout: PEFT rescales W of the dropped input
                    w = module.weight.t() if is_conv1d(module) else module.weight
                    base, output = torch.nn.functional.linear(xin.to(w.dtype), w), output
                    start = torch.zeros_like(output)
                else:
                    bias = getattr(module, "bias", None)
                    start = output if bias is None else output - bias.to(output.dtype)
                lora_out = start
            else:
                lora_out = output
            if groups is None:
                if compiling and _indexed_ok(xin, a, bt):
                    # Each row's factors read by index inside the products, which inductor
                    # compiles into two loop nests (no per-row copy of the factors, no
                    # opaque op): shapes independent of the assignment (no recompile).
                    # It adds s·B A x only; DoRA's row scales follow below, as on every path.
                    lora_out = torch_lora_mixed_indexed(
                        xin, lora_out, a, bt, scale, call.row_index
                    )
                else:
                    lora_out = torch_lora_mixed(xin, lora_out, a, bt, scale, call.row_index, inplace)
            elif groups[0]:
                lora_out = torch_lora_mixed_grouped(
                    xin, lora_out, a, bt, scale, *groups[2:6], groups[1], inplace
                )
            if dora is None:
                output = lora_out
            else:
                g = _row_scales(dora, call.row_index, lora_out)
                if xin is not x:
                    output = output + (g - 1) * base.to(output.dtype) + g * lora_out
                else:
                    bias = getattr(module, "bias", None)
                    output = lora_out * g if bias is None else lora_out * g + bias.to(output.dtype)
        if st.emb is not None:
            a, bt, scale = st.emb
            output = torch_embedding_lora_mixed(x, output, a, bt, scale, call.row_index, inplace)
            if dora is not None:
                output = output * _row_scales(dora, call.row_index, output)
        if st.ia3_post is not None:
            output = torch_ia3_mixed(output, st.ia3_post, call.row_index, inplace)
        for slot, layer in st.others_post:
            output = self._run_post(module, layer, slot, args, kwargs, output)
        return output

    # Layers that run as themselves: on their own rows in eager mode; under
    # torch.compile on the whole batch, selected by a mask, so shapes stay static.
    def _run_pre(self, module, layer, slot, args, kwargs, y):
        compiling = self.call.fixed or torch.compiler.is_compiling()
        rows = None if compiling else self.call.rows(slot)
        if rows is None and not compiling:
            return y
        sub = y if compiling else y.index_select(0, rows)
        sub_args, sub_kwargs = replace_first_input(args, kwargs, sub)
        new_args, new_kwargs = layer.pre_forward(module, sub_args, sub_kwargs)
        same_rest = len(new_args) == len(sub_args) and all(
            a is b for a, b in zip(new_args[1:], sub_args[1:])
        )
        if not same_rest or new_kwargs.keys() != sub_kwargs.keys():
            raise MixedBatchError(
                f"{type(layer).__name__}.pre_forward at {self.path!r} changes more than the "
                "module's first input, which per-row adapters cannot split by row; run its "
                "rows in a separate call."
            )
        new = first_input(new_args, new_kwargs)
        if compiling:
            return torch.where(_row_mask(self.call, slot, y), new.to(y.dtype), y)
        return y.index_copy(0, rows, new.to(y.dtype))

    def _run_post(self, module, layer, slot, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise MixedBatchError(
                f"Module {self.path!r} returns {type(output).__name__}, not a tensor, so "
                f"{type(layer).__name__} cannot be applied to some rows only; run its rows "
                "in a separate call."
            )
        if self.call.fixed or torch.compiler.is_compiling():
            new = layer.post_forward(module, args, kwargs, output)
            return torch.where(_row_mask(self.call, slot, output), new.to(output.dtype), output)
        rows = self.call.rows(slot)
        if rows is None:
            return output
        x = first_input(args, kwargs)
        sub_args, sub_kwargs = replace_first_input(args, kwargs, x.index_select(0, rows))
        new = layer.post_forward(module, sub_args, sub_kwargs, output.index_select(0, rows))
        return output.index_copy(0, rows, new.to(output.dtype))


def _row_scales(stack: torch.Tensor, row_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Each row's DoRA scales ``stack[row_index[b]]``, shaped to broadcast over ``like``
    (``(B, ..., out)``) in its dtype."""
    g = stack.index_select(0, row_index).to(like.dtype)
    return g.view((g.shape[0],) + (1,) * (like.dim() - 2) + (g.shape[-1],))


# ----------------------------------------------------------------------------------------
# the call
# ----------------------------------------------------------------------------------------
def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _validate(wrapper: Any, adapter_names: Any, args: tuple, kwargs: dict) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        hint = (
            f" For one adapter on every row pass [{adapter_names!r}] * batch_size, or call "
            "set_active_adapters() and leave adapter_names out."
            if isinstance(adapter_names, str)
            else " For one adapter on every row use set_active_adapters() instead."
        )
        raise wrong_type("adapter_names", "a list with one adapter name per batch row", adapter_names, hint)
    names = list(adapter_names)
    known = wrapper.adapters
    for name in names:
        if name != BASE_ADAPTER_NAME and (not isinstance(name, str) or name not in known):
            raise AdapterNotFoundError(
                f"adapter_names names {name!r}, which is not a loaded adapter; use one of "
                f"{list(known)!r} or {BASE_ADAPTER_NAME!r} for no adapter."
                f"{suggest(str(name), known)}"
            )
    if wrapper.merged_adapters:
        raise AdapterStateError(
            f"Adapters {wrapper.merged_adapters!r} are merged into the base weights, so rows "
            "cannot choose their adapter; call unmerge_adapters() before using adapter_names."
        )
    x = _first_tensor(args, kwargs)
    if x is not None and (x.dim() == 0 or x.shape[0] != len(names)):
        raise MixedBatchError(
            f"adapter_names has {len(names)} entries but the batch has "
            f"{x.shape[0] if x.dim() else 0} rows (input of shape {tuple(x.shape)}); give "
            "exactly one adapter name per row."
        )
    return names


def _device_of_sites(wrapper: Any, x: torch.Tensor | None) -> torch.device:
    if x is not None:
        return x.device
    for site in wrapper.registry.sites.values():
        device = device_of(site.module)
        if device is not None:
            return device
    return torch.device("cpu")


def _needs_autograd(state: WrapperState, used: Sequence[str]) -> bool:
    """Whether the stacks must carry gradients to the used adapters' parameters."""
    if not torch.is_grad_enabled():
        return False
    sigs = state.sigs if state.pool is None else state.pool.sigs
    return any(sigs[name].requires_grad() for name in used)


class _InFlight:
    """One mixed call's host-side state, from ``_prepare_and_begin`` to ``_end``: its plans, the
    slots it pins, and the plans it covers up (``outer``, see ``_publish``).

    One object that compiled code only passes from one disabled function to the next:
    dynamo never looks inside it, so it adds no guard. (A list of the plans held by the
    compiled frame made dynamo guard, in Python, that each of its sites and plans is the
    object the model's hooks reach: about a millisecond per call.)
    """

    __slots__ = ("plans", "pins", "outer", "outer_call")

    def __init__(self, plans: list[tuple[Any, "_SitePlan"]], pins: Any) -> None:
        self.plans = plans
        self.pins = pins
        self.outer: list[Any] = []
        self.outer_call: Call | None = None


@torch.compiler.disable
def _prepare_and_begin(
    wrapper: Any, fn: Any, adapter_names: Any, args: tuple, kwargs: dict
) -> _InFlight:
    """:func:`_prepare_plans`, then :func:`_begin`."""
    flight = _InFlight(*_prepare_plans(wrapper, fn, adapter_names, args, kwargs))
    _begin(wrapper, flight)
    return flight


def _prepare_plans(
    wrapper: Any, fn: Any, adapter_names: Any, args: tuple, kwargs: dict
) -> tuple[list[tuple[Any, _SitePlan]], Any]:
    """Validate the call and build every site's plan. Changes nothing visible (with
    reserved slots, it may load and evict adapters, which changes no result).

    Returns:
        The plans, and the reserved slots pinned for the call (``None`` without
        reservation), to release when it ends.
    """
    wrapper.registry.model()  # raises if unloaded
    # Outside the graph: DoRA's cached scales current before a compiled call reads them.
    wrapper.registry.refresh_dora_scales()
    names = _validate(wrapper, adapter_names, args, kwargs)
    if not names or wrapper.registry.disabled:
        # An empty batch has no row to adapt; inside disable_adapter() no adapter runs
        # (as in PEFT): both are plain calls.
        return [], None
    if getattr(fn, "__name__", "") == "generate":
        repeat = _generate_expansion(fn, kwargs)
        if repeat > 1:
            # generate() repeats each input row this many times, consecutively.
            names = [name for name in names for _ in range(repeat)]
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
    device = _device_of_sites(wrapper, _first_tensor(args, kwargs))

    def make_call(slot_of: dict[str, int], base_slot: int) -> Call:
        slots = [slot_of.get(name, base_slot) for name in names]
        # Shape (batch,) whatever the assignment: no recompile for a new one.
        row_index = torch.tensor(slots, dtype=torch.long, device=device)
        return Call(row_index, slots, base_slot)

    state = state_of(wrapper)
    with state.lock:
        return _site_plans(wrapper, state, used, make_call)


def _site_plans(wrapper: Any, state: WrapperState, used: list[str], make_call: Any) -> tuple:
    """Every site's plan for one call of the ``used`` adapters (``state.lock`` held);
    ``make_call(slot_of, base_slot)`` gives the call's rows. See :func:`_prepare_plans`."""
    slot_of, stacks, pins = cached_stacks(wrapper, state, used)
    try:
        base_slot = len(slot_of) if state.pool is None else state.pool.identity
        if _needs_autograd(state, used):
            used_slots = {slot_of[name] for name in used}
            stacks = {path: with_grads(st, used_slots) for path, st in stacks.items()}
        sites = dict(wrapper.registry.sites)
        call = make_call(slot_of, base_slot)
    except BaseException:
        if pins is not None:
            pins.release()
        raise
    plans = [
        (site, _SitePlan(path, stacks.get(path, _EMPTY), call)) for path, site in sites.items()
    ]
    # Last step, nothing after it can fail: every site used here is released by
    # _release, which removes the hooks added for this call once no call needs them.
    added = False
    for path, site in sites.items():
        added |= site.prepare_mixed(stacks[path].need_pre if path in stacks else False)
    if added:
        _note_layout(wrapper)
    return plans, pins


@torch.compiler.disable
def _prepare_assigned_and_begin(wrapper: Any, args: tuple, kwargs: dict) -> _InFlight:
    """:func:`_prepare_assigned_plans`, then :func:`_begin`."""
    flight = _InFlight(*_prepare_assigned_plans(wrapper, args, kwargs))
    _begin(wrapper, flight)
    return flight


def _prepare_assigned_plans(
    wrapper: Any, args: tuple, kwargs: dict
) -> tuple[list[tuple[Any, _SitePlan]], Any]:
    """:func:`_prepare_plans` for a call under ``set_row_adapters``: the rows read the static
    slot buffer (its first ``batch`` rows, a view), so nothing here creates a tensor
    from host data."""
    wrapper.registry.model()  # raises if unloaded
    wrapper.registry.refresh_dora_scales()  # as in _prepare_plans
    names, slots, rows = row_assignment(wrapper)
    if wrapper.registry.disabled:
        return [], None
    if wrapper.merged_adapters:
        raise AdapterStateError(
            f"Adapters {wrapper.merged_adapters!r} are merged into the base weights, so rows "
            "cannot run their assigned adapters; call unmerge_adapters() or "
            "clear_row_adapters()."
        )
    x = _first_tensor(args, kwargs)
    batch = x.shape[0] if x is not None and x.dim() else len(names)
    if batch > rows.shape[0]:
        raise MixedBatchError(
            f"The batch has {batch} rows but the row buffer has max_rows={rows.shape[0]}; "
            "split the batch, or reserve_adapter_slots(..., max_rows=N) with a larger N "
            "and set_row_adapters() again."
        )
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
    gone = [n for n in used if n not in wrapper.adapters]
    if gone:
        raise AdapterStateError(
            f"Adapters {gone!r} are assigned to rows (set_row_adapters) but were deleted; "
            "call set_row_adapters() again."
        )

    def make_call(slot_of: dict[str, int], base_slot: int) -> Call:
        moved = any(
            slot_of.get(n) != s for n, s in zip(names, slots) if n != BASE_ADAPTER_NAME
        )
        if moved or (x is not None and x.device != rows.device):
            raise AdapterStateError(
                "The assigned adapters' slots or device changed since set_row_adapters() "
                "(the model was moved); call set_row_adapters() again."
            )
        padded = (list(slots) + [base_slot] * batch)[:batch]
        return Call(rows[:batch], padded, base_slot, fixed=True)

    state = state_of(wrapper)
    with state.lock:
        return _site_plans(wrapper, state, used, make_call)


def _note_layout(wrapper: Any) -> None:
    # The wrapper numbers its hook layout so that compiled graphs of its forward are
    # guarded on it (torch.compile does not guard on empty hook dicts).
    wrapper.registry.note_hook_layout()


def _generate_expansion(fn: Any, kwargs: dict) -> int:
    """How many consecutive copies of each input row ``generate`` runs.

    Beam search runs ``num_beams`` rows per input; sampling and greedy search run
    ``num_return_sequences``. Read from the call's keywords, else its
    ``generation_config``, else the model's (transformers' own precedence).
    """
    config = kwargs.get("generation_config")
    if config is None:
        config = getattr(getattr(fn, "__self__", None), "generation_config", None)

    def setting(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1

    beams = setting("num_beams")
    return beams if beams > 1 else setting("num_return_sequences")


_EMPTY = SiteStacks(())


@run_frames_eagerly
def mixed_call(
    wrapper: Any, fn: Any, adapter_names: Sequence[str], args: tuple, kwargs: dict
) -> Any:
    """Run ``fn(*args, **kwargs)`` with row ``i`` using adapter ``adapter_names[i]``.

    Called by ``AdapterWrapper.forward`` and ``AdapterWrapper.generate`` when they get
    ``adapter_names=``.

    Args:
        wrapper: The ``AdapterWrapper``.
        fn: The base model (or its ``generate``).
        adapter_names: One adapter name per batch row; ``"__base__"`` for no adapter.
        args: Positional arguments for ``fn``.
        kwargs: Keyword arguments for ``fn`` (without ``adapter_names``).

    Returns:
        Whatever ``fn`` returns.

    Raises:
        ConfigTypeError: If ``adapter_names`` is not a list of names.
        AdapterNotFoundError: If a name is neither a loaded adapter nor ``"__base__"``.
        MixedBatchError: If the list's length is not the batch size, or an adapted
            module does not see the batch along dimension 0.
        AdapterStateError: If any adapter is merged, or the wrapper is unloaded.
        MixedBatchError: Also for adapters sharded for tensor parallelism.
    """
    if wrapper.registry.tensor_parallel:
        raise MixedBatchError(
            "Mixed batches (adapter_names=) are not supported on adapters sharded for "
            "tensor parallelism (tinytune.training.parallelize_adapters); run one "
            "adapter per call with set_active_adapters(), or gather the model first."
        )
    # One call into eager code before the model runs (each is a graph break, and each
    # break a compiled frame of its own to enter). No graph break inside a try block:
    # dynamo cannot resume a compiled frame there and would run this whole frame
    # eagerly, so the model's forward would become a frame of its own, whose cached
    # graph another instance of the same class may have compiled.
    flight = _prepare_and_begin(wrapper, fn, adapter_names, args, kwargs)
    try:
        return run_model(wrapper, fn, args, kwargs)
    finally:
        _end(wrapper, flight)


@run_frames_eagerly
def assigned_call(wrapper: Any, fn: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``fn(*args, **kwargs)`` with each row's adapter from ``set_row_adapters``.

    Called by ``AdapterWrapper.forward`` and ``generate`` while an assignment is set
    (and no ``adapter_names=`` is given). Row ``i`` runs the adapter assigned to row
    ``i`` (rows past the assigned names: none); the slots come from the static row
    buffer, so the call creates no tensor from host data and replays under CUDA-graph
    capture or ``torch.compile`` for every later assignment.

    Raises:
        MixedBatchError: For a batch larger than ``max_rows``, or an adapted module that
            does not see the batch along dimension 0.
        AdapterStateError: If adapters are merged, an assigned adapter was deleted or
            the model moved (call ``set_row_adapters`` again), or the wrapper is
            unloaded.
    """
    flight = _prepare_assigned_and_begin(wrapper, args, kwargs)
    try:
        return run_model(wrapper, fn, args, kwargs)
    finally:
        _end(wrapper, flight)


# Publishing and retracting run eagerly (outside any compiled graph): they are the
# wrapper's host-side bookkeeping, and keeping them out of the graph means compiled code
# never guards on them.
_ABSENT = object()


@torch.compiler.disable
def _publish(plans: list[tuple[Any, _SitePlan]]) -> list[Any]:
    # A mixed call made from inside another one (on this thread) restores the outer plan.
    outer = [getattr(site._local, "mixed", _ABSENT) for site, _ in plans]
    for site, plan in plans:
        site._local.mixed = plan
    return outer


@torch.compiler.disable
def _retract(plans: list[tuple[Any, _SitePlan]], outer: list[Any]) -> None:
    # Restore exactly what was there, absent or not: compiled graphs guard on the
    # attribute's presence, so a thread that never made a mixed call and one that made
    # some must look the same outside them.
    for (site, _), previous in zip(plans, outer):
        if previous is _ABSENT:
            del site._local.mixed
        else:
            site._local.mixed = previous


@torch.compiler.disable
def _release(wrapper: Any, plans: list[tuple[Any, _SitePlan]], pins: Any) -> None:
    # Remove the hooks this call added (once no other thread's call still uses them),
    # so modules whose adapters are inactive carry no hook between calls; with reserved
    # slots, unpin this call's slots.
    try:
        if not plans:
            return
        state = state_of(wrapper)
        with state.lock:
            removed = False
            for site, _ in plans:
                removed |= site.release_mixed()
            if removed and wrapper.registry.base is not None:
                _note_layout(wrapper)
    finally:
        if pins is not None:
            pins.release()


def _begin(wrapper: Any, flight: _InFlight) -> None:
    """Publish the call's plans; if that fails, undo what ``_prepare_plans`` did."""
    try:
        flight.outer = _publish(flight.plans)
        if flight.plans:
            flight.outer_call = _CURRENT.call
            _CURRENT.call = flight.plans[0][1].own_call
    except BaseException:
        _release(wrapper, flight.plans, flight.pins)
        raise


@torch.compiler.disable
def _end(wrapper: Any, flight: _InFlight) -> None:
    """Retract the call's plans, then release its hooks and pinned slots."""
    try:
        if flight.plans:
            _CURRENT.call = flight.outer_call
        _retract(flight.plans, flight.outer)
    finally:
        _release(wrapper, flight.plans, flight.pins)
