"""Argument handling for `jaxlora chat | predict | eval` and the end-of-training samples.

Resolves `--model` / `--adapter` (an adapter directory or a run directory) into a loaded model,
adapter, tokenizer and the adapter directory whose saved chat template inference should use, then
calls the plain functions in `jaxlora.evaluate.inference`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlora.data.loading import resolve_demo_names
from jaxlora.errors import UserError

SAMPLE_NEW_TOKENS = 48  # per answer printed after `jaxlora train`


def _adapter_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():  # a run directory
        return p / "adapter"
    raise UserError(f"{p}: neither an adapter directory nor a run directory with adapter/")


def load_for_inference(
    model_path: str | None, adapter_path: str | None, dtype: str = "bfloat16", base=None
):
    """(model, adapter or None, tokenizer, adapter_dir) ready for generation.

    Without a model, an adapter's own `base_model_name_or_path` (PEFT's convention) names the
    base; with neither, the built-in tiny model. `base`: that model already in memory (the one
    training used, `jaxlora.train.model_parts.inference_base`), so it is not read again.
    """
    from jaxlora.io.model import load_model, load_tokenizer
    from jaxlora.io.peft import check_adapter_fits, load_peft_adapter

    adir = _adapter_dir(adapter_path)
    if model_path in (None, "auto") and adir is not None:
        model_path = json.loads((adir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not model_path:
            raise UserError(
                f"{adir}/adapter_config.json has no base_model_name_or_path; pass --model"
            )
    model = base if base is not None else load_model(model_path or "tiny", dtype=dtype)
    adapter = None
    tokenizer = model.tokenizer
    if adir is not None:
        adapter = load_peft_adapter(adir)
        check_adapter_fits(adapter, model.params, str(adir))
        if (adir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adir)
    if tokenizer is None:
        raise UserError(f"{model_path}: no tokenizer files in the model (or adapter) directory")
    return model, adapter, tokenizer, adir


def _gen_kwargs(args) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }


def run_chat(args) -> int:
    from jaxlora.evaluate.inference import chat_once, chat_session

    model, adapter, tok, adir = load_for_inference(args.model, args.adapter, args.dtype)
    common = dict(template=args.template, system=args.system, adapter_dir=adir)
    if args.prompt is not None:
        print(chat_once(model, adapter, tok, args.prompt, gen_kwargs=_gen_kwargs(args), **common))
        return 0
    # chat_session prints the one-line header itself.
    chat_session(model, adapter, tok, gen_kwargs=_gen_kwargs(args), **common)
    return 0


def run_predict(args) -> int:
    from jaxlora.evaluate.inference import load_conversations, predict

    model, adapter, tok, adir = load_for_inference(args.model, args.adapter, args.dtype)
    examples = load_conversations(resolve_demo_names(args.dataset), max_samples=args.max_samples)
    rows = predict(
        model,
        adapter,
        tok,
        examples,
        args.out,
        gen_kwargs=_gen_kwargs(args),
        batch_size=args.batch_size,
        template=args.template,
        system=args.system,
        adapter_dir=adir,
    )
    print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def run_eval(args) -> int:
    from jaxlora.evaluate.inference import load_conversations
    from jaxlora.evaluate.scoring import evaluate, format_comparison_table

    model, adapter, tok, adir = load_for_inference(args.model, args.adapter, args.dtype)
    variants = {"base": None} if adapter is None else {"base": None, "adapter": adapter}
    sets = [("task", args.dataset)]
    if args.general_dataset:
        sets.append(("general (forgetting check)", args.general_dataset))
    for title, ds in sets:
        examples = load_conversations(resolve_demo_names(ds), max_samples=args.max_samples)
        res = evaluate(
            model,
            tok,
            examples,
            adapters=variants,
            gen_kwargs=_gen_kwargs(args),
            batch_size=args.batch_size,
            template=args.template,
            system=args.system,
            adapter_dir=adir,
        )
        print(format_comparison_table(res, title=title))
    return 0


def sample_answers(cfg, run_dir: Path, n: int = 3, base=None) -> list[tuple[str, str]]:
    """Greedy answers of the trained adapter (read back from `run_dir`) to the first `n`
    training prompts, generated as one batch (one decode compile, not one per prompt-length
    bucket). `base`: the base model training kept in memory, else it is loaded."""
    from jaxlora.evaluate.inference import (
        chat_many,
        load_conversations,
        prompt_template,
        split_reference,
    )

    model, adapter, tok, adir = load_for_inference(
        cfg.model.model_name_or_path,
        str(run_dir),
        "float32" if not cfg.train.bf16 else "bfloat16",
        base=base,
    )
    convs = load_conversations(
        resolve_demo_names(cfg.data.dataset), dataset_dir=cfg.data.dataset_dir, max_samples=n
    )
    turns = []
    for conv in convs[:n]:
        messages, _ = split_reference(conv)
        turns.append((messages[-1]["content"], messages[:-1]))
    if not turns:
        return []
    tmpl = prompt_template(tok, system=cfg.data.system, adapter_dir=adir)
    answers = chat_many(
        model, adapter, tok, turns, gen_kwargs={"max_new_tokens": SAMPLE_NEW_TOKENS}, tmpl=tmpl
    )
    return [(q, a) for (q, _), a in zip(turns, answers, strict=True)]
