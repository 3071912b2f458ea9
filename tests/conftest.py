"""Test-wide setup: 8 fake CPU devices (for mesh tests), float32 matmuls, a compilation cache.

The persistent compilation cache (shared with subprocesses through the environment) lets tests
that compile the same program, e.g. a run and its resumed copy, pay for compilation once.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU runs the fake devices' collectives on one pool of max(cores, devices) threads: 8 on a
# 2-core machine. When one device has two independent collectives in flight, it holds two threads,
# another device can be left with none, and after 40 s XLA aborts the process ("Termination
# timeout ... Expected 8 threads to join the rendezvous, but only 7 of them arrived"). NPROC is
# the core count XLA sizes its pools by; 32 threads leave every device room to make progress.
os.environ.setdefault("NPROC", "32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "distillm2-jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
