"""tinytune as a drop-in for PEFT: a PEFT user's script, run once with ``peft`` and once
with ``tinytune`` (only the imports differ), gives the same numbers on the same weights.

Then one test per item of the drop-in contract (issue 14): ``get_peft_model``,
``task_type``/``inference_mode``, ``get_base_model``/``base_model``/``peft_config``,
``init_lora_weights``, task heads, ``save_pretrained(selected_adapters=...)`` and its
keywords, ``add_weighted_adapter`` against PEFT, ``layers_to_transform``/
``layers_pattern``/``exclude_modules``, the regex hint, tied weights, dotted names.
A tiny Llama is built from a config: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import types
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import tinytune  # noqa: E402
from tinytune import (  # noqa: E402
    AdapterNotFoundError,
    AdapterWrapper,
    IA3Config,
    InvalidConfigError,
    LoraConfig,
    MergeNotSupportedError,
    NoMatchingModulesError,
    TaskType,
    UnsupportedArgumentError,
    get_peft_model,
)

from conftest import Tower, tiny_gpt2, tiny_llama  # noqa: E402

IDS = torch.tensor([[3, 17, 99, 4, 60, 5, 127], [8, 1, 42, 42, 7, 0, 77]])
ATOL = 1e-5


# The two libraries, as a user's import line would bring them in.
PEFT = types.SimpleNamespace(
    LoraConfig=peft.LoraConfig, get_peft_model=peft.get_peft_model, PeftModel=peft.PeftModel
)
TINYTUNE = types.SimpleNamespace(
    LoraConfig=tinytune.LoraConfig, get_peft_model=tinytune.get_peft_model,
    PeftModel=tinytune.AdapterWrapper,
)


def canonical(name: str) -> tuple[str, str, str] | None:
    """``(adapter, module path, "A"|"B")`` of a LoRA parameter, from either library's name:
    PEFT's ``base_model.model.<path>.lora_A.<adapter>.weight``, tinytune's
    ``adapters.<adapter>.layers.<path>.lora_A.weight`` (dotted, since issue 14)."""
    m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.([^.]+)\.weight", name)
    if m:
        return m.group(3), m.group(1), m.group(2)
    m = re.fullmatch(r"adapters\.([^.]+)\.layers\.(.+)\.lora_([AB])\.weight", name)
    if m:
        return m.group(1), m.group(2), m.group(3)
    return None


def same_weights(model: nn.Module, adapter: str) -> None:
    """Give ``adapter``'s LoRA factors values that depend only on (adapter, path, A/B),
    so both libraries hold the same weights."""
    seen = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = canonical(name)
            if key is None or key[0] != adapter:
                continue
            g = torch.Generator().manual_seed(sum(map(ord, "/".join(key))))
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            seen += 1
    assert seen, f"no LoRA parameter of {adapter!r} found"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def user_script(lib: types.SimpleNamespace, base: nn.Module, out: str) -> dict:
    """A PEFT user's fine-tuning script; ``lib`` only swaps the imports."""
    LoraConfig, get_peft_model, PeftModel = lib.LoraConfig, lib.get_peft_model, lib.PeftModel
    r: dict = {}
    # PEFT's quick tour: no target_modules, the architecture's defaults (q_proj, v_proj).
    config = LoraConfig(task_type="CAUSAL_LM", inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(copy.deepcopy(base), config)
    same_weights(model, "default")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    r["printed"] = buf.getvalue()
    r["r"] = model.peft_config["default"].r
    assert model.get_base_model() is model.base_model.model

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        torch.manual_seed(step)  # the same dropout masks in both runs
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    r["loss"] = loss.detach()
    r["trained"] = logits(model)

    # A second adapter, trained elsewhere and shipped as files.
    other = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))
    same_weights(other, "default")
    other.save_pretrained(os.path.join(out, "other_src"))
    model.load_adapter(os.path.join(out, "other_src"), adapter_name="other")
    model.set_adapter("other")
    r["other"] = logits(model)

    model.save_pretrained(os.path.join(out, "saved"), selected_adapters=["default", "other"])
    for ct in ("linear", "cat", "svd"):
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], f"w_{ct}", combination_type=ct)
        model.set_adapter(f"w_{ct}")
        model.eval()  # PEFT creates the new adapter's dropout modules in training mode
        r[f"weighted_{ct}"] = logits(model)

    model.set_adapter("default")
    r["generated"] = model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    merged = model.merge_and_unload()
    r["merged"] = logits(merged)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(out, "saved"))
    r["reloaded"] = logits(loaded)
    loaded.load_adapter(os.path.join(out, "saved", "other"), adapter_name="other")
    loaded.set_adapter("other")
    r["reloaded_other"] = logits(loaded)
    return r


