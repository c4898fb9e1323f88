"""Adapter configs: which modules to adapt, and with which layer.

The matching rules follow Hugging Face PEFT, so configs written for PEFT mean the same
thing here:

* ``target_modules`` as a string is a regular expression that must match the whole
  dotted module name (``re.fullmatch``);
* as a list, a name matches when it equals an entry or ends with ``"." + entry``;
* ``"all-linear"`` selects every linear layer except the model's output layer
  (``get_output_embeddings()`` for transformers models, else the last linear layer).

Floor 2: imports ``errors``, ``util`` and ``layers`` (``make_layer`` builds layers).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from .errors import ConfigTypeError, InvalidConfigError, UnsupportedModuleError, check_bool, wrong_type
from .layers import LinearIA3Layer, bypasses_forward, lora_layer_for
from .util import MAX_RANK, check_init_lora_weights  # noqa: F401 - MAX_RANK: public here too
from .util import check_number as _check_number
from .util import check_rank as _check_rank

__all__ = ["AdapterConfig", "LoraConfig", "IA3Config", "TaskType", "name_matches"]


class TaskType(str, enum.Enum):
    """PEFT's task types (``task_type=TaskType.CAUSAL_LM`` or ``"CAUSAL_LM"``).

    Informational, except that the classification tasks train the model's head, as in
    PEFT: ``SEQ_CLS`` and ``TOKEN_CLS`` add ``"classifier"`` and ``"score"`` to
    ``modules_to_save``, ``QUESTION_ANS`` adds ``"qa_outputs"`` (the names present in
    the model are used).
    """

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


#: Heads PEFT trains for each task type (PeftModelForSequenceClassification, ...).
TASK_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def name_matches(name: str, targets: str | list[str] | tuple[str, ...] | None) -> bool:
    """PEFT's rule: a regex fully matching ``name``, or a list of names/suffixes."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The key of ``rank_pattern``/``alpha_pattern`` that applies to ``name``, if any.

    As in PEFT, a key is a regex matched against the end of the dotted name, on a
    component boundary (``"q_proj"`` matches ``"layers.0.self_attn.q_proj"``).
    """
    for key in patterns:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return key
    return None


def _as_target_list(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value, key=str) if isinstance(value, set) else list(value)
    return value


def _check_targets(value: Any, what: str, allow_none: bool = True) -> None:
    """A regex string or a list of name strings; every regex must compile."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        _check_regex(value, what)
        return
    if not isinstance(value, list):
        raise ConfigTypeError(
            f"{what} must be a regex string or a list of module names, got "
            f"{type(value).__name__} ({value!r})."
        )
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ConfigTypeError(
            f"{what} must hold module names as strings, got {bad[0]!r} "
            f"({type(bad[0]).__name__}); e.g. {what}=['q_proj', 'v_proj']."
        )


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidConfigError(
            f"{what}={pattern!r} is not a valid regular expression ({exc}). A string is "
            "matched as a regex against the whole module name; pass a list of names "
            "instead to match names literally."
        ) from None


