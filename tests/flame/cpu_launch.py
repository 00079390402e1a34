"""Test-only CPU launcher for flame's training entry (torchtitan 0.1.x on a machine without a GPU).

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=... \\
        python cpu_launch.py -m flame.train --job.config_file ...          # a patched flame
        python cpu_launch.py -m flame_ext.flame.train --job.config_file ... # unpatched flame

torchtitan 0.1 decides its device once, at import: ``_get_available_device_type() or "cuda"``, so on a
CPU-only build it calls ``torch.cuda.set_device`` and fails. This sets the module globals that hold that
decision (``tools.utils``, ``distributed.utils``, ``components.metrics``) to the CPU, after which
``init_process_group`` picks gloo by itself, and then runs the module as ``python -m`` would. Nothing is
edited on disk; this file is never imported by flame_ext.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch


class _CPUDevice:
    """``torch.cpu`` plus the CUDA-only calls torchtitan's memory monitor and barriers make."""

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device) -> None:
        return None

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device=None):
        class _Props:
            total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

        return _Props()

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {"active_bytes.all.peak": 0, "reserved_bytes.all.peak": 0, "num_alloc_retries": 0, "num_ooms": 0}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None


def _patch_torchtitan() -> None:
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tools_utils

    device = _CPUDevice()
    for module in (tools_utils, dist_utils, metrics):
        module.device_type = "cpu"
        module.device_module = device


def _probe_first_forward(path: str) -> None:
    """``FLAME_EXT_PROBE=FILE``: the first forward pass of the run (its inputs, labels, positions and loss, and
    the model's RoPE ``inv_freq``) is saved to FILE, so a test can recompute that loss with HF on the same
    batch and weights. Hooked where flame builds the model (``AutoModelForCausalLM.from_config``)."""
    from transformers import AutoModelForCausalLM

    build = AutoModelForCausalLM.from_config

    def from_config(*args, **kwargs):
        model = build(*args, **kwargs)

        def save_first(module, args, kwargs, output) -> None:
            if os.path.exists(path):
                return
            rope = [b for n, b in module.named_buffers() if n.endswith("inv_freq")]
            keep = {k: kwargs.get(k) for k in ("input_ids", "labels", "position_ids")}
            keep = {k: v.detach().cpu() for k, v in keep.items() if v is not None}
            torch.save({**keep, "loss": output.loss.detach().cpu(), "inv_freq": rope[0].detach().cpu()}, path)

        model.register_forward_hook(save_first, with_kwargs=True)
        return model

    AutoModelForCausalLM.from_config = from_config


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: cpu_launch.py -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    sys.path.insert(0, os.getcwd())  # as `python -m`: the flame checkout (custom_models, flame) is importable
    _patch_torchtitan()
    if os.environ.get("FLAME_EXT_PROBE"):
        _probe_first_forward(os.environ["FLAME_EXT_PROBE"])
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
