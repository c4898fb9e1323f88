"""Serving many adapters: fixed adapter slots, a host-memory tier, LRU eviction.

After ``wrapper.reserve_adapter_slots(max_adapters, max_rank)`` the mixed-batch stacks
of every adapted module (see :class:`tinytune.batch.SiteStacks`) have a fixed shape:
``max_adapters`` slots padded to ``max_rank``, plus the identity slot, allocated once.
Any number of adapters may be loaded; the stackable weights (LoRA factors, IA³ scales)
of an adapter that is not in a slot live in host memory (pinned when the model is on
CUDA), in a buffer per parameter that the parameter itself uses as its storage. A mixed
call brings the adapters it names into slots, least recently used out first:

* loading copies the adapter's host buffers into its slot (asynchronously from pinned
  memory on CUDA, on the current stream, so ordered before the call's kernels) and
  makes its parameters views of the slot;
* evicting copies the slot back into the host buffers (the parameters may have been
  changed in place while resident) and makes them the parameters' storage again.

A plain call (no ``adapter_names``) and a merge bring the active (or merged) adapters
into slots the same way before reading their parameters (see :func:`plain_call`), so
they never hand a kernel a host tensor.

No tensor of the stacks ever changes shape or identity, so a compiled model does not
recompile and the stacks a captured CUDA graph reads stay valid (the row index is a
new tensor per call; README, "Serving many adapters", says what capturing takes). Slots
that a call in flight on another thread uses are never evicted under it: a call that
needs them waits.

Layers that are not stacked (``modules_to_save`` copies, Conv2d LoRA, custom
``AdapterLayer`` s) run as themselves on their rows; they take a slot (for the row
index) but no slot memory, and stay where they are.

Floor 6: imports ``errors``, ``util``, ``layers``, ``io`` and ``stacks``; reaches the
adapters through ``wrapper.registry`` (:mod:`tinytune.registry`) without importing it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .stacks import STATES, AdapterSignature, SiteStacks, release_unreserved, stack_params, state_of
from .adapter import BASE_ADAPTER_NAME
from .errors import (
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    InvalidConfigError,
    MixedBatchError,
    suggest,
    wrong_type,
)
from .io import layer_config, read_adapter
from .layers import LinearIA3Layer, LoraLayer, is_dora, layer_kind
from .util import device_of, run_frames_eagerly, run_model

__all__ = ["SlotPool", "assign_rows", "check_fits", "clear_rows", "row_assignment"]

# How long a call waits for slots that calls on other threads are using.
_WAIT_S = 60.0


def check_fits(adapter: Any, max_rank: int) -> None:
    """Refuse an adapter with a LoRA rank above ``max_rank``.

    Raises:
        InvalidConfigError: Naming the first layer whose rank is too high.
    """
    for path, layer in adapter.items():
        r = getattr(layer, "r", None)
        if layer_kind(layer) in ("lora", "emb") and isinstance(r, int) and r > max_rank:
            raise InvalidConfigError(
                f"Adapter {adapter.name!r} has rank {r} on {path!r}, above max_rank="
                f"{max_rank} reserved by reserve_adapter_slots(); nothing was changed. "
                f"Call reserve_adapter_slots(max_adapters, max_rank={r}) (or more) first, "
                "or use an adapter of a lower rank."
            )


class SlotPool:
    """The reserved slots of one wrapper, and the host tier behind them.

    Args:
        wrapper: The ``AdapterWrapper``.
        capacity: Number of adapter slots.
        max_rank: Rank every LoRA stack is padded to.
        lock: The wrapper state's lock (guards everything here).
    """

    def __init__(self, wrapper: nn.Module, capacity: int, max_rank: int, lock: Any) -> None:
        self._wrapper = weakref.ref(wrapper)
        self.capacity = capacity
        self.max_rank = max_rank
        self.stacks: dict[str, SiteStacks] = {}
        self.slot_of: dict[str, int] = {}
        self.lru: "OrderedDict[str, None]" = OrderedDict()  # resident, most recent last
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.sigs: dict[str, AdapterSignature] = {}  # resident adapters
        self.known: dict[str, nn.Module] = {}  # adapter objects adopted into the host tier
        self.host: dict[str, dict[int, tuple[nn.Parameter, torch.Tensor]]] = {}
        self.inflight = [0] * capacity
        self.held = [0] * capacity  # of inflight: pins of the row assignment (hold)
        self.cond = threading.Condition(lock)
        self.local = threading.local()
        self.loads = 0
        self.evictions = 0
        self.where: dict[str, tuple] = {}  # module path -> (device, dtype) at allocation
        # The static row assignment (set_row_adapters): ``rows`` is the (max_rows,) slot
        # buffer calls read, written in place only; ``assigned`` the names of its rows,
        # ``assigned_slots`` the slots written, ``assigned_held`` the slots it holds
        # (pinned for as long as it lasts, on no thread's account).
        self.rows: torch.Tensor | None = None
        self.assigned: tuple[str, ...] | None = None
        self.assigned_slots: list[int] = []
        self.assigned_held: list[int] = []

    @property
    def identity(self) -> int:
        return self.capacity

    # --- the host tier -----------------------------------------------------------------
    def _site_stacks(self, path: str, layer: Any) -> SiteStacks:
        """The stacks of ``path``, allocating them (or a missing kind) on first use."""
        st = self.stacks.get(path)
        if st is None:
            st = self.stacks[path] = SiteStacks(
                (),
                capacity=self.capacity,
                max_rank=self.max_rank,
                like=[layer],
                device=_module_device(self._wrapper(), path),
            )
            self.where[path] = _module_where(self._wrapper(), path)
        elif layer_kind(layer) is not None and not st.fits(layer):
            st.ensure([layer])
        return st

    def adopt(self, name: str, adapter: nn.Module) -> None:
        """Take a (new or changed) adapter into the host tier: each stackable parameter
        gets a host buffer, laid out like its slot view, as its storage."""
        buffers: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        old = self.host.get(name, {})
        with torch.inference_mode(False), torch.no_grad():
            for path, layer in adapter.items():
                kind = layer_kind(layer)
                st = self._site_stacks(path, layer)
                if kind is None:
                    continue
                for p, v in zip(stack_params(layer, kind), st.views(0, layer)):
                    if p.dtype != v.dtype or p.shape != v.shape:
                        continue  # copied into its slot instead (see SiteStacks)
                    kept = old.get(id(p))
                    if kept is not None and kept[0] is p and p.data_ptr() == kept[1].data_ptr():
                        buffers[id(p)] = kept
                        continue
                    buf = self._buffer_like(v)
                    buf.copy_(p.detach())
                    if name not in self.slot_of:
                        p.data = buf
                    buffers[id(p)] = (p, buf)
        self.host[name] = buffers
        self.known[name] = adapter

    def _buffer_like(self, view: torch.Tensor) -> torch.Tensor:
        pin = view.is_cuda
        return torch.empty_strided(
            view.size(), view.stride(), dtype=view.dtype, device="cpu", pin_memory=pin
        )

    def _host_buffer(self, name: str, p: nn.Parameter) -> torch.Tensor:
        kept = self.host.setdefault(name, {}).get(id(p))
        if kept is None or kept[0] is not p or kept[1].shape != p.shape:
            kept = (p, self._buffer_like(p.data))
            self.host[name][id(p)] = kept
        return kept[1]

    # --- slots -------------------------------------------------------------------------
    def _load(self, name: str, slot: int) -> None:
        adapter = self.known[name]
        layers = dict(adapter.items())
        for path, layer in layers.items():
            st = self.stacks.get(path)  # allocated when the adapter was adopted
            st = st if st is not None else self._site_stacks(path, layer)
            st.set_slot(slot, layer, derive=False)
        for path, st in self.stacks.items():
            if path not in layers and slot in st.dirty:
                st.set_slot(slot, None, derive=False)  # identity where it has no layer
        self.slot_of[name] = slot
        self.lru[name] = None
        self.sigs[name] = AdapterSignature(
            adapter, any(slot in st.copied for st in self.stacks.values())
        )
        self.loads += 1

    def _evict(self, name: str, keep_host: bool = True) -> int:
        slot = self.slot_of.pop(name)
        self.lru.pop(name, None)
        self.sigs.pop(name, None)
        for st in self.stacks.values():
            if st.layers[slot] is not None:
                if keep_host:
                    st.unbind(slot, into=lambda p: self._host_buffer(name, p))
                # Unbinds what is left into fresh copies; the values stay until the slot
                # is filled (no row indexes a free slot), which saves a pass over them.
                st.vacate(slot, derive=False)
        self.free.append(slot)
        return slot

    def evict_all(self) -> None:
        """Move every resident adapter to the host tier."""
        for name in list(self.slot_of):
            self._evict(name)
            self.evictions += 1
        self.derive()

    def derive(self) -> None:
        """Bring every module's bookkeeping up to date after slots changed."""
        for st in self.stacks.values():
            st.derive()

    def forget(self, name: str) -> None:
        """Drop a deleted adapter: its slot is freed, its host buffers released (its
        parameters keep their values, in storage of their own)."""
        if name in self.slot_of:
            self._evict(name, keep_host=False)
            self.derive()
        self.known.pop(name, None)
        self.host.pop(name, None)

    def _model_moved(self) -> bool:
        """Whether the model changed device or dtype since the stacks were allocated (one
        module checked: models move as a whole; ``_moved`` checks every module when
        adapters change)."""
        for path, where in self.where.items():
            return _module_where(self._wrapper(), path) != where
        return False

    def _moved(self, adapter: nn.Module) -> bool:
        """Whether the model moved to another device since the stacks were allocated,
        or ``adapter`` has stackable parameters of another dtype than their stacks."""
        wrapper = self._wrapper()
        for path, st in self.stacks.items():
            device = _module_device(wrapper, path)
            if device is not None and st.device is not None and device != st.device:
                return True
        for path, layer in adapter.items():
            st = self.stacks.get(path)
            kind = layer_kind(layer)
            if st is None or kind is None or getattr(st, kind) is None:
                continue
            stacks = getattr(st, kind)
            ref = stacks[0] if kind in ("lora", "emb") else stacks
            if any(p.dtype != ref.dtype for p in stack_params(layer, kind)):
                return True
        return False

    def _reset(self) -> None:
        """Forget every slot and stack; parameters keep their values in storage of
        their own. (Stacks are not cleared: calls in flight may still read them.)"""
        for st in self.stacks.values():
            for slot in range(st.size):
                st.unbind(slot)
        self.stacks, self.where = {}, {}
        self.slot_of, self.sigs, self.known, self.host = {}, {}, {}, {}
        self.lru.clear()
        self.free = list(range(self.capacity - 1, -1, -1))

    def _pin(self, slots: list[int]) -> "_Pins":
        for s in slots:
            self.inflight[s] += 1
        self.local.count = getattr(self.local, "count", 0) + len(slots)
        return _Pins(self, slots)

    def hold(self, slots: list[int]) -> None:
        """Pin ``slots`` beyond any call (the row assignment), until :meth:`unhold`."""
        for s in slots:
            self.inflight[s] += 1
            self.held[s] += 1

    def unhold(self, slots: list[int]) -> None:
        for s in slots:
            self.inflight[s] -= 1
            self.held[s] -= 1
        self.cond.notify_all()

    def _unpin(self, slots: list[int]) -> None:
        with self.cond:
            for s in slots:
                self.inflight[s] -= 1
            self.local.count = getattr(self.local, "count", 0) - len(slots)
            self.cond.notify_all()

    def prepare(
        self, used: Sequence[str], plain: bool = False, combining: bool = False
    ) -> tuple[dict[str, int], dict[str, SiteStacks], "_Pins"]:
        """Bring the ``used`` adapters into slots (LRU eviction) and pin those slots for
        the call. Validates before changing anything.

        Args:
            used: The adapters the call runs, each once.
            plain: The call is a plain call (or a merge) running the active adapters,
                not a mixed call naming them (only changes the error messages).
            combining: ``used`` are the sources of ``add_weighted_adapter`` (only
                changes the error messages).

        Returns:
            ``(slot of each resident adapter, stacks by module path, pins)``; release the
            pins when the call ends.

        Raises:
            MixedBatchError: If the call names more distinct adapters than there are
                slots, or its slots stay busy with other threads' calls.
            InvalidConfigError: If a used adapter has a layer of rank above
                ``max_rank`` (changed by hand after loading).
        """
        wrapper = self._wrapper()
        adapters = wrapper.adapters
        if len(used) > self.capacity and combining:
            raise MixedBatchError(
                f"add_weighted_adapter reads its {len(used)} source adapters ({list(used)!r}) "
                f"from adapter slots, but only {self.capacity} slots are reserved: it needs "
                f"{len(used)}. Combine at most {self.capacity} adapters at a time (combine "
                f"the result again), or call reserve_adapter_slots({len(used)}, "
                f"{self.max_rank}). Nothing was changed."
            )
        if len(used) > self.capacity and plain:
            raise MixedBatchError(
                f"{len(used)} adapters are active ({list(used)!r}) and a plain call runs "
                f"them all from adapter slots, but only {self.capacity} slots are reserved: "
                f"it needs {len(used)}. Activate at most {self.capacity} adapters, merge "
                f"some, or call reserve_adapter_slots({len(used)}, {self.max_rank}). "
                "Nothing was changed."
            )
        if len(used) > self.capacity:
            raise MixedBatchError(
                f"This call names {len(used)} distinct adapters, but only {self.capacity} "
                f"adapter slots are reserved: it needs {len(used)} slots. Split the batch "
                f"into calls of at most {self.capacity} distinct adapters, or call "
                f"reserve_adapter_slots({len(used)}, {self.max_rank}). Nothing was changed."
            )
        stale = []
        for name in used:
            adapter = adapters[name]
            if self.known.get(name) is not adapter:
                stale.append(name)
            elif name in self.slot_of and not self.sigs[name].fresh(adapter):
                stale.append(name)
        for name in stale:
            check_fits(adapters[name], self.max_rank)
        if self._model_moved() or any(self._moved(adapters[name]) for name in stale):
            # The model changed dtype or device (wrapper.to(...)): reallocate the stacks
            # like it (new tensors, as any dtype or device change needs).
            self._reset()
            stale = list(used)
        used_set = set(used)
        need = [n for n in used if n not in self.slot_of]
        while True:
            evictable = [
                n for n in self.lru if n not in used_set and not self.inflight[self.slot_of[n]]
            ]
            if len(self.free) + len(evictable) >= len(need):
                break
            # Slots held by the row assignment free up only at clear_row_adapters():
            # waiting for them would only time out.
            freeable = [n for n in self.lru if n not in used_set and not self.held[self.slot_of[n]]]
            if len(self.free) + len(freeable) < len(need):
                raise MixedBatchError(
                    f"This call needs {len(need)} more adapter slots, but the others hold "
                    "adapters assigned to rows (set_row_adapters). Call "
                    "clear_row_adapters() or assign fewer adapters, or reserve more slots "
                    "(reserve_adapter_slots). Nothing was changed."
                )
            if getattr(self.local, "count", 0):
                raise MixedBatchError(
                    "A call made inside another one on the same thread needs adapter "
                    "slots that the outer call is using; reserve more slots "
                    "(reserve_adapter_slots) or make the inner call outside. Nothing was "
                    "changed."
                )
            if not self.cond.wait(_WAIT_S):
                raise MixedBatchError(
                    f"Timed out after {_WAIT_S:.0f} s waiting for {len(need)} free adapter "
                    "slots: calls on other threads hold them. Reserve more slots "
                    "(reserve_adapter_slots). Nothing was changed."
                )
            need = [n for n in used if n not in self.slot_of]
        # From here on, nothing can fail for a reason of the caller's.
        for name in stale:
            was = self.slot_of.get(name)
            if was is not None:
                self._evict(name, keep_host=False)
            self.adopt(name, adapters[name])
            if was is not None:
                self.free.remove(was)
                self._load(name, was)
                self.loads -= 1  # a rewrite in place, not a load from the host tier
        for name in used:
            if name in self.slot_of:
                self.lru.move_to_end(name)
                if self.sigs[name].copies:
                    slot = self.slot_of[name]
                    for st in self.stacks.values():
                        if slot in st.copied:
                            st.refresh(slot)
                continue
            if self.free:
                slot = self.free.pop()
            else:
                victim = next(
                    n for n in self.lru if n not in used_set and not self.inflight[self.slot_of[n]]
                )
                self._evict(victim)
                self.evictions += 1
                slot = self.free.pop()
            self._load(name, slot)
        if stale or need:
            self.derive()
        pins = self._pin([self.slot_of[n] for n in used])
        return dict(self.slot_of), self.stacks, pins

    def stats(self) -> dict[str, Any]:
        device = sum(t.numel() * t.element_size() for st in self.stacks.values() for t in st.tensors())
        host = sum(
            buf.untyped_storage().nbytes() for bufs in self.host.values() for _, buf in bufs.values()
        )
        return {
            "device_bytes": int(device),
            "host_bytes": int(host),
            "resident": list(reversed(self.lru)),
            "loads": self.loads,
            "evictions": self.evictions,
            "max_adapters": self.capacity,
            "max_rank": self.max_rank,
        }


