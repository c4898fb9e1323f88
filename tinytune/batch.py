"""Mixed batches: one adapter per batch row (``adapter_names=[...]``).

``wrapper(x, adapter_names=["a", "b", "__base__", "a"])`` runs row ``i`` of the batch
with adapter ``adapter_names[i]`` only (``"__base__"``: no adapter), whatever the active
adapters are, as PEFT does. Each row's result equals running that row alone with only
its adapter active.

How it works:

* Per call, the names become a ``row_index`` tensor: the *slot* of each row's adapter.
* Per adapted module, the adapters' layers of the stackable kinds (LoRA on linear and
  embedding layers, IA³) are stacked once into rank-padded tensors with one slot per
  adapter plus a last identity slot (see :mod:`tinytune.kernels.lora_mixed`, which holds
  the tensor-only math that the PyTorch path and the fused kernels share). The stacks
  are cached; every call checks the used adapters' parameters (identity, ``_version``
  counters, data pointers) and scalings, so a training step or a load is never served
  stale weights: changed values are restacked in place for the changed adapters only, a
  changed structure (adapters, layers, parameter objects, dtype, device) restacks all. With autograd on
  and trainable adapters, each call wraps the cached stacks in an autograd function that
  routes their gradients back to the parameters they were built from.
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
"""

from __future__ import annotations

import copy
import threading
import weakref
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from .errors import AdapterNotFoundError, AdapterStateError, MixedBatchError, suggest
from .kernels.lora_mixed import (
    torch_embedding_lora_mixed,
    torch_ia3_mixed,
    torch_lora_mixed,
    torch_lora_mixed_grouped,
)
from .layers import (
    AdapterLayer,
    EmbeddingLoraLayer,
    LinearIA3Layer,
    LinearLoraLayer,
    first_input,
    replace_first_input,
)

from .wrapper import BASE_ADAPTER_NAME

__all__ = ["BASE_ADAPTER_NAME", "SiteStacks", "clear_cache", "mixed_call"]


# ----------------------------------------------------------------------------------------
# stacks: one per adapted module, for one slot order
# ----------------------------------------------------------------------------------------
def _stackable(layer: AdapterLayer) -> str | None:
    """The stacked kind of ``layer``, or ``None`` if it must run as itself.

    A subclass that overrides the forward methods keeps its own behaviour, so only
    layers whose forward methods are the built-in ones are stacked.
    """
    cls = type(layer)
    if isinstance(layer, LinearLoraLayer) and cls.post_forward is LinearLoraLayer.post_forward:
        return "lora"
    if (
        isinstance(layer, EmbeddingLoraLayer)
        and cls.post_forward is EmbeddingLoraLayer.post_forward
    ):
        return "emb"
    if (
        isinstance(layer, LinearIA3Layer)
        and cls.pre_forward is LinearIA3Layer.pre_forward
        and cls.post_forward is LinearIA3Layer.post_forward
    ):
        return "ia3_pre" if layer.is_feedforward else "ia3_post"
    return None


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == r:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, r - t.shape[dim]]
    return torch.nn.functional.pad(t, pad)


