"""Mixed batches on ``transformers`` models: GPT-2's Conv1D rows, ``generate()`` with
``adapter_names``, the same logits as PEFT's ``adapter_names``, and the reference ops."""

from __future__ import annotations

import pytest
import torch

from tinytune import AdapterWrapper, IA3Config, LoraConfig

from conftest import randomize, tiny_gpt2, tiny_llama


# ----------------------------------------------------------------------------------------
# transformers models: Conv1D (GPT-2) rows and generate()
# ----------------------------------------------------------------------------------------
def test_gpt2_conv1d_rows():
    model = tiny_gpt2(n_embd=32, vocab_size=64, n_positions=32)
    w = AdapterWrapper.from_config(
        model, LoraConfig(target_modules=["c_attn", "c_proj"], r=4, init_lora_weights=False), "a"
    )
    w.add_adapter_from_config(
        IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]), "b"
    )
    randomize(w)
    ids = torch.randint(0, 64, (3, 6))
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        out = w(input_ids=ids, adapter_names=names).logits
        rows = []
        for i, n in enumerate(names):
            w.set_active_adapters([] if n == "__base__" else [n])
            rows.append(w(input_ids=ids[i : i + 1]).logits)
        torch.testing.assert_close(out, torch.cat(rows), atol=1e-4, rtol=1e-4)


def test_llama_generate_with_adapter_names():
    model = tiny_llama(hidden_size=32, intermediate_size=64, vocab_size=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    w = AdapterWrapper.from_config(
        model, LoraConfig(target_modules=targets, r=4, init_lora_weights=False), "a"
    )
    w.add_adapter_from_config(LoraConfig(target_modules=targets, r=8, init_lora_weights=False), "b")
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.mul_(4.0)  # large enough to change greedy choices
    ids = torch.randint(1, 64, (3, 5))
    names = ["a", "__base__", "b"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = w.generate(input_ids=ids, adapter_names=names, **kw)
        rows = []
        for i, n in enumerate(names):
            w.set_active_adapters([] if n == "__base__" else [n])
            rows.append(w.generate(input_ids=ids[i : i + 1], **kw))
    assert torch.equal(out, torch.cat(rows))
    assert len({tuple(r[0, 5:].tolist()) for r in rows}) == 3  # the adapters matter
    # Beam search: generate() repeats each row num_beams times; so do the names.
    kw["num_beams"] = 2
    with torch.no_grad():
        w.set_active_adapters([])
        out = w.generate(input_ids=ids, adapter_names=names, **kw)
        rows = []
        for i, n in enumerate(names):
            w.set_active_adapters([] if n == "__base__" else [n])
            rows.append(w.generate(input_ids=ids[i : i + 1], **kw)[0])
    for i, row in enumerate(rows):  # a row that ends early is padded in the batch
        assert torch.equal(out[i, : len(row)], row)
        assert set(out[i, len(row) :].tolist()) <= {kw["pad_token_id"], model.config.eos_token_id}


def test_same_logits_as_peft_adapter_names():
    peft = pytest.importorskip("peft")
    base = tiny_llama(hidden_size=32, intermediate_size=64, vocab_size=64)
    theirs_base = type(base)(base.config).eval()
    theirs_base.load_state_dict(base.state_dict())
    targets = ["q_proj", "v_proj", "down_proj"]
    specs = {"x": (4, 8, False), "y": (8, 3, True), "z": (2, 2, False)}  # r, alpha, rslora
    w = AdapterWrapper(base)
    theirs = None
    for name, (r, alpha, rs) in specs.items():
        w.add_adapter_from_config(
            LoraConfig(
                target_modules=targets,
                r=r,
                lora_alpha=alpha,
                use_rslora=rs,
                init_lora_weights=False,
            ),
            name,
        )
        cfg_p = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, use_rslora=rs)
        if theirs is None:
            theirs = peft.get_peft_model(theirs_base, cfg_p, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg_p)
    randomize(w)
    modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name in specs:
            for path, layer in w.adapters[name].items():
                modules[path].lora_A[name].weight.copy_(layer.lora_A.weight)
                modules[path].lora_B[name].weight.copy_(layer.lora_B.weight)
    theirs.eval()
    ids = torch.randint(0, 64, (5, 7))
    names = ["z", "x", "__base__", "y", "x"]
    with torch.no_grad():
        ours_out = w(input_ids=ids, adapter_names=names).logits
        theirs_out = theirs(input_ids=ids, adapter_names=names).logits
        w.set_active_adapters([])
        base_out = w(input_ids=ids).logits
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=1e-5)
    effect = (ours_out - base_out).abs().amax(dim=(1, 2))
    assert effect[2] < 1e-5 and bool((effect[[0, 1, 3, 4]] > 1e-2).all()), effect


