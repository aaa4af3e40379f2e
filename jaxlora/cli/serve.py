"""`jaxlora serve`: the OpenAI-compatible server on a model (+ adapter), under uvicorn.

Argument handling only: loads the model as `jaxlora chat` does and hands it to
`jaxlora.evaluate.serve`. Binds 127.0.0.1 unless `--host` says otherwise; `--api-key` (or the
JAXLORA_API_KEY environment variable, which keeps the key out of `ps`) requires
`Authorization: Bearer <key>` on every request.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jaxlora.cli.options import add_template_options
from jaxlora.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat completions server")
    p.add_argument("--model", default="auto", help="HF model dir (default: the adapter's base)")
    p.add_argument("--adapter", default=None, help="PEFT/jaxlora adapter dir or a run dir")
    add_template_options(p, system_help="default system prompt")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--served-model-name", default=None, help="id shown by /v1/models")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together")
    p.set_defaults(fn=run_serve)


def served_name(model_path: str, adapter_dir: Path | None) -> str:
    if adapter_dir is not None:
        run = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
        return run.name
    return Path(model_path).name or model_path


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxlora.cli.inference import load_for_inference
    from jaxlora.evaluate.serve import Engine, build_app

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    model_path = args.model if args.model != "auto" or args.adapter else "tiny"
    model, adapter, tok, adir = load_for_inference(model_path, args.adapter, args.dtype)
    engine = Engine(
        model,
        adapter,
        tok,
        template=args.template,
        system=args.system,
        adapter_dir=adir,
        max_batch=args.max_batch,
    )
    name = args.served_model_name or served_name(model_path, adir)
    key = args.api_key or os.environ.get("JAXLORA_API_KEY") or None
    app = build_app(engine, model_id=name, api_key=key)
    auth = "Bearer key required" if key else "no API key (local use)"
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