def _module_where(wrapper: nn.Module, path: str) -> tuple:
    """``(device, dtype)`` of the adapted module ``path``'s first parameter."""
    site = wrapper.registry.sites.get(path)
    for t in () if site is None else site.module.parameters():
        return (t.device, t.dtype)
    return (None, None)


def _module_device(wrapper: nn.Module, path: str) -> torch.device | None:
    """The device of the adapted module ``path`` (its first parameter or buffer)."""
    site = wrapper.registry.sites.get(path)
    return None if site is None else device_of(site.module)


class _Pins:
    """Slots a call in flight uses; released once, when the call ends."""

    __slots__ = ("pool", "slots")

    def __init__(self, pool: SlotPool, slots: list[int]) -> None:
        self.pool = pool
        self.slots = slots

    def release(self) -> None:
        slots, self.slots = self.slots, []
        if slots:
            self.pool._unpin(slots)


# ----------------------------------------------------------------------------------------
# what AdapterWrapper's methods call
# ----------------------------------------------------------------------------------------
def pool_of(wrapper: nn.Module) -> SlotPool | None:
    """The wrapper's reserved slots, or ``None``."""
    state = STATES.get(wrapper)
    return None if state is None else state.pool


def reserve(wrapper: nn.Module, max_adapters: int, max_rank: int, max_rows: int | None = None) -> None:
    """Give the mixed-batch stacks a fixed shape: ``max_adapters`` slots, LoRA padded
    to ``max_rank``, allocated once on the model's device.

    From now on any number of adapters may be loaded; those not in a slot keep
    their LoRA/IA³ weights in host memory (pinned when the model is on CUDA). A call
    with ``adapter_names=`` brings the adapters it names into slots, least recently
    used out first, copying only those (asynchronously on CUDA, ordered before the
    call's kernels). A plain call (``forward`` or ``generate`` without
    ``adapter_names``) and ``merge_adapters`` bring the active (or merged) adapters
    into slots the same way first, so they never read host memory. Loading,
    hot-swapping, evicting or changing an adapter never changes a stack's shape or
    identity, so a compiled model does not recompile for it and the stacks a
    captured CUDA graph reads stay valid (README, "Serving many adapters", says
    what capturing mixed calls takes). Calling it again re-reserves.

    Args:
        wrapper: The ``AdapterWrapper``.
        max_adapters: Number of adapter slots (distinct adapters one call may use).
        max_rank: Largest LoRA rank an adapter may have.
        max_rows: Rows of the static slot buffer that :func:`assign_rows`
            (``set_row_adapters``) writes, the largest batch it serves; ``None`` (the
            default): no buffer.

    Raises:
        InvalidConfigError: If an argument is not a positive integer, or a loaded
            adapter has a rank above ``max_rank`` (nothing changes then).
        AdapterStateError: If the wrapper is unloaded.
    """
    checked = [("max_adapters", max_adapters), ("max_rank", max_rank)]
    if max_rows is not None:
        checked.append(("max_rows", max_rows))
    for what, value in checked:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidConfigError(
                f"{what} must be a positive integer, got {value!r}; e.g. "
                "reserve_adapter_slots(max_adapters=16, max_rank=64)."
            )
    wrapper.registry.model()  # raises if unloaded
    for adapter in wrapper.adapters.values():
        check_fits(adapter, max_rank)
    state = state_of(wrapper)
    with state.lock:
        if state.pool is not None:
            _drop_assignment(wrapper, state.pool)
            state.pool._reset()
        else:
            release_unreserved(state)
        pool = SlotPool(wrapper, max_adapters, max_rank, state.lock)
        if max_rows is not None:
            device = device_of(wrapper.registry.model()) or torch.device("cpu")
            pool.rows = torch.full((max_rows,), pool.identity, dtype=torch.long, device=device)
        # Allocate every module's stacks now, from all loaded adapters' layers, so that
        # later loads of adapters on the same modules allocate nothing.
        by_path: dict[str, list] = {}
        for adapter in wrapper.adapters.values():
            for path, layer in adapter.items():
                by_path.setdefault(path, []).append(layer)
        for path, layers in by_path.items():
            pool.stacks[path] = SiteStacks(
                (),
                capacity=max_adapters,
                max_rank=max_rank,
                like=layers,
                device=_module_device(wrapper, path),
            )
            pool.where[path] = _module_where(wrapper, path)
        for name, adapter in wrapper.adapters.items():
            pool.adopt(name, adapter)
        state.pool = pool
        # Read by forward/generate (a plain attribute, so a compiled forward guards on
        # it like on any other): only then do plain calls pin their adapters' slots.
        wrapper.registry.slots_reserved = True
        arm_hooks(wrapper, pool)


