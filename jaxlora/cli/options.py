"""Command-line options that several subcommands share (chat/predict/eval, blind prepare, serve).

One definition per option keeps the flag names, defaults and help text the same everywhere a
user meets them.
"""

from __future__ import annotations

import argparse


def add_template_options(p: argparse.ArgumentParser, system_help: str) -> None:
    """`--template`, `--system`, `--dtype`: how the prompt is rendered and the weights held."""
    p.add_argument("--template", default=None, help="chat template name (default: saved one)")
    p.add_argument("--system", default=None, help=system_help)
    p.add_argument("--dtype", default="bfloat16", help="weights dtype (default: %(default)s)")


def add_sampling_options(p: argparse.ArgumentParser, *, full: bool = True) -> None:
    """Answer length and sampling; `full` adds top-k and the repetition penalty."""
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="answer length cap (default: %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)"
    )
    if full:
        p.add_argument(
            "--top-k", type=int, default=0, help="sample from the k likeliest (default: 0 = off)"
        )
        p.add_argument(
            "--repetition-penalty",
            type=float,
            default=1.0,
            help="> 1 discourages repeats (default: 1 = off)",
        )


def add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="prompts generated together (default: %(default)s)",
    )
