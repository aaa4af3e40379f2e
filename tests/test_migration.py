"""Migrating from LLaMA-Factory and PAI Model Gallery: key aliases, `apply_chat_template: false`
(raw text), LLaMA-Factory template names, `dataset_dir` defaulting to ./data, did-you-mean."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from jaxlora.config import config_from_dict
from jaxlora.data.encode import answer_spans, encode_conversations
from jaxlora.data.formats import Conversation
from jaxlora.data.loading import resolve_datasets
from jaxlora.data.templates import render, resolve_template
from jaxlora.errors import UserError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def test_pai_aliases():
    cfg = config_from_dict(
        {"lora_dim": 16, "load_in_4bit": True, "dpo_beta": 0.25, "seq_length": 256}
        | {"system_prompt": "Be brief.", "load_in_8bit": False, "apply_chat_template": True}
    )
    assert cfg.finetune.lora_rank == 16 and cfg.model.quantization_bit == 4
    assert cfg.finetune.pref_beta == 0.25 and cfg.data.cutoff_len == 256
    assert cfg.data.system == "Be brief." and cfg.model.template is None
    assert "lora_dim" in cfg.ignored  # shown to the user as "read as `lora_rank`"
    assert config_from_dict({"load_in_8bit": "true"}).model.quantization_bit == 8
    assert config_from_dict({"load_in_4bit": False}).model.quantization_bit is None
    assert config_from_dict({"apply_chat_template": False}).model.template == "raw"
    with pytest.raises(UserError, match="`load_in_8bit` and `load_in_4bit` both set"):
        config_from_dict({"load_in_4bit": True, "load_in_8bit": True})
    with pytest.raises(UserError, match="`lora_dim` and `lora_rank` are both set"):
        config_from_dict({"lora_dim": 8, "lora_rank": 16})
    with pytest.raises(UserError, match="`apply_chat_template` and `template` are both set"):
        config_from_dict({"apply_chat_template": False, "template": "chatml"})


def test_raw_text_keeps_data_tokens_and_trains_on_answers(chatml_tokenizer):
    """`apply_chat_template: false`: text = contents concatenated, nothing added; the special
    tokens written in the data are single tokens; the loss covers the assistant contents."""
    tok = chatml_tokenizer
    tmpl = resolve_template(tok, "raw", system="SYS ")
    msgs = [
        {"role": "user", "content": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
        {"role": "assistant", "content": "Hello there<|im_end|>"},
    ]
    conv = Conversation(msgs, where="row 1")
    text, spans = answer_spans(conv, tok, tmpl)
    assert text == "SYS " + msgs[0]["content"] + msgs[1]["content"]
    assert [text[a:b] for a, b in spans] == ["Hello there<|im_end|>"]
    (ex,), _ = encode_conversations([conv], tok, tmpl, cutoff_len=None)
    assert ex.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (ex.input_ids == im_end).sum() == 2  # one in the prompt, one in the answer
    targets = ex.input_ids[ex.loss_mask > 0]
    assert tok.decode(targets) == "Hello there<|im_end|>"
    assert targets[-1] == im_end
    train_all, _ = encode_conversations([conv], tok, tmpl, cutoff_len=None, train_on_prompt=True)
    assert train_all[0].loss_mask[1:].all()


# LLaMA-Factory's rendering of CONV, written out from its register_template slots
# (bos <|begin_of_text|>, eos <|eot_id|> of the tiny llama3 tokenizer).
B, E = "<|begin_of_text|>", "<|eot_id|>"
EXPECTED = {
    "default": f"System: Be brief.{E}\nHuman: Hi{E}\nAssistant:Hello{E}\nHuman: Bye{E}\n"
    f"Assistant:Ciao{E}\n",
    "empty": "HiHelloByeCiao",
    "vicuna": "Be brief.USER: Hi ASSISTANT:Hello" + E + "USER: Bye ASSISTANT:Ciao" + E,
    "alpaca": "Be brief.### Instruction:\nHi\n\n### Response:\nHello"
    + E
    + "\n\n### Instruction:\nBye\n\n### Response:\nCiao"
    + E
    + "\n\n",
    "llama2": f"{B}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello{E}{B}[INST] Bye "
    f"[/INST]Ciao{E}",
    "mistral": f"{B}[INST] Be brief.\n\nHi[/INST] Hello{E}[INST] Bye[/INST] Ciao{E}",
    "gemma": f"{B}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    "Hello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    "Ciao<end_of_turn>\n",
    "qwen3_nothink": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\nCiao<|im_end|>\n",
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n<|im_start|>user\nBye"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nCiao<|im_end|>\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_llamafactory_templates_render_as_llamafactory(llama3_tokenizer, name):
    tok = llama3_tokenizer
    tmpl = resolve_template(tok, name)
    assert tmpl.name == name
    msgs = CONV if name != "empty" else CONV[1:]
    assert render(tok, tmpl, msgs) == EXPECTED[name]
    # The answer spans are found by prefix rendering (no fallback): exactly the assistant slots.
    text, spans = answer_spans(Conversation(msgs, where="row 1"), tok, tmpl)
    answers = [text[a:b] for a, b in spans]
    assert answers[1].rstrip().startswith(("Ciao", " Ciao", "<think>")), answers
    assert answers[0].count("Hello") == 1 and "Bye" not in answers[0]


def test_llamafactory_default_system_and_unknown_names(llama3_tokenizer, caplog):
    tok = llama3_tokenizer
    vicuna = render(tok, resolve_template(tok, "vicuna"), CONV[1:3])
    assert vicuna.startswith("A chat between a curious user and an artificial intelligence")
    with caplog.at_level(logging.WARNING, logger="jaxlora.data.templates"):
        tmpl = resolve_template(tok, "yi")  # LLaMA-Factory name jaxlora does not ship
    assert tmpl.name == "tokenizer" and tmpl.source == tok.chat_template
    assert "'yi' (LLaMA-Factory) is not built into jaxlora" in caplog.text
    with pytest.raises(UserError, match="did you mean `qwen3_nothink`"):
        resolve_template(tok, "qwen3_nothnk")
    with pytest.raises(UserError, match="did you mean `chatml`"):
        resolve_template(tok, "chatm")


def test_dataset_dir_defaults_to_data_and_registry_names_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_from_dict({}).data.dataset_dir is None  # no ./data here
    (tmp_path / "data").mkdir()
    rows = [{"instruction": "Who are you?", "output": "A test."}]
    (tmp_path / "data" / "me.json").write_text(json.dumps(rows))
    reg = {"identity": {"file_name": "me.json"}}
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(reg))
    cfg = config_from_dict({"dataset": "identity"})
    assert cfg.data.dataset_dir == "data"
    (spec,) = resolve_datasets(cfg.data.dataset, cfg.data.dataset_dir)
    assert spec.label == "identity" and spec.path.endswith("me.json")
    assert config_from_dict({"dataset_dir": "elsewhere"}).data.dataset_dir == "elsewhere"
    # `identty`: the registry's `identity`, not the bundled demo `identity_sft`.
    with pytest.raises(UserError, match="did you mean `identity`"):
        resolve_datasets("identty", "data")


# The shared LLaMA-Factory demo data beside the checkout (or beside a worktree's parent).
_REPO = Path(__file__).resolve().parents[1]
LF_DATA = next(
    (
        p / "shared" / "data" / "llamafactory"
        for p in (_REPO.parent, _REPO.parent.parent)
        if (p / "shared" / "data" / "llamafactory").is_dir()
    ),
    _REPO.parent / "shared" / "data" / "llamafactory",
)
# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, model and output changed only.
LF_LLAMA3_SFT = """\
### model
model_name_or_path: tiny
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
output_dir: saves/tiny/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
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
"""


def test_llamafactory_example_config_beside_data_dir(tmp_path, monkeypatch, llama3_tokenizer):
    if not (LF_DATA / "dataset_info.json").is_file():
        pytest.skip(f"{LF_DATA} not present")
    from jaxlora.config import load_config
    from jaxlora.data import load_sft_dataset

    (tmp_path / "data").symlink_to(LF_DATA, target_is_directory=True)
    (tmp_path / "llama3_lora_sft.yaml").write_text(LF_LLAMA3_SFT)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("llama3_lora_sft.yaml")
    assert cfg.data.dataset_dir == "data" and cfg.model.template == "llama3"
    d = cfg.data
    train, _, report = load_sft_dataset(
        llama3_tokenizer,
        dataset=d.dataset,
        dataset_dir=d.dataset_dir,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        template=cfg.model.template,
    )
    assert report.template_name == "llama3" and len(train) > 1000  # identity + alpaca rows
