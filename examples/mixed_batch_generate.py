"""Generate for several users at once, each row with its own adapter (``adapter_names=``).

    python examples/mixed_batch_generate.py --adapters 4 --new-tokens 8

A tiny Llama from a ``transformers`` config gets several LoRA adapters of different ranks
(random non-zero weights, as after training). One ``generate`` call serves a batch whose
rows name different adapters, ``"__base__"`` for none; each row's tokens equal those of
generating that row alone with only its adapter active.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from tinytune import AdapterWrapper, LoraConfig


def main(argv: list[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=3, help="adapters loaded (default 3)")
    p.add_argument("--new-tokens", type=int, default=10, help="tokens to generate (default 10)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)).eval()
    model = AdapterWrapper(base)
    names = [f"user{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4 * (i % 3 + 1), lora_alpha=16,
                            init_lora_weights=False)  # non-zero, as after training
        model.add_adapter_from_config(config, name, activate=False)

    rows = [*names, "__base__", names[0]]  # one adapter name per row
    prompts = torch.randint(1, 128, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        batch = model.generate(input_ids=prompts, adapter_names=rows, **kwargs)
        for i, name in enumerate(rows):
            model.set_active_adapters([] if name == "__base__" else name)
            alone = model.generate(input_ids=prompts[i : i + 1], **kwargs)
            assert torch.equal(batch[i : i + 1], alone), f"row {i} ({name}) differs from running it alone"
            print(f"row {i} {name:>9}: {batch[i, prompts.shape[1]:].tolist()}")
    print(f"one call, {len(set(rows))} different adapters: every row as if run alone")
    return batch


if __name__ == "__main__":
    main()
