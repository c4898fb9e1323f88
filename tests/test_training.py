"""Drop-in training: Hugging Face Trainer, mixed precision, gradient checkpointing,
gradient accumulation, a compiled training step, resuming (tiny models, CPU only)."""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from tinytune import AdapterFileError, AdapterWrapper, IA3Config, LoraConfig  # noqa: E402
from tinytune.training import (  # noqa: E402
    AdapterTrainer,
    cast_adapter_dtype,
    load_adapter_weights,
    load_all_adapters,
)

import conftest  # noqa: E402
from conftest import MLP  # noqa: E402

VOCAB = 64


def tiny_llama(seed: int = 0) -> nn.Module:
    """conftest's tiny Llama at this file's sizes, in training mode (as constructed)."""
    return conftest.tiny_llama(
        seed, vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        max_position_embeddings=64,
    ).train()


def wrapped_llama(seed: int = 0, **lora) -> AdapterWrapper:
    base = tiny_llama(seed)
    torch.manual_seed(seed + 100)
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, **lora)
    return AdapterWrapper.from_config(base, cfg)


class Rows(torch.utils.data.Dataset):
    """A plain torch dataset of dicts, with one column the model does not take."""

    def __init__(self, n: int = 16, seq: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "text": f"row {i}"}


def args(tmp_path: Path, **kw) -> "transformers.TrainingArguments":
    kw.setdefault("per_device_train_batch_size", 4)
    return transformers.TrainingArguments(output_dir=str(tmp_path), **kw)


def adapter_state(wrapper: AdapterWrapper) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in wrapper.named_adapter_parameters()}


def assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# --------------------------------------------------------------------------------------
# the forward signature
# --------------------------------------------------------------------------------------
def test_wrapper_presents_the_base_models_forward_signature():
    w = wrapped_llama()
    params = inspect.signature(w.forward).parameters
    base = inspect.signature(w.model.forward).parameters
    assert list(params)[: len(base) - 1] == list(base)[:-1]  # all but **kwargs, in order
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(params.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    # A plain module: its own parameter names, and the call is unchanged.
    mlp = AdapterWrapper.from_config(MLP().eval(), LoraConfig(target_modules="lin0"))
    assert list(inspect.signature(mlp.forward).parameters) == ["X", "adapter_names"]
    x = torch.randn(3, 10)
    torch.testing.assert_close(mlp(x), mlp.forward(X=x))
    # Copies and pickles show it too.
    for copied in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        assert list(inspect.signature(copied.forward).parameters) == ["X", "adapter_names"]
        assert copied.forward.__self__ is copied
        torch.testing.assert_close(copied(x), mlp(x))
    # Unloading shows the plain signature again; swapping a base model shows the new one.
    base_model = mlp.unload()
    assert list(inspect.signature(mlp.forward).parameters) == ["args", "kwargs"]
    mlp.swap_base_model(base_model)
    assert "X" in inspect.signature(mlp.forward).parameters


def test_plain_trainer_with_default_arguments_trains(tmp_path):
    # Used to fail: "The batch received was empty" (every column dropped).
    w = wrapped_llama()
    before = adapter_state(w)
    trainer = transformers.Trainer(model=w, args=transformers.TrainingArguments(str(tmp_path), max_steps=2), train_dataset=Rows())
    trainer.train()
    after = adapter_state(w)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in w.model.parameters())