# ----------------------------------------------------------------------------------------
# the static row assignment (set_row_adapters / clear_row_adapters)
# ----------------------------------------------------------------------------------------
def assign_rows(wrapper: nn.Module, adapter_names: Sequence[str]) -> None:
    """Assign adapter ``adapter_names[i]`` to row ``i`` of every later call, until
    :func:`clear_rows`.

    The named adapters are brought into slots and pinned while assigned; their slot
    indices are written, in place, into the static ``(max_rows,)`` buffer that calls
    read (rows past ``len(adapter_names)``: no adapter). A call then creates no tensor
    from host data, so a captured CUDA graph or a compiled model replays any
    assignment: call this outside the captured region, between replays.

    Args:
        wrapper: The ``AdapterWrapper``.
        adapter_names: One adapter name (or ``"__base__"``) per row, at most
            ``max_rows``.

    Raises:
        MixedBatchError: Without ``reserve_adapter_slots(..., max_rows=N)``, for more
            names than ``max_rows`` or none, more distinct adapters than slots, or
            slots held by other threads' calls.
        AdapterNotFoundError: For a name that is not a loaded adapter.
        AdapterStateError: If adapters are merged, or the wrapper is unloaded.
        ConfigTypeError: If ``adapter_names`` is not a list of names.
        InvalidConfigError: If an adapter was changed to a rank above ``max_rank``.
    """
    wrapper.registry.model()  # raises if unloaded
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise wrong_type(
            "adapter_names", "a list with one adapter name per batch row", adapter_names,
            " For one adapter on every row use set_active_adapters() instead.",
        )
    names = tuple(adapter_names)
    pool = pool_of(wrapper)
    if pool is None or pool.rows is None:
        raise MixedBatchError(
            "set_row_adapters() writes the rows' adapter slots into a static buffer; "
            "call reserve_adapter_slots(max_adapters, max_rank, max_rows=N) first, with "
            "N the largest batch to serve."
        )
    max_rows = pool.rows.shape[0]
    if not names or len(names) > max_rows:
        raise MixedBatchError(
            f"set_row_adapters() got {len(names)} row names, but the row buffer has "
            f"max_rows={max_rows} rows: give between 1 and {max_rows} names, or call "
            f"reserve_adapter_slots(..., max_rows={max(len(names), 1)}). Nothing was changed."
        )
    known = wrapper.adapters
    for name in names:
        if name != BASE_ADAPTER_NAME and (not isinstance(name, str) or name not in known):
            raise AdapterNotFoundError(
                f"set_row_adapters() names {name!r}, which is not a loaded adapter; use one "
                f"of {list(known)!r} or {BASE_ADAPTER_NAME!r} for no adapter."
                f"{suggest(str(name), known)} Nothing was changed."
            )
    if wrapper.merged_adapters:
        raise AdapterStateError(
            f"Adapters {wrapper.merged_adapters!r} are merged into the base weights, so rows "
            "cannot choose their adapter; call unmerge_adapters() first."
        )
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER_NAME))
    with pool.cond:
        if len(used) > pool.capacity:
            raise MixedBatchError(
                f"set_row_adapters() names {len(used)} distinct adapters, but only "
                f"{pool.capacity} adapter slots are reserved. Assign at most "
                f"{pool.capacity}, or call reserve_adapter_slots({len(used)}, "
                f"{pool.max_rank}, max_rows={max_rows}). Nothing was changed."
            )
        # The previous assignment's hold goes first, so its adapters may make room for
        # the new ones; it comes back if the new assignment fails.
        old_held = pool.assigned_held
        pool.unhold(old_held)
        try:
            slot_of, _, pins = pool.prepare(used)
        except BaseException:
            pool.hold(old_held)
            raise
        held = [slot_of[n] for n in used]
        pool.hold(held)
        pins.release()
        slots = [slot_of.get(n, pool.identity) for n in names]
        # One host-to-device copy, in place: the buffer keeps its identity and address.
        padded = slots + [pool.identity] * (max_rows - len(slots))
        pool.rows.copy_(torch.tensor(padded, dtype=torch.long))
        pool.assigned, pool.assigned_slots, pool.assigned_held = names, slots, held
        wrapper.registry.rows_assigned = True


