"""Serving many adapters: reserved slots, the host tier, hot-swapping, and mixed batches
that are never served stale weights (issue 10; issue 13 items 1 and 5).

The reference for every row is the same row run as a plain call with only its adapter
active (``"__base__"``: none active).
"""

from __future__ import annotations

import gc
import random
import threading
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from tinytune import (
    AdapterFileError,
    AdapterWrapper,
    IA3Config,
    InvalidConfigError,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
    MixedBatchError,
)
from tinytune.batch import clear_cache

from conftest import SmallMLP as MLP
from conftest import Tower, assert_same_params, mixed, params_snapshot, per_row
from conftest import rank_lora as lora


# ----------------------------------------------------------------------------------------
# compiled serving: no recompile for hot-swaps, loads, evictions
# ----------------------------------------------------------------------------------------
def test_compiled_wrapper_never_recompiles_for_hotswap_load_and_eviction(files):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    base = MLP().eval()
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a", activate=False)
    w.load_adapter(files["r8"], "b", activate=False)
    x = torch.randn(3, 10)

    def fresh(loads: dict[str, str], names: list[str]) -> torch.Tensor:
        f = AdapterWrapper(MLP().eval())
        f.model.load_state_dict(base.state_dict())
        for name, path in loads.items():
            f.load_adapter(path, name, activate=False)
        return mixed(f, x, names)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    device_bytes = w.slot_stats()["device_bytes"]
    mixed(w, x, ["a", "b", "__base__"])  # the first mixed call adds its hooks
    dynamo.reset()
    compiled = torch.compile(w, backend=backend)
    try:
        with dynamo.config.patch(error_on_recompile=True):
            out = mixed(compiled, x, ["a", "b", "__base__"])
            torch.testing.assert_close(out, fresh({"a": files["r4"], "b": files["r8"]}, ["a", "b", "__base__"]))
            # rank 4 -> rank 16 (other alpha), in place
            w.hotswap_adapter(files["r16"], "a")
            out = mixed(compiled, x, ["a", "b", "a"])
            torch.testing.assert_close(out, fresh({"a": files["r16"], "b": files["r8"]}, ["a", "b", "a"]))
            # new adapters: both slots are taken, so a and b are evicted
            w.load_adapter(files["r2"], "c", activate=False)
            w.load_adapter(files["lin0_only"], "d", activate=False)
            out = mixed(compiled, x, ["c", "d", "c"])
            torch.testing.assert_close(out, fresh({"c": files["r2"], "d": files["lin0_only"]}, ["c", "d", "c"]))
            assert w.slot_stats()["evictions"] == 2
            # evicted ones reloaded from host memory
            out = mixed(compiled, x, ["b", "__base__", "a"])
            torch.testing.assert_close(
                out, fresh({"a": files["r16"], "b": files["r8"]}, ["b", "__base__", "a"])
            )
            # and hot-swapping an adapter that is not in a slot
            w.hotswap_adapter(files["r4"], "c")
            out = mixed(compiled, x, ["c", "b", "c"])
            torch.testing.assert_close(out, fresh({"c": files["r4"], "b": files["r8"]}, ["c", "b", "c"]))
    finally:
        dynamo.reset()
    assert len(graphs) == 1
    stats = w.slot_stats()
    assert stats["device_bytes"] == device_bytes
    assert stats["resident"] == ["b", "c"]  # most recent first (b was named last)
    assert stats["loads"] == 7 and stats["evictions"] == 5