# --------------------------------------------------------------------------------------
# AdapterTrainer: files
# --------------------------------------------------------------------------------------
def test_trainer_save_model_writes_peft_adapter_files_only(tmp_path):
    w = wrapped_llama()
    default_args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"))
    trainer = AdapterTrainer(model=w, args=default_args, train_dataset=Rows(n=8))
    trainer.train()  # default arguments: 3 epochs of one batch of 8
    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = sorted(os.listdir(out))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "training_args.bin"]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys == {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"

    ids = Rows()[0]["input_ids"][None]
    w.eval()
    with torch.no_grad():
        want = w(input_ids=ids).logits
        # tinytune reads it back ...
        again = AdapterWrapper.from_pretrained(tiny_llama(), str(out)).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        # ... and so does PEFT.
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
        torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_trainer_saves_other_adapters_in_subdirectories_as_peft_does(tmp_path):
    w = wrapped_llama()
    w.add_adapter_from_config(IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "ia3")
    trainer = AdapterTrainer(model=w, args=args(tmp_path / "run", max_steps=1), train_dataset=Rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "ia3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_every_checkpoint_holds_adapter_files_and_resuming_continues_identically(tmp_path):
    data = Rows()
    # Uninterrupted: 4 steps, a checkpoint every 2.
    full = wrapped_llama()
    kw = dict(max_steps=4, save_steps=2, learning_rate=1e-2)
    AdapterTrainer(model=full, args=args(tmp_path / "a", **kw), train_dataset=data).train()
    for step in (2, 4):
        ckpt = tmp_path / "a" / f"checkpoint-{step}"
        names = set(os.listdir(ckpt))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}

    # Interrupted after step 2, resumed from its checkpoint in a fresh process-like setup
    # (a new model built the same way, so its adapters start where the run's did).
    resumed = wrapped_llama()
    t = AdapterTrainer(model=resumed, args=args(tmp_path / "a", **kw), train_dataset=data)
    params = [p for _, p in resumed.named_adapter_parameters()]
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    # Resuming loaded the weights in place: the optimizer trained the same tensors.
    assert [p for _, p in resumed.named_adapter_parameters()] == params
    assert_states_close(adapter_state(resumed), adapter_state(full))


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    w = wrapped_llama()
    run = tmp_path / "run"
    trainer = AdapterTrainer(
        model=w,
        args=args(
            run, max_steps=4, save_steps=1, eval_strategy="steps", eval_steps=1,
            load_best_model_at_end=True, learning_rate=5e-2,
        ),
        train_dataset=Rows(),
        eval_dataset=Rows(n=4, seed=1),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and "eval_loss" in trainer.state.log_history[0]
    losses = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.endswith(f"checkpoint-{min(losses, key=losses.get)}")
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for path, layer in w.adapters["default"].items():
        torch.testing.assert_close(layer.lora_A.weight, saved[f"base_model.model.{path}.lora_A.weight"])
        torch.testing.assert_close(layer.lora_B.weight, saved[f"base_model.model.{path}.lora_B.weight"])


def test_load_adapter_weights_refuses_another_adapter_and_changes_nothing(tmp_path):
    w = wrapped_llama()
    w.save_adapter(str(tmp_path / "same"))
    other = AdapterWrapper.from_config(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    other.save_adapter(str(tmp_path / "other"))
    before = adapter_state(w)
    with pytest.raises(AdapterFileError, match="different adapter"):
        load_adapter_weights(w, tmp_path / "other")
    assert_states_close(adapter_state(w), before, atol=0)
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.add_(1.0)
    load_adapter_weights(w, tmp_path / "same")
    assert_states_close(adapter_state(w), before, atol=0)


def two_adapters(seed: int = 0) -> AdapterWrapper:
    w = wrapped_llama(seed)
    w.add_adapter_from_config(IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "ia3")
    return w


@pytest.fixture(scope="module")
def two_adapter_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a run training "default" (LoRA) and "ia3" for 2 steps."""
    run = tmp_path_factory.mktemp("run")
    AdapterTrainer(model=two_adapters(), args=args(run, max_steps=2, save_steps=2), train_dataset=Rows()).train()
    return run / "checkpoint-2"


def perturbed_two_adapters() -> AdapterWrapper:
    # Unlike the checkpoint's weights, so a partial load would show.
    w = two_adapters()
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.add_(1.0)
    return w


@pytest.mark.parametrize(
    "missing", ["adapter_model.safetensors", "adapter_config.json", "ia3/adapter_model.safetensors"]
)
def test_resuming_from_a_checkpoint_missing_an_adapter_file_raises_before_any_step(
    tmp_path, two_adapter_checkpoint, missing
):
    # Used to train on from the current weights ("default" missing, "ia3" present), skip
    # "ia3" silently, or raise transformers' bare "Can't find a valid checkpoint".
    from tinytune import AdapterFileNotFoundError

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(two_adapter_checkpoint, ckpt)
    (ckpt / missing).unlink()
    w = perturbed_two_adapters()
    before = adapter_state(w)
    t = AdapterTrainer(model=w, args=args(tmp_path / "b", max_steps=4, learning_rate=1e-2), train_dataset=Rows())
    with pytest.raises(AdapterFileNotFoundError, match=re.escape(str(ckpt / missing))):
        t.train(resume_from_checkpoint=str(ckpt))
    assert t.state.global_step == 0
    assert_states_close(adapter_state(w), before, atol=0)


def test_a_resume_failing_on_the_second_adapter_changes_nothing(tmp_path, two_adapter_checkpoint):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(two_adapter_checkpoint, ckpt)
    # An adapter the model lacks (would be added, frozen) ...
    shutil.copytree(two_adapter_checkpoint / "ia3", ckpt / "extra")
    # ... and an "ia3" that describes another adapter than the model's.
    shutil.rmtree(ckpt / "ia3")
    other = AdapterWrapper.from_config(tiny_llama(), IA3Config(target_modules=["up_proj"], feedforward_modules=[]))
    other.save_adapter(str(ckpt / "ia3"))
    w = perturbed_two_adapters()
    before = adapter_state(w)
    t = AdapterTrainer(model=w, args=args(tmp_path / "b", max_steps=4), train_dataset=Rows())
    with pytest.raises(AdapterFileError, match="different adapter"):
        t.train(resume_from_checkpoint=str(ckpt))
    assert list(w.adapters) == ["default", "ia3"]
    assert_states_close(adapter_state(w), before, atol=0)
    # With "ia3" whole again, the same call loads everything.
    shutil.rmtree(ckpt / "ia3")
    shutil.copytree(two_adapter_checkpoint / "ia3", ckpt / "ia3")
    assert load_all_adapters(w, ckpt) == ["default", "ia3", "extra"]
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    for path, layer in w.adapters["default"].items():
        torch.testing.assert_close(layer.lora_A.weight, saved[f"base_model.model.{path}.lora_A.weight"])
    assert "extra" not in w.active_adapters
    assert not any(p.requires_grad for p in w.adapters["extra"].parameters())


def test_load_all_adapters_removes_the_adapters_it_added_when_a_later_one_cannot_be_added(tmp_path):
    from tinytune import InvalidConfigError

    w = wrapped_llama()
    w.save_adapter(str(tmp_path))
    for name, r in [("a_small", 4), ("b_big", 8)]:  # added in this order
        AdapterWrapper.from_config(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=r)).save_adapter(
            str(tmp_path / name)
        )
    w.reserve_adapter_slots(max_adapters=4, max_rank=4)  # b_big does not fit
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.add_(1.0)
    before = adapter_state(w)
    with pytest.raises(InvalidConfigError, match="max_rank"):
        load_all_adapters(w, tmp_path)
    assert list(w.adapters) == ["default"]
    assert_states_close(adapter_state(w), before, atol=0)


# --------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------
def sgd_steps(model, batches, lr=0.1, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for ids in batches:
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()


def test_bf16_base_with_fp32_adapter_weights_trains_and_saves(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"])
    w = AdapterWrapper.from_config(base, cfg, autocast_adapter_dtype=True)
    lora = [p for n, p in w.named_adapter_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    # The modules_to_save copy stays in the base dtype, as in PEFT.
    assert w.adapters["default"]["lm_head"].module_copy.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in w.model.parameters())
    before = adapter_state(w)
    ids = Rows(n=4)[0]["input_ids"][None]
    w.train()
    out = w(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    sgd_steps(w, [ids], steps=2)
    changed = [k for k, v in adapter_state(w).items() if "lora_B" in k and not torch.equal(v, before[k])]
    assert len(changed) == 4
    w.save_adapter(str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float32
    # Loading with the option gives fp32 weights on a bf16 base again; without, bf16 ones.
    again = AdapterWrapper.from_pretrained(tiny_llama().to(torch.bfloat16), str(tmp_path / "a"), autocast_adapter_dtype=True)
    assert again.adapters["default"]["model.layers.0.self_attn.q_proj"].lora_A.weight.dtype == torch.float32
    plain = AdapterWrapper.from_config(tiny_llama().to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]))
    assert next(plain.adapter_parameters()).dtype == torch.bfloat16
    cast_adapter_dtype(plain)
    assert next(plain.adapter_parameters()).dtype == torch.float32


def test_cpu_autocast_bf16_trains_fp32_adapters_close_to_fp32():
    ids = Rows(n=4)[0]["input_ids"][None].repeat(2, 1)
    ref = wrapped_llama(init_lora_weights=False)
    amp = wrapped_llama(init_lora_weights=False)
    ref.train(), amp.train()
    loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    torch.testing.assert_close(out.loss.float(), loss_ref, atol=5e-2, rtol=2e-2)
    for (name, p), (_, q) in zip(amp.named_adapter_parameters(), ref.named_adapter_parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        # bf16 matmuls: about 3 significant digits, so compare directions.
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos)


# --------------------------------------------------------------------------------------
# gradient checkpointing, accumulation
# --------------------------------------------------------------------------------------
def adapter_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_adapter_parameters()}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_enable_on_the_wrapper_reaches_the_base_model(use_reentrant):
    ids = Rows(n=4)[0]["input_ids"][None].repeat(2, 1)
    w = wrapped_llama(init_lora_weights=False).train()
    want = adapter_grads(w, ids)
    w.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert w.model.model.gradient_checkpointing and w.is_gradient_checkpointing
    # With a frozen base, the first checkpointed block's input must require grad
    # (transformers hooks the input embeddings, as PEFT arranges); else no adapter
    # inside a reentrant checkpoint would get a gradient.
    got = adapter_grads(w, ids)
    assert_states_close(got, want, atol=1e-6)
    assert all(v.abs().sum() > 0 for k, v in got.items())


def test_torch_utils_checkpoint_around_adapted_blocks():
    from conftest import Tower

    torch.manual_seed(0)
    tower = Tower()
    w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 32, (4, 6))

    def run(checkpointed: bool) -> dict[str, torch.Tensor]:
        w.zero_grad(set_to_none=True)
        x = tower.embed(ids)
        for block in tower.layers:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        tower.head(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in w.named_adapter_parameters()}

    assert_states_close(run(True), run(False), atol=1e-7)


def test_gradient_accumulation_in_trainer_equals_one_full_batch(tmp_path):
    # Trainer passes num_items_in_batch because the wrapper's signature shows the base
    # model's **kwargs, so accumulated micro-batches give exactly the full-batch step.
    results = []
    for i, (bs, ga) in enumerate([(8, 1), (4, 2)]):
        w = wrapped_llama()
        a = args(tmp_path / str(i), max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=1e-2)
        AdapterTrainer(model=w, args=a, train_dataset=Rows(n=8)).train()
        results.append(adapter_state(w))
    assert_states_close(results[0], results[1], atol=1e-6)
    assert any(not torch.equal(v, adapter_state(wrapped_llama())[k]) for k, v in results[0].items())


def test_trainer_activation_checkpointing_argument_reaches_the_base_model(tmp_path):
    w = wrapped_llama()
    before = adapter_state(w)
    a = args(tmp_path, max_steps=1, activation_checkpointing=True)
    AdapterTrainer(model=w, args=a, train_dataset=Rows(n=4)).train()
    assert w.model.model.gradient_checkpointing
    assert any(not torch.equal(v, before[k]) for k, v in adapter_state(w).items() if "lora_B" in k)


# --------------------------------------------------------------------------------------
# compiled training step
# --------------------------------------------------------------------------------------
def test_compiled_training_steps_match_eager():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        return AdapterWrapper.from_config(model, LoraConfig(target_modules=["0", "2"], init_lora_weights=False))

    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        w = make().train()
        model = torch.compile(w, fullgraph=True) if compiled else w
        opt = torch.optim.AdamW(list(w.adapter_parameters()), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        results.append(adapter_state(w))
    assert_states_close(results[1], results[0], atol=1e-5)
    assert not torch.equal(results[1]["default.0.lora_B.weight"], make().adapters["default"]["0"].lora_B.weight)


def test_single_process_helpers_and_bad_input(tmp_path):
    from tinytune import AdapterNotFoundError, InvalidConfigError
    from tinytune.training import save_adapter_distributed

    w = wrapped_llama(init_lora_weights=False)
    # Without torch.distributed initialised, save_adapter_distributed is save_adapter.
    save_adapter_distributed(w, tmp_path / "d")
    w.save_adapter(str(tmp_path / "s"))
    from safetensors import safe_open

    assert (tmp_path / "d" / "adapter_config.json").read_text() == (tmp_path / "s" / "adapter_config.json").read_text()
    d, s = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "ds")
    assert d.keys() == s.keys() and all(torch.equal(d[k], s[k]) for k in d)
    # (metadata compared as dicts: safetensors writes its entries in no fixed order)
    metas = [safe_open(str(tmp_path / x / "adapter_model.safetensors"), "pt").metadata() for x in "ds"]
    assert metas[0] == metas[1]
    before = adapter_state(w)
    with pytest.raises(InvalidConfigError, match="floating-point"):
        cast_adapter_dtype(w, dtype=torch.int8)
    with pytest.raises(AdapterNotFoundError):
        cast_adapter_dtype(w, "nope")
    with pytest.raises(AdapterNotFoundError):
        load_adapter_weights(w, tmp_path / "s", "nope")
    assert_states_close(adapter_state(w), before, atol=0)