def clear_rows(wrapper: nn.Module) -> None:
    """End :func:`assign_rows`: later calls run the active adapters again; the assigned
    adapters are unpinned. Does nothing without an assignment."""
    pool = pool_of(wrapper)
    if pool is None:
        wrapper.registry.rows_assigned = False
        return
    with pool.cond:
        _drop_assignment(wrapper, pool)


def _drop_assignment(wrapper: nn.Module, pool: SlotPool) -> None:
    held, pool.assigned_held = pool.assigned_held, []
    with pool.cond:
        pool.unhold(held)
    if pool.rows is not None:
        pool.rows.fill_(pool.identity)
    pool.assigned, pool.assigned_slots = None, []
    wrapper.registry.rows_assigned = False


def row_assignment(wrapper: nn.Module) -> tuple[tuple[str, ...], list[int], torch.Tensor]:
    """``(names, slots, rows buffer)`` of the assignment calls run with now.

    Raises:
        AdapterStateError: If there is none (the slots were reserved again, or the
            wrapper was copied): call ``set_row_adapters`` again.
    """
    pool = pool_of(wrapper)
    if pool is None or pool.assigned is None or pool.rows is None:
        raise AdapterStateError(
            "This wrapper's row assignment is gone (the slots were reserved again, or the "
            "wrapper was copied or unpickled); call set_row_adapters() again, or "
            "clear_row_adapters()."
        )
    return pool.assigned, pool.assigned_slots, pool.rows


