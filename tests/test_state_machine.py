"""Stateful property test: random sequences of public calls on one wrapper.

hypothesis drives add / delete / activate / merge / unmerge / disable / mixed calls /
save / load / swap / failing calls, and after every step checks:

* the output equals that of a freshly built reference wrapper with the same adapters
  (merged adapters act innermost, in merge order; inside ``disable_adapter`` the base);
* the hooks present are exactly the hooks needed (a module carries hooks iff an active,
  unmerged adapter has a layer there and adapters are not disabled);
* a failed call changed nothing (outputs, adapters, active and merged lists, hooks);
* at the end, ``unload()`` gives back base weights bit-identical to the original.

Bounded (few examples, short sequences) so it stays fast.
"""

from __future__ import annotations

import contextlib
import tempfile

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from tinytune import AdapterWrapper, IA3Config, LoraConfig, TinytuneError  # noqa: E402

from conftest import SmallMLP as Small  # noqa: E402


torch.manual_seed(0)
PRISTINE = Small().eval()
PRISTINE_STATE = {k: v.clone() for k, v in PRISTINE.state_dict().items()}
X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
NAMES = ["a", "b", "c", "d"]
TOL = dict(rtol=1e-5, atol=1e-5)

CONFIGS = {
    "lora_both": lambda: LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False),
    "lora_lin0": lambda: LoraConfig(target_modules=["lin0"], r=2, lora_alpha=4, init_lora_weights=False),
    "rslora_lin1": lambda: LoraConfig(
        target_modules=["lin1"], r=8, use_rslora=True, init_lora_weights=False
    ),
    "ia3_ff": lambda: IA3Config(
        target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False
    ),
    "ia3_out": lambda: IA3Config(target_modules=["lin0"], init_ia3_weights=False),
    "save_lin1": lambda: LoraConfig(
        target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False
    ),
}


def fresh_base() -> nn.Module:
    model = Small().eval()
    model.load_state_dict(PRISTINE_STATE)
    return model


class WrapperMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = AdapterWrapper(fresh_base())
        # The specification: every adapter's config kind and parameter values.
        self.spec: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = contextlib.ExitStack()
        self.depth = 0
        self.tmp = tempfile.TemporaryDirectory()
        self.seed = 0

    # --- the reference --------------------------------------------------------------
    def reference(self) -> AdapterWrapper:
        ref = AdapterWrapper(fresh_base())
        for name, (kind, params) in self.spec.items():
            ref.add_adapter_from_config(CONFIGS[kind](), name, activate=False)
            ref.adapters[name].load_state_dict(params)
        return ref

    def expected_active(self) -> list[str]:
        if self.depth:
            return []
        return self.merged + [n for n in self.active if n not in self.merged]

    def observe(self):
        w = self.w
        with torch.no_grad():
            out = w(X)
        hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in w.model.named_modules()}
        return out, list(w.adapters), w.active_adapters, w.merged_adapters, hooks

    def expect_failure(self, call, *args, **kwargs) -> None:
        before = self.observe()
        with pytest.raises(TinytuneError):
            call(*args, **kwargs)
        after = self.observe()
        assert torch.equal(before[0], after[0]), "a failed call changed the output"
        assert before[1:] == after[1:], "a failed call changed the state"

    # --- rules ----------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(sorted(CONFIGS)), activate=st.booleans())
    def add(self, name, kind, activate):
        if name in self.spec:
            self.expect_failure(self.w.add_adapter_from_config, CONFIGS[kind](), name)
            return
        self.seed += 1
        torch.manual_seed(self.seed)
        self.w.add_adapter_from_config(CONFIGS[kind](), name, activate=activate)
        params = {k: v.detach().clone() for k, v in self.w.adapters[name].state_dict().items()}
        self.spec[name] = (kind, params)
        if activate:
            self.active.append(name)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name):
        if name not in self.spec or name in self.merged:
            self.expect_failure(self.w.delete_adapter, name)
            return
        self.w.delete_adapter(name)
        del self.spec[name]
        if name in self.active:
            self.active.remove(name)

    @rule(data=st.data())
    def activate(self, data):
        names = data.draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
        if any(n not in self.spec for n in names):
            self.expect_failure(self.w.set_active_adapters, names)
            return
        self.w.set_active_adapters(names)
        self.active = list(names)

    @rule(all_active=st.booleans(), data=st.data())
    def merge(self, all_active, data):
        names = None if all_active else data.draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2))
        if self.depth or (names is not None and any(n not in self.spec for n in names)):
            self.expect_failure(self.w.merge_adapters, names)
            return
        self.w.merge_adapters(names)
        for n in self.active if names is None else names:
            if n not in self.merged:
                self.merged.append(n)

    @rule()
    def unmerge(self):
        self.w.unmerge_adapters()
        self.merged = []

    @precondition(lambda self: self.depth < 2)
    @rule()
    def enter_disable(self):
        if self.merged:
            with pytest.raises(TinytuneError):
                self.w.disable_adapter().__enter__()
            return
        self.disabled.enter_context(self.w.disable_adapter())
        self.depth += 1

    @precondition(lambda self: self.depth > 0)
    @rule()
    def exit_disable(self):
        # Leave every open block.
        inner = self.disabled.pop_all()
        self.depth = 0
        inner.close()

    @rule(data=st.data())
    def mixed_call(self, data):
        choices = sorted(self.spec) + ["__base__"]
        rows = data.draw(st.lists(st.sampled_from(choices), min_size=4, max_size=4))
        if self.merged:
            self.expect_failure(self.w, X, adapter_names=rows)
            return
        with torch.no_grad():
            out = self.w(X, adapter_names=rows)
            ref = self.reference()
            for i, name in enumerate(rows):
                ref.set_active_adapters([] if self.depth or name == "__base__" else [name])
                torch.testing.assert_close(out[i : i + 1], ref(X[i : i + 1]), **TOL)

    @rule(data=st.data())
    def bad_mixed_call(self, data):
        rows = data.draw(st.lists(st.sampled_from(NAMES + ["__base__"]), min_size=1, max_size=6))
        if len(rows) == 4 and all(n in self.spec or n == "__base__" for n in rows) and not self.merged:
            return
        self.expect_failure(self.w, X, adapter_names=rows)

    @precondition(lambda self: len(self.spec) < len(NAMES))
    @rule(source=st.sampled_from(NAMES), activate=st.booleans())
    def save_and_load(self, source, activate):
        if source not in self.spec:
            self.expect_failure(self.w.save_adapter, self.tmp.name + "/x", source)
            return
        target = next(n for n in NAMES if n not in self.spec)
        path = f"{self.tmp.name}/{source}"
        self.w.save_adapter(path, source)
        self.w.load_adapter(path, target, activate=activate)
        kind, params = self.spec[source]
        self.spec[target] = (kind, {k: v.clone() for k, v in params.items()})
        if activate:
            self.active.append(target)

    @rule()
    def swap(self):
        if self.merged:
            self.expect_failure(self.w.swap_base_model, fresh_base())
            return
        old = self.w.swap_base_model(fresh_base())
        assert all(torch.equal(v, PRISTINE_STATE[k]) for k, v in old.state_dict().items())
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in old.modules()) == 0

    @rule()
    def failing_calls(self):
        self.expect_failure(self.w.set_active_adapters, ["nope"])
        self.expect_failure(self.w.add_adapter_from_config, LoraConfig(target_modules=["zzz"]), "e")
        self.expect_failure(self.w.add_adapter_layer, "nope", "lin0", LoraConfig)

    # --- invariants -----------------------------------------------------------------
    @invariant()
    def state_matches_the_spec(self):
        assert self.w.active_adapters == self.active
        assert self.w.merged_adapters == self.merged
        assert list(self.w.adapters) == list(self.spec)

    @invariant()
    def output_equals_reference(self):
        ref = self.reference()
        ref.set_active_adapters(self.expected_active())
        with torch.no_grad():
            torch.testing.assert_close(self.w(X), ref(X), **TOL)

    @invariant()
    def hooks_present_are_hooks_needed(self):
        for path, module in self.w.model.named_modules():
            needed = not self.depth and any(
                name in self.active
                and name not in self.merged
                and path in self.w.adapters[name]
                for name in self.spec
            )
            present = len(module._forward_hooks) + len(module._forward_pre_hooks)
            assert bool(present) == needed, (path, present, needed)
        for site in self.w.registry.sites.values():
            assert not site.mixed_hooked
            assert not getattr(site.call_state, "stack", [])

    def teardown(self):
        self.disabled.close()
        self.depth = 0
        base = self.w.unload()
        for k, v in base.state_dict().items():
            assert torch.equal(v, PRISTINE_STATE[k]), f"{k} changed after unload"
        self.tmp.cleanup()


TestWrapperMachine = WrapperMachine.TestCase
TestWrapperMachine.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
