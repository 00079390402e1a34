"""One rank of guarded initial loads, for test_ranks: the installed torchtitan's real ``CheckpointManager``
(flame-ext's ``ValidatingCheckpointManager``) on a gloo process group, loading a converted checkpoint.

    torchrun --standalone --nproc_per_node=2 rank_worker.py --hf DIR --checkpoint C --out DIR --scenario S ...

or two plain processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (so that no launcher ends a
rank on another's behalf). Each scenario is one fresh model and manager and one initial load, with a fault on
rank 1 only; several scenarios run one after the other in the same processes (one import of torch for all):

  checkpoint  rank 1 loads --other-checkpoint (a stale or foreign copy)
  loss        rank 1's model computes logits x10 (a faulty node), so another loss
  kill        rank 1 dies (SIGKILL) inside the guard's forward pass
  freeze      rank 1 stops (SIGSTOP) there: alive, connected, silent

Each rank writes ``<out>/rank-<r>-<scenario>.json`` (what ended its load, and when). A validation error is
recorded and the next scenario runs; any other error propagates. The exit code is non-zero if any load failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flame_ext.titan.managers import build_checkpoint_manager


def run_scenario(args: argparse.Namespace, scenario: str, rank: int) -> bool:
    """One guarded initial load with ``scenario``'s fault on rank 1; True if it passed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame_ext.errors import InitialLoadValidationError

    out = Path(args.out) / f"rank-{rank}-{scenario}.json"
    record: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "scenario": scenario}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.hf))
    checkpoint = args.other_checkpoint if rank == 1 and scenario == "checkpoint" else args.checkpoint
    if rank == 1 and scenario == "loss":
        model.lm_head.register_forward_hook(lambda m, i, o: o * 10)
    if rank == 1 and scenario in ("kill", "freeze"):
        sig = signal.SIGKILL if scenario == "kill" else signal.SIGSTOP

        def die(module: Any, inputs: Any) -> None:
            out.write_text(json.dumps({**record, "event": f"{scenario} in forward", "t": time.time()}))
            os.kill(os.getpid(), sig)

        model.register_forward_pre_hook(die)  # the guard's reference forward pass is this model's first forward
    base = Path(args.out) / f"run-{scenario}-rank{rank}"
    # the installed generation's guarded manager, configured as a user switches the guard on
    manager = build_checkpoint_manager(
        [model], base, guard={"validate_initial_load": True}, initial_load_path=checkpoint
    ).manager
    dist.barrier()  # every rank built and ready: the load starts together
    record["t_load"] = time.time()
    try:
        manager.load()
    except BaseException as exc:
        report = getattr(exc, "report", None)
        record.update(
            event="raised",
            error=type(exc).__name__,
            message=str(exc).splitlines()[0][:500],
            report=report.to_dict() if report is not None else None,
            t=time.time(),
            traceback=traceback.format_exc()[-2000:],
        )
        out.write_text(json.dumps(record))
        if isinstance(exc, InitialLoadValidationError):
            return False
        raise
    record.update(event="passed", report=manager.initial_load_report.to_dict(), t=time.time())
    out.write_text(json.dumps(record))
    return True


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--other-checkpoint")
    p.add_argument("--scenario", action="append", choices=["checkpoint", "loss", "kill", "freeze"], required=True)
    p.add_argument("--pg-timeout", type=float, default=30.0)
    args = p.parse_args()

    # The slow imports before the process group exists, so that no rank waits in a collective on another's imports.
    import transformers  # noqa: F401

    torch.manual_seed(0)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank = dist.get_rank()
    passed = [run_scenario(args, scenario, rank) for scenario in args.scenario]
    dist.destroy_process_group()
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