@contextlib.contextmanager
def pinned(wrapper: nn.Module, names: Sequence[str], combining: bool = False) -> Iterator[None]:
    """Context manager: :func:`pin_adapters` for the block, released on exit."""
    pins = pin_adapters(wrapper, names, combining)
    try:
        yield
    finally:
        if pins is not None:
            pins.release()


def pin_adapters(wrapper: nn.Module, names: Sequence[str], combining: bool = False) -> "_Pins | None":
    """Bring ``names`` into slots (unless already there) and pin them until released.

    Plain calls and merges read the adapters' parameters themselves; with reserved
    slots an adapter outside a slot has them in host memory, which the model's device
    cannot read (CUDA raises a device mismatch). In a slot they are views of the
    device stacks. Returns ``None`` without reserved slots (nothing to do).
    ``combining``: ``names`` are the sources of ``add_weighted_adapter`` (for the
    error message).

    Raises:
        MixedBatchError: If there are more ``names`` than slots, or their slots stay
            busy with other threads' calls (nothing changes then).
        InvalidConfigError: If an adapter was changed to a rank above ``max_rank``.
    """
    pool = pool_of(wrapper)
    if pool is None or not names:
        return None
    with pool.cond:
        return pool.prepare(list(dict.fromkeys(names)), plain=True, combining=combining)[2]


