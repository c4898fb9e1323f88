"""Serving with reserved slots, plain calls and merges (issue 13): the active adapters are
read from their slots (or the host tier), pinned against other threads, reloaded without
recompiling, and ``add_weighted_adapter`` reads its sources the same way."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tinytune import ConfigTypeError, AdapterWrapper, IA3Config, MixedBatchError

from conftest import SmallMLP as MLP
from conftest import assert_same_params, mixed, params_snapshot, per_row, plain
from conftest import rank_lora as lora


# ----------------------------------------------------------------------------------------
# plain calls and merges with reserved slots: active adapters are read from their slots
# ----------------------------------------------------------------------------------------
class _ReadsOf(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the storage of every tensor given to an aten op that computes on it.

    Our stand-in for CUDA's device check on a CPU-only machine: with reserved slots on
    CUDA, the host tier is (pinned) CPU memory and the stacks are device memory; a
    kernel given a host tensor raises a device mismatch, while copies between devices
    (``copy_``, ``to``) and views are allowed. Here host == device, so we check the
    cause instead: no op other than a copy or a view may touch a host-tier buffer.
    """

    _ALLOWED = (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self._ALLOWED and not func.is_view:
            for t in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor):
                    self.storages.add(t.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def _host_storages(w: AdapterWrapper) -> dict[int, str]:
    from tinytune.stacks import STATES

    pool = STATES[w].pool
    return {
        buf.untyped_storage().data_ptr(): name
        for name, bufs in pool.host.items()
        for _, buf in bufs.values()
    }


def _in_slot(w: AdapterWrapper, name: str) -> bool:
    """Whether every LoRA parameter of ``name`` is a view of its module's stacks."""
    from tinytune.stacks import STATES

    pool = STATES[w].pool
    for path, layer in w.adapters[name].items():
        stacks = {t.untyped_storage().data_ptr() for t in pool.stacks[path].lora[:2]}
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            if p.untyped_storage().data_ptr() not in stacks:
                return False
    return True


class _MLPGen(MLP):
    def generate(self, x):
        return self(x) * 2


def test_plain_calls_and_merges_read_active_adapters_from_their_slots(tmp_path):
    torch.manual_seed(0)
    base = _MLPGen().eval()
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    for i in range(4):
        w.add_adapter_from_config(lora(4 + i), f"a{i}", activate=False)
        w.save_adapter(str(tmp_path / f"a{i}"), f"a{i}")
    x = torch.randn(3, 10)
    base_weights = {k: t.clone() for k, t in base.state_dict().items()}  # before merges

    def fresh(name: str, merge: bool = False) -> torch.Tensor:
        f = AdapterWrapper(_MLPGen().eval())
        f.model.load_state_dict(base_weights)
        f.load_adapter(str(tmp_path / name), name)
        if merge:
            f.merge_adapters()
        with torch.no_grad():
            return f(x)

    mixed(w, x, ["a2", "a3", "a2"])  # a0, a1 in the host tier
    assert w.slot_stats()["resident"] == ["a3", "a2"] and not _in_slot(w, "a0")
    host = _host_storages(w)
    w.set_active_adapters("a0")  # activating moves nothing yet
    assert not _in_slot(w, "a0")
    reads = _ReadsOf()
    with torch.no_grad(), reads:
        out = w(x)
    assert not reads.storages & host.keys(), "a plain call read the host tier"
    torch.testing.assert_close(out, fresh("a0"))
    assert _in_slot(w, "a0") and w.slot_stats()["resident"] == ["a0", "a3"]
    from tinytune.stacks import STATES

    assert not any(STATES[w].pool.inflight)  # released after the call
    # generate() too
    w.set_active_adapters("a1")
    with torch.no_grad(), reads:
        out = w.generate(x)
    assert not reads.storages & host.keys()
    torch.testing.assert_close(out, fresh("a1") * 2)
    assert w.slot_stats()["resident"] == ["a1", "a0"]
    # evicted, then activated again: same as a fresh wrapper
    mixed(w, x, ["a2", "a3", "a2"])
    assert not _in_slot(w, "a0")
    w.set_active_adapters("a0")
    torch.testing.assert_close(plain(w, x, "a0"), fresh("a0"))
    # merging an adapter that sits in the host tier merges it from its slot
    mixed(w, x, ["a2", "a3", "a2"])
    assert not _in_slot(w, "a1")
    reads = _ReadsOf()
    with reads:
        w.merge_adapters(["a1"])
    assert not reads.storages & host.keys(), "the merge read the host tier"
    w.set_active_adapters([])
    with torch.no_grad():
        torch.testing.assert_close(w(x), fresh("a1", merge=True))
    w.unmerge_adapters()
    # inside disable_adapter() nothing runs, so nothing moves
    mixed(w, x, ["a2", "a3", "a2"])
    w.set_active_adapters("a0")
    with w.disable_adapter(), torch.no_grad():
        w(x)
    assert w.slot_stats()["resident"] == ["a3", "a2"]
    # more active adapters than slots: refused, nothing changes
    w.set_active_adapters(["a0", "a1", "a2"])
    stats = w.slot_stats()
    with pytest.raises(MixedBatchError, match="3 adapters are active"):
        w(x)
    assert w.slot_stats() == stats and not any(STATES[w].pool.inflight)


def test_compiled_plain_calls_reload_the_active_adapter_without_recompiling(tmp_path):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    base = MLP().eval()
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    for i in range(3):
        w.add_adapter_from_config(lora(8), f"a{i}", activate=i == 0)
    x = torch.randn(3, 10)
    with torch.no_grad():
        ref = w(x)
    mixed(w, x, ["a1", "a2", "a1"])  # a0 evicted; the mixed-call hooks are registered
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    compiled = torch.compile(w, backend=backend)
    try:
        with torch.no_grad():
            # one compile for plain calls (a0 brought in from the host tier), one for
            # mixed calls (a0 evicted again)
            torch.testing.assert_close(compiled(x), ref)
            compiled(x, adapter_names=["a1", "a2", "a1"])
            n = len(graphs)
            with dynamo.config.patch(error_on_recompile=True):
                for names in (["a2", "a1", "a2"], ["a1", "a2", "a1"]):
                    assert not _in_slot(w, "a0")
                    torch.testing.assert_close(compiled(x), ref)  # reloaded, other slot
                    assert _in_slot(w, "a0")
                    compiled(x, adapter_names=names)  # evicted
    finally:
        dynamo.reset()
    assert len(graphs) == n


def test_ia3_merge_and_plain_call_from_the_host_tier():
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    w.reserve_adapter_slots(max_adapters=1, max_rank=4)
    cfg = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    w.add_adapter_from_config(cfg, "ia3", activate=False)
    w.add_adapter_from_config(lora(4), "other", activate=False)
    x = torch.randn(2, 10)
    ref = plain(w, x, "ia3")
    mixed(w, x, ["other", "other"])  # ia3 to the host tier
    host = _host_storages(w)
    assert "ia3" in host.values() and w.slot_stats()["resident"] == ["other"]
    w.set_active_adapters("ia3")
    reads = _ReadsOf()
    with torch.no_grad(), reads:
        out = w(x)
    assert not reads.storages & host.keys()
    torch.testing.assert_close(out, ref)
    mixed(w, x, ["other", "other"])
    with reads:
        w.merge_adapters()  # IA³ multiplies the weight by its scales: from the slot
    assert not reads.storages & host.keys()
    w.set_active_adapters([])
    with torch.no_grad():
        torch.testing.assert_close(w(x), ref)


def test_plain_call_pins_its_adapter_against_other_threads():
    torch.manual_seed(0)
    model = MLP().eval()
    w = AdapterWrapper(model)
    w.reserve_adapter_slots(max_adapters=1, max_rank=4)
    for name in "ab":
        w.add_adapter_from_config(lora(4), name, activate=False)
    x = torch.randn(2, 10)
    ref_a, ref_b = plain(w, x, "a"), per_row(w, x, ["b", "b"])
    w.set_active_adapters("a")
    inside, release = threading.Event(), threading.Event()
    results = {}

    def hold(module, args, output):
        if threading.current_thread().name == "held":
            inside.set()
            assert release.wait(20)

    handle = model.lin1.register_forward_hook(hold)

    def run_plain():
        with torch.no_grad():
            results["a"] = w(x)

    held = threading.Thread(target=run_plain, name="held")
    held.start()
    try:
        assert inside.wait(20)
        # the only slot is pinned by the plain call: a mixed call for "b" must wait
        waiting = threading.Thread(target=lambda: results.setdefault("b", mixed(w, x, ["b", "b"])))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and w.slot_stats()["resident"] == ["a"]
    finally:
        release.set()
        held.join(20)
    waiting.join(20)
    handle.remove()
    torch.testing.assert_close(results["a"], ref_a)
    torch.testing.assert_close(results["b"], ref_b)


def test_add_weighted_adapter_reads_its_sources_from_their_slots(tmp_path):
    torch.manual_seed(0)
    base = MLP().eval()
    ref = AdapterWrapper(copy.deepcopy(base))  # the same, without reserved slots
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    for i in range(4):
        w.add_adapter_from_config(lora(4), f"a{i}", activate=False)
    x = torch.randn(3, 10)
    mixed(w, x, ["a2", "a3", "a2"])  # a0 and a1 sit in the host tier
    assert not _in_slot(w, "a0") and not _in_slot(w, "a1")
    for name in ("a0", "a1"):
        ref.add_adapter_from_config(lora(4), name, activate=False)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                ref.adapters[name].named_adapter_parameters(),
                w.adapters[name].named_adapter_parameters(),
            ):
                p.copy_(q)
    ref.add_weighted_adapter(["a0", "a1"], [0.7, 0.3], "mix", combination_type="cat")
    host = _host_storages(w)
    reads = _ReadsOf()
    with reads:
        w.add_weighted_adapter(["a0", "a1"], [0.7, 0.3], "mix", combination_type="cat")
    assert not reads.storages & host.keys(), "add_weighted_adapter read the host tier"
    from tinytune.stacks import STATES

    assert not any(STATES[w].pool.inflight)  # pins released
    torch.testing.assert_close(plain(w, x, "mix"), plain(ref, x, "mix"))
    # three sources, two slots: nothing changes, and the message speaks of the sources
    # (they are not active adapters)
    with pytest.raises(MixedBatchError, match="add_weighted_adapter reads its 3 source") as info:
        w.add_weighted_adapter(["a0", "a1", "a2"], [1, 1, 1], "mix3", combination_type="cat")
    assert "active" not in str(info.value)
    assert "mix3" not in w.adapters


