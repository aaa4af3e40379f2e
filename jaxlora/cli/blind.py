"""`jaxlora blind prepare | serve | report`: blind rating of base vs tuned answers.

Argument handling only. `prepare` loads the model once and the two sides' adapters (the tuned
`--adapter`, and `--baseline-adapter` when comparing two runs; else the base model itself),
generates both answers and writes the session; `serve` runs the rating page under uvicorn and
prints its address with the session token; `report` unblinds, writes report.md + PNG and, when
a side was a training run, links the report from that run's report.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxlora.cli.options import add_batch_size, add_sampling_options, add_template_options
from jaxlora.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("blind", help="blind rating of base vs tuned answers in the browser")
    bsub = p.add_subparsers(dest="blind_command", required=True)

    q = bsub.add_parser("prepare", help="generate both answers for a prompt set")
    q.add_argument("--out", required=True, help="new session directory")
    q.add_argument("--adapter", required=True, help="tuned side: adapter dir or run dir")
    q.add_argument("--baseline-adapter", default=None, help="base side adapter (two runs)")
    q.add_argument("--model", default="auto", help="base model dir (default: adapter's base)")
    q.add_argument("--dataset", default=None, help="prompt set: any format we read, demo:NAME")
    q.add_argument("--general-dataset", default=None, help="general-domain prompts too")
    q.add_argument("--max-samples", type=int, default=None, help="per dataset")
    add_template_options(q, system_help="system prompt for both sides")
    add_sampling_options(q, full=False)
    add_batch_size(q)
    q.add_argument("--seed", type=int, default=None, help="answer order (default: random)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.set_defaults(fn=run_prepare)

    s = bsub.add_parser("serve", help="serve the rating page of a session")
    s.add_argument("session", help="session directory made by `blind prepare`")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    s.add_argument("--port", type=int, default=8765, help="TCP port (default: %(default)s)")
    s.set_defaults(fn=run_serve)

    r = bsub.add_parser("report", help="unblind: win/tie/loss, scores, agreement (closes it)")
    r.add_argument("session", help="session directory to unblind")
    r.set_defaults(fn=run_report)


def _side(model: str, adapter_dir: Path | None) -> dict:
    run = None
    if adapter_dir is not None and (adapter_dir.parent / "config.yaml").is_file():
        run = str(adapter_dir.parent.resolve())
    return {
        "model": model,
        "adapter": None if adapter_dir is None else str(adapter_dir.resolve()),
        "run": run,
    }


def run_prepare(args: argparse.Namespace) -> int:
    from jaxlora.cli.inference import _adapter_dir, load_for_inference
    from jaxlora.data.loading import resolve_demo_names as resolve_dataset
    from jaxlora.evaluate.blind_prepare import load_prompt_sets, prepare
    from jaxlora.io.peft import check_adapter_fits, load_peft_adapter

    sets = [(n, d) for n, d in (("task", args.dataset), ("general", args.general_dataset)) if d]
    if not sets:
        raise UserError("blind prepare: give --dataset and/or --general-dataset")
    items = load_prompt_sets([(n, resolve_dataset(d)) for n, d in sets], args.max_samples)
    model, tuned, tok, adir = load_for_inference(args.model, args.adapter, args.dtype)
    base, bdir = None, _adapter_dir(args.baseline_adapter)
    if bdir is not None:
        base = load_peft_adapter(bdir)
        check_adapter_fits(base, model.params, str(bdir))
    model_path = str(getattr(model, "path", args.model))
    out = prepare(
        args.out,
        model,
        tok,
        {"base": base, "tuned": tuned},
        items,
        sides={"base": _side(model_path, bdir), "tuned": _side(model_path, adir)},
        datasets=[d for _, d in sets],
        gen_kwargs={
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
        },
        template=args.template,
        system=args.system,
        adapter_dir=adir,
        batch_size=args.batch_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"wrote a blind session with {len(items)} items to {out}")
    print(f"rate it with: jaxlora blind serve {out}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxlora.evaluate.blind_server import build_blind_app
    from jaxlora.evaluate.blind_session import Session

    session = Session(args.session)
    if session.closed:
        raise UserError(f"{args.session}: the session is closed (its report has been written)")
    app = build_blind_app(session)
    print(f"open http://{args.host}:{args.port}/#token={session.token}", flush=True)
    print("(the token lets a browser save ratings: share it only with your raters)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from jaxlora.evaluate.blind_report import write_blind_report
    from jaxlora.evaluate.blind_session import Session

    session = Session(args.session)
    path = write_blind_report(session)
    print(path.read_text(encoding="utf-8"))
    for side in session.meta["sides"].values():
        if side.get("run"):
            _link_from_run(Path(side["run"]), path)
    return 0


def _link_from_run(run: Path, report: Path) -> None:
    """Register the blind report with the run and rewrite the run's report.md."""
    from jaxlora.config import load_config
    from jaxlora.evaluate.report import register_blind_report
    from jaxlora.train.outputs import write_run_report

    if not (run / "config.yaml").is_file():
        return
    register_blind_report(run, report)
    if write_run_report(run, load_config(run / "config.yaml")) is not None:
        print(f"linked from {run / 'report.md'}")
