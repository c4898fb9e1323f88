"""``AdapterTrainer``: Hugging Face ``Trainer`` for an :class:`~tinytune.AdapterWrapper`.

Plain ``Trainer(model=wrapper, ...)`` trains a wrapper (the wrapper shows the base
model's ``forward`` signature, so the dataset's columns are kept), but ``Trainer`` only
calls ``save_pretrained`` on ``PreTrainedModel`` and ``PeftModel`` instances; any other
model has its whole ``state_dict`` (base weights included) written as
``model.safetensors``, and resuming or ``load_best_model_at_end`` read that file back.
transformers offers no other hook for saving or loading, so this subclass overrides the
three places where ``Trainer`` handles model files:

* ``_save`` (``save_model()`` and every checkpoint) writes adapter files only, in PEFT's
  layout: ``"default"`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in the
  directory, any other adapter in a sub-directory of its name;
* ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and
  ``_load_best_model`` (``load_best_model_at_end=True``) copy the saved adapter weights
  into the wrapper's adapters in place (``load_all_adapters``: all checked first, so a
  missing or mismatched file raises before any step and changes nothing), so the
  optimizer state restored by ``Trainer`` still refers to the same parameters.

It also takes ``label_names`` from the base model's class (``Trainer`` reads them from
the model's class, which for a wrapper has no ``labels`` parameter), so evaluation
reports ``eval_loss`` with default arguments. A wrapper on a quantized model (QLoRA:
bitsandbytes or torchao through transformers) with trainable adapters passes
``Trainer``'s check that a quantized model has adapters to train. Models that are not
wrappers are handed to ``Trainer`` unchanged.

Floor 8b (training helpers): imports ``util``, ``checkpoints`` and ``wrapper`` (and
transformers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    can_return_loss,
    find_labels,
)

from .checkpoints import (
    load_all_adapters,
    save_adapter_distributed,
    save_all_adapters,
    saved_adapter_dirs,
)
from .util import adapter_dir, dtensor_type
from .wrapper import AdapterWrapper

__all__ = ["AdapterTrainer"]

# transformers' flag for "adapters are loaded on this model" (PeftAdapterMixin), which its
# check of quantized models before training reads.
_HF_ADAPTERS_LOADED = "_hf_peft_config_loaded"


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` that saves and loads an ``AdapterWrapper``'s adapters.

    Use it exactly like ``Trainer``::

        trainer = AdapterTrainer(model=wrapper, args=TrainingArguments("out"),
                                 train_dataset=ds)
        trainer.train()
        trainer.save_model()            # out/adapter_config.json + adapter_model.safetensors
        AdapterWrapper.from_pretrained(base, "out")       # or peft.PeftModel.from_pretrained

    Every checkpoint (``out/checkpoint-N``) holds the adapter files next to Trainer's own
    optimizer, scheduler, RNG and state files; ``train(resume_from_checkpoint=True)`` and
    ``load_best_model_at_end=True`` work. Arguments are ``Trainer``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wrapper = self._adapter_wrapper(kwargs.get("model", args[0] if args else None))
        # transformers refuses to train a quantized model (QLoRA) unless it carries
        # adapters that transformers knows of: a flag that its own adapter loading sets
        # on the model (transformers' attribute, not tinytune's). A wrapper with trainable
        # adapters is that case; the flag stands on the wrapper only while ``Trainer``
        # checks it.
        flag = (
            wrapper is not None
            and _HF_ADAPTERS_LOADED not in vars(wrapper)
            and bool(getattr(wrapper, "is_quantized", False))
            and any(p.requires_grad for p in wrapper.adapter_parameters())
        )
        if flag:
            setattr(wrapper, _HF_ADAPTERS_LOADED, True)
        try:
            super().__init__(*args, **kwargs)
        finally:
            if flag:
                delattr(wrapper, _HF_ADAPTERS_LOADED)
        wrapper = self._adapter_wrapper(self.model)
        if wrapper is not None and self.args.label_names is None:
            base = type(wrapper.registry.model())
            self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    @staticmethod
    def _adapter_wrapper(model: nn.Module | None) -> AdapterWrapper | None:
        # torch.compile'd wrappers are OptimizedModules around the wrapper.
        model = getattr(model, "_orig_mod", model)
        return model if isinstance(model, AdapterWrapper) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapper = self._adapter_wrapper(self.model)
        if wrapper is None:
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        dtensor = dtensor_type()
        sharded = dtensor is not None and any(isinstance(p, dtensor) for p in wrapper.adapter_parameters())
        if sharded:
            # Gathering shards is a collective: every rank takes part, the main one writes.
            for name, adapter in wrapper.adapters.items():
                if len(adapter):
                    where = adapter_dir(output_dir, name)
                    save_adapter_distributed(wrapper, where, name, rank=0 if self.args.should_save else 1)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not sharded:
            save_all_adapters(wrapper, output_dir)
        # ``processing_class`` since transformers 4.46, ``tokenizer`` before.
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        wrapper = self._adapter_wrapper(model if model is not None else self.model)
        if wrapper is None or _full_model_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_all_adapters(wrapper, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        wrapper = self._adapter_wrapper(self.model)
        best = self.state.best_model_checkpoint
        if wrapper is None or best is None or _full_model_checkpoint(best):
            super()._load_best_model()
            return
        load_all_adapters(wrapper, best)


def _full_model_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds a whole model's weights (written by a plain ``Trainer``)
    and no adapter files: ``Trainer`` loads those itself. Any other directory is an
    adapter checkpoint, even one whose adapter files are missing, which
    ``load_all_adapters`` then reports by name instead of resuming from the current
    weights."""
    if saved_adapter_dirs(directory):
        return False
    names = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
    return any(os.path.isfile(os.path.join(directory, name)) for name in names)
