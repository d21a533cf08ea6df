"""Pinned numerics: training gives the same bytes on every x86-64 CPU.

PyTorch and the BLAS inside it choose their kernels by the CPU they run on, and the kernels sum and round
in different orders. Measured on one Intel Xeon (bench/train_numerics.py): torch.randn's data differs
between the `default` and `avx2`/`avx512` kernels of ATen, and the trained weights differ again by MKL's
code path (MKL_CBWR unset, AVX2, AVX512, COMPATIBLE give three different state_dicts). So training pins:

- ATEN_CPU_CAPABILITY=default: ATen's baseline x86-64 kernels, which every x86-64 CPU runs the same way;
- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility mode, documented by Intel to give the
  same results on Intel and non-Intel x86 CPUs;
- one intra-op thread, so no reduction is split by the core count;
- oneDNN off, so that no fp32 op is routed through it by a future default (today it changes nothing here).

Both variables are read once, at the first operator (ATen) and the first BLAS call (MKL), so they are set
before training runs any; a process that ran torch operators earlier (an in-process test, a notebook)
keeps the kernels it chose, and the record says `pinned: false`. `native` pins nothing: the fastest
kernels of this CPU, reproducible only on the same machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

MODES = ("pinned", "native")
PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
PINNED_CAPABILITY = "DEFAULT"  # what torch.backends.cpu.get_cpu_capability() reports when the pin took
PINNED_THREADS = 1


@contextlib.contextmanager
def apply(mode: str = "pinned") -> Iterator[dict]:
    """Run the body under `mode`'s numerics; yields the record of what was in effect (for report.json).

    The environment and torch's thread and oneDNN settings are restored afterwards."""
    if mode not in MODES:
        raise ValueError(f"numerics {mode!r} is not one of {', '.join(MODES)}")
    saved_environment = {name: os.environ.get(name) for name in PINNED_ENVIRONMENT}
    if mode == "pinned":
        os.environ.update(PINNED_ENVIRONMENT)
    import torch

    saved_threads, saved_mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        if mode == "pinned":
            torch.set_num_threads(PINNED_THREADS)
            torch.backends.mkldnn.enabled = False
        record = {
            "mode": mode,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
            "threads": torch.get_num_threads(),
        }
        record["pinned"] = mode == "pinned" and record["cpu_capability"] == PINNED_CAPABILITY
        if mode == "pinned" and not record["pinned"]:
            log.warning(
                "event=numerics_not_pinned cpu_capability=%s reason=torch_ran_operators_earlier_in_this_process "
                "effect=bytes_reproducible_on_this_machine_only",
                record["cpu_capability"],
            )
        yield record
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.mkldnn.enabled = saved_mkldnn
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
