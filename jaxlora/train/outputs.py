"""End-of-run artefacts and `jaxlora export` from a run directory.

Why this file exists: a run directory holds a config, orbax checkpoints and (at the end) an
adapter or merged model. Turning either into the file formats of `jaxlora.io.export` needs the
run's method split (`jaxlora.train.methods`: PiSSA conversion, freeze slices, full params), so it
lives in the training layer. The report is written here too, once, at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import jax

from jaxlora.errors import UserError
from jaxlora.io.export import (
    TEMPLATE_FILE,
    export_adapter,
    export_gguf,
    export_merged,
    refuse_merge,
)
from jaxlora.io.peft import load_peft_adapter
from jaxlora.peft.bottleneck import BottleneckAdapter
from jaxlora.peft.lora import Adapter
from jaxlora.peft.prompt import PromptAdapter


def export_run_outputs(run: Any, trainable: Any) -> None:
    """End of training: final adapter or model, loss plot and report in the run directory.

    Called on every process: on a multi-host run the trainable arrays span all hosts, and
    gathering them (per leaf for an adapter, per layer for full weights) is a collective that
    every process joins; only process 0 writes."""
    from jaxlora.parallel import distributed
    from jaxlora.train.methods import adapter_for_export, params_for_export

    main = distributed.is_main_process()
    cfg = run.cfg
    tmpl = run.data.report.chat_template or None
    base = str(run.parts.model.path)
    if run.parts.mode in ("lora", "prompt", "adapter"):
        adapter = adapter_for_export(run.parts.split, trainable)
        host = jax.tree_util.tree_map(distributed.to_host, adapter.params)  # per leaf
        if main:
            export_adapter(
                dataclasses.replace(adapter, params=host),
                run.run_dir / "adapter",
                base_model=base,
                tokenizer=run.parts.model.tokenizer,
                chat_template=tmpl,
                overwrite=True,
                model_config=run.parts.model.config,
            )
    else:
        export_merged(
            base,
            run.run_dir / "model",
            params=params_for_export(run.parts.split, trainable),
            tokenizer=run.parts.model.tokenizer,
            chat_template=tmpl,
            overwrite=True,
            write=main,
        )
    if main:
        write_run_report(run.run_dir, cfg)
    distributed.sync("jaxlora-run-outputs")


def write_run_report(run_dir: Path, cfg: Any) -> Path | None:
    from jaxlora.config import config_to_dict
    from jaxlora.evaluate.report import read_metrics, write_report

    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return None
    flat = config_to_dict(cfg)
    return write_report(run_dir, records, flat)


def _restore_trainable(ckpt_dir: Path, like: Any = None) -> tuple[Any, int]:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("state", "meta"))
    step = mngr.latest_step()
    if step is None:
        raise UserError(f"{ckpt_dir}: no complete checkpoint found")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    trainable = out["state"]["trainable"]
    if like is not None:  # freeze: LayerSlice nodes come back as {"value": ...} dicts
        leaves = jax.tree_util.tree_leaves(trainable)
        trainable = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
    return trainable, step


def export_from_run(
    run_or_ckpt: str | Path,
    out_dir: str | Path,
    *,
    merged: bool = False,
    overwrite: bool = False,
    gguf_type: str | None = None,
) -> Path:
    """`jaxlora export`: a run directory (final adapter or latest checkpoint) or a PEFT adapter.

    `gguf_type` (f16 | bf16 | q8_0): write the merged model as GGUF + Ollama Modelfile instead.
    """
    from jaxlora.config import load_config
    from jaxlora.io.model import load_tokenizer, resolve_model_path

    src = Path(run_or_ckpt)
    if (src / "adapter_config.json").is_file():  # an adapter directory
        adapter = load_peft_adapter(src)
        base = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base is not None:  # a built-in name, a .gguf or a hub id -> its local directory
            base = str(resolve_model_path(base))
        template = (src / TEMPLATE_FILE).read_text() if (src / TEMPLATE_FILE).is_file() else None
        tok_dir = src if (src / "tokenizer_config.json").is_file() else base
    else:
        if not (src / "config.yaml").is_file():
            raise UserError(
                f"{src}: not a jaxlora run directory (no config.yaml) nor a PEFT adapter "
                "directory (no adapter_config.json)"
            )
        cfg = load_config(src / "config.yaml")
        base = str(resolve_model_path(cfg.model.model_name_or_path))
        report = src / "data_report.json"
        template = json.loads(report.read_text()).get("chat_template") if report.is_file() else None
        tok_dir = base
        if cfg.finetune.finetuning_type in ("full", "freeze"):
            if (src / "model").is_dir() and not merged and not gguf_type:
                raise UserError(
                    f"{src} is a full fine-tuning run; use --merged (or copy {src}/model)"
                )
            if gguf_type and (src / "model" / "config.json").is_file():
                # the finished run's HF checkpoint, streamed tensor by tensor from disk
                return export_gguf(
                    src / "model",
                    out_dir,
                    tokenizer=load_tokenizer(base),
                    chat_template=template,
                    gguf_type=gguf_type,
                    overwrite=overwrite,
                )
            from jaxlora.train.methods import params_for_export, rebuild_split

            split = rebuild_split(cfg, base)
            trainable, _ = _restore_trainable(src / "checkpoints", like=split.trainable)
            trainable = params_for_export(split, trainable)
            write = partial(export_gguf, gguf_type=gguf_type) if gguf_type else export_merged
            return write(
                base,
                out_dir,
                params=trainable,
                tokenizer=load_tokenizer(base),
                chat_template=template,
                overwrite=overwrite,
            )
        if (src / "adapter" / "adapter_config.json").is_file():
            adapter = load_peft_adapter(src / "adapter")
        else:
            from jaxlora.train.methods import adapter_for_export, lora_config_for, rebuild_split

            trainable, _ = _restore_trainable(src / "checkpoints")
            if cfg.finetune.pissa_init or cfg.finetune.finetuning_type != "lora":
                # PiSSA: converted relative to the original base; prompt / prefix: the run's
                # PromptConfig (a continued adapter's own, or the config's)
                adapter = adapter_for_export(rebuild_split(cfg, base), trainable)
            else:
                adapter = Adapter(trainable, lora_config_for(cfg))
    if base is None:
        raise UserError(f"{src}: adapter_config.json has no base_model_name_or_path")
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    if gguf_type:
        refuse_merge(adapter)
        return export_gguf(
            base,
            out_dir,
            adapter=adapter,
            tokenizer=tokenizer,
            chat_template=template,
            gguf_type=gguf_type,
            overwrite=overwrite,
        )
    if merged:
        refuse_merge(adapter)
        return export_merged(
            base,
            out_dir,
            adapter=adapter,
            tokenizer=tokenizer,
            chat_template=template,
            overwrite=overwrite,
        )
    model_config = None
    from jaxlora.io.model import resolve_model_path
    from jaxlora.models.config import load_hf_config

    if isinstance(adapter, PromptAdapter | BottleneckAdapter):  # configs record the base's shapes
        model_config = load_hf_config(resolve_model_path(base))[0]
    elif (Path(base) / "config.json").is_file():  # a local base: its layer naming (Gemma 3)
        model_config = load_hf_config(base)[0]
    return export_adapter(
        adapter,
        out_dir,
        base_model=base,
        tokenizer=tokenizer,
        chat_template=template,
        overwrite=overwrite,
        model_config=model_config,
    )
