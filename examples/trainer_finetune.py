"""Fine-tune LoRA adapters with Hugging Face ``Trainer`` (``AdapterTrainer``), then load them back.

    python examples/trainer_finetune.py --steps 40 --out out/trainer

A tiny Llama (random weights, from a ``transformers`` config) learns to continue counting
sequences. ``AdapterTrainer`` is a ``Trainer`` that writes PEFT-format adapter files for
``save_model()`` and every ``checkpoint-N`` (plain ``Trainer`` would write the whole
model), resumes them in place, and reports ``eval_loss`` with default arguments.
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


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4))


class Counting(torch.utils.data.Dataset):
    """Sequences that count upwards modulo the vocabulary; labels are the inputs."""

    def __init__(self, n: int, seq: int, seed: int):
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq", type=int, default=12, help="tokens per row (default 12)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, args.out or tmp)


def run(args: argparse.Namespace, out: str) -> dict:
    wrapper = AdapterWrapper.from_config(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=8))
    targs = transformers.TrainingArguments(
        out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-2,
        save_steps=max(1, args.steps // 2), logging_steps=max(1, args.steps // 4), report_to=[],
        use_cpu=True, disable_tqdm=True)
    trainer = AdapterTrainer(model=wrapper, args=targs, train_dataset=Counting(512, args.seq, 0),
                             eval_dataset=Counting(32, args.seq, 1))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()  # train(resume_from_checkpoint=True) would continue from the last checkpoint
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(f"{out}/final")
    print(f"eval_loss {before:.3f} -> {after:.3f}; saved: {sorted(os.listdir(f'{out}/final'))}")

    again = AdapterWrapper.from_pretrained(tiny_llama(), f"{out}/final")  # or peft.PeftModel.from_pretrained
    ids = Counting(4, args.seq, 2)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, wrapper.eval()(input_ids=ids).logits)
    print("loaded back from the saved adapter: same logits")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
