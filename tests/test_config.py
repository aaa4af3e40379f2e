"""Config loading, overrides, LLaMA-Factory compatibility and every validation message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from jaxlora.config import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    lora_target_modules,
)
from jaxlora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))

# Modelled on LLaMA-Factory examples/train_lora/llama3_lora_sft.yaml, with its eval block enabled.
LLAMAFACTORY_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(d: dict, source: str = "my.yaml") -> str:
    with pytest.raises(UserError) as e:
        config_from_dict(d, source)
    return str(e.value)


# --- loading -------------------------------------------------------------------------------------


def test_defaults_and_derived_values() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.model_name_or_path == "tiny"
    assert cfg.finetune.resolved_lora_alpha == 16.0  # 2 x rank, as LLaMA-Factory
    assert cfg.finetune.lora_scale == 2.0
    assert cfg.train.resolved_eval_batch_size == cfg.train.per_device_train_batch_size
    assert cfg.train.resolved_eval_steps == cfg.train.logging_steps
    assert not cfg.has_eval_set and not cfg.eval_enabled
    assert not cfg.packing_enabled
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)
    assert cfg.ignored == {}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_without_warnings(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.ignored == {}
    assert cfg.source == str(path)
    # Training configs hold out an eval set; benchmark configs train on random tokens.
    assert cfg.eval_enabled or path.name.startswith("bench-")


def test_shipped_config_set_is_complete() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "quickstart.yaml",
        "quickstart-tiny.yaml",
        "quickstart-dpo.yaml",
        "qwen2.5-7b-lora-sft.yaml",
        "llama3-8b-lora-sft.yaml",
        "qwen2.5-7b-qlora.yaml",
    } <= names
    quick = load_config(REPO / "configs" / "quickstart.yaml")
    assert quick.data.dataset == "demo:identity"
    assert quick.model.model_name_or_path == "smollm2-135m-instruct"
    assert quick.train.output_dir == "runs/quickstart"
    tiny = load_config(REPO / "configs" / "quickstart-tiny.yaml")
    assert tiny.data.dataset == "demo:identity_sft" and tiny.model.model_name_or_path == "tiny"
    assert tiny.finetune.lora_rank == 8 and tiny.data.cutoff_len == 256
    assert tiny.train.output_dir == "runs/quickstart-tiny"
    dpo = load_config(REPO / "configs" / "quickstart-dpo.yaml")
    assert dpo.finetune.stage == "dpo" and dpo.finetune.use_ref_model
    assert dpo.data.dataset == "demo:dpo_demo" and dpo.finetune.pref_beta == 0.1
    qlora = load_config(REPO / "configs" / "qwen2.5-7b-qlora.yaml")
    assert qlora.model.quantization_bit == 4


def test_llamafactory_yaml_loads_with_only_ignored_key_warnings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, LLAMAFACTORY_SFT))
    assert set(cfg.ignored) == {
        "trust_remote_code",
        "do_train",
        "overwrite_cache",
        "dataloader_num_workers",
        "save_only_model",
        "report_to",
        "ddp_timeout",
    }
    assert cfg.ignored["trust_remote_code"] == "jaxlora never runs remote code"
    assert all(reason for reason in cfg.ignored.values())
    assert cfg.model.template == "llama3"
    assert cfg.data.dataset == "identity,alpaca_en_demo"
    assert cfg.data.preprocessing_num_workers == 16  # tokenising processes (issue 17)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.gradient_accumulation_steps == 8
    assert cfg.finetune.resolved_lora_alpha == 16.0
    assert cfg.train.overwrite_output_dir and cfg.train.plot_loss
    assert cfg.eval_enabled and cfg.train.resolved_eval_steps == 500


def test_overrides_are_yaml_scalars_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "lora_rank: 4\nbf16: true\nmesh: {data: -1, fsdp: 2}\n")
    cfg = load_config(
        path,
        [
            "lora_rank=16",
            "bf16=false",
            "lora_target=q_proj,v_proj",
            "mesh.data=4",
            "learning_rate=1e-4",  # YAML 1.1 reads this as a string
            "eval_strategy=no",  # YAML reads `no` as false
            "system=Answer: briefly",  # not a mapping
            "dataset=demo:identity_sft",
            "max_samples=null",
        ],
    )
    assert cfg.finetune.lora_rank == 16 and cfg.train.bf16 is False
    assert cfg.finetune.lora_target == "q_proj,v_proj"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (4, 2, 1)
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.eval_strategy == "no"
    assert cfg.data.system == "Answer: briefly"
    assert cfg.data.dataset == "demo:identity_sft" and cfg.data.max_samples is None


def test_override_errors_name_the_command_line() -> None:
    with pytest.raises(UserError, match=r"command line: override `lora_rank` must look like"):
        load_config(None, ["lora_rank"])
    with pytest.raises(UserError, match=r"command line: unknown config key `lora_rnak`"):
        load_config(None, ["lora_rnak=16"])


def test_contradiction_across_file_and_override_names_both(tmp_path: Path) -> None:
    path = write(tmp_path, "warmup_ratio: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(path, ["warmup_steps=100"])
    assert str(path) in str(e.value) and "command line" in str(e.value)
    assert "`warmup_ratio` (0.1) and `warmup_steps` (100) are both set" in str(e.value)


def test_round_trip_dict_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "qwen2.5-7b-qlora.yaml",
        ["lora_alpha=24", "use_rslora=true", "packing=true", "mesh.fsdp=2", "mesh.data=1"],
    )
    flat = config_to_dict(cfg)
    mesh = {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}
    assert flat["lora_rank"] == 16 and flat["mesh"] == mesh
    assert not any(isinstance(v, dict) for k, v in flat.items() if k != "mesh")
    assert config_from_dict(flat) == cfg
    out = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert yaml.safe_load(out.read_text())["learning_rate"] == 2e-4
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left


# --- unknown keys, types, enums -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("lora_rnak", "lora_rank"),
        ("learning_rat", "learning_rate"),
        ("lora_targets", "lora_target"),
        ("num_epochs", "num_train_epochs"),
        ("mesh.dta", "mesh.data"),
    ],
)
def test_unknown_key_suggests_the_closest(key: str, suggestion: str) -> None:
    msg = error_of({key: 1})
    assert msg.startswith("my.yaml: unknown config key")
    assert f"(did you mean `{suggestion}`?)" in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "lora_rnak: 8\n")
    with pytest.raises(UserError, match=r"run\.yaml: unknown config key `lora_rnak`"):
        load_config(path)


def test_grouped_yaml_is_refused_with_a_hint() -> None:
    assert "config keys are flat" in error_of({"model": {"model_name_or_path": "x"}})


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"lora_rank": "eight"}, "`lora_rank` expects an integer, got 'eight'"),
        ({"lora_rank": 8.5}, "`lora_rank` expects an integer, got 8.5"),
        ({"lora_rank": True}, "`lora_rank` expects an integer, got True"),
        ({"learning_rate": "fast"}, "`learning_rate` expects a number, got 'fast'"),
        ({"learning_rate": math.inf}, "`learning_rate` expects a number"),
        ({"bf16": "maybe"}, "`bf16` expects true or false, got 'maybe'"),
        ({"model_name_or_path": None}, "`model_name_or_path` must be set (got null)"),
        ({"output_dir": 5}, "`output_dir` expects a string, got 5"),
        ({"resume_from_checkpoint": True}, "a run resumes from the latest checkpoint"),
    ],
)
def test_wrong_types(d: dict, expected: str) -> None:
    assert expected in error_of(d)


def test_lenient_coercions() -> None:
    cfg = config_from_dict(
        {
            "learning_rate": "1e-4",
            "lora_rank": "16",
            "cutoff_len": 512.0,
            "bf16": "no",
            "train_on_prompt": "yes",
            "packing": "auto",
            "lora_target": ["q_proj", "v_proj"],
            "dataset": ["a.json", "b.jsonl"],
            "lr_scheduler_type": "Linear",
            "lora_alpha": 32,
            "resume_from_checkpoint": False,
        }
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.finetune.lora_rank == 16
    assert cfg.data.cutoff_len == 512 and isinstance(cfg.data.cutoff_len, int)
    assert cfg.train.bf16 is False and cfg.data.train_on_prompt is True
    assert cfg.data.packing is None
    assert cfg.finetune.lora_target == "q_proj,v_proj" and cfg.data.dataset == "a.json,b.jsonl"
    assert cfg.train.lr_scheduler_type == "linear"
    assert cfg.finetune.lora_alpha == 32.0
    assert cfg.train.resume_from_checkpoint is None


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        (
            {"lr_scheduler_type": "cosin"},
            "`lr_scheduler_type` must be one of cosine, linear, constant, constant_with_warmup;"
            " got 'cosin' (did you mean `cosine`?)",
        ),
        ({"stage": "ppo"}, "`stage` must be one of sft, dpo, kto, pt; got 'ppo'"),
        ({"finetuning_type": "oft"}, "`finetuning_type` must be one of lora, full, freeze"),
        ({"pref_loss": "kto_pair"}, "`pref_loss` must be one of sigmoid, hinge, ipo, robust"),
        ({"remat": "everything"}, "`remat` must be one of none, full, dots, dots_no_batch"),
        ({"formatting": "chatml"}, "`formatting` must be one of auto, alpaca, sharegpt"),
        ({"eval_strategy": "epoch"}, "`eval_strategy` must be one of steps, no; got 'epoch'"),
        ({"quantization_type": "fp4"}, "`quantization_type` must be one of nf4"),
        ({"attention": "flash"}, "`attention` must be one of auto, xla, cudnn"),
    ],
)
def test_bad_enum_values_list_the_valid_ones(d: dict, expected: str) -> None:
    assert expected in error_of(d)


# --- ranges and contradictions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"lora_rank": 0}, "`lora_rank` must be >= 1; got 0"),
        ({"cutoff_len": 4}, "`cutoff_len` must be >= 8; got 4"),
        ({"val_size": -0.1, "dataset": "d.json"}, "`val_size` must be >= 0 (a fraction"),
        ({"val_size": 10.5, "dataset": "d.json"}, "`val_size` >= 1 counts samples"),
        ({"lora_dropout": 1.0}, "`lora_dropout` must be in [0, 1); got 1.0"),
        ({"lora_alpha": 0}, "`lora_alpha` must be > 0; got 0.0"),
        ({"learning_rate": 0}, "`learning_rate` must be > 0"),
        ({"warmup_ratio": 1.5}, "`warmup_ratio` must be in [0, 1)"),
        ({"max_grad_norm": -1}, "`max_grad_norm` must be >= 0 (0 disables clipping)"),
        ({"adam_beta2": 1.0}, "`adam_beta2` must be in [0, 1)"),
        ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size` must be >= 1"),
        ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps` must be >= 1"),
        ({"eval_steps": 0}, "`eval_steps` must be >= 1 (ratios of total steps"),
        ({"max_steps": 0}, "`max_steps` must be -1 (train num_train_epochs) or >= 1; got 0"),
        ({"num_train_epochs": 0}, "`num_train_epochs` must be > 0"),
        ({"dpo_label_smoothing": 0.5}, "`dpo_label_smoothing` must be in [0, 0.5)"),
        ({"pref_beta": 0}, "`pref_beta` must be > 0"),
        ({"freeze_trainable_layers": 0}, "`freeze_trainable_layers` must be > 0 (last n"),
        ({"mesh": {"fsdp": 0}}, "`mesh.fsdp` must be -1 (all remaining devices) or >= 1"),
        ({"mesh": {"data": -1, "fsdp": -1}}, "at most one `mesh` axis may be -1"),
        ({"mesh": [1, 2]}, "`mesh` expects a mapping"),
    ],
)
def test_out_of_range_values(d: dict, expected: str) -> None:
    assert expected in error_of(d)


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        (
            {"warmup_ratio": 0.1, "warmup_steps": 10},
            "`warmup_ratio` (0.1) and `warmup_steps` (10) are both set; keep one of them",
        ),
        ({"quantization_bit": 3}, "`quantization_bit` must be 4 (NF4) or 8 (int8); got 3"),
        (
            {"quantization_bit": 4, "finetuning_type": "full"},
            "`quantization_bit` quantises the frozen base (QLoRA) and needs a method that keeps "
            "the base frozen (lora, prompt_tuning, prefix_tuning, adapter); got "
            "`finetuning_type: full`",
        ),
        (
            {"use_dora": True, "finetuning_type": "freeze"},
            "`use_dora` is only valid with `finetuning_type: lora`",
        ),
        (
            {"loraplus_lr_ratio": 16, "finetuning_type": "full"},
            "`loraplus_lr_ratio` is only valid with `finetuning_type: lora`",
        ),
        (
            {"adapter_name_or_path": "a", "finetuning_type": "full"},
            "`adapter_name_or_path` is only valid with `finetuning_type: lora`",
        ),
        (
            {"pissa_init": True, "adapter_name_or_path": "a"},
            "`pissa_init` creates a new adapter",
        ),
        (
            {"stage": "dpo", "pref_loss": "ipo", "dpo_label_smoothing": 0.1},
            "`dpo_label_smoothing` applies to `pref_loss: sigmoid` or `robust` only",
        ),
        (
            {"stage": "dpo", "pref_loss": "simpo", "precompute_ref_logps": True},
            "`precompute_ref_logps` needs a reference model",
        ),
        (
            {"precompute_ref_logps": True},
            "`precompute_ref_logps` needs a reference model",
        ),
        ({"formatting": "preference"}, "`formatting: preference` needs `stage: dpo`"),
        ({"formatting": "text"}, "`formatting: text` has no prompt/answer split"),
        ({"stage": "pt", "packing": False}, "`stage: pt` always packs raw text"),
        (
            {"max_prompt_length": 512, "cutoff_len": 512},
            "`max_prompt_length` (512) must be < `cutoff_len` (512)",
        ),
        (
            {"template": "llama3", "chat_template": "{{ x }}"},
            "`template` (a name) and `chat_template` (a Jinja string) are both set",
        ),
        (
            {"dataset": "a.json", "val_size": 0.1, "eval_dataset": "b.json"},
            "`val_size` and `eval_dataset` are both set",
        ),
        ({"val_size": 0.1}, "`val_size` splits `dataset`, which is not set"),
        (
            {"eval_strategy": "steps"},
            "`eval_strategy: steps` needs an evaluation set: set `val_size` (e.g. 0.1) or "
            "`eval_dataset`",
        ),
        (
            {"load_best_model_at_end": True},
            "`load_best_model_at_end` needs an evaluation set: set `val_size`",
        ),
        (
            {"early_stopping_patience": 3},
            "`early_stopping_patience` needs an evaluation set",
        ),
        (
            {"early_stopping_patience": 3, "eval_dataset": "e.json", "eval_strategy": "no"},
            "`early_stopping_patience` needs evaluation; got `eval_strategy: no`",
        ),
        ({"fp16": True}, "`fp16: true` is not supported: use `bf16: true`"),
    ],
)
def test_contradictions(d: dict, expected: str) -> None:
    msg = error_of(d)
    assert msg.startswith("my.yaml: ")
    assert expected in msg


def test_combinations_that_are_allowed() -> None:
    # PEFT allows DoRA + PiSSA and rsLoRA + PiSSA; PiSSA's DPO reference is the initial model.
    cfg = config_from_dict(
        {"use_dora": True, "pissa_init": True, "use_rslora": True, "stage": "dpo"}
    )
    assert cfg.finetune.use_ref_model
    cfg = config_from_dict({"quantization_bit": 8, "use_dora": True, "loraplus_lr_ratio": 16})
    assert cfg.model.quantization_bit == 8
    cfg = config_from_dict(
        {
            "dataset": "a.json",
            "val_size": 0.1,
            "load_best_model_at_end": True,
            "early_stopping_patience": 2,
        }  # fmt: skip
    )
    assert cfg.eval_enabled
    cfg = config_from_dict({"stage": "dpo", "pref_loss": "robust", "dpo_label_smoothing": 0.1})
    assert cfg.finetune.dpo_label_smoothing == 0.1


# --- LLaMA-Factory / HF compatibility keys ------------------------------------------------------


def test_unsupported_features_error_unless_noop() -> None:
    assert "`use_galore: true` is not supported: GaLore" in error_of({"use_galore": True})
    assert "`quantization_method: gptq` is not supported" in error_of(
        {"quantization_method": "gptq"}
    )
    assert "`save_strategy: epoch` is not supported" in error_of({"save_strategy": "epoch"})
    assert "`ref_model: /m` is not supported" in error_of({"ref_model": "/m"})
    cfg = config_from_dict(
        {
            "fp16": False,
            "use_galore": False,
            "quantization_method": "bnb",
            "save_strategy": "steps",
            "optim": "adamw_torch",
            "lr_scheduler_kwargs": {},
            "ref_model": None,
        }
    )
    assert set(cfg.ignored) == {
        "fp16",
        "use_galore",
        "quantization_method",
        "save_strategy",
        "optim",
        "lr_scheduler_kwargs",
        "ref_model",
    }
    assert "is a no-op" in cfg.ignored["fp16"]


def test_aliases() -> None:
    cfg = config_from_dict(
        {"evaluation_strategy": "no", "pure_bf16": True, "finetuning_type": "full"}
    )
    assert cfg.train.eval_strategy == "no"
    assert cfg.finetune.full_precision_master is False
    assert cfg.ignored["pure_bf16"] == "read as `full_precision_master`"
    msg = error_of({"evaluation_strategy": "no", "eval_strategy": "steps"})
    assert "`evaluation_strategy` and `eval_strategy` are both set" in msg


def test_eval_and_packing_resolution() -> None:
    cfg = config_from_dict({"dataset": "a.json", "val_size": 20, "eval_strategy": False})
    assert cfg.has_eval_set and not cfg.eval_enabled  # YAML `no` arrives as False
    cfg = config_from_dict({"eval_dataset": "e.json", "eval_steps": 7, "logging_steps": 3})
    assert cfg.eval_enabled and cfg.train.resolved_eval_steps == 7
    assert config_from_dict({"stage": "pt"}).packing_enabled
    assert config_from_dict({"packing": True}).packing_enabled
    cfg = config_from_dict({"per_device_eval_batch_size": 2})
    assert cfg.train.resolved_eval_batch_size == 2


# --- YAML files ----------------------------------------------------------------------------------


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        load_config(write(tmp_path, "lora_rank: [8\n", "bad.yaml"))
    with pytest.raises(UserError, match=r"list\.yaml: expected a mapping of key: value"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(UserError, match=r"dup\.yaml, line 2: key `lora_rank` appears twice"):
        load_config(write(tmp_path, "lora_rank: 8\nlora_rank: 16\n", "dup.yaml"))
    assert load_config(write(tmp_path, "# nothing\n", "empty.yaml")) == Config()


def test_numbers_without_a_dot_in_yaml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "learning_rate: 2e-5\nadam_epsilon: 1e-8\n"))
    assert cfg.train.learning_rate == 2e-5 and cfg.train.adam_epsilon == 1e-8


# --- derived helpers -----------------------------------------------------------------------------


def test_lora_scale_variants() -> None:
    assert config_from_dict({"lora_rank": 16, "lora_alpha": 16}).finetune.lora_scale == 1.0
    rs = config_from_dict({"lora_rank": 16, "lora_alpha": 16, "use_rslora": True}).finetune
    assert rs.lora_scale == pytest.approx(4.0)  # alpha / sqrt(r)
    assert config_from_dict({"lora_rank": 4}).finetune.lora_scale == 2.0  # alpha = 2r


def test_reference_free_losses() -> None:
    for loss, needs_ref in [("sigmoid", True), ("ipo", True), ("orpo", False), ("simpo", False)]:
        f = config_from_dict({"stage": "dpo", "pref_loss": loss}).finetune
        assert f.use_ref_model is needs_ref and f.reference_free is (not needs_ref)
    assert not config_from_dict({"stage": "sft"}).finetune.use_ref_model


def test_lora_target_modules() -> None:
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_target_modules(config_from_dict({}), list(reversed(llama))) == llama
    assert lora_target_modules(config_from_dict({"lora_target": "ALL"}), ["v_proj", "q_proj"]) == [
        "q_proj",
        "v_proj",
    ]
    cfg = config_from_dict({"lora_target": " v_proj, q_proj ,v_proj"})
    assert lora_target_modules(cfg, llama) == ["v_proj", "q_proj"]
    cfg = config_from_dict({"lora_target": "q_proj,vproj"}, "x.yaml")
    with pytest.raises(UserError) as e:
        lora_target_modules(cfg, llama)
    assert "x.yaml: `lora_target` names `vproj`" in str(e.value)
    assert "(did you mean `v_proj`?)" in str(e.value)
    with pytest.raises(UserError, match="selects no module"):
        lora_target_modules(config_from_dict({"lora_target": " , "}), llama)


@pytest.mark.parametrize(
    ("name", "siblings"),
    [
        ("schema", set()),
        ("parse", {"jaxlora.config.schema", "jaxlora.config.validate"}),
        ("validate", {"jaxlora.config.schema"}),
    ],
)
def test_config_module_imports_no_jax(name: str, siblings: set[str]) -> None:
    # config is plain data: the CLI validates a config before JAX (and its backends) start.
    import ast

    tree = ast.parse((REPO / "jaxlora" / "config" / f"{name}.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in modules if m.split(".")[0] in ("jax", "flax", "optax", "numpy")} == set()
    assert {m for m in modules if m.startswith("jaxlora")} == {"jaxlora.errors", *siblings}
