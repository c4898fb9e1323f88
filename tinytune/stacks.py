"""The stacks of mixed batches: per adapted module, the stackable adapters' weights in
rank-padded tensors, one slot per adapter (see :mod:`tinytune.batch` for how calls use
them), the signatures that tell when a slot is stale, and the per-wrapper cache.

Floor 5 (beside ``registry``, which it does not import): imports ``errors``,
``layers`` and the tensor-only ``kernels``. The per-wrapper cache is keyed by the
wrapper object but never reads it.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from .layers import AdapterLayer, is_dora, layer_kind

__all__ = [
    "STATES",
    "AdapterSignature",
    "SiteStacks",
    "WrapperState",
    "release_unreserved",
    "stack_params",
    "state_of",
    "with_grads",
]


# ----------------------------------------------------------------------------------------
# stacks: one per adapted module, for one slot order
# ----------------------------------------------------------------------------------------
def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _lora_dims(kind: str, layer: AdapterLayer) -> tuple[int, int]:
    """``(rows of A's stack entry, width of B^T's)`` of a LoRA layer: ``(in, out)`` for
    linear LoRA, ``(num_embeddings, dim)`` for embedding LoRA."""
    return int(layer.lora_A.weight.shape[1 if kind == "lora" else 0]), int(
        layer.lora_B.weight.shape[0]
    )


def stack_params(layer: AdapterLayer, kind: str | None) -> tuple[nn.Parameter, ...]:
    """The parameters of ``layer`` that live in the stacks, looked up afresh (so a
    replaced ``lora_B`` module or parameter is seen)."""
    if kind in ("lora", "emb"):
        a, b = layer._modules.get("lora_A"), layer._modules.get("lora_B")
        if a is None or b is None:
            return ()
        return tuple(p for p in (a._parameters.get("weight"), b._parameters.get("weight")) if p is not None)
    if kind is not None:
        p = layer._parameters.get("ia3_l")
        return () if p is None else (p,)
    return ()


class SiteStacks:
    """The stacked adapter tensors of one module: one slot per adapter, plus a last
    identity slot (``"__base__"`` rows, and adapters without a layer here).

    The stacks *are* the storage of the adapters' stackable parameters: after a layer is
    put in a slot (:meth:`set_slot`), its ``lora_A.weight``, ``lora_B.weight`` or
    ``ia3_l`` is a view of its slot (``param.data`` is rebound; the parameter object
    stays the same). Every in-place change of a parameter (``.data.mul_``, ``copy_``,
    ``load_state_dict``, any optimizer, fused or not) is therefore a change of the stack
    itself, and the next mixed call cannot serve stale values. What a view cannot follow
    (a new parameter object or module, ``param.data = other``, a new scaling) changes
    the parameter's identity, data pointer, shape or a float, which
    ``AdapterSignature`` compares on every call. A parameter whose dtype or device
    differs from its stack's is copied instead, and refreshed on every call that uses it.

    Attributes:
        lora: ``(a_stack (S, r, in), bt_stack (S, r, out), scale (S,), dropout (S,))``
            or ``None``.
        has_dropout: Whether any LoRA slot uses dropout (applied in training mode).
        emb: ``(a_stack (S, num, r), bt_stack (S, r, dim), scale (S,))`` or ``None``.
        ia3_pre: ``(S, in)`` input scales (feed-forward IA³) or ``None``.
        ia3_post: ``(S, out)`` output scales or ``None``.
        dora: ``(S, out)`` fp32 DoRA scales ``g`` (see ``DoraLayer.dora_scale``) of the
            ``lora`` or ``emb`` slots, ones for slots without DoRA, or ``None`` when no
            DoRA layer was ever stacked here. A DoRA layer's cached scale is a view of
            its row, so refreshing the cache updates the stack in place.
        dora_items: ``((slot, layer), ...)`` of the DoRA layers in the slots.
        ranks: ``(S,)`` int32 on the stacks' device: each slot's true LoRA rank (of the
            ``lora`` or ``emb`` kind; a module has at most one), 0 for slots without
            LoRA and for the identity slot. Kept current in place; fused kernels mask
            the padded rank rows with it.
        others_pre, others_post: ``((slot, layer), ...)``: layers that run as
            themselves on their rows, those with a ``pre_forward`` / ``post_forward``.
        need_pre: Whether any layer here changes the module's inputs.
        layers: The layer in each slot (``None``: identity).

    Args:
        layers: The layer of each adapter in slot order at this module (``None`` where
            an adapter has none).
        capacity: Number of adapter slots (default ``len(layers)``); fixed for the
            stacks' lifetime.
        max_rank: Rank the LoRA stacks are padded to (default: the largest rank in
            ``layers``).
        bind: Make the layers' parameters views of their slots (default). ``False``
            copies them (a throwaway stack).
        like: More layers to allocate stacks for (kinds, shapes, dtype, device),
            without putting them in slots.
        device: Where to allocate the stacks (default: where the layers' parameters
            are; reserved slots pass the module's device, their adapters' parameters
            may be in host memory).
    """

    __slots__ = (
        "lora",
        "has_dropout",
        "emb",
        "ia3_pre",
        "ia3_post",
        "dora",
        "dora_items",
        "others_pre",
        "others_post",
        "need_pre",
        "items",
        "ranks",
        "layers",
        "bound",
        "copied",
        "max_rank",
        "dirty",
        "kinds",
        "device",
        "fixed",
    )

    def __init__(
        self,
        layers: Sequence[AdapterLayer | None],
        capacity: int | None = None,
        max_rank: int | None = None,
        bind: bool = True,
        like: Sequence[AdapterLayer] = (),
        device: torch.device | None = None,
    ) -> None:
        layers = list(layers)
        n = (len(layers) if capacity is None else capacity) + 1  # + identity slot
        self.lora = self.emb = self.ia3_pre = self.ia3_post = self.dora = None
        self.dora_items: tuple = ()
        self.max_rank = max_rank
        self.layers: list[AdapterLayer | None] = [None] * n
        self.kinds: list[str | None] = [None] * n  # layer_kind() of each slot's layer
        self.bound: list[tuple[nn.Parameter, ...]] = [()] * n
        self.copied: set[int] = set()
        self.dirty: set[int] = set()  # vacated slots still holding old values
        # Reserved slots (a device given): parameters may live in host memory and move
        # into their slots; otherwise a parameter on another device is copied, not bound.
        self.fixed = device is not None
        for layer in [*layers, *like]:
            if device is not None:
                break
            params = stack_params(layer, layer_kind(layer)) if layer is not None else ()
            if params:
                device = params[0].device
                break
        self.device = device
        self.ranks = torch.zeros(n, dtype=torch.int32, device=device)
        with torch.inference_mode(False), torch.no_grad():
            self._allocate([l for l in [*layers, *like] if l is not None])
            for slot, layer in enumerate(layers):
                if layer is not None:
                    self._write(slot, layer, bind)
        self.derive()

    # --- allocation --------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of slots, the identity slot included."""
        return len(self.layers)

    def _allocate(self, layers: list[AdapterLayer]) -> None:
        """Allocate the stacks of every kind ``layers`` have and this one lacks."""
        by_kind: dict[str, list[AdapterLayer]] = {}
        for layer in layers:
            kind = layer_kind(layer)
            if kind is not None and getattr(self, kind) is None and stack_params(layer, kind):
                by_kind.setdefault(kind, []).append(layer)
        n = self.size
        if self.dora is None:
            dora = [l for l in layers if is_dora(l) and layer_kind(l) in ("lora", "emb")]
            if dora:
                params = stack_params(dora[0], layer_kind(dora[0]))
                device = self.device if self.device is not None else params[0].device
                width = int(dora[0].lora_B.weight.shape[0])
                self.dora = torch.ones((n, width), dtype=torch.float32, device=device)
        for kind, items in by_kind.items():
            params = [p for layer in items for p in stack_params(layer, kind)]
            dtype = _common_dtype(params)
            device = self.device if self.device is not None else params[0].device
            if kind in ("lora", "emb"):
                r = self.max_rank or max(int(layer.r) for layer in items)
                rows, width = _lora_dims(kind, items[0])
                a_shape = (n, r, rows) if kind == "lora" else (n, rows, r)
                stacks = (
                    torch.zeros(a_shape, dtype=dtype, device=device),
                    torch.zeros((n, r, width), dtype=dtype, device=device),
                    # float64: the scalings are Python floats; each path casts to its
                    # compute dtype.
                    torch.zeros(n, dtype=torch.float64, device=device),
                )
                if kind == "lora":
                    stacks += (torch.zeros(n, dtype=torch.float32, device=device),)
                setattr(self, kind, stacks)
            else:
                width = items[0].ia3_l.numel()
                setattr(self, kind, torch.ones((n, width), dtype=dtype, device=device))

    def ensure(self, layers: Sequence[AdapterLayer]) -> None:
        """Allocate the stacks of kinds that ``layers`` have and these stacks lack (new
        tensors: compiled graphs that read these stacks recompile once)."""
        with torch.inference_mode(False), torch.no_grad():
            self._allocate(list(layers))
        self.derive()

    def fits(self, layer: AdapterLayer) -> bool:
        """Whether ``layer`` can go into a slot without reallocating any stack."""
        kind = layer_kind(layer)
        if kind is None:
            return True
        params = stack_params(layer, kind)
        if not params:
            return False
        if is_dora(layer) and self.dora is None:
            return False
        stacks = getattr(self, kind)
        if stacks is None:
            return False
        ref = stacks[0] if kind in ("lora", "emb") else stacks
        if any(p.dtype != ref.dtype or (p.device != ref.device and not self.fixed) for p in params):
            return False
        if kind in ("lora", "emb"):
            a, bt = stacks[0], stacks[1]
            rows, width = _lora_dims(kind, layer)
            r_stack = a.shape[1] if kind == "lora" else a.shape[2]
            return (
                layer.r <= r_stack
                and rows == (a.shape[2] if kind == "lora" else a.shape[1])
                and width == bt.shape[2]
                and params[0].shape[0 if kind == "lora" else 1] == layer.r
                and params[1].shape[1] == layer.r
            )
        return params[0].numel() == stacks.shape[1]

    # --- slots -------------------------------------------------------------------------
    def views(self, slot: int, layer: AdapterLayer) -> tuple[torch.Tensor, ...]:
        """The views of slot ``slot`` that ``layer``'s stack parameters become, in the
        order of ``stack_params`` (same shapes as the parameters)."""
        kind = layer_kind(layer)
        if kind in ("lora", "emb"):
            a, bt = getattr(self, kind)[:2]
            r = int(layer.r)
            va = a[slot, :r] if kind == "lora" else a[slot, :, :r]
            return va, bt[slot, :r].t()
        return (getattr(self, kind)[slot].view(layer.ia3_l.shape),)

    def set_slot(
        self, slot: int, layer: AdapterLayer | None, bind: bool = True, derive: bool = True
    ) -> None:
        """Put ``layer`` in slot ``slot`` (``None``: identity), in place.

        The previous occupant's parameters must have been moved out first (see
        ``unbind``); ``layer`` must fit (see :meth:`fits`). With ``bind``, ``layer``'s
        stack parameters become views of the slot. ``derive=False`` leaves the
        bookkeeping attributes to a later :meth:`derive` (several slots at once).
        """
        self.unbind(slot)
        with torch.inference_mode(False), torch.no_grad():
            self._clear(slot)
            if layer is not None:
                self._write(slot, layer, bind)
        if derive:
            self.derive()

    def refresh(self, slot: int) -> None:
        """Copy again the values of a slot whose parameters are copies (not views)."""
        layer = self.layers[slot]
        if layer is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            for p, v in zip(stack_params(layer, layer_kind(layer)), self.views(slot, layer)):
                if v.data_ptr() != p.data_ptr():
                    v.copy_(p.detach())

    def unbind(self, slot: int, into: Any = None) -> None:
        """Give the parameters viewing slot ``slot`` storage of their own again.

        Args:
            slot: The slot.
            into: ``param -> tensor`` (same shape) to copy each parameter into, e.g. its
                host-memory buffer; default: a fresh contiguous copy on its device.
        """
        layer = self.layers[slot]
        if getattr(layer, "slot_factors", None) is not None:
            layer.slot_factors = None
        if is_dora(layer):
            cache = layer._buffers.get("dora_scale_cache")
            if cache is not None and self.dora is not None and cache.data_ptr() == self.dora[slot].data_ptr():
                layer._buffers["dora_scale_cache"] = cache.clone()
        if not self.bound[slot]:
            return
        with torch.inference_mode(False), torch.no_grad():
            for p in self.bound[slot]:
                if into is None:
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
                else:
                    buf = into(p)
                    buf.copy_(p.data)
                    p.data = buf
        self.bound[slot] = ()

    def vacate(self, slot: int, derive: bool = True) -> None:
        """Empty slot ``slot`` without clearing its values (no row may index it until
        :meth:`set_slot` fills or clears it); its parameters must have been moved out."""
        self.unbind(slot)
        self.layers[slot] = None
        self.kinds[slot] = None
        self.copied.discard(slot)
        self.dirty.add(slot)
        self.ranks[slot] = 0
        if derive:
            self.derive()

    def _clear(self, slot: int) -> None:
        self.dirty.discard(slot)
        for kind in ("lora", "emb"):
            stacks = getattr(self, kind)
            if stacks is not None:
                for t in stacks:
                    t[slot].zero_()
        for kind in ("ia3_pre", "ia3_post"):
            stack = getattr(self, kind)
            if stack is not None:
                stack[slot].fill_(1.0)
        if self.dora is not None:
            self.dora[slot].fill_(1.0)
        self.ranks[slot] = 0
        self.layers[slot] = None
        self.kinds[slot] = None
        self.bound[slot] = ()
        self.copied.discard(slot)

    def _write(self, slot: int, layer: AdapterLayer, bind: bool) -> None:
        self.layers[slot] = layer
        kind = self.kinds[slot] = layer_kind(layer)
        if kind is None:
            return
        params = stack_params(layer, kind)
        views = self.views(slot, layer)
        bound = []
        for p, v in zip(params, views):
            v.copy_(p.detach(), non_blocking=True)
            same_device = p.device == v.device or self.fixed
            if bind and p.dtype == v.dtype and same_device and p.shape == v.shape:
                if p.data_ptr() != v.data_ptr() or p.stride() != v.stride():
                    p.data = v
                bound.append(p)
        self.bound[slot] = tuple(bound)
        if len(bound) != len(params):
            self.copied.add(slot)
        if kind in ("lora", "emb"):
            stacks = getattr(self, kind)
            if self.fixed and slot not in self.copied:
                # Reserved slots: plain calls read the fixed-shape slot, which is the
                # parameters' storage (LoraLayer.slot_factors), so a new rank never
                # changes what a compiled graph sees.
                layer.slot_factors = (stacks[0][slot], stacks[1][slot])
            stacks[2][slot] = float(layer.scaling)
            if kind == "lora":
                stacks[3][slot] = float(layer.lora_dropout)
            self.ranks[slot] = int(layer.r)
            if is_dora(layer):
                row = self.dora[slot]
                row.copy_(layer.dora_scale())
                if bind and row.device == layer.dora_scale_cache.device:
                    # The layer's cache becomes this row: its refreshes update the stack.
                    layer._buffers["dora_scale_cache"] = row

    def derive(self) -> None:
        """Re-derive the per-slot bookkeeping from ``layers`` (after a slot changed).

        One plain pass: it runs for every slot written, so it stays cheap."""
        by_kind: dict[str, list[tuple[int, AdapterLayer]]] = {}
        pre: list[tuple[int, AdapterLayer]] = []
        post: list[tuple[int, AdapterLayer]] = []
        dropout = False
        for slot, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            if layer is None:
                continue
            if kind is None:
                if layer.uses_pre_forward:
                    pre.append((slot, layer))
                if layer.uses_post_forward:
                    post.append((slot, layer))
            else:
                by_kind.setdefault(kind, []).append((slot, layer))
                dropout = dropout or (kind == "lora" and layer.lora_dropout > 0)
        self.items = by_kind  # kind -> [(slot, layer)], to route gradients (with_grads)
        self.dora_items = tuple(
            (s, l) for kind in ("lora", "emb") for s, l in by_kind.get(kind, ()) if is_dora(l)
        )
        self.has_dropout = dropout
        self.others_pre = tuple(pre)
        self.others_post = tuple(post)
        # With an input-IA³ stack every row goes through it (ones for the others), so
        # the pre-hook is needed whoever is in the slots: keeps the hooks stable.
        self.need_pre = self.ia3_pre is not None or bool(self.others_pre)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        out = [self.ranks]
        for kind in ("lora", "emb"):
            out.extend(getattr(self, kind) or ())
        out.extend(t for t in (self.ia3_pre, self.ia3_post, self.dora) if t is not None)
        return out


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