def test_reference_ops_against_per_row_loops():
    """The tensor-only references (tinytune.mixed_torch) on odd shapes."""
    from tinytune.mixed_torch import (
        torch_embedding_lora_mixed,
        torch_ia3_mixed,
        torch_lora_mixed,
        torch_lora_mixed_grouped,
    )

    g = torch.Generator().manual_seed(0)
    for b, t, d_in, d_out, r, slots in [
        (1, 1, 3, 5, 1, 1),
        (3, 17, 13, 7, 4, 2),
        (5, 2, 130, 17, 3, 4),
        (9, 1, 17, 3, 2, 3),
    ]:
        x = torch.randn(b, t, d_in, generator=g)
        out = torch.randn(b, t, d_out, generator=g)
        a = torch.randn(slots, r, d_in, generator=g)
        bt = torch.randn(slots, r, d_out, generator=g)
        scale = torch.rand(slots, generator=g, dtype=torch.float64)
        rows = torch.randint(0, slots, (b,), generator=g)
        expected = torch.stack(
            [out[i] + float(scale[rows[i]]) * (x[i] @ a[rows[i]].T @ bt[rows[i]]) for i in range(b)]
        )
        torch.testing.assert_close(torch_lora_mixed(x, out, a, bt, scale, rows), expected)
        # the same rows grouped by slot (base rows = the last slot, left out)
        segments: dict[int, list[int]] = {}
        for i, slot in enumerate(rows.tolist()):
            if slot != slots - 1 or slots == 1:
                segments.setdefault(slot, []).append(i)
        members = list(segments.values())
        grouped = torch_lora_mixed_grouped(
            x,
            out,
            a,
            bt,
            scale,
            torch.tensor(list(segments)),
            torch.tensor([i for m in members for i in m]),
            torch.tensor([g for g, m in enumerate(members) for _ in m]),
            torch.tensor([p for m in members for p in range(len(m))]),
            max(len(m) for m in members),
        )
        left_out = [i for i in range(b) if not any(i in m for m in members)]
        expected_grouped = expected.clone()
        expected_grouped[left_out] = out[left_out]
        torch.testing.assert_close(grouped, expected_grouped)
        copy = out.clone()
        torch.testing.assert_close(
            torch_lora_mixed(x, copy, a, bt, scale, rows, inplace=True), expected
        )
        torch.testing.assert_close(copy, expected)  # updated in place
        scales = torch.randn(slots, d_in, generator=g)
        torch.testing.assert_close(
            torch_ia3_mixed(x, scales, rows),
            torch.stack([x[i] * scales[rows[i]] for i in range(b)]),
        )
        ids = torch.randint(0, 11, (b, t), generator=g)
        table = torch.randn(slots, 11, r, generator=g)
        expected = torch.stack(
            [
                out[i] + float(scale[rows[i]]) * (table[rows[i]][ids[i]] @ bt[rows[i]])
                for i in range(b)
            ]
        )
        torch.testing.assert_close(
            torch_embedding_lora_mixed(ids, out, table, bt, scale, rows), expected
        )
