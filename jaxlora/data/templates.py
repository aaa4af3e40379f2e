"""Chat templates: which one renders the data, and rendering a conversation to text.

The training template must equal the inference template, so jaxlora renders with the
tokenizer's own ``chat_template`` by default and saves whatever it used with the adapter.
When the tokenizer has none (base models), the config names a built-in template
(``chatml``/``qwen``, ``llama3``) or gives a Jinja string (``chat_template``).
Rendering always goes through ``tokenizer.apply_chat_template(..., tokenize=False)`` so the
exact HF Jinja environment (trim_blocks, ``raise_exception``, ``tojson`` ...) is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlora.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You can call these tools:\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You can call these tools:\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n'"
    " + messages[0]['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# `apply_chat_template: false` (PAI Model Gallery): the data already holds every special token,
# so a conversation renders as the plain concatenation of its message contents (system first if
# any, then the turns in order) with nothing added: no role markers, BOS, EOS or separators. The
# loss covers the assistant contents (as with any template), the whole text is tokenised once,
# so special-token strings written in the data become their single token ids.
RAW_TEMPLATE = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"


def _slots(text: str) -> str:
    """A LLaMA-Factory slot string ("Human: {c}<EOS>\nAssistant:") as a Jinja expression;
    {c} is the content, <BOS>/<EOS> the tokenizer's bos/eos token strings."""
    import re

    parts = []
    for piece in re.split(r"(\{c\}|<BOS>|<EOS>)", text):
        if piece == "{c}":
            parts.append("content")
        elif piece in ("<BOS>", "<EOS>"):
            parts.append("(bos_token or '')" if piece == "<BOS>" else "(eos_token or '')")
        elif piece:
            parts.append(json.dumps(piece))
    return " + ".join(parts) or "''"


def _lf_template(
    user: str, assistant: str = "{c}<EOS>", system: str = "{c}", prefix: str = "", fuse=False
) -> str:
    """Jinja equal to a LLaMA-Factory `register_template(...)` text format: `prefix` once, the
    system slot (or, `fuse` = its Llama2Template, the system slot prepended to the first user
    message), user slots (which end with the assistant header, so the generation prompt adds
    nothing) and assistant slots. Roles other than user/assistant are refused by name."""
    sys_expr = _slots(system).replace("content", "system_message")
    user_expr = _slots(user)
    if fuse:
        user_expr = user_expr.replace(
            "content", "((" + sys_expr + ") if loop.first and system_message else '') + content", 1
        )
    return (
        ("{{- " + _slots(prefix) + " }}" if prefix else "")
        + "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
        + ("" if fuse else "{%- if system_message %}{{- " + sys_expr + " }}{%- endif %}")
        + "{%- for message in loop_messages %}{%- set content = message['content'] %}"
        "{%- if message['role'] == 'user' %}{{- " + user_expr + " }}"
        "{%- elif message['role'] == 'assistant' %}{{- " + _slots(assistant) + " }}"
        "{%- else %}{{- raise_exception('this template renders user and assistant messages "
        "only, not ' + message['role']) }}{%- endif %}{%- endfor %}"
    )


