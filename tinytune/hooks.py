"""One hook site per adapted module.

A :class:`HookSite` holds every adapter layer attached to one module of the base model
and applies the active, unmerged ones through at most one forward pre-hook and one
forward hook. With no work to do it registers no hook at all, so a merged or inactive
module runs exactly as in the bare model.

Several active layers on one module compose as nested wrappers, in the order of the
wrapper's ``active_adapters``: the first is innermost. Pre-forwards therefore run last
adapter first, post-forwards first adapter first, and each layer's ``post_forward`` sees
the inputs as they were after its own ``pre_forward``. Merging in the same order gives
the same function, which is what makes merged and unmerged outputs agree.

Mixed batches (``adapter_names=``, see :mod:`tinytune.batch`) use the same two hooks:
for the duration of one call, on the calling thread only, ``tinytune.batch`` publishes a
per-site plan in the site's thread-local slot, and each hook hands the module to that
plan instead of the active chain. A thread-local attribute read is something
``torch.compile`` traces (and guards on) without a graph break, so the dispatch stays
inside the compiled model.

Fused kernels (see :mod:`tinytune.dispatch`): on an ``nn.Linear`` or ``Conv1D`` whose
call :mod:`tinytune.dispatch` sends to the fused kernel, the pre-hook hands the module
an empty batch (a view of its input with no rows), so the module's own matmul does no
work, and passes the real input on to the post-hook, which returns the kernel's result
(base product included). No module is replaced or patched. The real input travels
with the call (see ``_hand_over``), never in per-thread state, so an exception between
the two hooks leaves nothing behind. Other hooks on the module see the empty input on
that path (and forward hooks registered before tinytune's, the empty output). Where
nothing else can see it (one LoRA on an ``nn.Linear``, no other forward hook, no
torch-function mode, no ``forward`` set on the instance), the eager pre-hook hands the
forward a placeholder instead (``_Skip``), on which ``F.linear`` returns at once: the
module's own matmul then does not run at all, not even on no rows.

Floor 4 (beside ``io`` and ``weighted``): imports ``layers`` and ``dispatch``.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import dispatch
from .layers import AdapterLayer, first_input, is_conv1d, replace_first_input

__all__ = ["HookSite", "hook_layout_id"]

# torch.compiler.is_compiling without two attribute lookups per call (dynamo knows the
# function by identity, so it still reads as True while tracing).
_is_compiling = torch.compiler.is_compiling
# What the eager fused path checks before it hands a module's forward a _Skip.
_LINEAR_FORWARD = nn.Linear.forward
_F_LINEAR = torch.nn.functional.linear
_GLOBAL_FORWARD_HOOKS = torch.nn.modules.module._global_forward_hooks
_function_mode_on = torch._C._is_torch_function_mode_enabled

def hook_layout_id(sites: Iterable["HookSite"]) -> int:
    """A number naming which modules carry how many hooks, equal for equal layouts.

    The number is a 62-bit digest of the layout, so one number means one layout in
    every wrapper of the process (compiled graphs of different wrappers share the code
    of ``AdapterWrapper.forward``, and a graph is reused for any wrapper whose guards
    pass) without a process-wide registry that would grow with every layout ever seen.
    Two different layouts share a number with probability about 2**-62.

    Args:
        sites: The hook sites of one wrapper.

    Returns:
        A non-negative int, the same for every set of sites with the same module
        paths and the same numbers of forward pre-hooks and forward hooks on them.
    """
    layout = sorted(
        (s.path, len(s.module._forward_pre_hooks), len(s.module._forward_hooks)) for s in sites
    )
    digest = hashlib.blake2b(repr(layout).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 2


class _CallStack(threading.local):
    """Per-thread stack of input views, from a pre-hook to its post-hook.

    ``threading.local`` runs ``__init__`` in each thread on first use, so ``stack``
    always exists: creating it lazily would add an attribute on the first call, which
    ``torch.compile`` guards on (``hasattr``) and so recompiles for the second call.
    """

    def __init__(self) -> None:
        self.stack: list = []


class HookSite:
    """The adapter layers of one module, and the hooks that apply them.

    Args:
        path: Dotted name of the module in the base model.
        module: The module itself.
    """

    def __init__(self, path: str, module: nn.Module) -> None:
        self.path = path
        self.module = module
        self.layers: dict[str, AdapterLayer] = {}  # adapter name -> layer
        self.chain: tuple[AdapterLayer, ...] = ()  # active, unmerged; innermost first
        self._handles: list[RemovableHandle] = []
        # Hooks added for mixed calls in flight (prepare_mixed), removed by the last
        # release_mixed: a module with no active adapter carries no hook between calls.
        self._mixed_handles: list[RemovableHandle] = []
        self._mixed_users = 0
        self._mixed_need_pre = False
        self._pres: tuple[tuple[int, AdapterLayer], ...] = ()
        self._posts: tuple[tuple[int, AdapterLayer], ...] = ()
        self._needs_stack = False
        # Per-thread call state: the composition stack and the mixed-batch plan
        # (attribute ``mixed``, set by tinytune.batch for the duration of one call).
        self._local = _CallStack()
        self._has_pre = False
        self._has_post: str | bool = False  # False, or the _post_kind()
        # Fused kernels: why the active chain cannot run on them (None: it can).
        self._chain_reason: str | None = None
        self._chain_params: tuple = ()
        self._chain_dropout = False  # whether a layer of the chain has LoRA dropout
        self._reuse_inputs = False
        self._kept: tuple | None = None  # see _fused_inputs
        self._lean = False  # see _set_lean

    @property
    def module(self) -> nn.Module:
        return self._module

    @module.setter
    def module(self, module: nn.Module) -> None:
        # Whether the module can run on the fused kernels at all (its type, this machine).
        self._module = module
        self._fusable = dispatch.module_reason(module) is None and dispatch.fusion_possible()
        self._conv1d = is_conv1d(module)
        # Whose forward is exactly F.linear(input, weight, bias) (see _Skip).
        self._linear_forward = type(module).forward is _LINEAR_FORWARD
        self._lean = False  # until the next chain is read (_set_lean)
        self._empty: torch.Tensor | None = None  # see dispatch.empty_input

    # --- state -------------------------------------------------------------------------
    def set_chain(self, chain: tuple[AdapterLayer, ...]) -> None:
        """Apply exactly ``chain`` (innermost first) from now on, re-hooking as needed."""
        if chain == self.chain and (bool(self._handles) == bool(chain)):
            return
        self.chain = chain
        self._pres = tuple((i, l) for i, l in enumerate(chain) if l.uses_pre_forward)
        self._posts = tuple((i, l) for i, l in enumerate(chain) if l.uses_post_forward)
        # A post-forward needs its own view of the inputs only if an inner layer's
        # pre-forward changes them further.
        self._needs_stack = any(
            i_pre < i_post for i_pre, _ in self._pres for i_post, _ in self._posts
        )
        self._read_chain()
        want_pre, want_post = self._wanted()
        if (
            self._handles
            and not self._mixed_handles
            and (want_pre, want_post) == (self._has_pre, self._has_post)
        ):
            # The registered hooks read the chain when called: keep them.
            return
        self.remove_hooks()
        if want_pre:
            self._register_pre(self._handles)
        if want_post:
            self._register_post(self._handles)
        if self._mixed_users:
            self._add_mixed_hooks(self._mixed_need_pre)

    def layers_changed(self) -> None:
        """Re-read the active layers' parameters (a hot-swap gave a layer new ones)."""
        self._read_chain()

    def _read_chain(self) -> None:
        # What the fused path's per-call decision needs from the chain, read once per
        # chain (set_chain) or per change of its layers (layers_changed), not per call.
        chain = self.chain
        self._chain_reason = dispatch.chain_reason(self.module, chain)
        self._chain_params = tuple(dispatch.chain_params(chain))
        self._chain_dropout = any(getattr(layer, "lora_dropout", 0.0) for layer in chain)
        # One LoRA alone reaches the kernel as views of its own tensors (no copy), which
        # stay current through in-place updates: those inputs are kept between calls.
        self._reuse_inputs = len(chain) == 1 and dispatch.fused_kind(chain[0]) == "lora"
        self._kept = None
        self._set_lean()

    def _set_lean(self) -> None:
        # The pre-hook's lean path: one LoRA that can fuse, on a module whose forward is
        # nn.Linear's (see _Skip).
        self._lean = (
            self._reuse_inputs
            and self._chain_reason is None
            and self._fusable
            and self._linear_forward
        )

    def _fused_inputs(self, x: torch.Tensor) -> tuple | None:
        """The kernel's adapter inputs for this call (see ``dispatch.checked_inputs``);
        kept between eager calls as :meth:`_fused_inputs_eager` says."""
        if torch.compiler.is_compiling():
            return dispatch.checked_inputs(self.path, self.chain)
        return self._fused_inputs_eager()

    def _fused_inputs_eager(self) -> tuple | None:
        """:meth:`_fused_inputs` outside ``torch.compile``.

        Kept between calls where they are views (``_reuse_inputs``), keyed on what
        changes which tensors they view: the layer's reserved slot, whether autograd is
        on (slots are read without it), and the layer's conversions (a layer moved or
        cast gets a new scaling buffer). A new chain or a hot-swap (``set_chain``,
        ``layers_changed``) drops them. Never kept under ``torch.compile``: the traced
        graph reads the parameters as before.
        """
        if not self._reuse_inputs:
            return dispatch.checked_inputs(self.path, self.chain)
        layer = self.chain[0]
        kept = self._kept
        if (
            kept is not None
            and kept[0] is layer.slot_factors
            and kept[1] is torch.is_grad_enabled()
            and kept[2] == layer.conversions
        ):
            return kept[3]
        inputs = dispatch.checked_inputs(self.path, self.chain)
        if inputs is not None:
            self._kept = (layer.slot_factors, torch.is_grad_enabled(), layer.conversions, inputs)
        return inputs

    def _wanted(self) -> tuple[bool, str | bool]:
        """The hooks the active chain needs: (pre-hook?, post-hook kind or False)."""
        # The fused path needs both hooks, whatever the chain's layers use.
        fused = bool(self.chain) and self._fusable and self._chain_reason is None
        want_pre = bool(self._pres) or fused
        want_post = self._post_kind() if (self._posts or fused) else False
        return want_pre, want_post

    def _register_pre(self, into: list) -> None:
        hook = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        into.append(hook)
        self._has_pre = True

    def _post_kind(self) -> str:
        """Which post-hook method the current chain needs."""
        # The general one where a pre-hook hands something over (fused path, views).
        single = self._single_post() and not (self._fusable or self._needs_stack)
        return "_post_hook_single" if single else "_post_hook"

    def _register_post(self, into: list) -> None:
        kind = self._post_kind()
        hook = getattr(self, kind)
        into.append(self.module.register_forward_hook(hook, with_kwargs=True))
        self._has_post = kind

    def prepare_mixed(self, need_pre: bool) -> bool:
        """Make sure the hooks a mixed-batch call needs are registered.

        Args:
            need_pre: Whether a layer used by the call has a ``pre_forward``.

        Returns:
            Whether a hook was added.

        Each call must be paired with :meth:`release_mixed` (in a ``finally``). The
        chain's own hooks are never removed and re-added, so a plain call running on
        another thread meanwhile never sees the module without them; the extra hooks
        stay while any mixed call (on any thread) still uses them.
        """
        self._mixed_users += 1
        self._mixed_need_pre |= need_pre
        return self._add_mixed_hooks(need_pre)

    def _add_mixed_hooks(self, need_pre: bool) -> bool:
        added = False
        if (need_pre or self._fusable) and not self._has_pre:
            self._register_pre(self._mixed_handles)
            added = True
        if not self._has_post:
            self._register_post(self._mixed_handles)
            added = True
        return added

    def release_mixed(self) -> bool:
        """End one mixed call's use of the hooks; the last one removes the extra hooks.

        Returns:
            Whether a hook was removed.
        """
        self._mixed_users = max(0, self._mixed_users - 1)
        if self._mixed_users:
            return False
        self._mixed_need_pre = False
        if not self._mixed_handles:
            return False
        while self._mixed_handles:
            self._mixed_handles.pop().remove()
        want_pre, want_post = self._wanted() if self._handles else (False, False)
        self._has_pre, self._has_post = want_pre, want_post
        return True

    def _single_post(self) -> bool:
        return len(self._posts) == 1 and not self._needs_stack

    def remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._mixed_handles:
            self._mixed_handles.pop().remove()
        self._has_pre = self._has_post = False

    @property
    def hooked(self) -> bool:
        return bool(self._handles) or bool(self._mixed_handles)

    # --- read by tests and debugging -----------------------------------------------------
    @property
    def call_state(self) -> threading.local:
        """This thread's call state: ``stack`` (what pre-hooks hand their post-hooks under
        ``torch.compile``) and, during a mixed call only, ``mixed`` (its plan). Between
        calls the stack is empty and ``mixed`` absent."""
        return self._local

    @property
    def needs_stack(self) -> bool:
        """Whether a layer's pre-hook runs before another's post-hook, so that input views
        are handed over (the chain composes)."""
        return self._needs_stack

    @property
    def fusable(self) -> bool:
        """Whether the module can run on the fused kernels at all (its type, this machine)."""
        return self._fusable

    @property
    def mixed_hooked(self) -> bool:
        """Whether mixed calls in flight hold hooks of this site (never between calls)."""
        return bool(self._mixed_handles) or self._mixed_users != 0

    # --- the hooks ---------------------------------------------------------------------
    # What a pre-hook hands its post-hook (the fused path's real input, or the input views
    # of a composed chain) travels with the call itself in eager mode: as an attribute of
    # the args tuple the pre-hook returns, which torch passes on to the forward hooks.
    # Nothing is stored per thread, so an exception anywhere in between leaves nothing
    # behind, and nested or concurrent calls cannot mix their states up. Under
    # torch.compile the site's per-thread stack carries it instead: a list push and pop
    # is what every dynamo version traces (attributes on a tuple subclass work in torch
    # 2.13 but are not relied on), and within one graph they leave no side effect.
    def _hand_over(self, args: tuple, value: Any) -> tuple:
        if torch.compiler.is_compiling():
            self._local.stack.append(value)
            return args
        args = _CallArgs(args)
        args.handed = value
        return args

    def _take_over(self, args: tuple) -> Any:
        if torch.compiler.is_compiling():
            stack = self._local.stack
            return stack.pop() if stack else None
        return getattr(args, "handed", None) if type(args) is _CallArgs else None

    def _plan(self) -> Any:
        """The mixed-batch plan of the call in flight on this thread, or ``None``."""
        if torch.compiler.is_compiling():
            return getattr(self._local, "mixed", None)
        # A dict lookup, where a getattr with a default pays for a failed lookup on
        # every plain call (no plan); dynamo is only ever shown the getattr.
        return self._local.__dict__.get("mixed")

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if _is_compiling():
            return self._pre_hook_traced(module, args, kwargs)
        # Eager calls. The plan read is a dict lookup, where a getattr with a default
        # pays for a failed lookup on every plain call (no plan).
        plan = self._local.__dict__.get("mixed")
        if (
            self._lean
            and plan is None
            and len(args) == 1
            and not (self._chain_dropout and module.training)
        ):
            # One LoRA on an nn.Linear, the call serving repeats per module and token: as
            # little Python as it takes (the same decision as everywhere else).
            x = args[0]
            weights = dispatch.lean_weights(module, x, self._chain_params)
            if weights is not None:
                inputs = self._fused_inputs_eager()
                if inputs is not None:
                    if (
                        len(module._forward_pre_hooks) == 1
                        and len(module._forward_hooks) == 1
                        and not _GLOBAL_FORWARD_HOOKS
                        and "forward" not in module.__dict__
                        and not _function_mode_on()
                    ):
                        # No hook but tinytune's sees the module's input or output: its
                        # forward gets a _Skip, on which F.linear does nothing.
                        skip = _Skip()
                        skip.x = x
                        skip.weights = weights
                        skip.inputs = inputs
                        return (skip,), kwargs
                    params = (weights[0], weights[1], None)
                    return self._empty_args(module, args, x, params, inputs), kwargs
        if self._fusable:
            if plan is None and args:
                # A plain call: the general eager fused path (see _empty_args).
                x = args[0]
                params = dispatch.fused_weights(
                    self.path,
                    self._chain_reason,
                    module,
                    x,
                    self._chain_params,
                    self._chain_dropout and module.training,
                )
                if params is not None:
                    inputs = self._fused_inputs_eager()
                    if inputs is not None:
                        return self._empty_args(module, args, x, params, inputs), kwargs
            else:
                fused = self._fuse(plan, module, args, kwargs)
                if fused is not None:
                    return fused
        elif dispatch.forced():
            raise self._unavailable(plan)
        return self._chain_pre(plan, module, args, kwargs)

    def _fuse(
        self, plan: Any, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """The fused path's pre-hook work for a mixed call (``plan``) or any call the
        eager fast paths do not take, traced or eager: ``(args, kwargs)`` for the
        module's own forward (no rows; the post-hook computes it all, from what
        ``_hand_over`` passes it), or ``None`` where the call runs on PyTorch."""
        x = first_input(args, kwargs)
        if plan is not None:
            fuse = _Fused(x, None) if plan.use_fused(module, x) else None
        elif dispatch.use_fused(
            self.path,
            self._chain_reason,
            module,
            x,
            self._chain_params,
            self._chain_dropout and module.training,
        ):
            inputs = self._fused_inputs(x)
            fuse = None if inputs is None else _Fused(x, inputs)
        else:
            fuse = None
        if fuse is None:
            return None
        args, kwargs = replace_first_input(args, kwargs, dispatch.empty_rows(x))
        return self._hand_over(args, fuse), kwargs

    def _empty_args(
        self, module: nn.Module, args: tuple, x: torch.Tensor, params: tuple, inputs: tuple
    ) -> "_CallArgs":
        """The eager fused path's args for the module's own forward where other hooks
        (or a forward that is not ``nn.Linear``'s) may see them: ``(empty, *args[1:])``,
        carrying ``handed``: ``(x, (weight, bias, weight_scale), inputs)``. The empty
        input is kept between calls (``dispatch.empty_input``)."""
        if params[2] is not None:  # int8/fp8 codes: the module's forward takes x's dtype
            empty = dispatch.empty_rows(x)
        else:
            empty = self._empty
            if empty is None or empty.dtype is not x.dtype or empty.get_device() != x.get_device():
                empty = self._empty = dispatch.empty_input(params[0], self._conv1d)
        out = _CallArgs((empty,) if len(args) == 1 else (empty, *args[1:]))
        out.handed = (x, params, inputs)
        return out

    def _pre_hook_traced(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """The pre-hook under ``torch.compile`` (what dynamo traces)."""
        plan = getattr(self._local, "mixed", None)
        if self._fusable:
            fused = self._fuse(plan, module, args, kwargs)
            if fused is not None:
                return fused
        elif dispatch.forced():
            raise self._unavailable(plan)
        return self._chain_pre(plan, module, args, kwargs)

    def _chain_pre(
        self, plan: Any, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """The PyTorch path's pre-hook: the plan's, or the chain's pre-forwards."""
        if plan is not None:
            return plan.pre(module, args, kwargs)
        if self._needs_stack:
            views: dict[int, tuple[tuple, dict]] = {len(self.chain): (args, kwargs)}
            for i, layer in reversed(self._pres):
                args, kwargs = _checked_pre(layer, layer.pre_forward(module, args, kwargs))
                views[i] = (args, kwargs)
            return self._hand_over(args, views), kwargs
        for _, layer in reversed(self._pres):
            args, kwargs = _checked_pre(layer, layer.pre_forward(module, args, kwargs))
        return args, kwargs

    def _unavailable(self, plan: Any) -> Exception:
        """Kernel mode 'triton' on a site that cannot fuse at all."""
        reason = dispatch.module_reason(self.module)
        if reason is None:
            reason = (
                plan.fuse_reason(self.module) if plan is not None else self._chain_reason
            ) or dispatch.machine_reason()
        return dispatch.unavailable(self.path, reason)

    def _post_hook_single(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan = self._plan()
        if not self._has_pre and dispatch.forced():
            raise self._unavailable(plan)
        if plan is not None:
            return plan.post(module, args, kwargs, output)
        layer = self._posts[0][1]
        new = layer.post_forward(module, args, kwargs, output)
        if new is None and output is not None:
            # torch would read a None from a hook as "output unchanged": the adapter
            # would silently do nothing.
            raise _returned_none(layer, "post_forward", "return output")
        return new

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if args and type(args[0]) is _Skip:  # the lean path's skipped forward
            skip = args[0]
            weight, bias = skip.weights
            return dispatch.fused_linear_with(skip.x, weight, bias, skip.inputs, False)
        if type(args) is _CallArgs:  # eager, and a pre-hook handed something over
            handed = args.handed
            if type(handed) is tuple:  # _empty_args' (x, (weight, bias, weight_scale), inputs)
                x, (weight, bias, scale), inputs = handed
                return dispatch.fused_linear_with(x, weight, bias, inputs, self._conv1d, scale)
        plan = self._plan()
        handed = self._take_over(args)
        if type(handed) is _Fused:
            if handed.inputs is None:
                return plan.fused(module, handed.x)
            return dispatch.fused_linear(module, handed.x, handed.inputs, self._conv1d)
        if not self._has_pre and dispatch.forced():
            raise self._unavailable(plan)
        if plan is not None:
            return plan.post(module, args, kwargs, output)
        if not self._posts:
            return output
        if not self._needs_stack:
            for _, layer in self._posts:
                new = layer.post_forward(module, args, kwargs, output)
                if new is None and output is not None:
                    raise _returned_none(layer, "post_forward", "return output")
                output = new
            return output
        views = handed
        # The inputs seen by layer i: after the pre-forwards of layers i, i+1, ...
        # (outer layers), i.e. the view recorded at the nearest pre index >= i; the
        # original inputs are recorded at index len(chain).
        per_layer: dict[int, tuple[tuple, dict]] = {}
        view = views[len(self.chain)]
        for i in range(len(self.chain) - 1, -1, -1):
            view = views.get(i, view)
            per_layer[i] = view
        for i, layer in self._posts:
            a, k = per_layer[i]
            new = layer.post_forward(module, a, k, output)
            if new is None and output is not None:
                raise _returned_none(layer, "post_forward", "return output")
            output = new
        return output

    def __getstate__(self) -> dict:
        # Thread-local call state is per process and per call: never copied or pickled
        # (deep-copying a hooked model copies its hook sites).
        state = self.__dict__.copy()
        del state["_local"]
        state["_kept"] = None  # views of this process's tensors: a copy reads its own
        state["_empty"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _CallStack()

    def __repr__(self) -> str:
        return f"HookSite({self.path!r}, adapters={list(self.layers)}, active={len(self.chain)})"


class _Skip:
    """What the eager fused path hands a plain ``nn.Linear``'s own forward as its input,
    where no hook but tinytune's sees it: ``F.linear`` on it returns ``None`` at once (its
    ``__torch_function__``), so the module's matmul costs nothing, not even a call on no
    rows. It carries the call to the post-hook, which computes the whole result: the real
    input ``x``, the module's float ``weights`` (``(weight, bias)``) and the kernel's
    adapter ``inputs``."""

    __slots__ = ("x", "weights", "inputs")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> None:
        if func is _F_LINEAR:
            return None
        raise RuntimeError(
            f"tinytune: {getattr(func, '__name__', func)} was called on the placeholder input "
            "of a fused nn.Linear call; only F.linear is expected there. Please report "
            "this, and run with tinytune.kernel_mode('torch') meanwhile."
        )


class _CallArgs(tuple):
    """The args tuple a pre-hook returns, carrying ``handed`` to the post-hook."""


class _Fused:
    """Handed from pre- to post-hook on the fused path: the module's real input, and
    the kernel's adapter inputs (``None`` for a mixed call: its plan has them)."""

    __slots__ = ("x", "inputs")

    def __init__(self, x: Any, inputs: tuple | None) -> None:
        self.x = x
        self.inputs = inputs


def _returned_none(layer: AdapterLayer, method: str, fix: str) -> TypeError:
    return TypeError(
        f"{type(layer).__name__}.{method}() returned None; it must return its result "
        f"(add `{fix}` at its end)."
    )


def _checked_pre(layer: AdapterLayer, result: Any) -> tuple[tuple, dict]:
    if result is None:
        raise _returned_none(layer, "pre_forward", "return args, kwargs")
    return result