class SiteStacks:
    """The stacked adapter tensors of one module, for one slot order.

    Slot ``i`` is adapter ``names[i]``; the last slot (``len(names)``) is the identity,
    used by ``"__base__"`` rows. Adapters without a layer of a kind at this module get
    identity entries (zero LoRA factors, unit IA³ scales) in that kind's stack.

    Attributes:
        lora: ``(a_stack (S, r, in), bt_stack (S, r, out), scale (S,), dropout (S,))``
            or ``None``.
        has_dropout: Whether any LoRA slot uses dropout (applied in training mode).
        emb: ``(a_stack (S, num, r), bt_stack (S, r, dim), scale (S,))`` or ``None``.
        ia3_pre: ``(S, in)`` input scales (feed-forward IA³) or ``None``.
        ia3_post: ``(S, out)`` output scales or ``None``.
        others_pre, others_post: ``((slot, layer), ...)``: layers that run as
            themselves on their rows, those with a ``pre_forward`` / ``post_forward``.
        need_pre: Whether any layer here changes the module's inputs.

    Args:
        layers: The layer of each adapter in slot order at this module (``None`` where
            an adapter has none).
    """

    __slots__ = (
        "lora",
        "has_dropout",
        "emb",
        "ia3_pre",
        "ia3_post",
        "others_pre",
        "others_post",
        "need_pre",
        "items",
    )

    def __init__(self, layers: Sequence[AdapterLayer | None]) -> None:
        n = len(layers) + 1  # + identity slot
        by_kind: dict[str, list[tuple[int, AdapterLayer]]] = {}
        others: list[tuple[int, AdapterLayer]] = []
        for slot, layer in enumerate(layers):
            if layer is None:
                continue
            kind = _stackable(layer)
            if kind is None:
                others.append((slot, layer))
            else:
                by_kind.setdefault(kind, []).append((slot, layer))
        self.lora = self.emb = self.ia3_pre = self.ia3_post = None
        self.has_dropout = False
        self.items = by_kind  # kind -> [(slot, layer)], to route gradients (with_grads)
        if "lora" in by_kind:
            items = by_kind["lora"]
            self.lora = self._lora_stacks(items, n, emb=False)
            self.has_dropout = any(layer.lora_dropout > 0 for _, layer in items)
        if "emb" in by_kind:
            self.emb = self._lora_stacks(by_kind["emb"], n, emb=True)[:3]
        for kind in ("ia3_pre", "ia3_post"):
            if kind in by_kind:
                items = by_kind[kind]
                vecs = [layer.ia3_l.reshape(-1) for _, layer in items]
                ref = vecs[0]
                stack = torch.ones(n, ref.shape[0], dtype=_common_dtype(vecs), device=ref.device)
                slots = torch.tensor([s for s, _ in items], device=ref.device)
                stack = stack.index_copy(0, slots, torch.stack([v.to(stack.dtype) for v in vecs]))
                setattr(self, kind, stack)
        self.others_pre = tuple((s, l) for s, l in others if l.uses_pre_forward)
        self.others_post = tuple((s, l) for s, l in others if l.uses_post_forward)
        self.need_pre = any(layer is not None and layer.uses_pre_forward for layer in layers)

    @staticmethod
    def _lora_stacks(items: list[tuple[int, AdapterLayer]], n: int, emb: bool) -> tuple:
        r = max(layer.r for _, layer in items)
        if emb:
            # lora_A: Embedding (num, r) -> (num, r) per slot; lora_B: Linear (dim, r) -> (r, dim)
            a_list = [_pad_rank(layer.lora_A.weight, r, 1) for _, layer in items]
        else:
            # lora_A: Linear (r, in); lora_B: Linear (out, r) -> B^T (r, out)
            a_list = [_pad_rank(layer.lora_A.weight, r, 0) for _, layer in items]
        bt_list = [_pad_rank(layer.lora_B.weight.t(), r, 0) for _, layer in items]
        dtype = _common_dtype(a_list + bt_list)
        device = a_list[0].device
        slots = torch.tensor([s for s, _ in items], device=device)
        a_vals = torch.stack([a.to(dtype) for a in a_list])
        bt_vals = torch.stack([b.to(dtype) for b in bt_list])
        # Identity (zero) factors in every other slot.
        a_stack = a_vals.new_zeros((n,) + tuple(a_vals.shape[1:])).index_copy(0, slots, a_vals)
        bt_stack = bt_vals.new_zeros((n,) + tuple(bt_vals.shape[1:])).index_copy(0, slots, bt_vals)
        scales, dropouts = [0.0] * n, [0.0] * n
        for s, layer in items:
            scales[s], dropouts[s] = float(layer.scaling), float(layer.lora_dropout)
        # float64: the scalings are Python floats; each path casts to its compute dtype.
        scale = torch.tensor(scales, dtype=torch.float64, device=device)
        dropout = torch.tensor(dropouts, dtype=torch.float32, device=device)
        return a_stack, bt_stack, scale, dropout


def _restack_slots(st: SiteStacks, updates: dict[int, AdapterLayer]) -> None:
    """Rewrite the slots in ``updates`` of ``st`` from their layers' current values, in
    place (same structure: layers, ranks, parameter objects).

    In place, so the cost follows the changed adapters, not the loaded ones. Autograd
    never saves the stacks (only gathers from them), so graphs of earlier calls are not
    affected; a call running meanwhile on another thread may see the new values, as it
    would see a parameter changed under it in any model.
    """
    for kind in ("lora", "emb"):
        items = [(s, layer) for s, layer in st.items.get(kind, ()) if s in updates]
        if not items:
            continue
        a, bt, scale, *rest = getattr(st, kind)
        for s, layer in items:
            a[s].zero_()
            (a[s][:, : layer.r] if kind == "emb" else a[s, : layer.r]).copy_(layer.lora_A.weight)
            bt[s].zero_()
            bt[s, : layer.r].copy_(layer.lora_B.weight.t())
            scale[s] = float(layer.scaling)
            if rest:
                rest[0][s] = float(layer.lora_dropout)
        if rest:
            st.has_dropout = bool((rest[0] > 0).any())
    for kind in ("ia3_pre", "ia3_post"):
        for s, layer in st.items.get(kind, ()):
            if s in updates:
                getattr(st, kind)[s].copy_(layer.ia3_l.reshape(-1))


