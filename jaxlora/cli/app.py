"""`jaxlora` command line: train | export | chat | predict | eval | data stats | bench | report |
serve | blind.

The only module that talks to the terminal. User mistakes (`UserError`) print one clear message
and exit 2 without a traceback (unless `--debug`); a preempted training run exits 75 after
writing its checkpoint, so a scheduler can simply rerun the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxlora.cli.options import add_batch_size, add_sampling_options, add_template_options

EXIT_USER_ERROR = 2


def _load_cfg(args):
    from jaxlora.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from jaxlora.train.loop import EXIT_PREEMPTED, summarise, train

    cfg = _load_cfg(args)
    result = train(cfg, progress=not args.no_progress, keep_base=True)
    print(summarise(result, cfg.finetune.stage))
    if result.preempted:
        return EXIT_PREEMPTED
    _print_samples(cfg, result.run_dir, result.base_model)
    return 0


def _print_samples(cfg, run_dir: Path, base=None) -> None:
    """A few answers from the trained adapter, so the user sees what was learned. They come after
    the run's `time:` line (training is over), so their own time is printed with them. `base`:
    the base model training used, when inference can reuse it (else it is loaded again)."""
    import time

    from jaxlora.cli.inference import SAMPLE_NEW_TOKENS, sample_answers

    if cfg.finetune.stage in ("pt", "dpo", "kto") or not (run_dir / "adapter").is_dir():
        return
    t = time.perf_counter()
    samples = sample_answers(cfg, run_dir, n=3, base=base)
    if not samples:
        return
    took = f"{time.perf_counter() - t:.1f}s" + (" with loading the model" if base is None else "")
    print(
        f"\nanswers of the trained adapter to {len(samples)} training prompts (greedy, <= "
        f"{SAMPLE_NEW_TOKENS} new tokens; {took}):"
    )
    for prompt, answer in samples:
        print(f"\n> {prompt}\n{answer}")


def cmd_export(args) -> int:
    from jaxlora.train.outputs import export_from_run

    out = export_from_run(
        args.run,
        args.out,
        merged=args.merged,
        overwrite=args.overwrite,
        gguf_type=args.gguf_type if args.gguf else None,
    )
    kind = "merged model" if args.merged else "PEFT adapter"
    if args.gguf:
        kind = f"merged GGUF ({args.gguf_type}) + Ollama Modelfile"
    print(f"wrote {kind} to {out}")
    return 0


def cmd_report(args) -> int:
    from jaxlora.config import load_config
    from jaxlora.train.outputs import write_run_report

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        from jaxlora.errors import UserError

        raise UserError(f"{run}: not a jaxlora run directory (no config.yaml)")
    path = write_run_report(run, load_config(run / "config.yaml"))
    if path is None:
        print(f"{run}: no metrics logged yet")
        return 1
    print(Path(path).read_text())
    return 0


def cmd_data_stats(args) -> int:
    from jaxlora.data.cache import data_cache_dir
    from jaxlora.data.loading import resolve_demo_names as resolve_dataset
    from jaxlora.data.stats import data_stats, format_stats, plot_length_histogram
    from jaxlora.io.locate import load_tokenizer, resolve_model_path  # no JAX import

    cfg = _load_cfg(args)
    if cfg.data.dataset is None:
        from jaxlora.errors import UserError

        raise UserError("config key `dataset` is required for `jaxlora data stats`")
    tok = load_tokenizer(resolve_model_path(cfg.model.model_name_or_path))
    stats = data_stats(
        tok,
        dataset=resolve_dataset(cfg.data.dataset),
        stage=cfg.finetune.stage,
        dataset_dir=cfg.data.dataset_dir,
        formatting=cfg.data.formatting,
        cutoff_len=cfg.data.cutoff_len,
        max_samples=cfg.data.max_samples,
        template=cfg.model.template,
        chat_template=cfg.model.chat_template,
        system=cfg.data.system,
        train_on_prompt=cfg.data.train_on_prompt,
        max_prompt_length=cfg.data.max_prompt_length,
        cache_dir=data_cache_dir(cfg),
        num_workers=cfg.data.preprocessing_num_workers,
    )
    print(format_stats(stats))
    out = Path(args.out or cfg.train.output_dir)
    png = plot_length_histogram(stats, out / "token_lengths.png")
    print(f"histogram: {png}")
    return 0


def cmd_chat(args) -> int:
    from jaxlora.cli.inference import run_chat

    return run_chat(args)


def cmd_predict(args) -> int:
    from jaxlora.cli.inference import run_predict

    return run_predict(args)


def cmd_eval(args) -> int:
    from jaxlora.cli.inference import run_eval

    return run_eval(args)


def cmd_bench(args) -> int:
    if args.lower_for:
        from jaxlora.bench.lower import run_lower_cli

        return run_lower_cli(_load_cfg(args), args.lower_for, args.hlo_out)
    if args.hlo_out:
        from jaxlora.errors import UserError

        raise UserError("--hlo-out needs --lower-for tpu|cuda")
    from jaxlora.bench.measure import run_bench_cli

    return run_bench_cli(_load_cfg(args), steps=args.steps, warmup=args.warmup)


_DATASET_HELP = "dataset file, comma list, or demo:NAME (e.g. demo:identity_sft)"


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (LLaMA-Factory style keys)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF model directory, .gguf file, built-in name or hub id (default: the adapter's "
        "base_model_name_or_path, else the built-in tiny model)",
    )
    p.add_argument("--adapter", default=None, help="PEFT/jaxlora adapter dir or a run dir")
    add_template_options(p, system_help="system prompt (default: the template's)")
    add_sampling_options(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxlora", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks for user errors (accepted anywhere on the line)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="SFT / DPO / KTO / pretraining as configured")
    _add_config(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="PEFT adapter (default), merged HF model or GGUF from a run")
    p.add_argument("run", help="run directory, or an adapter directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--merged", action="store_true", help="merge into the base weights")
    p.add_argument(
        "--gguf", action="store_true", help="merged model as model.gguf (llama.cpp) + Modelfile"
    )
    p.add_argument(
        "--gguf-type",
        default="f16",
        choices=("f16", "bf16", "q8_0"),
        help="GGUF tensor type (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="loss plot + diagnosis of a run")
    p.add_argument("run", help="run directory (output_dir of a training run)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("stats", help="token lengths, truncation, suggested cutoff_len")
    _add_config(d)
    d.add_argument("--out", default=None, help="directory for the histogram PNG")
    d.set_defaults(fn=cmd_data_stats)

    p = sub.add_parser("chat", help="interactive chat (or one-shot --prompt)")
    _inference_args(p)
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("predict", help="generate for a dataset -> JSONL")
    _inference_args(p)
    p.add_argument("--dataset", required=True, help=_DATASET_HELP)
    p.add_argument("--out", required=True, help="JSONL file of predictions")
    add_batch_size(p)
    p.add_argument("--max-samples", type=int, default=None, help="use the first N rows only")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("eval", help="loss/perplexity + ROUGE/BLEU, base vs adapter")
    _inference_args(p)
    p.add_argument("--dataset", required=True, help=_DATASET_HELP)
    p.add_argument(
        "--general-dataset",
        default=None,
        help="general-domain set (forgetting check); demo:NAME works",
    )
    add_batch_size(p)
    p.add_argument("--max-samples", type=int, default=None, help="use the first N rows only")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="tokens/s, step time, MFU, memory for a config")
    _add_config(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)"
    )
    p.add_argument(
        "--lower-for",
        choices=("tpu", "cuda"),
        default=None,
        help="lower the train step for this platform on this host (no device, no weights)",
    )
    p.add_argument("--hlo-out", default=None, help="with --lower-for: write the StableHLO here")
    p.set_defaults(fn=cmd_bench)

    from jaxlora.cli import blind, serve

    serve.add_parser(sub)
    blind.add_parser(sub)
    return ap


def _show_attention_log() -> None:
    """The one-time "which attention kernel runs, and why" lines go to stderr."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is at emit time: `main()` may be called again after a
        caller (pytest's capsys, a redirecting wrapper) replaced and closed the old stream."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value):
            pass

    log = logging.getLogger("jaxlora.attention")
    if not log.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    from jaxlora.errors import UserError

    if argv is None:  # this process is the command: keep torch out (io/no_torch.py)
        os.environ.setdefault("JAXLORA_HIDE_TORCH", "1")
    parser = build_parser()
    # `--debug` is accepted anywhere (`jaxlora train cfg.yaml --debug`), not only before the
    # subcommand where argparse would look for it.
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    # `key=value` overrides may come after flags (`train cfg.yaml --no-progress lr=1e-4`).
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # transformers' "PyTorch was not found" advisory on import: jaxlora uses only its
    # tokenizers and never needs torch.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _show_attention_log()
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
