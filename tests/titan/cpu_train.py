"""Run torchtitan 0.3's trainer on a CPU-only machine (tests only; never part of the package).

torchtitan 0.3.0 assumes an accelerator in a few places; these patches, applied before torchtitan is
imported, make ``torchtitan.train.main()`` run on CPU with gloo, unchanged otherwise:

* ``tools/utils.py`` picks ``"cuda"`` when no accelerator is found -> report ``"cpu"``;
* the metrics / memory monitor call ``torch.cpu`` functions that only ``torch.cuda`` has -> harmless stubs;
* ``set_pg_timeouts`` calls ``torch.distributed.set_timeout``, missing in torch 2.13 -> the c10d function
  it stands for, and ``barrier(device_ids=[torch.cpu.current_device()])`` needs an int -> 0;
* FSDP2 with torchtitan's gradient_divide_factor uses PREMUL_SUM, which gloo lacks -> force plain sums.

Usage: ``python tests/titan/cpu_train.py <torchtitan.train arguments>`` with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT / LOCAL_RANK set (or under torchrun). The FlexAttention -> SDPA swap the debug
models need on CPU is ``--override.imports cpu_overrides.cpu_sdpa`` (this folder is put on sys.path).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch._utils
import torch.distributed.distributed_c10d as c10d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch._utils._get_available_device_type = lambda: "cpu"
torch.cpu.current_device = lambda: 0
torch.cpu.get_device_name = lambda device=None: "cpu"
torch.cpu.get_device_properties = lambda device=None: SimpleNamespace(name="cpu", total_memory=1 << 34)
torch.cpu.reset_peak_memory_stats = lambda device=None: None
torch.cpu.empty_cache = lambda: None
torch.cpu.memory_stats = lambda device=None: {}
if not hasattr(torch.distributed, "set_timeout"):
    torch.distributed.set_timeout = lambda timeout, group=None: c10d._set_pg_timeout(timeout, group)


def _force_sum_reduction() -> None:
    import torchtitan.distributed.fsdp as fsdp

    original = fsdp.disable_fsdp_gradient_division

    def patched(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
        return out

    fsdp.disable_fsdp_gradient_division = patched


if __name__ == "__main__":
    _force_sum_reduction()
    import torchtitan.train

    torchtitan.train.main()