def with_grads(st: SiteStacks, used_slots: set[int]) -> SiteStacks:
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
    dora = [(s, l) for s, l in st.dora_items if s in used_slots and l.lora_magnitude_vector.requires_grad]
    if dora:
        # g = m / norm with the norm detached (as in PEFT): gradients reach m.
        rows = torch.stack([
            l.lora_magnitude_vector.reshape(-1).float() / l.dora_norm().to(st.dora.device) for _, l in dora
        ])
        index = torch.tensor([s for s, _ in dora], device=st.dora.device)
        new.dora = st.dora.detach().index_put((index,), rows)
    return new


class AdapterSignature:
    """What an adapter's slots were written from, to detect what views cannot follow.

    In-place changes of values need no check: the parameters are views of the stacks.
    This compares, per layer, the layer objects, the parameter objects (looked up afresh
    through ``lora_A`` / ``lora_B`` / ``ia3_l``), their data pointers and shapes (a
    ``param.data = ...`` rebinding) and the floats (``scaling``, ``lora_dropout``).
    """

    __slots__ = ("adapter", "layers", "entries", "copies")

    def __init__(self, adapter: nn.Module, copies: bool = False) -> None:
        self.adapter = adapter
        self.layers = tuple(adapter.layers.values())
        entries = []
        for layer in self.layers:
            params = stack_params(layer, layer_kind(layer))
            entries.append(
                (
                    layer,
                    params,
                    tuple((p.data_ptr(), p.shape) for p in params),
                    getattr(layer, "scaling", None),
                    getattr(layer, "lora_dropout", None),
                )
            )
        self.entries = tuple(entries)
        self.copies = copies  # some slot of this adapter holds copies, not views

    def fresh(self, adapter: nn.Module) -> bool:
        """Whether the slots written from ``adapter`` still show it exactly."""
        if adapter is not self.adapter:
            return False
        layers = adapter.layers._modules
        if len(layers) != len(self.layers):
            return False
        for live, (layer, params, where, scaling, dropout) in zip(layers.values(), self.entries):
            if live is not layer:
                return False
            now = stack_params(layer, layer_kind(layer))
            if len(now) != len(params):
                return False
            for p, q, (ptr, shape) in zip(now, params, where):
                if p is not q or p.data_ptr() != ptr or p.shape != shape:
                    return False
            if getattr(layer, "scaling", None) != scaling or getattr(layer, "lora_dropout", None) != dropout:
                return False
        return True

    def requires_grad(self) -> bool:
        return any(p.requires_grad for entry in self.entries for p in entry[1])