class _StackGrads(torch.autograd.Function):
    """Hands out a cached stack and routes its gradient to the parameters in it.

    The stacks are built once, without autograd; with autograd on, each call wraps them
    in this function, so a mixed batch trains its adapters without re-stacking them.
    ``routes.items`` is ``((slot, how, r), ...)``, one per parameter in ``params``.
    """

    @staticmethod
    def forward(ctx, routes, *params):
        ctx.routes = routes.items
        ctx.meta = [(p.shape, p.dtype) for p in params]
        return routes.stack.detach()

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for (slot, how, r), (shape, dtype) in zip(ctx.routes, ctx.meta):
            g = grad[slot]
            if how == "rows":  # A (r, in) from (r_max, in)
                g = g[:r]
            elif how == "rows_t":  # B (out, r) from B^T (r_max, out)
                g = g[:r].t()
            elif how == "cols":  # embedding A (num, r) from (num, r_max)
                g = g[:, :r]
            grads.append(g.reshape(shape).to(dtype))
        return (None, *grads)


class _Routes:
    __slots__ = ("stack", "items")

    def __init__(self, stack: torch.Tensor, items: tuple) -> None:
        self.stack = stack
        self.items = items


def _with_grad(
    stack: torch.Tensor, routed: list[tuple[int, str, int, nn.Parameter]]
) -> torch.Tensor:
    routed = [item for item in routed if item[3].requires_grad]
    if not routed:
        return stack
    routes = _Routes(stack, tuple((slot, how, r) for slot, how, r, _ in routed))
    return _StackGrads.apply(routes, *(p for *_, p in routed))


def _with_grads(st: SiteStacks, used_slots: set[int]) -> SiteStacks:
    """A per-call copy of ``st`` whose stacks carry gradients to the used adapters."""
    new = copy.copy(st)
    items = {k: [(s, l) for s, l in v if s in used_slots] for k, v in st.items.items()}
    if st.lora is not None:
        a, bt, scale, p = st.lora
        lora = items["lora"]
        new.lora = (
            _with_grad(a, [(s, "rows", l.r, l.lora_A.weight) for s, l in lora]),
            _with_grad(bt, [(s, "rows_t", l.r, l.lora_B.weight) for s, l in lora]),
            scale,
            p,
        )
    if st.emb is not None:
        a, bt, scale = st.emb
        emb = items["emb"]
        new.emb = (
            _with_grad(a, [(s, "cols", l.r, l.lora_A.weight) for s, l in emb]),
            _with_grad(bt, [(s, "rows_t", l.r, l.lora_B.weight) for s, l in emb]),
            scale,
        )
    for kind in ("ia3_pre", "ia3_post"):
        stack = getattr(st, kind)
        if stack is not None:
            setattr(new, kind, _with_grad(stack, [(s, "vec", 0, l.ia3_l) for s, l in items[kind]]))
    return new


def _stacked_params(layer: AdapterLayer) -> list[nn.Parameter]:
    kind = _stackable(layer)
    if kind in ("lora", "emb"):
        return [layer.lora_A.weight, layer.lora_B.weight]
    if kind is not None:
        return [layer.ia3_l]
    return []


class _AdapterSignature:
    """What the stacks of one adapter were built from, to detect any later change."""

    __slots__ = ("adapter", "n_layers", "checks", "floats")

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter
        self.n_layers = len(adapter.layers)
        checks = []
        floats = []
        for layer in adapter.layers.values():
            for owner in (getattr(layer, "lora_A", None), getattr(layer, "lora_B", None), layer):
                if owner is None:
                    continue
                for pname, p in owner._parameters.items():
                    if p is not None and (owner is not layer or pname == "ia3_l"):
                        checks.append((owner._parameters, pname, p, p._version, p.data_ptr()))
            floats.append(
                (layer, getattr(layer, "scaling", None), getattr(layer, "lora_dropout", None))
            )
        self.checks = tuple(checks)
        self.floats = tuple(floats)

    def check(self, adapter: nn.Module) -> str:
        """``"fresh"``; ``"values"`` if only parameter values or scalings changed (an
        optimizer step, a load into the parameters); else ``"structure"``."""
        if adapter is not self.adapter or len(adapter.layers) != self.n_layers:
            return "structure"
        status = "fresh"
        for params, pname, p, version, ptr in self.checks:
            # A new data pointer: new storage (.to(), a dtype or device change).
            if params.get(pname) is not p or p.data_ptr() != ptr:
                return "structure"
            if p._version != version:
                status = "values"
        for layer, scaling, dropout in self.floats:
            if (
                getattr(layer, "scaling", None) != scaling
                or getattr(layer, "lora_dropout", None) != dropout
            ):
                status = "values"
        return status


