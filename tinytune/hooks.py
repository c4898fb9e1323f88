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
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import AdapterLayer

__all__ = ["HookSite", "hook_layout_id"]

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
        # The always_call hook that pops the per-thread input stack (see set_chain),
        # and the hook id it always registers under.
        self._pop_handle: RemovableHandle | None = None
        self._pop_id: int | None = None
        self._pres: tuple[tuple[int, AdapterLayer], ...] = ()
        self._posts: tuple[tuple[int, AdapterLayer], ...] = ()
        self._needs_stack = False
        # Per-thread call state: the composition stack and the mixed-batch plan
        # (attribute ``mixed``, set by tinytune.batch for the duration of one call).
        self._local = _CallStack()
        self._has_pre = False
        self._has_post = False

    # --- state -------------------------------------------------------------------------
    def set_chain(self, chain: tuple[AdapterLayer, ...]) -> None:
        """Apply exactly ``chain`` (innermost first) from now on, re-hooking as needed."""
        if chain == self.chain and (bool(self._handles) == bool(chain)):
            return
        self.remove_hooks()
        self.chain = chain
        self._pres = tuple((i, l) for i, l in enumerate(chain) if l.uses_pre_forward)
        self._posts = tuple((i, l) for i, l in enumerate(chain) if l.uses_post_forward)
        # A post-forward needs its own view of the inputs only if an inner layer's
        # pre-forward changes them further.
        self._needs_stack = any(
            i_pre < i_post for i_pre, _ in self._pres for i_post, _ in self._posts
        )
        if self._pres:
            self._register_pre(self._handles)
        if self._posts:
            self._register_post(self._handles)
        if self._needs_stack:
            # Pops the inputs the pre-hook pushed, even when forward raises (torch runs
            # always_call hooks then), so failing calls leave nothing on the stack. It
            # runs after the post-hook (registered after it).
            self._pop_handle = self._register_pop()
        if self._mixed_users:
            self._add_mixed_hooks(self._mixed_need_pre)

    def _register_pre(self, into: list) -> None:
        hook = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        into.append(hook)
        self._has_pre = True

    def _register_post(self, into: list) -> None:
        post = self._post_hook_single if self._single_post() else self._post_hook
        into.append(self.module.register_forward_hook(post, with_kwargs=True))
        self._has_post = True

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
        if need_pre and not self._has_pre:
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
        self._has_pre = bool(self._handles) and bool(self._pres)
        self._has_post = bool(self._handles) and bool(self._posts)
        return True

    def _single_post(self) -> bool:
        return len(self._posts) == 1 and not self._needs_stack

    def _register_pop(self) -> RemovableHandle:
        module = self.module
        handle = module.register_forward_hook(self._pop_views, with_kwargs=True, always_call=True)
        if self._pop_id is None:
            self._pop_id = handle.id
        elif handle.id != self._pop_id:
            # torch.compile guards on the ids of always_call hooks: re-registering under
            # a new id would recompile every time the chain changes (merge, unmerge,
            # switching adapters). Re-key the hook to the site's first id, so a layout
            # seen before reuses its graph. Ids come from one global counter, so the
            # old id is still unique.
            for d in (
                module._forward_hooks,
                module._forward_hooks_with_kwargs,
                module._forward_hooks_always_called,
            ):
                d[self._pop_id] = d.pop(handle.id)
            handle.id = self._pop_id
        return handle

    def remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._mixed_handles:
            self._mixed_handles.pop().remove()
        if self._pop_handle is not None:
            self._pop_handle.remove()
            self._pop_handle = None
        self._has_pre = self._has_post = False

    @property
    def hooked(self) -> bool:
        return bool(self._handles) or bool(self._mixed_handles)

    # --- the hooks ---------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        plan = getattr(self._local, "mixed", None)
        if plan is not None:
            return plan.pre(module, args, kwargs)
        if self._needs_stack:
            views: dict[int, tuple[tuple, dict]] = {len(self.chain): (args, kwargs)}
            # Pushed before any pre_forward can raise: _pop_views pops it either way.
            self._stack().append(views)
            for i, layer in reversed(self._pres):
                args, kwargs = _checked_pre(layer, layer.pre_forward(module, args, kwargs))
                views[i] = (args, kwargs)
            return args, kwargs
        for _, layer in reversed(self._pres):
            args, kwargs = _checked_pre(layer, layer.pre_forward(module, args, kwargs))
        return args, kwargs

    def _post_hook_single(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan = getattr(self._local, "mixed", None)
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
        plan = getattr(self._local, "mixed", None)
        if plan is not None:
            return plan.post(module, args, kwargs, output)
        if not self._needs_stack:
            for _, layer in self._posts:
                new = layer.post_forward(module, args, kwargs, output)
                if new is None and output is not None:
                    raise _returned_none(layer, "post_forward", "return output")
                output = new
            return output
        views = self._stack()[-1]  # popped by _pop_views, which runs next
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

    def _pop_views(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if getattr(self._local, "mixed", None) is None:
            stack = self._stack()
            if stack:
                stack.pop()

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __getstate__(self) -> dict:
        # Thread-local call state is per process and per call: never copied or pickled
        # (deep-copying a hooked model copies its hook sites).
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _CallStack()

    def __repr__(self) -> str:
        return f"HookSite({self.path!r}, adapters={list(self.layers)}, active={len(self.chain)})"


def _returned_none(layer: AdapterLayer, method: str, fix: str) -> TypeError:
    return TypeError(
        f"{type(layer).__name__}.{method}() returned None; it must return its result "
        f"(add `{fix}` at its end)."
    )


def _checked_pre(layer: AdapterLayer, result: Any) -> tuple[tuple, dict]:
    if result is None:
        raise _returned_none(layer, "pre_forward", "return args, kwargs")
    return result