def test_compiled_plain_calls_do_not_recompile_for_a_rank_changing_hotswap(files):
    """Plain calls under reserved slots read the fixed-shape slots (zero past the rank),
    so hot-swapping rank 4 -> 16 -> 4 into the active adapter recompiles nothing."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    base = MLP().eval()
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a")
    x = torch.randn(3, 10)

    def fresh(path: str) -> torch.Tensor:
        f = AdapterWrapper(MLP().eval())
        f.model.load_state_dict(base.state_dict())
        f.load_adapter(path, "a")
        with torch.no_grad():
            return f(x)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    compiled = torch.compile(w, backend=backend)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fresh(files["r4"]))
            with dynamo.config.patch(error_on_recompile=True):
                for path in (files["r16"], files["r4"], files["r8"]):
                    w.hotswap_adapter(path, "a")
                    out = compiled(x)
                    torch.testing.assert_close(out, fresh(path))
                    torch.testing.assert_close(out, w(x), atol=0, rtol=0)  # eager
    finally:
        dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.parametrize("reserved", [False, True])
def test_rank_changing_hotswap_keeps_the_adapters_dtype(files, reserved):
    """An fp32 adapter over a bf16 base (autocast_adapter_dtype=True) stays fp32 when a
    hot-swap changes its rank, as it does when the rank stays: it holds what
    load_adapter(..., autocast_adapter_dtype=True) of the same file gives."""
    w = AdapterWrapper(MLP().to(torch.bfloat16).eval())
    if reserved:
        w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a", autocast_adapter_dtype=True)
    for path in (files["r16"], files["r4"]):
        w.hotswap_adapter(path, "a")
        assert {p.dtype for _, p in w.named_adapter_parameters()} == {torch.float32}
        want = AdapterWrapper(MLP().to(torch.bfloat16).eval())
        want.load_adapter(path, "a", autocast_adapter_dtype=True)
        for (k, p), (_, q) in zip(w.named_adapter_parameters(), want.named_adapter_parameters()):
            assert torch.equal(p.detach(), q.detach()), k
    with torch.no_grad():
        w(torch.randn(2, 10, dtype=torch.bfloat16))


@pytest.mark.parametrize("path", ["r4", "r16"])  # same rank (copied in place), new rank
def test_hotswap_is_trainable(files, path):
    """is_trainable as in load_adapter: False freezes the swapped adapter, True makes it
    trainable; left out, it keeps what it was (PEFT's hotswap_adapter copies into the old
    parameters, which keep their requires_grad)."""
    w = AdapterWrapper(MLP().eval())
    w.load_adapter(files["r4"], "a", is_trainable=False)

    def grads() -> set[bool]:
        return {p.requires_grad for _, p in w.named_adapter_parameters()}

    w.hotswap_adapter(files[path], "a")
    assert grads() == {False} and w.adapters["a"].config.inference_mode
    w.hotswap_adapter(files[path], "a", is_trainable=True)
    assert grads() == {True} and not w.adapters["a"].config.inference_mode
    w(torch.randn(2, 10)).sum().backward()
    assert all(p.grad is not None for _, p in w.named_adapter_parameters())
    w.hotswap_adapter(files[path], "a")
    assert grads() == {True}
    w.hotswap_adapter(files[path], "a", is_trainable=False)
    assert grads() == {False} and w.adapters["a"].config.inference_mode
    params = params_snapshot(w)
    with pytest.raises(ConfigTypeError, match="is_trainable"):
        w.hotswap_adapter(files["r16"], "a", is_trainable="yes")
    assert_same_params(w, params) and grads() == {False}