class _WrapperState:
    """Per-wrapper cache of stacks (for all loaded adapters) and the arming lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: tuple[str, ...] = ()
        self.slot: dict[str, int] = {}
        self.sigs: dict[str, _AdapterSignature] = {}
        self.stacks: dict[str, SiteStacks] = {}
        self.sites: dict[str, Any] = {}


_STATES: "weakref.WeakKeyDictionary[nn.Module, _WrapperState]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _wrapper_state(wrapper: nn.Module) -> _WrapperState:
    state = _STATES.get(wrapper)
    if state is None:
        with _STATES_LOCK:
            state = _STATES.get(wrapper)
            if state is None:
                state = _STATES[wrapper] = _WrapperState()
    return state


def clear_cache(wrapper: nn.Module) -> None:
    """Free the stacked adapter tensors cached for ``wrapper``'s mixed calls.

    The cache holds a second copy of every loaded adapter's stackable weights; it is
    rebuilt on the next mixed call that needs it.

    Args:
        wrapper: An ``AdapterWrapper``.
    """
    state = _STATES.get(wrapper)
    if state is not None:
        with state.lock:
            state.names, state.slot, state.sigs, state.stacks, state.sites = (), {}, {}, {}, {}


def _build_stacks(sites: dict[str, Any], names: Sequence[str]) -> dict[str, SiteStacks]:
    stacks = {}
    # Plain tensors without autograd history, even inside inference_mode, so later calls
    # with autograd on can use them too (gradients are routed by _StackGrads).
    with torch.inference_mode(False), torch.no_grad():
        for path, site in sites.items():
            layers = [site.layers.get(name) for name in names]
            if any(layer is not None for layer in layers):
                stacks[path] = SiteStacks(layers)
    return stacks


def _cached_stacks(
    wrapper: Any, state: _WrapperState, used: Sequence[str]
) -> tuple[dict[str, int], dict[str, SiteStacks]]:
    """Stacks over every loaded adapter, brought up to date for the used adapters.

    Changed values of a used adapter restack its slots only; any change of structure
    (adapters added or deleted, new layers or parameter objects, a dtype or device
    change) restacks everything.
    """
    adapters = wrapper.adapters
    names = tuple(adapters.keys())
    stale: list[str] | None = None
    if names == state.names and state.sites == wrapper._sites:
        stale = []
        for name in used:
            sig = state.sigs.get(name)
            status = "structure" if sig is None else sig.check(adapters[name])
            if status == "structure":
                stale = None
                break
            if status == "values":
                stale.append(name)
    if stale is None:
        stacks = _build_stacks(wrapper._sites, names)
        state.sigs = {name: _AdapterSignature(adapters[name]) for name in names}
        state.names = names
        state.slot = {name: i for i, name in enumerate(names)}
        state.stacks = stacks
        state.sites = dict(wrapper._sites)
    elif stale:
        updates: dict[str, dict[int, AdapterLayer]] = {}
        for name in stale:
            for path, layer in adapters[name].items():
                updates.setdefault(path, {})[state.slot[name]] = layer
        with torch.no_grad():
            for path, slots in updates.items():
                if path in state.stacks:
                    _restack_slots(state.stacks[path], slots)
        for name in stale:
            state.sigs[name] = _AdapterSignature(adapters[name])
    return state.slot, state.stacks


# ----------------------------------------------------------------------------------------
# the per-call plan that each hook site runs
# ----------------------------------------------------------------------------------------
class _Call:
    """One mixed call: the row assignment, shared by every module."""

    __slots__ = ("row_index", "batch", "slots", "identity", "_rows", "_groups")

    def __init__(self, row_index: torch.Tensor, slots: list[int], identity: int) -> None:
        self.row_index = row_index
        self.batch = len(slots)
        self.slots = slots
        self.identity = identity
        self._rows: dict[int, torch.Tensor | None] = {}
        self._groups: tuple | None = None

    def groups(self) -> tuple:
        """Rows sorted into segments by slot, identity rows left out (eager mode only).

        Returns:
            ``(n, size, group_slots, rows, row_group, row_pos)`` (see
            ``torch_lora_mixed_grouped``), ``n == 0`` if every row is a base row.
        """
        if self._groups is None:
            segments: dict[int, list[int]] = {}
            for i, slot in enumerate(self.slots):
                if slot != self.identity:
                    segments.setdefault(slot, []).append(i)
            device = self.row_index.device
            long = partial(torch.tensor, dtype=torch.long, device=device)
            members = list(segments.values())
            self._groups = (
                len(segments),
                max((len(m) for m in members), default=0),
                long(list(segments)),
                long([i for m in members for i in m]),
                long([g for g, m in enumerate(members) for _ in m]),
                long([p for m in members for p in range(len(m))]),
            )
        return self._groups

    def rows(self, slot: int) -> torch.Tensor | None:
        """Indices of the rows using ``slot`` (``None`` if none); eager mode only."""
        if slot not in self._rows:
            idx = [i for i, s in enumerate(self.slots) if s == slot]
            self._rows[slot] = (
                torch.tensor(idx, dtype=torch.long, device=self.row_index.device) if idx else None
            )
        return self._rows[slot]


def _check_rows(x: Any, call: _Call, path: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != call.batch:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MixedBatchError(
            f"Module {path!r} received an input of shape {shape}, but adapter_names has "
            f"{call.batch} entries: per-row adapters need the batch as dimension 0 of every "
            "adapted module's input. This model reshapes or folds the batch before this "
            "module; run such rows in separate calls with set_active_adapters() instead."
        )


def _row_mask(call: _Call, slot: int, like: torch.Tensor) -> torch.Tensor:
    return (call.row_index == slot).view((call.batch,) + (1,) * (like.dim() - 1))


def _row_dropout(x: torch.Tensor, p_stack: torch.Tensor, call: _Call) -> torch.Tensor:
    p = p_stack.index_select(0, call.row_index).view((call.batch,) + (1,) * (x.dim() - 1))
    keep = (1.0 - p).to(x.dtype)
    mask = (torch.rand_like(x) < keep).to(x.dtype)
    return x * mask / keep


def _worth_grouping(call: _Call, x: torch.Tensor, a_stack: torch.Tensor) -> tuple | None:
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
    n, size = groups[0], groups[1]
    if 4 * n * (a_stack.shape[1] + size * tokens) < call.batch * a_stack.shape[1]:
        return groups
    return None


class _SitePlan:
    """What one hook site does during one mixed call (see ``HookSite._pre_hook``)."""

    __slots__ = ("path", "stacks", "call")

    def __init__(self, path: str, stacks: SiteStacks, call: _Call) -> None:
        self.path = path
        self.stacks = stacks
        self.call = call

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

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.stacks
        call = self.call
        x = first_input(args, kwargs)
        _check_rows(x, call, self.path)
        # Without autograd, update the module's freshly computed output in place: that
        # saves a full copy of it per adapted module (about 5% of a prefill). Only a
        # forward hook that ran before this one and kept the output could tell.
        inplace = not torch.is_grad_enabled() and isinstance(output, torch.Tensor)
        if st.lora is not None:
            a, bt, scale, p = st.lora
            xin = _row_dropout(x, p, call) if st.has_dropout and module.training else x
            groups = None if torch.compiler.is_compiling() else _worth_grouping(call, xin, a)
            if groups is None:
                output = torch_lora_mixed(xin, output, a, bt, scale, call.row_index, inplace)
            elif groups[0]:
                output = torch_lora_mixed_grouped(
                    xin, output, a, bt, scale, *groups[2:], groups[1], inplace
                )
        if st.emb is not None:
            a, bt, scale = st.emb
            output = torch_embedding_lora_mixed(x, output, a, bt, scale, call.row_index, inplace)
        if st.ia3_post is not None:
            output = torch_ia3_mixed(output, st.ia3_post, call.row_index, inplace)
        for slot, layer in st.others_post:
            output = self._run_post(module, layer, slot, args, kwargs, output)
        return output

    # Layers that run as themselves: on their own rows in eager mode; under
    # torch.compile on the whole batch, selected by a mask, so shapes stay static.
    def _run_pre(self, module, layer, slot, args, kwargs, y):
        compiling = torch.compiler.is_compiling()
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
        if torch.compiler.is_compiling():
            new = layer.post_forward(module, args, kwargs, output)
            return torch.where(_row_mask(self.call, slot, output), new.to(output.dtype), output)
        rows = self.call.rows(slot)
        if rows is None:
            return output
        x = first_input(args, kwargs)
        sub_args, sub_kwargs = replace_first_input(args, kwargs, x.index_select(0, rows))
        new = layer.post_forward(module, sub_args, sub_kwargs, output.index_select(0, rows))
        return output.index_copy(0, rows, new.to(output.dtype))


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
        raise TypeError(
            f"adapter_names must be a list with one adapter name per batch row, got "
            f"{type(adapter_names).__name__}; for one adapter on every row use "
            "set_active_adapters() instead."
        )
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
    for site in wrapper._sites.values():
        for p in site.module.parameters():
            return p.device
    return torch.device("cpu")


def _needs_autograd(state: _WrapperState, used: Sequence[str]) -> bool:
    """Whether the stacks must carry gradients to the used adapters' parameters."""
    if not torch.is_grad_enabled():
        return False
    return any(check[2].requires_grad for name in used for check in state.sigs[name].checks)


