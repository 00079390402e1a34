"""One rank of a guarded run that saves and resumes on several ranks: gloo, FSDP2 (``fully_shard``) on the HF
model, the installed torchtitan's real checkpoint manager. Run under ``torchrun --nproc_per_node=N``.

``--first-load CHECKPOINT --dump DIR``: the first load (guarded), one training step, a full checkpoint at step 1.
``--resume DIR [DIR ...]``: for each run folder, a fresh model (RoPE as to_empty leaves it) resumes from its
latest step and, when that passes, trains one step. ``--fault-rank R``: on rank R the optimizers' own
``load_state_dict`` halves this rank's shard of one ``exp_avg`` after loading it (layer 1's ``up_proj``): a
loader that puts other values into one rank's shard, as torchtitan #1136 and OLMo #641 describe; the files on
disk are untouched. ``--hide-record-rank R``: on rank R the step folders' save-time record reads as absent (a
shared file system that shows a new file to some nodes later). Each rank writes ``<out>/rank-<r>.json``: one entry per
resume (verdict, error kinds and keys, the report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # _models; support

from _models import hf_like_trainer, leave_rope_uninitialised, rope_is_right  # noqa: E402
from _steps import train_step  # noqa: E402
from support.titan_hosts import build_manager, save_step  # noqa: E402

from flame_ext.guard import ResumeValidationError  # noqa: E402


def sharded_model(hf: Path, *, rope_as_left: bool = False):
    """The model built as flame builds it, FSDP-sharded over every rank; RoPE as to_empty leaves it if asked."""
    model = hf_like_trainer(hf)
    if rope_as_left:
        leave_rope_uninitialised(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def start(hf: Path, checkpoint: str, run: Path) -> None:
    model = sharded_model(hf)
    manager = build_manager(model, run, initial_load_path=checkpoint, validate_initial_load=True)
    assert manager.load()
    train_step(model, manager)
    save_step(manager, 1)
    manager.close()


def halve_one_shard_after_loading(manager, model) -> None:
    """The real optimizers' ``load_state_dict``, then this rank's local shard of one ``exp_avg`` halved."""
    optimizers = manager.states["optimizer"]
    load = optimizers.load_state_dict
    param = model.model.layers[1].mlp.up_proj.weight

    def load_then_damage(state_dict) -> None:
        load(state_dict)
        for optimizer in optimizers.optimizers:
            if param in optimizer.state:
                optimizer.state[param]["exp_avg"].to_local().mul_(0.5)

    optimizers.load_state_dict = load_then_damage


def hide_the_record() -> None:
    """This rank reads every save-time record as absent, as where the file system does not show it yet."""
    import flame_ext.guard.resume as resume_check

    resume_check.read_step_record = lambda folder: (None, f"{folder}/flame_ext.json is absent on this rank")


def resume(hf: Path, run: Path, fault: bool = False) -> dict:
    model = sharded_model(hf, rope_as_left=True)
    manager = build_manager(model, run, validate_initial_load=True)
    if fault:
        halve_one_shard_after_loading(manager, model)
    try:
        manager.load()
    except ResumeValidationError as exc:  # raised on this rank before any step: recorded, then the next run
        manager.close()
        errors = exc.report.errors
        kinds = sorted({p.kind for p in errors})
        return {"ok": False, "kinds": kinds, "keys": [p.key for p in errors], "text": str(exc)}
    train_step(model, manager, seed=1)
    manager.close()
    return {"ok": True, "rope_right": rope_is_right(model), "notes": manager.resume_report.notes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--first-load")
    p.add_argument("--dump")
    p.add_argument("--resume", nargs="*", default=[])
    p.add_argument("--fault-rank", type=int, default=-1)
    p.add_argument("--hide-record-rank", type=int, default=-1)
    args = p.parse_args()

    logging.basicConfig(
        level=logging.INFO, format=f"[rank{os.environ.get('RANK', '?')}] %(name)s %(levelname)s %(message)s"
    )
    dist.init_process_group("gloo")
    if args.first_load:
        start(Path(args.hf), args.first_load, Path(args.dump))
    fault = dist.get_rank() == args.fault_rank
    if dist.get_rank() == args.hide_record_rank:
        hide_the_record()
    results = [resume(Path(args.hf), Path(run), fault) for run in args.resume]
    Path(args.out, f"rank-{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dist_worker.py: everything is written; skip the teardown that can abort under load


if __name__ == "__main__":
    main()
