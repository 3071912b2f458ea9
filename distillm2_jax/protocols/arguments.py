"""Command-line flags of the evaluation protocols (shared by `distillm2 eval` and `distillm2 judge`).

Only argparse here: `cli.py` builds every command's parser at start, before any heavy import.
"""
from __future__ import annotations


def add_judge_arguments(p, *, help_suffix: str = "") -> None:
    """The flags that choose and configure the judge."""
    p.add_argument("--judge", default=None, metavar="DIR", help="local judge model folder" + help_suffix)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint instead (http://host:port[/v1])")
    p.add_argument("--judge-model", default=None, help="model name to send to --judge-url")
    p.add_argument("--judge-api-key-env", default=None, metavar="VAR", help="environment variable holding the API key")
    p.add_argument("--judge-temperature", type=float, default=0.7, help="judge sampling temperature (paper: 0.7)")
    p.add_argument("--judge-max-new-tokens", type=int, default=512, help="judge tokens per verdict")
    p.add_argument("--judge-max-prompt-length", type=int, default=4096,
                   help="local judge: prompt tokens kept (longer prompts keep their end and are counted)")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--judge-workers", type=int, default=4, help="HTTP requests in flight")
    p.add_argument("--judge-seed", type=int, default=0, help="judge sampling and bootstrap seed")


def add_eval_arguments(p) -> None:
    """`distillm2 eval`'s protocol inputs (docs/evaluation.md) and the report folder."""
    g = p.add_argument_group("paper protocols (each runs when its input is given)")
    g.add_argument("--math", default=None, metavar="FILE",
                   help="math problems (`question` + `answer`: GSM8K `####` or MATH `\\boxed{}`): greedy pass@1")
    g.add_argument("--code", default=None, metavar="FILE",
                   help="HumanEval/MBPP-format problems: greedy pass@1, each program sandboxed")
    g.add_argument("--code-timeout", type=float, default=3.0, help="seconds per program (--code)")
    g.add_argument("--judge-references", default=None, metavar="FILE",
                   help="reference answers (AlpacaEval `instruction` + `output`): pairwise judge win rate")
    add_judge_arguments(g, help_suffix=" (with --judge-references)")
    g.add_argument("--report", default=None, metavar="DIR", help="write report.json and report.md here")


def judge_kwargs(args, batch_size: int = 16) -> dict:
    """`judge_backends.build_judge`'s keyword arguments from the parsed flags."""
    return dict(path=args.judge, url=args.judge_url, model_name=args.judge_model,
                api_key_env=args.judge_api_key_env, temperature=args.judge_temperature,
                max_new_tokens=args.judge_max_new_tokens, max_prompt_length=args.judge_max_prompt_length,
                timeout=args.judge_timeout, workers=args.judge_workers,
                seed=args.judge_seed, batch_size=batch_size, dtype=getattr(args, "dtype", "float32"))


def check_eval_arguments(args) -> None:
    """The protocol flags' one-line errors, before any model is loaded."""
    from distillm2_jax.errors import UserError

    if not args.code_timeout > 0:
        raise UserError(f"--code-timeout must be positive, got {args.code_timeout}")
    has_judge = args.judge is not None or args.judge_url is not None
    if args.judge_references and not has_judge:
        raise UserError("--judge-references needs a judge: --judge DIR or --judge-url URL --judge-model NAME")
    if has_judge and not args.judge_references:
        raise UserError("--judge / --judge-url need --judge-references (the reference answers to compare with)")
    if args.judge is not None and args.judge_url is not None:
        raise UserError("give --judge DIR or --judge-url URL, not both")
    if args.judge_url is not None and not args.judge_model:
        raise UserError("--judge-url needs --judge-model (the model name the server expects)")
