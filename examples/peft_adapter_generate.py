"""Load an adapter that Hugging Face PEFT trained and saved, and generate with it.

    python examples/peft_adapter_generate.py --new-tokens 8

Builds a tiny Llama from a ``transformers`` config (random weights, nothing downloaded),
makes a LoRA adapter with ``peft`` (non-zero weights, as after training), saves it with
``save_pretrained``, loads it with tinytune and generates; PEFT's own ``generate`` on the
same adapter gives the same tokens. Needs ``peft`` and ``transformers`` (the ``bench``
or ``test`` extra).
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch
import transformers

from tinytune import AdapterWrapper


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights for both libraries
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=12, help="tokens to generate (default 12)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the PEFT adapter (default 8)")
    p.add_argument("--out", default=None, help="where PEFT saves the adapter (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, args.out or tmp)


def run(args: argparse.Namespace, path: str) -> torch.Tensor:
    # 1. PEFT makes and saves an adapter (init_lora_weights=False: non-zero, as if trained).
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()
    peft_model.save_pretrained(path)

    # 2. tinytune loads it onto the same base model and generates.
    model = AdapterWrapper.from_pretrained(tiny_llama(), path)
    prompt = torch.tensor([[1, 5, 9, 13]])
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ours = model.generate(input_ids=prompt, **kwargs)
        theirs = peft_model.generate(input_ids=prompt, **kwargs)
    print("tinytune:", ours[0].tolist())
    print("PEFT:    ", theirs[0].tolist())
    assert torch.equal(ours, theirs), "tinytune and PEFT generated different tokens"
    print(f"adapter from {path}: the same tokens as PEFT")
    return ours


if __name__ == "__main__":
    main()
