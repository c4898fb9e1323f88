"""QLoRA: train LoRA on a 4-bit (bitsandbytes NF4) base with ``AdapterTrainer``, use it on the float model.

    python examples/qlora_finetune.py --steps 80 --out out/qlora

A tiny Llama (random weights, from a ``transformers`` config) is saved, loaded back in 4 bits
through ``BitsAndBytesConfig`` (as a large model would be), and LoRA adapters on its
quantized projections learn to continue counting sequences. Only the adapters train: the
4-bit weights stay frozen and are never merged into. The adapter is saved in PEFT's format,
then loaded onto the float model it was quantized from, where it does the same job:
the float model with the adapter counts as the 4-bit one does, with logits that differ
by about the quantization error.

bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights in place for a faster kernel on
the first forward in eval mode without autograd (``Trainer.evaluate()`` does one). After
that, autograd no longer flows through those layers, so the adapters below them stop
learning (PEFT is affected too). :func:`keep_4bit_layout` turns the repack off for the
run; the script checks that every adapter layer learned.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

from tinytune import AdapterWrapper, LoraConfig
from tinytune.training import AdapterTrainer

VOCAB = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> transformers.LlamaForCausalLM:
    # Widths in multiples of 64: bitsandbytes' CPU 4-bit layouts take them as they are.
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2))


def load_4bit(path: str) -> transformers.PreTrainedModel:
    """The model saved at ``path``, its linear layers (but ``lm_head``) in NF4."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32)


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU repack of 4-bit weights; returns how many layers.

    The repack happens on a CPU with AVX512-BF16 on the first forward in eval mode
    without autograd; afterwards gradients no longer reach through the layer. Without the
    repack, every forward runs bitsandbytes' dequantize-and-matmul path, with or without
    autograd. (A tinytune that guards the repack itself makes this a no-op.)
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def gradients_reach_every_layer(wrapper: AdapterWrapper, data: "Counting") -> None:
    """Check that one backward gives every LoRA ``B`` a gradient.

    ``B`` starts at zero, so the layers above an adapter pass it a gradient only through
    their frozen 4-bit weights: a layer that bitsandbytes repacked passes none.
    """
    wrapper.train()
    wrapper(input_ids=data.ids, labels=data.ids).loss.backward()
    missing = [path for path, layer in wrapper.adapters["default"].items()
               if layer.lora_B.weight.grad is None or not layer.lora_B.weight.grad.any()]
    wrapper.zero_grad(set_to_none=True)
    assert not missing, f"no gradient reaches the adapters of {missing}"


class Counting(torch.utils.data.Dataset):
    """Sequences that count upwards modulo the vocabulary; labels are the inputs."""

    def __init__(self, n: int, seq: int, seed: int):
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def mean_loss(model: torch.nn.Module, data: Counting) -> float:
    with torch.no_grad():
        return float(model(input_ids=data.ids, labels=data.ids).loss)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq", type=int, default=12, help="tokens per row (default 12)")
    p.add_argument("--new-tokens", type=int, default=6, help="tokens to generate at the end (default 6)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, args.out or tmp)


def run(args: argparse.Namespace, out: str) -> dict:
    tiny_llama().save_pretrained(f"{out}/float-base")  # stands in for a downloaded checkpoint
    base4 = load_4bit(f"{out}/float-base")
    print(f"4-bit base: {type(base4.model.layers[0].self_attn.q_proj).__name__} layers; "
          f"repack turned off on {keep_4bit_layout(base4)}")

    wrapper = AdapterWrapper.from_config(base4, LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32))
    wrapper.print_trainable_parameters()
    targs = transformers.TrainingArguments(
        f"{out}/run", max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-2,
        save_strategy="no", logging_steps=max(1, args.steps // 4), report_to=[], use_cpu=True,
        disable_tqdm=True)
    evalset = Counting(32, args.seq, 1)
    trainer = AdapterTrainer(model=wrapper, args=targs, train_dataset=Counting(512, args.seq, 0),
                             eval_dataset=evalset)
    before = trainer.evaluate()["eval_loss"]  # an eval forward without autograd, before training
    gradients_reach_every_layer(wrapper, evalset)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"4-bit base: eval_loss {before:.3f} -> {after:.3f}")
    learned = args.steps >= 20  # enough steps to learn counting (the smoke test runs 2)
    if learned:
        assert after < 0.5 * before, "the adapters did not learn"

    trainer.save_model(f"{out}/adapter")
    print(f"saved: {sorted(os.listdir(f'{out}/adapter'))}")

    # The same adapter on the float model (the one the 4-bit model was quantized from).
    float_base = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/float-base", dtype=torch.float32)
    plain_loss = mean_loss(float_base.eval(), evalset)
    tuned = AdapterWrapper.from_pretrained(float_base, f"{out}/adapter").eval()
    trained = dict(wrapper.named_adapter_parameters())
    for name, p in tuned.named_adapter_parameters():
        assert torch.equal(p, trained[name]), f"{name} was not loaded as trained"
    float_loss = mean_loss(tuned, evalset)
    print(f"float base: eval_loss {plain_loss:.3f} without the adapter, {float_loss:.3f} with it")
    if learned:
        assert float_loss < 0.5 * plain_loss, "the adapter does not carry over to the float model"

    wrapper.eval()
    ids = evalset.ids[:4, :6]
    with torch.no_grad():
        l4, lf = wrapper(input_ids=ids).logits, tuned(input_ids=ids).logits
        rel = float((l4 - lf).norm() / lf.norm())
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        tokens4 = wrapper.generate(input_ids=ids, **gen)[:, ids.shape[1]:]
        tokensf = tuned.generate(input_ids=ids, **gen)[:, ids.shape[1]:]
    want = (ids[:, -1:] + 1 + torch.arange(args.new_tokens)) % VOCAB
    print(f"logits, 4-bit vs float base with the adapter: relative difference {rel:.3f} (the quantization error)")
    print(f"prompt {ids[0].tolist()} -> 4-bit {tokens4[0].tolist()}, float {tokensf[0].tolist()}")
    acc4, accf = float((tokens4 == want).float().mean()), float((tokensf == want).float().mean())
    print(f"counting continued correctly: {acc4:.0%} of tokens on the 4-bit base, {accf:.0%} on the float base")
    if learned:
        assert accf >= 0.9 and acc4 >= 0.9, "the adapter does not continue counting"
    return {"before": before, "after": after, "float_loss": float_loss, "relative": rel,
            "accuracy_4bit": acc4, "accuracy_float": accf}


if __name__ == "__main__":
    main()
