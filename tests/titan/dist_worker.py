"""One rank of a guarded initial load on several ranks: gloo, FSDP2 (``fully_shard``) on the HF model,
the installed torchtitan's real checkpoint manager. Run under ``torchrun --nproc_per_node=N``.

Each rank writes ``<out>/rank-<r>.json`` with what it saw, then behaves as a trainer does: a validation
failure propagates and the process exits non-zero. ``--view-rank R --view KIND``: rank R loads the checkpoint
through a view of its folder, as a node whose shared file system shows it otherwise: ``no-manifest`` (the
manifest not shown yet), ``stale-manifest`` (the manifest being replaced, still seen without fingerprints),
``torn-metadata`` (``.metadata`` cut short, as while it is written).
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
from support.titan_hosts import build_manager  # noqa: E402

from flame_ext.errors import InitialLoadValidationError  # noqa: E402
from flame_ext.io.manifest import MANIFEST_NAME  # noqa: E402


def rank_view(checkpoint: Path, view: Path, kind: str) -> Path:
    """``checkpoint`` as another node sees it (``kind``: see the module's docstring). Hard links to its files:
    the guard refuses a DCP data file that is a symlink."""
    view.mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.name != MANIFEST_NAME:
            os.link(file, view / file.name)
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    if kind == "stale-manifest":
        del manifest["fingerprints"]
    if kind != "no-manifest":
        (view / MANIFEST_NAME).write_text(json.dumps(manifest))
    if kind == "torn-metadata":
        data = (checkpoint / ".metadata").read_bytes()
        (view / ".metadata").unlink()
        (view / ".metadata").write_bytes(data[: len(data) // 2])
    return view


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--poison-rank", type=int, default=-1, help="leave RoPE uninitialised on this rank only")
    p.add_argument("--no-repair", action="store_true")
    p.add_argument("--view-rank", type=int, default=-1, help="this rank sees the checkpoint through a --view")
    p.add_argument("--view", choices=["no-manifest", "stale-manifest", "torn-metadata"], default="no-manifest")
    args = p.parse_args()

    logging.basicConfig(
        level=logging.INFO, format=f"[rank{os.environ.get('RANK', '?')}] %(name)s %(levelname)s %(message)s"
    )
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = hf_like_trainer(Path(args.hf))
    if rank == args.poison_rank and rope_is_right(model):
        leave_rope_uninitialised(model)
    elif rank != args.poison_rank and not rope_is_right(model):
        from flame_ext.checks.nonpersistent_buffers import check_buffers

        check_buffers(model, repair=True)  # only the chosen rank keeps a wrong buffer
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    checkpoint = Path(args.checkpoint)
    if rank == args.view_rank:
        checkpoint = rank_view(checkpoint, Path(args.out) / f"view-{rank}" / checkpoint.name, args.view)
    manager = build_manager(
        model,
        Path(args.out),
        initial_load_path=str(checkpoint),
        validate_initial_load=True,
        initial_load_repair_buffers=not args.no_repair,
    )
    out = Path(args.out) / f"rank-{rank}.json"
    try:
        manager.load()
    except InitialLoadValidationError as exc:
        out.write_text(
            json.dumps(
                {"ok": False, "kinds": sorted({p.kind for p in exc.report.errors}), "report": exc.report.to_dict()}
            )
        )
        raise
    report = manager.initial_load_report
    out.write_text(json.dumps({"ok": True, "report": report.to_dict()}))
    manager.close()
    dist.destroy_process_group()
    # Interpreter teardown after a clean run occasionally aborts in this torch build on a loaded machine
    # ("terminate called without an active exception", ~1 run in 20 under the full suite, never in 30 runs
    # alone); everything this rank had to say is written, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
