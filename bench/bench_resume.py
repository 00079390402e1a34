"""What the save-time record and the resume check cost: a save and a resume with the guard off and on, side by
side, for a Llama-shaped model with AdamW state, on 1 and 2 ranks, synchronous and async saves.

    .venv/bin/python bench/bench_resume.py                       # ~0.5B parameters (fits 24 GB with async)
    .venv/bin/python bench/bench_resume.py --params 1e9 --no-async
    .venv/bin/python bench/bench_resume.py --params 2e6 --ranks 1 --warm-only   # a smoke run (the tests run this)

Each row runs in fresh processes (torchrun, gloo; FSDP2 over 2 ranks): build the model, one real
AdamW step so the optimizer state exists, then a timed save through the installed torchtitan's manager, then a
fresh model and manager that resume from it (timed), and, as root, once more with the page cache emptied first
(a restart on another node reads the step from disk). For an async save, "blocking" is what ``save()`` took
(what the training loop waits for) and "total" includes waiting for the save to complete. The figures are the
slowest rank's, best of ``--repeat`` (runs without and with the guard alternate; before each, the previous
run's writes are flushed and, as root, the page cache is dropped); the table gives each guarded figure beside the
unguarded one, as a ratio. A 1B model in fp32 with AdamW state is 12 GB, and an async save stages a copy of it:
24 GB, past this machine's memory, hence the default size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from olmo2_checkpoint import can_drop_caches, drop_page_cache

ROOT = Path(__file__).resolve().parents[1]


def llama_config(params: float):
    """A Llama config of about ``params`` parameters: width 2048 (vocabulary 32000) above 1e8 parameters, width 64
    (vocabulary 512) below, and as many layers as the count asks (12 h^2 per layer, 2 V h for embedding and head)."""
    from transformers import LlamaConfig

    hidden, vocab = (2048, 32000) if params > 1e8 else (64, 512)
    layers = max(2, round((params - 2 * vocab * hidden) / (12 * hidden * hidden)))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def worker(args: argparse.Namespace) -> None:
    """One rank: build, step, save (timed), resume (timed); rank 0 writes the figures."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from flame_ext.checks.nonpersistent_buffers import check_buffers
    from flame_ext.titan import generation
    from flame_ext.titan.managers import build_checkpoint_manager

    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")  # an async save needs one, even on one rank
    torch.manual_seed(0)
    config = llama_config(args.params)
    guard = {"validate_initial_load": True} if args.guard else {}
    # Every step saved by interval, not as the last step: a host saves its last step synchronously, whatever
    # its async mode.
    host = {"interval": 1, **({"async_mode": "async"} if args.async_save else {})}

    def build():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        # to_empty leaves RoPE's non-persistent inv_freq as whatever the memory held: its config-derived value, or
        # the step trains on garbage and the state saved holds NaN (every tensor, on 2 ranks), which the
        # fingerprint sums then pass over twice (the second pass counts the non-finite values).
        check_buffers(model, repair=True)
        training = build_checkpoint_manager([model], Path(args.base), guard=guard, host=host, full_load=True)
        return model, training

    model, training = build()
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    training.optimizers.step()
    assert all(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all() for p in model.parameters())
    training.optimizers.zero_grad(set_to_none=True)
    training.lr_schedulers.step()
    manager = training.manager
    parameters = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if generation() == "0.1":
        manager.save(curr_step=1)
    else:
        manager.save(curr_step=1, last_step=False)
    blocking = time.perf_counter() - start
    manager.maybe_wait_for_staging() if hasattr(manager, "maybe_wait_for_staging") else None
    _wait(manager)
    total = time.perf_counter() - start
    manager.close()
    del model, training, manager
    load = timed_resume(build)
    # A restart on another node reads the step from disk, not from the page cache the save filled: the same
    # resume again, the cache emptied first (root only; 0 stands for "not measured").
    cold = 0.0
    if args.cold:
        if dist.get_rank() == 0:
            drop_page_cache()
        dist.barrier()
        cold = timed_resume(build)
    figures = torch.tensor([blocking, total, load, cold], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # the slowest rank's
    if dist.get_rank() == 0:
        out = dict(zip(FIGURES, figures.tolist()), parameters=parameters)
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def timed_resume(build) -> float:
    """Seconds of a fresh model and manager's ``load()`` of the saved step (the guard's resume check included)."""
    model, training = build()
    start = time.perf_counter()
    assert training.manager.load() is True
    seconds = time.perf_counter() - start
    training.manager.close()
    return seconds


def _wait(manager) -> None:
    """Until the save is on disk: 0.3's hook, or 0.1's future."""
    if hasattr(manager, "maybe_wait_for_saving"):
        manager.maybe_wait_for_saving()
    elif hasattr(manager, "_async_wait"):
        manager._async_wait()


def settle() -> None:
    """Write back the previous row's dirty pages (and, as root, empty the page cache), so that a save does not
    pay for the one before it: a 7 GB save measured 11.4 s or 25.3 s depending on what was left to write back."""
    os.sync()
    if can_drop_caches():
        drop_page_cache()


def run_row(params: float, ranks: int, async_save: bool, guard: bool, cold: bool) -> dict:
    settle()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        out = Path(tmp) / "figures.json"
        own = [__file__, "--worker", "--params", str(params), "--base", str(Path(tmp) / "run"), "--out", str(out)]
        own += ["--async-save"] * async_save + ["--guard"] * guard + ["--cold"] * cold
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *own]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"row failed ({ranks} ranks, async={async_save}, guard={guard}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


FIGURES = ("blocking", "total", "load", "cold")


def best(rows: list[dict]) -> dict:
    return {k: min(r[k] for r in rows) for k in FIGURES} | {"parameters": rows[0]["parameters"]}


def _cell(off: float, on: float) -> str:
    if not off:
        return f"{'not measured':<28}"
    return f"{off:6.2f} s -> {on:6.2f} s (x{on / off:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=5e8, help="about how many parameters (default 5e8)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-async", action="store_true", help="synchronous saves only")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--warm-only", action="store_true", help="skip the cold resume (it empties the page cache, which needs root)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--async-save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--guard", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torchtitan

    print(
        f"torchtitan {getattr(torchtitan, '__version__', '?')}, {os.cpu_count()} CPU cores, ~{args.params:.2g} params"
    )
    cold = not args.warm_only and can_drop_caches()
    if not cold:
        why = "--warm-only" if args.warm_only else "emptying the page cache needs root"
        print(f"the cold resume is not measured: {why}")
    columns = ("blocking", "total", "resume, warm", "resume, cold")
    header = "ranks  save   | " + " | ".join(f"{c + ' off -> on (x)':<28}" for c in columns)
    print(header)
    for ranks in args.ranks:
        for async_save in [False] + ([] if args.no_async else [True]):
            # off and on alternate, so that a drift of the machine's state hits both alike
            row = [args.params, ranks, async_save]
            runs = [[run_row(*row, guard, cold) for guard in (False, True)] for _ in range(args.repeat)]
            off, on = best([r[0] for r in runs]), best([r[1] for r in runs])
            cells = [_cell(off[k], on[k]) for k in FIGURES]
            kind = "async" if async_save else "sync "
            print(f"{ranks:>5}  {kind}  | " + " | ".join(cells) + f"   [{off['parameters']:,} parameters]")


if __name__ == "__main__":
    main()
