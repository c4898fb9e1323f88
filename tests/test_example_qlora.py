"""QLoRA with ``AdapterTrainer`` (issue 21, part 5): examples/qlora_finetune.py runs, and
``Trainer``'s check on quantized models accepts a wrapper with trainable adapters.

The smoke case of examples/qlora_finetune.py lives here (tests/test_scripts.py lists the
script in COVERED with this file).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from tinytune import AdapterWrapper, LoraConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parents[1]


def test_qlora_example_runs(tmp_path):
    argv = [sys.executable, "examples/qlora_finetune.py", "--steps", "2", "--batch", "2", "--seq", "4",
            "--new-tokens", "2", "--out", str(tmp_path)]
    proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "float base: eval_loss" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_args.bin"]


@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)

    def load():
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_pretrained(
                path, quantization_config=config, device_map="cpu", dtype=torch.float32)

    return load


class _Ids(torch.utils.data.Dataset):
    def __init__(self, vocab: int):
        self.ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path):
    return transformers.TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True)


def test_adapter_trainer_trains_a_wrapper_on_a_4bit_model(nf4_llama, tmp_path):
    from tinytune.training import AdapterTrainer

    model = nf4_llama()
    assert model.is_quantized
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    trainer = AdapterTrainer(model=w, args=_args(tmp_path), train_dataset=_Ids(model.config.vocab_size))
    assert "_hf_peft_config_loaded" not in vars(w)  # set only while Trainer checks the model
    trainer.train()
    assert all(layer.lora_B.weight.any() for _, layer in w.adapters["default"].items())


def test_a_quantized_model_without_trainable_adapters_is_still_refused(nf4_llama, tmp_path):
    from tinytune.training import AdapterTrainer

    model = nf4_llama()
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj"], r=4))
    for p in w.adapter_parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="purely quantized"):
        AdapterTrainer(model=w, args=_args(tmp_path), train_dataset=_Ids(model.config.vocab_size))
    assert "_hf_peft_config_loaded" not in vars(w)
