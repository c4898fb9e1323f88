"""transformers models as drop-in bases: GPT-2 (Conv1D, fan_in_fan_out) and generate().

Tiny models built from configs with random weights; nothing is downloaded. Each case
is checked against PEFT on the same model through adapter files.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402

import tinytune as tt  # noqa: E402

ATOL = 1e-5


IDS = torch.tensor([[5, 17, 99, 4, 60], [8, 1, 42, 42, 7]])
MASK = torch.ones_like(IDS)


def randomise(params, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


GPT2_PEFT = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "lora-rslora-pattern": lambda: peft.LoraConfig(
        r=8, lora_alpha=4, use_rslora=True, target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"],
        rank_pattern={"mlp.c_proj": 2}, fan_in_fan_out=True,
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
    ),
}


@pytest.mark.parametrize("name", list(GPT2_PEFT))
def test_gpt2_peft_file_parity_and_generate(gpt2, tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(gpt2), GPT2_PEFT[name]())
        randomise([p for _, p in sorted(pm.named_parameters()) if p.requires_grad])
        pm.save_pretrained(tmp_path / "peft")
        pm.eval()
    expected = logits(pm)
    assert not torch.allclose(expected, logits(gpt2), atol=1e-3)

    wrapper = tt.AdapterWrapper(copy.deepcopy(gpt2))
    wrapper.load_adapter(tmp_path / "peft")
    # The Conv1D layers are adapted in place through hooks, not replaced.
    conv1d = type(wrapper.model.transformer.h[0].attn.c_attn)
    assert conv1d.__name__ == "Conv1D"
    assert torch.allclose(logits(wrapper), expected, atol=ATOL, rtol=0)

    kwargs = dict(attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=0)
    theirs = pm.generate(input_ids=IDS, **kwargs)
    ours = wrapper.generate(IDS, **kwargs)
    assert ours.shape == (2, 10)
    assert torch.equal(ours, theirs)

    # And back: PEFT reads tinytune's file to the same logits.
    wrapper.save_adapter(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours").eval()
    assert torch.allclose(logits(back), expected, atol=ATOL, rtol=0)


def test_gpt2_tinytune_config_marks_fan_in_fan_out(gpt2, tmp_path):
    """tinytune detects Conv1D itself; the file says fan_in_fan_out=True for PEFT."""
    wrapper = tt.AdapterWrapper.from_config(
        copy.deepcopy(gpt2), tt.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    randomise([p for _, p in wrapper.named_adapter_parameters()], seed=2)
    wrapper.save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        # PEFT warns (and fixes) fan_in_fan_out=False on Conv1D: it must not need to.
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        pm = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path).eval()
    assert torch.allclose(logits(pm), logits(wrapper), atol=ATOL, rtol=0)


def test_gpt2_merge_matches_unmerged(gpt2, tmp_path):
    """Conv1D merging (weights stored (in, out)) agrees with the hooked forward."""
    wrapper = tt.AdapterWrapper.from_config(
        copy.deepcopy(gpt2), tt.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    )
    randomise([p for _, p in wrapper.named_adapter_parameters()], seed=5)
    unmerged = logits(wrapper)
    wrapper.merge_adapters()
    assert torch.allclose(logits(wrapper), unmerged, atol=1e-4, rtol=0)