class WrapperState:
    """Per-wrapper cache of stacks, and the lock that guards it.

    Without reserved slots (``pool is None``), one slot per loaded adapter, in the
    order of ``wrapper.adapters``; with them, ``pool`` (a
    :class:`tinytune.serving.SlotPool`) owns the stacks and the slots.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.names: tuple[str, ...] = ()
        self.slot: dict[str, int] = {}
        self.sigs: dict[str, AdapterSignature] = {}
        self.stacks: dict[str, SiteStacks] = {}
        self.sites: dict[str, Any] = {}
        self.pool: Any = None
        self.recent: dict[str, None] = {}  # names in order of use, most recent last
        self.loads = 0


STATES: "weakref.WeakKeyDictionary[nn.Module, WrapperState]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_of(wrapper: nn.Module) -> WrapperState:
    state = STATES.get(wrapper)
    if state is None:
        with _STATES_LOCK:
            state = STATES.get(wrapper)
            if state is None:
                state = STATES[wrapper] = WrapperState()
    return state


def release_unreserved(state: WrapperState) -> None:
    """Give every stacked parameter its own storage again and drop the stacks."""
    for st in state.stacks.values():
        for slot in range(st.size):
            st.unbind(slot)
    state.names, state.slot, state.sigs, state.stacks, state.sites = (), {}, {}, {}, {}
    state.recent = {}