def test_peft_users_script_runs_unchanged_and_agrees_with_peft(llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = user_script(PEFT, llama, str(tmp_path / "peft"))
    ours = user_script(TINYTUNE, llama, str(tmp_path / "tinytune"))
    assert ours["printed"] == theirs["printed"]
    assert ours["r"] == theirs["r"] == 8
    torch.testing.assert_close(ours["loss"], theirs["loss"], atol=1e-5, rtol=1e-5)
    for key in ("trained", "other", "weighted_linear", "weighted_cat", "weighted_svd", "merged",
                "reloaded", "reloaded_other"):
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-4, msg=key)
    assert torch.equal(ours["generated"], theirs["generated"])
    # The adapters moved: the trained one changes the model, the combinations differ.
    assert not torch.allclose(ours["trained"], logits(llama), atol=1e-3)
    assert not torch.allclose(ours["weighted_cat"], ours["weighted_linear"], atol=1e-4)
    # The two libraries read each other's directories, the subfolder layout included.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "tinytune" / "saved"))
        pm.load_adapter(str(tmp_path / "tinytune" / "saved" / "other"), adapter_name="other")
    torch.testing.assert_close(logits(pm.eval()), theirs["reloaded"], atol=1e-4, rtol=1e-4)
    w = AdapterWrapper.from_pretrained(copy.deepcopy(llama), str(tmp_path / "peft" / "saved" / "other"))
    torch.testing.assert_close(logits(w), theirs["other"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# get_peft_model, task_type, inference_mode, the wrapper's PEFT attributes
# ------------------------------------------------------------------------------------------
def test_get_peft_model_returns_the_wrapper_and_inference_mode_freezes(llama):
    base = copy.deepcopy(llama)
    w = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"]), adapter_name="a")
    assert isinstance(w, AdapterWrapper) and w.active_adapters == ["a"]
    assert w.peft_config["a"].task_type == "CAUSAL_LM"
    assert all(p.requires_grad for p in w.adapters["a"].adapter_parameters())
    frozen = LoraConfig(task_type="CAUSAL_LM", inference_mode=True, r=4, target_modules=["v_proj"])
    w.add_adapter_from_config(frozen, "frozen")
    assert not any(p.requires_grad for p in w.adapters["frozen"].adapter_parameters())
    theirs = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(inference_mode=True, r=4, target_modules=["v_proj"]))
    assert not any(p.requires_grad for p in theirs.parameters())


def test_default_target_tables_equal_peft_key_by_key():
    # tinytune keeps copies (peft is optional); a PEFT release that adds or changes an
    # architecture fails here. gpt_neo, gptj, llama4, ... once had LoRA defaults but no IA3.
    from peft.utils import constants

    from tinytune import config as ours

    pairs = [
        (ours.LORA_DEFAULT_TARGETS, constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
        (ours.IA3_DEFAULT_TARGETS, constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
        (ours.IA3_DEFAULT_FEEDFORWARD, constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING),
    ]
    for table, theirs in pairs:
        assert sorted(table) == sorted(theirs)
        for model_type, targets in theirs.items():
            assert table[model_type] == targets, model_type


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo"])
def test_default_targets_per_architecture_as_peft(llama, kind, arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        base = tiny_gpt2(None, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    elif arch == "gpt_neo":  # had LoRA defaults but no IA3 ones
        cfg = transformers.GPTNeoConfig(
            vocab_size=50, hidden_size=32, num_layers=2, num_heads=2,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=16,
        )
        base = transformers.GPTNeoForCausalLM(cfg).eval()
    else:
        base = llama
    ours_cfg = LoraConfig(r=2) if kind == "lora" else IA3Config()
    theirs_cfg = peft.LoraConfig(r=2) if kind == "lora" else peft.IA3Config()
    ours = get_peft_model(copy.deepcopy(base), ours_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg)
    key = ".lora_A." if kind == "lora" else ".ia3_l."
    peft_shapes = {n[len("base_model.model."):].split(key)[0]: tuple(p.shape)
                   for n, p in theirs.named_parameters() if key in n}
    ours_shapes = {path: tuple((l.lora_A.weight if kind == "lora" else l.ia3_l).shape)
                   for path, l in ours.adapters["default"].items()}
    assert ours_shapes == peft_shapes and peft_shapes
    assert ours_cfg.target_modules is None  # the user's config is left as it was
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    with pytest.raises(InvalidConfigError, match="no default targets"):
        AdapterWrapper.from_config(Tower(), LoraConfig())


def test_get_peft_model_upcasts_half_precision_adapters_as_peft(tower):
    base = Tower().to(torch.bfloat16)
    w = get_peft_model(base, LoraConfig(target_modules=["q_proj"], modules_to_save=["head"], init_lora_weights=False))
    assert {p.dtype for p in w.adapters["default"]["layers.0.q_proj"].parameters()} == {torch.float32}
    assert w.adapters["default"]["head"].mimic.weight.dtype == torch.bfloat16  # copies keep theirs
    assert w(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    kept = get_peft_model(Tower().to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert kept.adapters["default"]["layers.0.q_proj"].lora_A.weight.dtype == torch.bfloat16


def test_task_type_is_checked():
    with pytest.raises(InvalidConfigError, match="task types"):
        LoraConfig(task_type="CAUSAL", target_modules=["q"])


def test_base_model_get_base_model_peft_config_and_unknown_attributes(llama):
    base = copy.deepcopy(llama)
    w = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert w.get_base_model() is base
    # As in PEFT, base_model is the layer around the user's model, not a submodule of it.
    assert w.base_model.model is base
    assert w.base_model is not base.model
    assert isinstance(w.peft_config["default"], LoraConfig) and list(w.peft_config) == ["default"]
    assert w.config is base.config  # lookups fall through to the model
    with pytest.raises(AttributeError, match="'AdapterWrapper' object has no attribute 'no_such_thing'") as e:
        w.no_such_thing
    assert "LlamaForCausalLM" in str(e.value)


# ------------------------------------------------------------------------------------------
# errors the prototype's and PEFT's users catch
# ------------------------------------------------------------------------------------------
def test_adapter_not_found_is_keyerror_and_valueerror_without_quotes(tower):
    w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj"]))
    for call in (lambda: w.delete_adapter("nope"), lambda: w.set_adapter("nope")):
        with pytest.raises(KeyError) as e:
            call()
        assert isinstance(e.value, ValueError) and isinstance(e.value, AdapterNotFoundError)
        assert str(e.value).startswith("No adapter named 'nope'")  # not wrapped in quotes
    with pytest.raises(AttributeError):
        w.add_adapter_layer("default", "layers.0.no_proj", tinytune.LinearLoraLayer)
    with pytest.raises(tinytune.LayerNotFoundError):
        w.add_adapter_layer("default", "layers.0.no_proj", tinytune.LinearLoraLayer)


# ------------------------------------------------------------------------------------------
# init_lora_weights
# ------------------------------------------------------------------------------------------
def test_gaussian_init_as_in_peft(llama):
    torch.manual_seed(0)
    w = get_peft_model(copy.deepcopy(llama), LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"))
    a = torch.cat([l.lora_A.weight.flatten() for _, l in w.adapters["default"].items()])
    torch.testing.assert_close(a.std(), torch.tensor(1 / 8), atol=0.01, rtol=0)  # N(0, 1/r²)
    assert all(l.lora_B.weight.abs().sum() == 0 for _, l in w.adapters["default"].items())
    torch.testing.assert_close(logits(w), logits(llama))  # a no-op at the start
    emb = AdapterWrapper.from_config(Tower(), LoraConfig(target_modules=["embed"], init_lora_weights="gaussian"))
    assert emb.adapters["default"]["embed"].lora_A.weight.abs().sum() == 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "eva", "orthogonal"])
def test_inits_tinytune_cannot_run_are_refused_at_config_creation(init):
    with pytest.raises(InvalidConfigError, match="not supported"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
    with pytest.raises(InvalidConfigError, match="True, False or 'gaussian'"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="kaiming")


# ------------------------------------------------------------------------------------------
# task_type heads
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, head", [("SEQ_CLS", "score"), ("TOKEN_CLS", "score"), ("QUESTION_ANS", "qa_outputs")])
def test_classification_task_types_train_the_head_as_peft(task, head):
    cls = {
        "SEQ_CLS": "LlamaForSequenceClassification",
        "TOKEN_CLS": "LlamaForTokenClassification",
        "QUESTION_ANS": "LlamaForQuestionAnswering",
    }[task]
    base = tiny_llama(cls=cls, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                      num_labels=3, pad_token_id=0)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=task, r=4, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task, r=4, target_modules=["q_proj"]))
    assert sorted(ours.peft_config["default"].modules_to_save) == sorted(theirs.peft_config["default"].modules_to_save)
    assert isinstance(ours.adapters["default"][head], tinytune.ModulesToSaveLayer)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any(f".{head}.mimic." in n for n in trained)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ------------------------------------------------------------------------------------------
# save_pretrained: PEFT's layout and keywords
# ------------------------------------------------------------------------------------------
def test_save_pretrained_layout_and_keywords(tmp_path):
    torch.manual_seed(0)
    w = AdapterWrapper.from_config(Tower(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    w.add_adapter_from_config(LoraConfig(target_modules=["v_proj"], init_lora_weights=False), "b")
    w.add_adapter_from_config(IA3Config(target_modules=["up_proj"], init_ia3_weights=False), "c")
    ids = torch.tensor([[1, 2, 3]])
    w.save_pretrained(tmp_path / "all")  # PEFT's default: every adapter
    assert (tmp_path / "all" / "adapter_config.json").is_file()
    assert {p.name for p in (tmp_path / "all").iterdir() if p.is_dir()} == {"b", "c"}
    w.save_pretrained(tmp_path / "some", selected_adapters=["b"])
    assert not (tmp_path / "some" / "adapter_config.json").exists()
    assert (tmp_path / "some" / "b" / "adapter_model.safetensors").is_file()
    fresh = AdapterWrapper(w.unload())
    fresh.load_adapter(tmp_path / "all")
    fresh.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    fresh.load_adapter(tmp_path / "all", adapter_name="c", subfolder="c")  # PEFT's keyword
    w.swap_base_model(Tower())  # put the originals on a copy to compare
    w.model.load_state_dict(fresh.model.state_dict())
    for name in ("default", "b", "c"):
        w.set_adapter(name)
        fresh.set_adapter(name)
        torch.testing.assert_close(fresh(ids), w(ids))
    # PEFT keywords that mean something here are accepted, the others refused by name.
    w.save_pretrained(tmp_path / "kw", safe_serialization=True, save_embedding_layers="auto",
                      is_main_process=True, selected_adapters=["default"])
    assert (tmp_path / "kw" / "adapter_config.json").is_file()
    w.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    for kwargs, word in [
        ({"safe_serialization": False}, "safe_serialization"),
        ({"save_embedding_layers": True}, "save_embedding_layers"),
        ({"path_initial_model_for_weight_conversion": "x"}, "path_initial_model_for_weight_conversion"),
        ({"push_to_hub": True}, "push_to_hub"),
    ]:
        with pytest.raises(UnsupportedArgumentError, match=word):
            w.save_pretrained(tmp_path / "refused", **kwargs)
        assert isinstance(UnsupportedArgumentError("x"), TypeError)
    with pytest.raises(AdapterNotFoundError):
        w.save_pretrained(tmp_path / "refused", selected_adapters=["default", "zzz"])
    assert not (tmp_path / "refused").exists()


# ------------------------------------------------------------------------------------------
# add_weighted_adapter against PEFT, on Linear, Embedding and Conv2d
# ------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lin = nn.Linear(8, 6)

    def forward(self, ids, img):
        return self.lin(self.emb(ids)).sum(1), self.conv(img)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
@pytest.mark.parametrize("weights", [[1.0, 0.5], [0.6, -1.3]])
def test_add_weighted_adapter_matches_peft(combination_type, weights):
    torch.manual_seed(0)
    base = Net().eval()
    ids, img = torch.tensor([[1, 4, 19], [0, 2, 2]]), torch.randn(2, 2, 5, 5)
    r2 = 3 if combination_type == "linear" else 2
    cfgs = [dict(r=3, lora_alpha=6, target_modules=["emb", "conv", "lin"]),
            dict(r=r2, lora_alpha=5, target_modules=["emb", "lin"], use_rslora=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfgs[0]), adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(**cfgs[1]))
    w = AdapterWrapper.from_config(copy.deepcopy(base), LoraConfig(**cfgs[0]), "a")
    w.add_adapter_from_config(LoraConfig(**cfgs[1]), "b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same random factors in both, in PEFT's layout
        for name, adapter in (("a", w.adapters["a"]), ("b", w.adapters["b"])):
            for path, layer in adapter.items():
                peft_layer = pm.base_model.model.get_submodule(path)
                if path == "emb":
                    a = torch.randn(layer.r, 20, generator=g)
                    b = torch.randn(8, layer.r, generator=g)
                    peft_layer.lora_embedding_A[name].copy_(a)
                    peft_layer.lora_embedding_B[name].copy_(b)
                    layer.lora_A.weight.copy_(a.t())
                    layer.lora_B.weight.copy_(b)
                else:
                    a = torch.randn(layer.lora_A.weight.shape, generator=g)
                    b = torch.randn(layer.lora_B.weight.shape, generator=g)
                    peft_layer.lora_A[name].weight.copy_(a)
                    peft_layer.lora_B[name].weight.copy_(b)
                    layer.lora_A.weight.copy_(a)
                    layer.lora_B.weight.copy_(b)
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type)
    w.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type)
    assert w.active_adapters == ["a", "b"]  # not activated, as in PEFT
    pm.set_adapter("mix")
    w.set_adapter("mix")
    new_r = {"linear": 3, "cat": 3 + r2, "svd": 3}[combination_type]
    assert w.adapters["mix"]["lin"].r == new_r == pm.peft_config["mix"].r
    with torch.no_grad():
        for ours, theirs in zip(w(ids, img), pm(ids, img)):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if combination_type == "cat":  # exact: the weighted sum of the updates of each layer
        mix = w.adapters["mix"]["lin"].delta_weight()
        want = sum(wt * w.adapters[n]["lin"].delta_weight() for n, wt in zip("ab", weights))
        torch.testing.assert_close(mix, want, atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_refusals(tower):
    w = AdapterWrapper.from_config(tower, LoraConfig(r=4, target_modules=["q_proj"]), "a")
    w.add_adapter_from_config(LoraConfig(r=2, target_modules=["q_proj"]), "b")
    w.add_adapter_from_config(IA3Config(target_modules=["q_proj"]), "ia3")
    with pytest.raises(InvalidConfigError, match="'cat' or 'svd'"):
        w.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="linear")
    with pytest.raises(InvalidConfigError, match="not implemented"):
        w.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(InvalidConfigError, match="one per adapter"):
        w.add_weighted_adapter(["a", "b"], [1], "m", combination_type="cat")
    with pytest.raises(tinytune.UnsupportedModuleError, match="LoRA adapters only"):
        w.add_weighted_adapter(["a", "ia3"], [1, 1], "m", combination_type="cat")
    with pytest.raises(AdapterNotFoundError):
        w.add_weighted_adapter(["a", "zz"], [1, 1], "m", combination_type="cat")
    with pytest.raises(tinytune.AdapterExistsError):
        w.add_weighted_adapter(["a", "b"], [1, 1], "b", combination_type="cat")
    assert list(w.adapters) == ["a", "b", "ia3"]


# ------------------------------------------------------------------------------------------
# which modules a config adapts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
        dict(target_modules="all-linear", exclude_modules=r".*mlp\..*"),
    ],
)
def test_layer_selection_at_creation_matches_peft(llama, kwargs):
    ours = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=2, **kwargs))
    peft_paths = {n[len("base_model.model."):].rsplit(".lora_A", 1)[0]
                  for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert set(ours.adapters["default"].layer_names) == peft_paths
    assert len(peft_paths) < len([m for m in llama.modules() if isinstance(m, nn.Linear)])


def test_layers_to_transform_needs_a_list_target():
    for target in (".*q_proj", "all-linear"):  # PEFT refuses both
        with pytest.raises(InvalidConfigError, match="is a string, a regex or .all-linear."):
            LoraConfig(target_modules=target, layers_to_transform=[0])
        with pytest.raises(ValueError):
            peft.LoraConfig(target_modules=target, layers_to_transform=[0])
    with pytest.raises(InvalidConfigError, match="layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_string_target_matching_nothing_explains_full_match(tower):
    with pytest.raises(NoMatchingModulesError) as e:
        AdapterWrapper.from_config(tower, LoraConfig(target_modules="q_proj"))
    msg = str(e.value)
    assert "regular expression" in msg and "whole dotted module name" in msg
    assert "target_modules=['q_proj']" in msg


# ------------------------------------------------------------------------------------------
# tied weights (GPT-2's lm_head / wte): refused, with the way out that works
# ------------------------------------------------------------------------------------------
def test_merge_into_tied_weights_is_refused_with_the_way_out():
    base = tiny_gpt2(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    ids = torch.tensor([[1, 2, 3, 4]])
    w = AdapterWrapper.from_config(copy.deepcopy(base), LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    before = w(ids).logits
    with pytest.raises(MergeNotSupportedError, match="tied") as e:
        w.merge_adapters()
    assert "nn.Parameter(" in str(e.value) and w.merged_adapters == []
    torch.testing.assert_close(w(ids).logits, before)
    # The way out the message names: untie before wrapping; then merging is exact.
    untied = copy.deepcopy(base)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    w2 = AdapterWrapper.from_config(untied, LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    w2.adapters["default"]["lm_head"].load_state_dict(w.adapters["default"]["lm_head"].state_dict())
    torch.testing.assert_close(w2(ids).logits, before)
    merged = w2.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, before, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# dotted names
# ------------------------------------------------------------------------------------------
def test_nested_parameter_names_are_dotted_everywhere(tower):
    w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    names = [n for n, p in w.named_parameters() if p.requires_grad]
    assert "adapters.default.layers.layers.0.q_proj.lora_A.weight" in names
    assert "adapters.default.layers.head.mimic.weight" in names
    assert not any("/" in n for n in names)
    assert not any("/" in k for k in w.state_dict())
    assert "/" not in repr(w)
    for n in names:  # the names work with the usual lookups
        assert w.get_parameter(n) is dict(w.named_parameters())[n]
    # state_dict round trip with the dotted keys
    torch.manual_seed(1)
    other = AdapterWrapper.from_config(Tower(), LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    missing, unexpected = other.load_state_dict(w.state_dict())
    assert (missing, unexpected) == ([], [])
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(other(ids), w(ids))


class _Thin(nn.Module):
    """Modules narrower than the adapters' rank: 16 -> 3 and 4 -> 16."""

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(16, 3)
        self.up = nn.Linear(3, 16)

    def forward(self, x):
        return self.up(self.down(x))


@pytest.mark.parametrize("svd_rank", [None, 12])
def test_svd_rank_above_a_module_dimension_is_clipped_as_peft(svd_rank, tmp_path):
    torch.manual_seed(0)
    base = _Thin().eval()
    x = torch.randn(2, 16)
    cfg = dict(r=8, lora_alpha=8, target_modules=["down", "up"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(**cfg))
    w = AdapterWrapper.from_config(copy.deepcopy(base), LoraConfig(**cfg), "a")
    w.add_adapter_from_config(LoraConfig(**cfg), "b")
    with torch.no_grad():
        for name in "ab":
            for path, layer in w.adapters[name].items():
                peft_layer = pm.base_model.model.get_submodule(path)
                peft_layer.lora_A[name].weight.copy_(layer.lora_A.weight)
                peft_layer.lora_B[name].weight.copy_(layer.lora_B.weight)
    # PEFT's full_matrices=True fails on such modules; with False it clips the factors.
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="svd",
                            svd_rank=svd_rank, svd_full_matrices=False)
    w.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="svd", svd_rank=svd_rank)
    pm.set_adapter("mix")
    w.set_adapter("mix")
    assert w.adapters["mix"]["down"].r == 3 and w.adapters["mix"]["up"].r == 3
    with torch.no_grad():
        want = pm(x)
        torch.testing.assert_close(w(x), want, atol=1e-5, rtol=1e-5)
    # the clipped ranks are in the config, so the saved file loads back (here and in PEFT)
    w.save_adapter(tmp_path / "mix", "mix")
    w.load_adapter(tmp_path / "mix", "again")
    w.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(w(x), want, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)