# ----------------------------------------------------------------------------------------
# every row equals a plain call, across eviction cycles
# ----------------------------------------------------------------------------------------
def _many_adapters(tower: nn.Module) -> AdapterWrapper:
    """Tower with LoRA of several ranks (linear and embedding), IA³ on inputs and outputs,
    LoRA and IA³ in one adapter, and a modules_to_save copy."""
    w = AdapterWrapper(tower)
    w.reserve_adapter_slots(max_adapters=3, max_rank=8)
    targets = ["q_proj", "v_proj", "down_proj", "embed"]
    for i, r in enumerate([1, 2, 4, 8, 3, 6]):
        w.add_adapter_from_config(
            LoraConfig(target_modules=targets[: 2 + i % 3], r=r, lora_alpha=r + i, init_lora_weights=False),
            f"l{i}",
            activate=False,
        )
    w.add_adapter_from_config(
        IA3Config(
            target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        "ia3",
        activate=False,
    )
    w.add_adapter("mix", activate=False)
    w.add_adapter_layer("mix", "layers.0.q_proj", LinearIA3Layer(init_ia3_weights=False))
    w.add_adapter_from_config(
        LoraConfig(target_modules=["up_proj"], r=5, modules_to_save=["head"], init_lora_weights=False),
        "save",
        activate=False,
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in w.named_adapter_parameters():
            if "module_copy" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embed" in name and "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return w


def test_rows_equal_plain_calls_across_eviction_cycles():
    torch.manual_seed(0)
    w = _many_adapters(Tower().eval())
    names = list(w.adapters)
    ids = torch.randint(0, 32, (4, 5))
    rng = random.Random(0)
    for _ in range(14):
        distinct = rng.sample(names, rng.randint(1, 3))
        row_names = [rng.choice(distinct + ["__base__"]) for _ in range(4)]
        torch.testing.assert_close(
            mixed(w, ids, row_names), per_row(w, ids, row_names), atol=2e-5, rtol=1e-5
        )
    stats = w.slot_stats()
    assert stats["evictions"] > 5
    assert len(stats["resident"]) == 3
    # clear_cache empties the slots; everything still serves right
    clear_cache(w)
    assert w.slot_stats()["resident"] == []
    row_names = ["l3", "save", "ia3", "l3"]
    torch.testing.assert_close(mixed(w, ids, row_names), per_row(w, ids, row_names), atol=2e-5, rtol=1e-5)
    # a dtype change of the whole wrapper: the stacks follow (resident or not)
    w.to(torch.float64)
    for row_names in (["l3", "ia3", "l0", "__base__"], ["l1", "l5", "mix", "l1"]):
        out = mixed(w, ids, row_names)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, per_row(w, ids, row_names))


def test_adapter_memory_lives_in_host_tier_and_device_memory_is_constant():
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    device, host = [], []
    for i in range(6):
        w.add_adapter_from_config(lora(8), f"a{i}", activate=False)
        stats = w.slot_stats()
        device.append(stats["device_bytes"])
        host.append(stats["host_bytes"])
    assert len(set(device)) == 1
    steps = {b - a for a, b in zip(host, host[1:])}
    assert len(steps) == 1 and steps.pop() > 0  # linear in loaded adapters
    x = torch.randn(2, 10)
    from tinytune.stacks import STATES

    pool = STATES[w].pool
    tensors = {path: [id(t) for t in st.tensors()] for path, st in pool.stacks.items()}
    for pair in (["a0", "a1"], ["a2", "a3"], ["a1", "a4"]):
        torch.testing.assert_close(mixed(w, x, pair), per_row(w, x, pair))
        assert w.slot_stats()["device_bytes"] == device[0]
        assert w.slot_stats()["host_bytes"] == host[-1]
    assert w.slot_stats()["resident"] == ["a4", "a1"]
    # the same tensors throughout; ranks shows each slot's true rank (0: empty, identity)
    assert {path: [id(t) for t in st.tensors()] for path, st in pool.stacks.items()} == tensors
    st = pool.stacks["lin0"]
    assert st.ranks.dtype == torch.int32 and st.ranks.tolist() == [8, 8, 0]
    w.delete_adapter("a4")
    assert st.ranks.tolist() == [8, 0, 0]


# ----------------------------------------------------------------------------------------
# errors change nothing
# ----------------------------------------------------------------------------------------
def test_errors_change_nothing(files):
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    w.reserve_adapter_slots(max_adapters=3, max_rank=16)
    for name in ("r4", "r8", "r2", "r16"):
        w.load_adapter(files[name], name, activate=False)
    x = torch.randn(4, 10)
    names = ["r4", "r8", "__base__", "r16"]
    expected = mixed(w, x, names)

    def unchanged(stats, params):
        assert w.slot_stats() == stats
        assert_same_params(w, params)
        assert list(w.adapters) == ["r4", "r8", "r2", "r16"]

    stats, params = w.slot_stats(), params_snapshot(w)
    # a rank above max_rank: from a file, from a config, from reserve_adapter_slots
    with pytest.raises(InvalidConfigError, match="rank 32 .* above max_rank=16"):
        w.load_adapter(files["r32"], "big", activate=False)
    with pytest.raises(InvalidConfigError, match="max_rank"):
        w.add_adapter_from_config(lora(17), "big")
    with pytest.raises(InvalidConfigError, match="max_rank"):
        w.reserve_adapter_slots(max_adapters=3, max_rank=8)
    with pytest.raises(InvalidConfigError, match="positive integer"):
        w.reserve_adapter_slots(max_adapters=0, max_rank=8)
    unchanged(stats, params)
    # more distinct adapters than slots
    with pytest.raises(MixedBatchError, match="needs 4 slots"):
        mixed(w, x, ["r4", "r8", "r2", "r16"])
    unchanged(stats, params)
    # hot-swaps that cannot apply: other modules, rank above max_rank, other layer kinds
    with pytest.raises(AdapterFileError, match="same modules"):
        w.hotswap_adapter(files["lin0_only"], "r8")
    with pytest.raises(InvalidConfigError, match="max_rank"):
        w.hotswap_adapter(files["r32"], "r8")
    with pytest.raises(AdapterFileError, match="LinearIA3Layer"):
        w.hotswap_adapter(files["ia3"], "r8")
    unchanged(stats, params)
    assert w.active_adapters == []
    torch.testing.assert_close(mixed(w, x, names), expected, atol=0, rtol=0)


def test_hotswap_without_reserved_slots(files):
    torch.manual_seed(0)
    base = MLP().eval()
    w = AdapterWrapper(base)
    w.load_adapter(files["r4"], "a", activate=False)
    w.load_adapter(files["r8"], "b")
    x = torch.randn(3, 10)
    mixed(w, x, ["a", "b", "a"])
    a0 = w.adapters["a"]["lin0"].lora_A.weight
    w.hotswap_adapter(files["r16"], "a")
    w.hotswap_adapter(files["r2"], "b")  # active
    fresh = AdapterWrapper(MLP().eval())
    fresh.model.load_state_dict(base.state_dict())
    fresh.load_adapter(files["r16"], "a", activate=False)
    fresh.load_adapter(files["r2"], "b")
    torch.testing.assert_close(mixed(w, x, ["a", "b", "__base__"]), mixed(fresh, x, ["a", "b", "__base__"]))
    with torch.no_grad():
        torch.testing.assert_close(w(x), fresh(x))
    assert w.adapters["a"]["lin0"].r == 16 and w.adapters["a"]["lin0"].lora_alpha == 7
    assert w.adapters["a"].config.r == 16
    # same rank: the parameters keep their identity
    w.hotswap_adapter(files["r4"], "a")
    w.hotswap_adapter(files["r4"], "a")
    assert w.adapters["a"]["lin0"].lora_A.weight.shape == a0.shape
    same = w.adapters["a"]["lin0"].lora_A.weight
    w.hotswap_adapter(files["r4"], "a")
    assert w.adapters["a"]["lin0"].lora_A.weight is same


def test_hotswap_tinytune_format_file_with_lora_and_ia3(tmp_path):
    torch.manual_seed(0)
    src = AdapterWrapper(MLP())
    for name, r in (("m4", 4), ("m8", 8)):
        src.add_adapter(name, activate=False)
        src.add_adapter_layer(name, "lin0", partial(LinearLoraLayer, r=r, lora_alpha=r + 1, init_lora_weights=False))
        src.add_adapter_layer(name, "lin1", partial(LinearIA3Layer, init_ia3_weights=False))
        src.save_adapter(str(tmp_path / name), name)
    base = MLP().eval()
    w = AdapterWrapper(base)
    w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    w.load_adapter(str(tmp_path / "m4"), "m", activate=False)
    x = torch.randn(3, 10)
    mixed(w, x, ["m", "__base__", "m"])
    w.hotswap_adapter(str(tmp_path / "m8"), "m")
    fresh = AdapterWrapper(MLP().eval())
    fresh.model.load_state_dict(base.state_dict())
    fresh.load_adapter(str(tmp_path / "m8"), "m", activate=False)
    torch.testing.assert_close(mixed(w, x, ["m", "__base__", "m"]), mixed(fresh, x, ["m", "__base__", "m"]))
    torch.testing.assert_close(per_row(w, x, ["m"] * 3), per_row(fresh, x, ["m"] * 3))


# ----------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------
def test_threads_never_evict_slots_a_call_in_flight_uses():
    torch.manual_seed(0)
    model = MLP().eval()
    w = AdapterWrapper(model)
    w.reserve_adapter_slots(max_adapters=2, max_rank=4)
    for name in "abcd":
        w.add_adapter_from_config(lora(4), name, activate=False)
    x = torch.randn(2, 10)
    refs = {pair: per_row(w, x, pair) for pair in [("a", "b"), ("c", "d"), ("d", "a")]}
    inside, release = threading.Event(), threading.Event()
    results, errors = {}, []

    def hold(module, args, output):
        if threading.current_thread().name == "held":
            inside.set()
            assert release.wait(20)

    handle = model.lin1.register_forward_hook(hold)

    def run(pair):
        try:
            results[pair] = mixed(w, x, pair)
        except BaseException as exc:  # reported below
            errors.append(exc)

    held = threading.Thread(target=run, args=(("a", "b"),), name="held")
    held.start()
    try:
        assert inside.wait(20)
        # both slots are pinned by the held call: this one must wait, not evict them
        waiting = threading.Thread(target=run, args=(("c", "d"),))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
        assert set(w.slot_stats()["resident"]) == {"a", "b"}
    finally:
        release.set()
        held.join(20)
    waiting.join(20)
    handle.remove()
    threads = [threading.Thread(target=run, args=(pair,)) for pair in [("d", "a"), ("a", "b")] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    for pair, out in results.items():
        torch.testing.assert_close(out, refs[pair], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# stale weights (issue 13 item 1): every way of changing a parameter is seen
# ----------------------------------------------------------------------------------------
def _fused_adamw_works() -> bool:
    try:
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def _step(optimizer_kwargs):
    def change(w, layer):
        params = [layer.lora_A.weight, layer.lora_B.weight]
        opt = torch.optim.AdamW(params, lr=0.05, **optimizer_kwargs)
        w.set_active_adapters(["b"])
        w(torch.randn(3, 10)).square().sum().backward()
        w.set_active_adapters([])
        opt.step()

    return change


def _new_module(w, layer):
    new = nn.Linear(layer.r, 32, bias=False)
    nn.init.normal_(new.weight)
    layer.lora_B = new


def _rebind(w, layer):
    layer.lora_B.weight.data = torch.randn_like(layer.lora_B.weight)


def _load_state_dict(w, layer):
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})


def _scaling(w, layer):
    layer.scaling = 3.5


CHANGES = {
    "data_mul": lambda w, layer: layer.lora_B.weight.data.mul_(3),
    "data_copy": lambda w, layer: layer.lora_B.weight.data.copy_(torch.randn_like(layer.lora_B.weight)),
    "no_grad_copy": lambda w, layer: torch.no_grad()(layer.lora_A.weight.copy_)(
        torch.randn_like(layer.lora_A.weight)
    ),
    "new_lora_B_module": _new_module,
    "param_data_rebound": _rebind,
    "load_state_dict": _load_state_dict,
    "scaling": _scaling,
    "adamw_foreach": _step({"foreach": True}),
    "adamw_fused": pytest.param(
        _step({"fused": True}),
        marks=pytest.mark.skipif(not _fused_adamw_works(), reason="fused AdamW unavailable on this CPU build"),
    ),
}


@pytest.mark.parametrize("reserved", [False, True], ids=["cached", "reserved"])
@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_mixed_batches_see_every_change_of_a_parameter(change, reserved):
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    if reserved:
        w.reserve_adapter_slots(max_adapters=2, max_rank=8)
    w.add_adapter_from_config(lora(4), "a", activate=False)
    w.add_adapter_from_config(lora(4), "b", activate=False)
    x = torch.randn(4, 10)
    names = ["b", "a", "b", "__base__"]
    torch.testing.assert_close(mixed(w, x, names), per_row(w, x, names))
    before = mixed(w, x, ["b"] * 4)
    change(w, w.adapters["b"]["lin0"])
    after = per_row(w, x, ["b"] * 4)
    assert not torch.allclose(after, before)  # the change matters
    torch.testing.assert_close(mixed(w, x, ["b"] * 4), after, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed(w, x, names), per_row(w, x, names), atol=1e-6, rtol=1e-5)


def test_ia3_in_place_change_is_seen():
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    w.add_adapter_from_config(
        IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]), "s", activate=False
    )
    x = torch.randn(2, 10)
    mixed(w, x, ["s", "__base__"])
    w.adapters["s"]["lin1"].ia3_l.data.mul_(2.0)
    w.adapters["s"]["lin0"].ia3_l.data.add_(0.5)
    torch.testing.assert_close(mixed(w, x, ["s", "__base__"]), per_row(w, x, ["s", "__base__"]))


