"""`distillm2 train CONFIG [key=value ...]`: Algorithm 1 of DistiLLM-2 from one config.

Rerunning the same command resumes from the latest complete checkpoint in run_dir. SIGTERM
(preemption) writes a checkpoint and exits with status 0. On a cluster, run the same command on
every host (see launch/); `--coordinator/--num-processes/--process-id` join the processes when
the environment does not say how.
"""
from __future__ import annotations

import argparse


def add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-host")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 (jax.distributed)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distil a teacher into a student (Algorithm 1)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    add_distributed_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax import config as config_lib
    from distillm2_jax import distributed
    from distillm2_jax.train.loop import train

    cfg = config_lib.load(args.config, args.overrides)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout_s=cfg.distributed.heartbeat_timeout_s,
                           initialization_timeout_s=cfg.distributed.initialization_timeout_s)
    result = train(cfg, max_steps=args.max_steps)
    state = "preempted" if result.preempted else "finished"
    loss = result.final_metrics.get("loss")
    if distributed.is_main_process():
        print(f"{state}: {result.steps} steps, {result.epochs_completed} epochs, "
              f"last loss {loss if loss is None else f'{loss:.5f}'}; run folder {result.run_dir}")
    return 0