@torch.compiler.disable
def _pin_active(wrapper: nn.Module) -> "_Pins | None":
    # Host-side bookkeeping, outside any compiled graph (as batch._prepare_and_begin): compiled
    # code never guards on it. Merged adapters run no hook; disabled ones none at all.
    if wrapper.registry.disabled:
        return None
    merged = wrapper.registry.merged
    return pin_adapters(wrapper, [n for n in wrapper.registry.active if n not in merged])


@torch.compiler.disable
def _unpin(pins: "_Pins | None") -> None:
    if pins is not None:
        pins.release()


@run_frames_eagerly
def plain_call(wrapper: nn.Module, fn: Any, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` with the active adapters resident and pinned (reserved
    slots only; ``AdapterWrapper.forward`` and ``generate`` call it then).

    Their parameters are then views of the device stacks for the whole call, and no
    mixed call on another thread evicts them under it.
    """
    pins = _pin_active(wrapper)
    try:
        return run_model(wrapper, fn, args, kwargs)
    finally:
        _unpin(pins)


def check_attach(wrapper: nn.Module, adapter: Any) -> None:
    """Refuse, before anything changes, an adapter the reserved slots cannot hold."""
    pool = pool_of(wrapper)
    if pool is not None:
        check_fits(adapter, pool.max_rank)


def on_attach(wrapper: nn.Module, name: str) -> None:
    """Move a new (or grown) adapter's stackable weights to the host tier."""
    pool = pool_of(wrapper)
    if pool is not None:
        with pool.cond:
            if name not in pool.slot_of:
                pool.adopt(name, wrapper.adapters[name])
            arm_hooks(wrapper, pool)


def arm_hooks(wrapper: nn.Module, pool: SlotPool) -> None:
    """Register the hooks mixed calls need on every module with stacks, now.

    A change of the active adapters re-derives each module's hooks and drops the ones
    only mixed calls use; the next mixed call would add them back, but a compiled
    forward reads the hook layout before that and would recompile. Serving with
    reserved slots keeps them (without a mixed call in flight they do nothing).
    """
    added = False
    for path, site in wrapper.registry.sites.items():
        st = pool.stacks.get(path)
        if st is not None:
            added |= site.prepare_mixed(st.need_pre)
    if added:
        wrapper.registry.note_hook_layout()


def stats(wrapper: nn.Module) -> dict[str, Any]:
    """See ``AdapterWrapper.slot_stats``."""
    state = STATES.get(wrapper)
    if state is not None and state.pool is not None:
        with state.lock:
            return state.pool.stats()
    out: dict[str, Any] = {
        "device_bytes": 0,
        "host_bytes": 0,
        "resident": [],
        "loads": 0,
        "evictions": 0,
        "max_adapters": None,
        "max_rank": None,
    }
    if state is None:
        return out
    with state.lock:
        live = [n for n in state.names if n in wrapper.adapters]
        recent = [n for n in reversed(state.recent) if n in live]
        out["device_bytes"] = int(
            sum(t.numel() * t.element_size() for st in state.stacks.values() for t in st.tensors())
        )
        out["resident"] = recent + [n for n in live if n not in recent]
        out["loads"] = state.loads
    return out


def hotswap(wrapper: nn.Module, path: Any, adapter_name: str, **kwargs: Any) -> None:
    """Replace the weights (and scaling) of an existing adapter, in place, from a
    saved adapter directory (PEFT's or tinytune's format).

    Everything is read and checked before anything changes. The new adapter may
    have another rank and ``lora_alpha`` as long as it targets the same modules with
    the same kinds of layers (and, with reserved slots, fits ``max_rank``). With
    reserved slots its slot is rewritten in place, so a compiled model serving
    mixed batches does not recompile. Parameters keep their identity where the rank
    is unchanged; a new rank brings new ``lora_A`` / ``lora_B`` modules.

    Args:
        wrapper: The ``AdapterWrapper``.
        path: The adapter directory.
        adapter_name: The loaded adapter to replace.
        **kwargs: ``custom_layers`` and ``check_fingerprint``, as in
            :meth:`load_adapter`; ``is_trainable``: ``True``/``False`` makes the
            swapped adapter's parameters trainable or frozen (``requires_grad``);
            ``None`` (default) keeps them as they were, as PEFT's
            ``hotswap_adapter`` does. The adapter keeps its dtype.

    Raises:
        AdapterNotFoundError: If there is no such adapter.
        AdapterStateError: If it is merged.
        AdapterFileError: If the file targets other modules or other kinds of layers,
            or cannot be read (see :meth:`load_adapter`).
        InvalidConfigError: If its rank exceeds the reserved ``max_rank``.
        ConfigTypeError: If ``is_trainable`` is not a bool or ``None``.
    """
    # Normal tensors even when called inside inference_mode: the new weights may train.
    with torch.inference_mode(False):
        _hotswap(wrapper, path, adapter_name, **kwargs)


def _hotswap(
    wrapper: nn.Module, path: Any, adapter_name: str, is_trainable: Any = None, **kwargs: Any
) -> None:
    old = wrapper.registry.get(adapter_name)
    if adapter_name in wrapper.registry.merged:
        raise AdapterStateError(
            f"Adapter {adapter_name!r} is merged; call unmerge_adapters() before hot-swapping it."
        )
    if is_trainable is None:
        # PEFT's hotswap_adapter copies into the old parameters, which keep their
        # requires_grad: the swapped adapter trains exactly if the old one did.
        is_trainable = any(p.requires_grad for p in old.parameters())
    elif not isinstance(is_trainable, bool):
        raise wrong_type(
            "is_trainable", "True, False or None (keep the adapter's current setting)", is_trainable
        )
    new = read_adapter(
        wrapper.registry.model(), path, adapter_name, is_trainable=is_trainable, **kwargs
    )
    old_paths, new_paths = set(old.layer_names), set(new.layer_names)
    if old_paths != new_paths:
        extra, missing = sorted(new_paths - old_paths), sorted(old_paths - new_paths)
        raise AdapterFileError(
            f"The adapter at {str(path)!r} does not target the same modules as adapter "
            f"{adapter_name!r}: it adds {extra!r} and lacks {missing!r}. hotswap_adapter "
            "replaces weights in place, so the modules must match; load it under a new "
            "name with load_adapter() instead. Nothing was changed."
        )
    for p in old.layer_names:
        o, n = old[p], new[p]
        if type(o) is not type(n):
            raise AdapterFileError(
                f"The adapter at {str(path)!r} has a {type(n).__name__} on {p!r} where adapter "
                f"{adapter_name!r} has a {type(o).__name__}; hotswap_adapter needs the same "
                "kind of layer on every module. Nothing was changed."
            )
        if isinstance(o, LinearIA3Layer) and o.is_feedforward != n.is_feedforward:
            raise AdapterFileError(
                f"The IA³ layer on {p!r} scales the {'input' if n.is_feedforward else 'output'} "
                f"in {str(path)!r} but the {'input' if o.is_feedforward else 'output'} in adapter "
                f"{adapter_name!r}; hotswap_adapter cannot change that. Nothing was changed."
            )
        if not isinstance(o, (LoraLayer, LinearIA3Layer)):
            same = {k: t.shape for k, t in o.state_dict().items()} == {
                k: t.shape for k, t in n.state_dict().items()
            }
            try:
                same = same and layer_config(p, o) == layer_config(p, n)
            except Exception:  # noqa: BLE001 - a layer without a storable config
                same = False
            if not same:
                raise AdapterFileError(
                    f"The {type(o).__name__} on {p!r} in {str(path)!r} has other settings or "
                    f"tensor shapes than adapter {adapter_name!r}'s; hotswap_adapter can only "
                    "replace its values. Nothing was changed."
                )
    check_attach(wrapper, new)
    state = state_of(wrapper)
    with state.lock, torch.no_grad():
        for p in old.layer_names:
            o, n = old[p], new[p]
            if isinstance(o, LoraLayer):
                if o.r == n.r and o.lora_A.weight.shape == n.lora_A.weight.shape:
                    o.lora_A.weight.copy_(n.lora_A.weight)
                    o.lora_B.weight.copy_(n.lora_B.weight)
                else:
                    # The adapter's dtype stays (e.g. fp32 from autocast_adapter_dtype
                    # over a bf16 base), as in the same-rank copy above.
                    o.lora_A = n.lora_A.to(o.lora_A.weight.dtype)
                    o.lora_B = n.lora_B.to(o.lora_B.weight.dtype)
                    o.r = n.r
                if is_dora(o):
                    o.lora_magnitude_vector.copy_(n.lora_magnitude_vector)
                o.requires_grad_(is_trainable)
                o.lora_alpha, o.use_rslora = n.lora_alpha, n.use_rslora
                o.lora_dropout = n.lora_dropout
                o.scaling = n.scaling
            else:
                theirs = n.state_dict()
                for k, t in o.state_dict(keep_vars=True).items():
                    t.copy_(theirs[k])
                o.requires_grad_(is_trainable)
            site = wrapper.registry.sites.get(p)
            if site is not None:
                site.layers_changed()
        old.config = new.config
        old.peft_extras = new.peft_extras
        pool = state.pool
        if pool is not None and adapter_name in pool.known:
            slot = pool.slot_of.get(adapter_name)
            if slot is not None:
                # Rewrite its slot in place now (the stacks keep shape and identity).
                pool._evict(adapter_name, keep_host=False)
                pool.free.remove(slot)
                pool.adopt(adapter_name, old)
                pool._load(adapter_name, slot)
                pool.loads -= 1
                pool.derive()
            else:
                pool.adopt(adapter_name, old)
        for p in old.layer_names:
            site = wrapper.registry.sites.get(p)
            if site is not None and is_dora(old[p]):
                # DoRA's norm, now: a compiled graph reads the cached scale as it is.
                old[p].dora_scale(site.module)


class SlotHooks:
    """What the adapter registry calls, while it attaches or merges adapters, to keep
    the reserved slots right (see :class:`tinytune.registry.AdapterRegistry`)."""

    __slots__ = ("wrapper",)

    def __init__(self, wrapper: nn.Module) -> None:
        self.wrapper = wrapper

    def check_attach(self, adapter: Any) -> None:
        """See :func:`check_attach`."""
        check_attach(self.wrapper, adapter)

    def on_attach(self, name: str) -> None:
        """See :func:`on_attach`."""
        on_attach(self.wrapper, name)

    def pin(self, names: Sequence[str]) -> "_Pins | None":
        """See :func:`pin_adapters`."""
        return pin_adapters(self.wrapper, names)


def slot_hooks(wrapper: nn.Module) -> SlotHooks | None:
    """The registry's ``slots`` argument for ``wrapper``: ``None`` without reserved
    slots (then attaching and merging need nothing from them)."""
    return SlotHooks(wrapper) if pool_of(wrapper) is not None else None