# ----------------------------------------------------------------------------------------
# delete_adapter frees the cache (issue 13 item 5)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reserved", [False, True], ids=["cached", "reserved"])
def test_delete_adapter_frees_the_mixed_batch_cache(reserved):
    torch.manual_seed(0)
    w = AdapterWrapper(MLP().eval())
    if reserved:
        w.reserve_adapter_slots(max_adapters=4, max_rank=4)
    names = [f"a{i}" for i in range(8)]
    for name in names:
        w.add_adapter_from_config(lora(4), name, activate=False)
    x = torch.randn(4, 10)
    mixed(w, x, names[:4])
    kept = w.adapters["a0"]["lin0"]
    kept_values = kept.lora_B.weight.detach().clone()
    refs = [weakref.ref(w.adapters[n]) for n in names[1:]]
    host = w.slot_stats()["host_bytes"]
    for name in names[1:]:
        w.delete_adapter(name)
    gc.collect()
    assert all(r() is None for r in refs)  # nothing keeps deleted adapters alive
    stats = w.slot_stats()
    if reserved:
        assert stats["resident"] == ["a0"]
        assert stats["host_bytes"] == host // 8
    else:  # the stacks were freed (rebuilt, for "a0" alone, by the next mixed call)
        assert stats["resident"] == [] and stats["device_bytes"] == 0
    # a deleted adapter someone still holds keeps its values; the kept one still serves
    torch.testing.assert_close(mixed(w, x, ["a0", "__base__"] * 2), per_row(w, x, ["a0", "__base__"] * 2))
    assert torch.equal(kept.lora_B.weight, kept_values)
    w.delete_adapter("a0")
    assert w.slot_stats()["resident"] == []
    assert torch.equal(kept.lora_B.weight, kept_values)