@torch.compiler.disable
def _prepare(
    wrapper: Any, fn: Any, adapter_names: Any, args: tuple, kwargs: dict
) -> list[tuple[Any, _SitePlan]]:
    """Validate the call and build every site's plan. Changes nothing visible."""
    wrapper._model()  # raises if unloaded
    names = _validate(wrapper, adapter_names, args, kwargs)
    if not names or getattr(wrapper, "_disabled", 0):
        # An empty batch has no row to adapt; inside disable_adapter() no adapter runs
        # (as in PEFT): both are plain calls.
        return []
    if getattr(fn, "__name__", "") == "generate":
        repeat = _generate_expansion(fn, kwargs)
        if repeat > 1:
            # generate() repeats each input row this many times, consecutively.
            names = [name for name in names for _ in range(repeat)]
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
    state = _wrapper_state(wrapper)
    with state.lock:
        slot_of, stacks = _cached_stacks(wrapper, state, used)
        base_slot = len(slot_of)
        if _needs_autograd(state, used):
            used_slots = {slot_of[name] for name in used}
            stacks = {path: _with_grads(st, used_slots) for path, st in stacks.items()}
        sites = dict(wrapper._sites)
        slots = [slot_of.get(name, base_slot) for name in names]
        device = _device_of_sites(wrapper, _first_tensor(args, kwargs))
        call = _Call(torch.tensor(slots, dtype=torch.long, device=device), slots, base_slot)
        plans = [
            (site, _SitePlan(path, stacks.get(path, _EMPTY), call)) for path, site in sites.items()
        ]
        # Last step, nothing after it can fail: every site used here is released by
        # _retract, which removes the hooks added for this call once no call needs them.
        added = False
        for path, site in sites.items():
            added |= site.prepare_mixed(stacks[path].need_pre if path in stacks else False)
        if added:
            _note_layout(wrapper)
    return plans