_CHATML_USER = "<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{c}<|im_end|>\n"
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# name -> (jinja source, default system prompt or None)
BUILTIN_TEMPLATES: dict[str, tuple[str, str | None]] = {
    "chatml": (CHATML_TEMPLATE, None),
    "qwen": (
        CHATML_TEMPLATE,
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "llama3": (LLAMA3_TEMPLATE, None),
    "raw": (RAW_TEMPLATE, None),
    # LLaMA-Factory's text formats of the same names (src/llamafactory/data/template.py).
    "default": (
        _lf_template("Human: {c}<EOS>\nAssistant:", "{c}<EOS>\n", system="System: {c}<EOS>\n"),
        None,
    ),
    "empty": (_lf_template("{c}", "{c}"), None),
    "alpaca": (
        _lf_template("### Instruction:\n{c}\n\n### Response:\n", "{c}<EOS>\n\n"),
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n",
    ),
    "vicuna": (_lf_template("USER: {c} ASSISTANT:"), _VICUNA_SYSTEM),
    "llama2": (
        _lf_template("<BOS>[INST] {c} [/INST]", system="<<SYS>>\n{c}\n<</SYS>>\n\n", fuse=True),
        None,
    ),
    "mistral": (
        _lf_template("[INST] {c}[/INST]", " {c}<EOS>", system="{c}\n\n", prefix="<BOS>", fuse=True),
        None,
    ),
    "gemma": (
        _lf_template(
            "<start_of_turn>user\n{c}<end_of_turn>\n<start_of_turn>model\n",
            "{c}<end_of_turn>\n",
            system="{c}\n\n",
            prefix="<BOS>",
            fuse=True,
        ),
        None,
    ),
    # qwen3: LLaMA-Factory's ReasoningTemplate with thinking on trains an empty thought block
    # before an answer that has none; here every assistant turn without one gets it.
    "qwen3": (
        _lf_template(_CHATML_USER, "{c}<|im_end|>\n", system=_CHATML_SYSTEM).replace(
            '{{- content + "<|im_end|>\\n" }}',
            "{{- ('' if '<think>' in content else '<think>\\n\\n</think>\\n\\n') + content"
            " + '<|im_end|>\\n' }}",
        ),
        None,
    ),
    "qwen3_nothink": (
        _lf_template(_CHATML_USER, "{c}<|im_end|>\n", system=_CHATML_SYSTEM),
        None,
    ),
}

# LLaMA-Factory's registered template names that jaxlora does not ship: with one of these a
# LLaMA-Factory config runs on the tokenizer's own template, with a warning. Any other unknown
# name is a typo and gets an error with a suggestion instead of a silent fallback.
LLAMAFACTORY_TEMPLATES = frozenset(
    """alpaca aquila atom baichuan baichuan2 bailing belle bluelm breeze chatglm2 chatglm3
    chatml_de codegeex2 codegeex4 cohere cpm cpm3 cpm4 dbrx deepseek deepseek3 deepseekr1
    deepseekcoder default empty exaone falcon falcon_h1 fewshot gemma gemma2 gemma3 gemma3n glm4
    glm4_moe glm4v glmz1 gpt granite3 granite3_vision granite4 hunyuan index intern intern2
    intern_vl intern_s1 kimi_vl llama2 llama2_zh llama4 llava llava_next llava_next_mistral
    llava_next_qwen llava_next_video marco mimo mimo_vl minicpm_v minicpm_o ministral mistral
    mllama moonlight olmo openchat openchat-3.6 opencoder orion paligemma phi phi_small phi4
    phi4_mini pixtral qwen2_audio qwen2_omni qwen2_vl qwen3 qwen3_nothink qwen3_vl sailor seed_oss
    seed_coder skywork skywork_o1 smollm smollm2 solar starchat telechat telechat2 vicuna
    video_llava xuanyuan xverse yayi yi yi_vl yuan zephyr ziya""".split()
)

# Values of `template` that mean "use the tokenizer's own chat template".
_AUTO = (None, "", "auto", "tokenizer")


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: the Jinja source and the system prompt used when a sample has none."""

    source: str
    default_system: str | None = None
    name: str = "tokenizer"

    @property
    def takes_tools(self) -> bool:
        """Whether the template renders ``tools`` (else tools are described in the system text)."""
        return "tools" in self.source


def resolve_template(
    tokenizer: Any,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
) -> ChatTemplate:
    """Pick the template: ``chat_template`` (Jinja text or a .jinja file) > named ``template`` >
    the tokenizer's own.

    A LLaMA-Factory template name jaxlora does not ship (``mistral``, ``gemma`` ...) falls back to
    the tokenizer's own template when it has one (with a log line), so LLaMA-Factory configs run
    unchanged; any other name is an error with a did-you-mean (a typo must not silently train
    on a different template). ``system`` overrides any default system prompt.
    """
    if chat_template and "{" not in chat_template and Path(chat_template).expanduser().is_file():
        chat_template = Path(chat_template).expanduser().read_text(encoding="utf-8")
    if chat_template:
        if "{" not in chat_template:
            raise UserError(
                "config key `chat_template` must be a Jinja template string or a file holding "
                f"one (got {chat_template[:40]!r}); to name a built-in template use `template`"
            )
        return ChatTemplate(chat_template, system, "custom")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers ship several named templates
        own = own.get("default") or next(iter(own.values()), None)
    if template in _AUTO:
        if not own:
            raise UserError(
                "the tokenizer has no chat template; set `template` to one of "
                f"{sorted(BUILTIN_TEMPLATES)} or give a Jinja string as `chat_template`"
            )
        return ChatTemplate(own, system, "tokenizer")
    if template in BUILTIN_TEMPLATES:
        source, default_system = BUILTIN_TEMPLATES[template]
        _check_special_tokens(tokenizer, source, template)
        return ChatTemplate(source, system if system is not None else default_system, template)
    if own and template in LLAMAFACTORY_TEMPLATES:
        log.warning(
            "template %r (LLaMA-Factory) is not built into jaxlora; training with the "
            "tokenizer's own chat template instead (built in: %s)",
            template,
            ", ".join(sorted(BUILTIN_TEMPLATES)),
        )
        return ChatTemplate(own, system, "tokenizer")
    if template in LLAMAFACTORY_TEMPLATES:
        hint = "jaxlora does not ship it and the tokenizer has no chat template of its own"
    else:  # suggest a built-in name first, a LLaMA-Factory one only when none is close
        name = str(template)
        close = did_you_mean(name, BUILTIN_TEMPLATES) or did_you_mean(name, LLAMAFACTORY_TEMPLATES)
        hint = f"unknown template{close}"
    own_hint = "`template: auto` uses the tokenizer's own template; " if own else ""
    raise UserError(
        f"config key `template`: {template!r}: {hint}; {own_hint}built-in templates are "
        f"{sorted(BUILTIN_TEMPLATES)} (or give a Jinja string as `chat_template`)"
    )


def _check_special_tokens(tokenizer: Any, source: str, name: str) -> None:
    """Warn when a built-in template's markers are not single tokens of this tokenizer."""
    known = ("<|im_start|>", "<|im_end|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>")
    markers = [m for m in known if m in source]
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    if missing:
        log.warning(
            "template %r uses %s, which this tokenizer splits into several tokens", name, missing
        )


def render(
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    tools: list[Any] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """Render messages to text with the template (system default and tools applied)."""
    msgs, kwargs = _prepare(template, messages, tools)
    return tokenizer.apply_chat_template(
        msgs,
        chat_template=template.source,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def render_many(
    tokenizer: Any,
    template: ChatTemplate,
    conversations: list[list[dict[str, str]]],
    *,
    add_generation_prompt: bool = False,
) -> list[str]:
    """``render`` of many tool-free, non-empty conversations in one batched
    ``apply_chat_template`` call (the same rendering; its per-call set-up paid once)."""
    if not conversations:
        return []
    batch = [_prepare(template, m, None)[0] for m in conversations]
    return tokenizer.apply_chat_template(
        batch,
        chat_template=template.source,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _prepare(template: ChatTemplate, messages, tools) -> tuple[list[dict], dict[str, Any]]:
    """(messages with the default system prompt / tool description, template kwargs)."""
    msgs = list(messages)
    if template.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": template.default_system})
    kwargs: dict[str, Any] = {}
    if tools:
        if template.takes_tools:
            kwargs["tools"] = tools
        else:  # template ignores tools: describe them in the system message instead
            text = "You can call these tools:\n" + "\n".join(json.dumps(t) for t in tools)
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + text}
            else:
                msgs.insert(0, {"role": "system", "content": text})
    return msgs, kwargs
