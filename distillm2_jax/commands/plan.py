"""`distillm2 plan CONFIG [key=value ...] --devices N`: will this config fit, and how fast is it?

Lowers and compiles the train step and the sampler's programs on abstract arrays (no weights:
only each model folder's config.json is read) for the config's mesh on N devices (fake CPU
devices when this machine has fewer accelerators), and prints per-device memory (student,
optimizer state, teacher, step temporaries, KV cache), FLOPs per step and per generated token,
whether it fits each device kind, roofline step and generation times, and what to change when
it does not fit. Presets: h100-80gb, a100-80gb, tpu-v5e, tpu-v4 (docs/plan.md).
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="memory, FLOPs and step time of a config on N devices (no weights)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.teacher=DIR model.student=DIR (folders with a config.json)")
    p.add_argument("--devices", type=int, required=True, help="devices of the mesh (mesh.shape's -1 takes the rest)")
    p.add_argument("--hardware", default=None,
                   help="comma-separated presets: h100-80gb, a100-80gb, tpu-v5e, tpu-v4")
    p.add_argument("--hbm-gib", type=float, default=None, help="memory per device (GiB)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s per device")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="memory bandwidth per device (TB/s)")
    p.add_argument("--no-generation", action="store_true", help="skip the sampler's programs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON array with one object per device kind")
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax import config as config_lib
    from distillm2_jax import planning
    from distillm2_jax.planning import devices as devices_lib

    devices_lib.for_command_line(args.devices)    # before anything starts JAX's backend
    cfg = config_lib.load(args.config, args.overrides)
    rows = planning.plan(cfg, args.devices, args.hardware, hbm_gib=args.hbm_gib, peak_tflops=args.peak_tflops,
                         bandwidth_tbs=args.bandwidth_tbs, generation=not args.no_generation)
    print(json.dumps(rows, indent=1) if args.json else planning.format_report(rows))
    return 0