def _note_layout(wrapper: Any) -> None:
    note_layout = getattr(type(wrapper), "_note_hook_layout", None)
    if note_layout is not None:
        # The wrapper numbers its hook layout so that compiled graphs of its forward
        # are guarded on it (torch.compile does not guard on empty hook dicts).
        note_layout(wrapper)


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
        TypeError: If ``adapter_names`` is not a list of names.
        AdapterNotFoundError: If a name is neither a loaded adapter nor ``"__base__"``.
        MixedBatchError: If the list's length is not the batch size, or an adapted
            module does not see the batch along dimension 0.
        AdapterStateError: If any adapter is merged, or the wrapper is unloaded.
    """
    plans = _prepare(wrapper, fn, adapter_names, args, kwargs)
    try:
        outer = _publish(plans)
        try:
            return fn(*args, **kwargs)
        finally:
            _retract(plans, outer)
    finally:
        _release(wrapper, plans)


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
def _release(wrapper: Any, plans: list[tuple[Any, _SitePlan]]) -> None:
    # Remove the hooks this call added (once no other thread's call still uses them),
    # so modules whose adapters are inactive carry no hook between calls.
    if not plans:
        return
    state = _wrapper_state(wrapper)
    with state.lock:
        removed = False
        for site, _ in plans:
            removed |= site.release_mixed()
        if removed and wrapper._modules.get("model") is not None:
            _note_layout(wrapper)