@dataclass
class AdapterConfig:
    """Base class of adapter configs.

    Args:
        target_modules: Which modules to adapt: a regex matching the whole dotted name,
            a list of names or name suffixes, or ``"all-linear"``.
        modules_to_save: Modules trained as a full copy (a classifier head, say). The
            original module is left untouched until the adapter is merged.
        task_type: A :class:`TaskType` or its name, as in PEFT; kept when saving.
            ``SEQ_CLS``/``TOKEN_CLS``/``QUESTION_ANS`` add the model's classification
            head to ``modules_to_save`` (see :class:`TaskType`).
        exclude_modules: Modules never adapted, even if ``target_modules`` selects them:
            a full-match regex or a list of names/suffixes (PEFT's rule).
        inference_mode: ``True`` creates the adapter frozen (``requires_grad=False``),
            as PEFT does.
        mimic_layers: The prototype's name for ``modules_to_save``; its entries are
            added to ``modules_to_save``.
    """

    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    exclude_modules: str | list[str] | None = None
    inference_mode: bool = False
    mimic_layers: list[str] | None = None

    peft_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.target_modules = _as_target_list(self.target_modules)
        self.modules_to_save = _as_target_list(self.modules_to_save)
        self.exclude_modules = _as_target_list(self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        _check_targets(self.target_modules, "target_modules")
        _check_targets(self.modules_to_save, "modules_to_save")
        mimic = _as_target_list(self.mimic_layers)
        if isinstance(mimic, str):
            mimic = [mimic]
        _check_targets(mimic, "mimic_layers")
        if mimic:
            self.mimic_layers = list(mimic)
            self.modules_to_save = list(self.modules_to_save or []) + [
                m for m in mimic if m not in (self.modules_to_save or [])
            ]
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise wrong_type(
                "task_type", f"a TaskType, one of its names {list(TaskType.__members__)!r}, or None",
                self.task_type,
            )
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise InvalidConfigError(
                f"task_type={self.task_type!r} is not one of PEFT's task types "
                f"{list(TaskType.__members__)!r}; pass one of them or None."
            )
        heads = TASK_HEAD_MODULES.get(self.task_type or "", ())
        if heads:
            # As PeftModelForSequenceClassification does: train the head, whichever of
            # these names the model uses (names the model lacks are skipped).
            self.modules_to_save = list(self.modules_to_save or []) + [
                h for h in heads if h not in (self.modules_to_save or [])
            ]
        if not isinstance(self.inference_mode, bool):
            raise InvalidConfigError(
                f"inference_mode must be True or False, got {self.inference_mode!r}."
            )
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise InvalidConfigError(
                f"target_modules must be a regex string or a list of module names, got "
                f"{type(self.target_modules).__name__}."
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise InvalidConfigError("target_modules is an empty list: name at least one module.")

    def matches(self, name: str, module: nn.Module, model: nn.Module | None = None) -> bool:
        """Whether ``target_modules`` selects the module called ``name`` (after
        ``exclude_modules`` and, for LoRA, ``layers_to_transform``), by PEFT's rules."""
        if self.exclude_modules and name_matches(name, self.exclude_modules):
            return False
        if self.target_modules == "all-linear":
            if not _is_linear(module):
                return False
            out = _output_layer_name(model) if model is not None else None
            return name != out
        if isinstance(self.target_modules, str):
            # PEFT applies layers_to_transform to lists only (a regex says it all).
            return name_matches(name, self.target_modules)
        return name_matches(name, self.target_modules) and self._in_layers(name)

    def _in_layers(self, name: str) -> bool:
        """PEFT's ``layers_to_transform``/``layers_pattern`` filter (LoRA only)."""
        indexes = getattr(self, "layers_to_transform", None)
        if indexes is None or (isinstance(indexes, list) and not indexes):
            return True
        pattern = getattr(self, "layers_pattern", None)
        match = None
        if not pattern:
            # The first numbered component (not a nested one such as an expert index).
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == indexes if isinstance(indexes, int) else index in indexes

    def make_layer(self, name: str, module: nn.Module) -> nn.Module:
        """Build the (not yet attached) adapter layer for the module called ``name``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The config's fields as a JSON-friendly dict (with ``peft_type``)."""
        out = dataclasses.asdict(self)
        # Folded into modules_to_save; PEFT has no such field.
        out.pop("mimic_layers", None)
        out["peft_type"] = self.peft_type
        return out


def _is_linear(module: nn.Module) -> bool:
    # "all-linear" skips nn.MultiheadAttention's out_proj: hooks on it never run.
    if bypasses_forward(module):
        return False
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_layer_name(model: nn.Module) -> str | None:
    """The output layer: ``get_output_embeddings()`` where the model has one (transformers),
    else the last linear layer in module order."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # noqa: BLE001 - any model without a usable output layer
            out = None
        if out is not None:
            for name, mod in model.named_modules():
                if mod is out:
                    return name
    linear = [n for n, m in model.named_modules() if _is_linear(m)]
    return linear[-1] if linear else None


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: ``W x + scaling * B A x``, with A (r x in) and B (out x r), B starting at 0.

    Args:
        r: Rank of the update. Must be positive.
        lora_alpha: Scale numerator: ``scaling = lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout on the LoRA branch's input, in training mode only.
        use_rslora: Rank-stabilised scaling.
        fan_in_fan_out: Whether the target stores its weight as (in, out), as GPT-2's
            ``Conv1D`` does. Detected automatically for ``Conv1D``.
        rank_pattern: Per-module rank overrides, ``{name regex: r}``.
        alpha_pattern: Per-module alpha overrides, ``{name regex: alpha}``.
        init_lora_weights: ``True`` for the paper's init (A Kaiming-uniform, B = 0: the
            adapter starts as a no-op); ``"gaussian"`` for A ~ N(0, 1/r²), B = 0 (PEFT's
            option); ``False`` for a random B (useful in tests). PEFT's data-driven or
            base-rewriting inits (``"pissa"``, ``"olora"``, ``"loftq"``, ``"corda"``,
            ``"eva"``, ...) are refused here, when the config is made.
        bias: Only ``"none"`` is supported.
        layers_to_transform: Only adapt layers with these indexes (an int or a list),
            PEFT's rule: the index is the first number in the dotted name
            (``model.layers.3.self_attn.q_proj`` is layer 3), or the number after
            ``layers_pattern``. Needs a list ``target_modules``.
        layers_pattern: The name before the layer index (``"layers"``, ``"h"``), or a
            list of them; needs ``layers_to_transform``.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's option): each output unit of the
            adapted weight is rescaled by ``m / ‖W + s·B·A‖_row`` with a trained
            magnitude ``m`` (``lora_magnitude_vector``). Supported on ``nn.Linear``,
            transformers' ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d``, as in PEFT
            (see :class:`~tinytune.LinearDoraLayer`).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    bias: str = "none"
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    use_dora: bool = False

    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank(self.r, "r")
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), dict):
                raise InvalidConfigError(
                    f"{what} must be a dict {{module name regex: value}}, got "
                    f"{type(getattr(self, what)).__name__}."
                )
        for what in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, what):
                if not isinstance(key, str):
                    raise ConfigTypeError(
                        f"{what} keys must be module name regexes (strings), got {key!r}."
                    )
                _check_regex(key, f"{what} key")
        for key, r in self.rank_pattern.items():
            _check_rank(r, f"rank_pattern[{key!r}]")
        _check_number(self.lora_alpha, "lora_alpha")
        for key, alpha in self.alpha_pattern.items():
            _check_number(alpha, f"alpha_pattern[{key!r}]")
        _check_number(self.lora_dropout, "lora_dropout")
        for what in ("use_rslora", "fan_in_fan_out", "use_dora"):
            check_bool(getattr(self, what), what)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise InvalidConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.bias != "none":
            raise InvalidConfigError(
                f"bias={self.bias!r} is not supported: tinytune trains no bias; use bias='none' "
                "or put the module in modules_to_save."
            )
        self.init_lora_weights = check_init_lora_weights(self.init_lora_weights)
        self.layers_to_transform = _as_target_list(self.layers_to_transform)
        self.layers_pattern = _as_target_list(self.layers_pattern)
        _check_targets(self.layers_pattern, "layers_pattern")
        layers = self.layers_to_transform
        if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool))
            or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            raise InvalidConfigError(
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}."
            )
        if isinstance(self.target_modules, str):
            for what in ("layers_to_transform", "layers_pattern"):
                if getattr(self, what) is not None:
                    raise InvalidConfigError(
                        f"{what} cannot be used when target_modules is a string, a regex or 'all-linear' (as in "
                        "PEFT): put the layer indexes in the regex, or pass target_modules as "
                        "a list of names."
                    )
        if self.layers_pattern and self.layers_to_transform is None:
            raise InvalidConfigError(
                "layers_pattern needs layers_to_transform (as in PEFT): pass the layer "
                "indexes to adapt, e.g. layers_to_transform=[0, 1]."
            )

    def rank_for(self, name: str) -> int:
        key = pattern_key(self.rank_pattern, name)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, name: str) -> float:
        key = pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def make_layer(self, name: str, module: nn.Module) -> nn.Module:
        cls = lora_layer_for(module, use_dora=self.use_dora)
        if cls is None:
            what = "DoRA (use_dora=True)" if self.use_dora else "LoRA"
            raise UnsupportedModuleError(
                f"{what} cannot adapt module {name!r} of type {type(module).__name__}: supported "
                "types are nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv2d. "
                "Narrow target_modules, or write an AdapterLayer for it."
            )
        return cls(
            r=self.rank_for(name),
            lora_alpha=self.alpha_for(name),
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            init_lora_weights=self.init_lora_weights,
        )


@dataclass
class IA3Config(AdapterConfig):
    """IA³: learned per-feature scales, initialised to 1.

    Modules listed in ``feedforward_modules`` get their *input* scaled (one scale per
    input feature); the other targets get their *output* scaled (one per output
    feature), as in PEFT.

    Args:
        feedforward_modules: Subset of the targets treated as feed-forward layers, with
            the same matching rules as ``target_modules``.
        init_ia3_weights: ``True`` to start at 1 (a no-op); ``False`` for random scales.
    """

    feedforward_modules: str | list[str] | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.feedforward_modules = _as_target_list(self.feedforward_modules)
        _check_targets(self.feedforward_modules, "feedforward_modules")
        for what in ("fan_in_fan_out", "init_ia3_weights"):
            check_bool(getattr(self, what), what)
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise InvalidConfigError(
                f"feedforward_modules {sorted(set(ff) - set(targets))!r} are not in "
                "target_modules; every feed-forward module must also be a target."
            )

    def is_feedforward(self, name: str) -> bool:
        return name_matches(name, self.feedforward_modules)

    def make_layer(self, name: str, module: nn.Module) -> nn.Module:
        # nn.Linear subclasses that hooks cannot reach are refused, with the reason, by
        # LinearIA3Layer.reset_params.
        if not (_is_linear(module) or isinstance(module, nn.Linear)):
            raise UnsupportedModuleError(
                f"IA3 cannot adapt module {name!r} of type {type(module).__name__}: supported "
                "types are nn.Linear and transformers' Conv1D. Narrow target_modules."
            )
        return LinearIA3Layer(
            is_feedforward=self.is_feedforward(name), init_ia3_weights=self.init_ia3_weights
        )


# PEFT's per-architecture defaults for a config without target_modules, keyed by a
# transformers model's ``config.model_type``: copies of peft.utils.constants'
# TRANSFORMERS_MODELS_TO_{LORA_TARGET,IA3_TARGET,IA3_FEEDFORWARD}_MODULES_MAPPING (peft is
# only a test extra, so tinytune keeps its own; tests/test_peft_dropin.py compares them
# key by key with the installed peft). A string is a regex over the whole dotted name.
LORA_DEFAULT_TARGETS: dict[str, str | list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
# PEFT's mt5 entry is empty (wi_1 is a target but not treated as feed-forward): copied
# as it is, since the point of these tables is PEFT's result.
IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


def with_model_defaults(config: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """``config`` with PEFT's per-architecture defaults filled in where it leaves them
    out: ``target_modules`` (and IA³'s ``feedforward_modules``) for a transformers model
    whose ``config.model_type`` PEFT knows (``"llama"``: ``["q_proj", "v_proj"]``, ...).
    Returns ``config`` itself when nothing is filled in, else a filled copy."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return config
    if isinstance(config, IA3Config):
        tables = {"target_modules": IA3_DEFAULT_TARGETS, "feedforward_modules": IA3_DEFAULT_FEEDFORWARD}
    elif isinstance(config, LoraConfig):
        tables = {"target_modules": LORA_DEFAULT_TARGETS}
    else:
        return config
    changes: dict[str, Any] = {}
    for attr, table in tables.items():
        default = table.get(model_type)
        if getattr(config, attr) is None and default is not None:
            # A copy: a user editing the filled config must not edit the table.
            changes[attr] = default if isinstance(default, str) else list(default)
    if not changes:
        return config
    filled = copy.copy(config)
    for key, value in changes.items():
        setattr(filled, key, value)
    return filled


def check_config(config: Any) -> AdapterConfig:
    """``config`` if it is a tinytune :class:`AdapterConfig`, else raise
    :class:`~tinytune.ConfigTypeError` saying what to pass (PEFT's configs and plain
    dicts get a hint)."""
    if isinstance(config, AdapterConfig):
        return config
    cls = type(config)
    hint = ""
    if cls.__module__.split(".")[0] == "peft":
        hint = (
            f" This is PEFT's {cls.__name__}; use tinytune's, which takes the same "
            "fields: from tinytune import LoraConfig, IA3Config."
        )
    elif isinstance(config, dict):
        hint = " To build one from a dict of fields: tinytune.LoraConfig(**fields)."
    raise wrong_type(
        "config",
        "a tinytune AdapterConfig (tinytune.LoraConfig, tinytune.IA3Config, ...)",
        config,
        f" (a {cls.__module__}.{cls.__qualname__}){hint}",
    )


def layer_factory(layer: Any) -> Callable[[], nn.Module]:
    """Normalise what ``add_adapter_layer`` accepts into a zero-argument factory."""
    if isinstance(layer, nn.Module):
        return lambda: layer
    if callable(layer):
        return layer
    raise wrong_type(
        "layer", "an AdapterLayer instance, an AdapterLayer subclass, or a callable returning "
        "one (functools.partial(LinearLoraLayer, r=16))", layer,
    )

