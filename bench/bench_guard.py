"""What the training guard costs: the metadata comparison at 7B scale, and the loss pass on the tiny model.

    .venv/bin/python bench/bench_guard.py            (also runs in .venv-titan01)

1. Key/shape/dtype parity for OLMo-2-7B: the model built on ``meta`` (the trainer has it already; its
   build is timed apart), a ``.metadata`` file with the same 7B key set written in DCP's own format (the
   tensor data is not needed: the check never reads it), then the guard's pre-load check as the
   adapters run it: read the metadata, take the request from the state dict, compare. Expected < 1 s.
2. The post-load checks on the embedded tiny model: buffer check and one forward pass on the reference
   batch, against a plain forward for scale; and a whole guarded initial load through the installed
   torchtitan's CheckpointManager against an unguarded one.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_diagnose import write_sparse_dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "titan")]  # the test hosts (tests/support) and models

# allenai/OLMo-2-1124-7B config.json
OLMO2_7B = dict(
    vocab_size=100352,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=500000,
    tie_word_embeddings=False,
    pad_token_id=100277,
    eos_token_id=100257,
    bos_token_id=None,
)


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    """Best of ``repeat`` runs: the machine is shared, and the minimum is the least disturbed figure."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_parity_7b() -> None:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flame_ext.checks.keys import compare_specs
    from flame_ext.guard import split_request
    from flame_ext.guard.parity import parity_problems
    from flame_ext.io.dcp import read_dcp_metadata

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Olmo2ForCausalLM(Olmo2Config(**OLMO2_7B))
    build = time.perf_counter() - t0
    sd = model.state_dict()
    n_params = sum(v.numel() for v in sd.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dcp"
        # A real .metadata as torch's writer makes it, over sparse data files: the check never reads the data,
        # and the reader refuses a .metadata without storage records.
        write_sparse_dcp(folder, sd, {"model_type": "olmo2", **OLMO2_7B})
        t_read, found = timed(lambda: read_dcp_metadata(folder))
        t_request, requested = timed(lambda: split_request(model.state_dict()))
        t_compare, result = timed(lambda: compare_specs(requested.model, found))
        assert not result.problems

        def whole_check() -> None:  # what the adapters run before a load, reference read excluded
            found_now = read_dcp_metadata(folder)
            problems = parity_problems(split_request(model.state_dict()), found_now, fresh=[], tied={}, counts={})
            assert not problems

        t_total, _ = timed(whole_check)
    print(f"parity, OLMo-2-7B key set ({len(sd)} tensors, {n_params / 1e9:.2f} B parameters, no tensor data read):")
    print(f"  read .metadata           {t_read * 1e3:8.1f} ms")
    print(f"  request from state dict  {t_request * 1e3:8.1f} ms")
    print(f"  compare_specs            {t_compare * 1e3:8.1f} ms")
    print(
        f"  whole pre-load check     {t_total * 1e3:8.1f} ms   (model build on meta, not part of it: "
        f"{build * 1e3:.0f} ms)"
    )


def bench_loss_tiny() -> None:
    from transformers import AutoModelForCausalLM

    from flame_ext.checks.nonpersistent_buffers import check_buffers
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
    from flame_ext.guard import hf_loss_probe
    from flame_ext.io.hf import DEFAULT_MODEL
    from flame_ext.io.manifest import read_reference

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "step-0"
        convert_hf_to_dcp(ConvertOptions(model=str(DEFAULT_MODEL), checkpoint=str(ckpt), progress=False))
        ref = read_reference(ckpt / "flame_ext.json")
        ids = torch.tensor(ref["token_ids"])
        model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
        n = ids.shape[1] - 1
        probe = hf_loss_probe(model)
        ranges = [(0, n), (0, n // 4), (n // 4, n // 2), (n // 2, 3 * n // 4), (3 * n // 4, n)]
        plain, probed = [], []
        with torch.no_grad():
            for _ in range(5):  # interleaved, so a busy moment on the machine hits both alike
                plain.append(timed(lambda: model(ids), repeat=1)[0])
                probed.append(timed(lambda: probe(ids, ranges), repeat=1)[0])
        t_plain, t_probe = min(plain), min(probed)
        t_buffers, _ = timed(lambda: check_buffers(model, repair=False))
        print(
            f"loss pass, embedded tiny model ({sum(p.numel() for p in model.parameters()):,} parameters, "
            f"reference batch {tuple(ids.shape)}):"
        )
        print(f"  plain forward            {t_plain * 1e3:8.1f} ms")
        print(f"  guard's loss probe       {t_probe * 1e3:8.1f} ms   (forward + per-token loss + position buckets)")
        print(f"  buffer check             {t_buffers * 1e3:8.1f} ms")
        bench_manager_load(ckpt, Path(tmp))


def bench_manager_load(ckpt: Path, tmp: Path) -> None:
    from _models import hf_like_trainer
    from support.titan_hosts import build_manager, titan_generation

    from flame_ext.io.hf import DEFAULT_MODEL

    if titan_generation() not in ("0.1", "0.3"):
        print("(torchtitan 0.1/0.3 not installed: manager load not measured)")
        return
    logging.disable(logging.WARNING)
    runs = iter(range(1000))

    def load(guarded: bool) -> None:
        fields = {"validate_initial_load": True} if guarded else {}
        manager = build_manager(
            hf_like_trainer(DEFAULT_MODEL), tmp / f"run{next(runs)}", initial_load_path=str(ckpt), **fields
        )
        t0 = time.perf_counter()
        manager.load()
        load.seconds.append(time.perf_counter() - t0)
        manager.close()

    for guarded in (False, True):
        load.seconds = []
        for _ in range(5):
            load(guarded)
        label = "guarded" if guarded else "plain  "
        print(
            f"  {label} initial load via torchtitan {titan_generation()} CheckpointManager: "
            f"{min(load.seconds) * 1e3:8.1f} ms (best of 5)"
        )
    logging.disable(logging.NOTSET)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; figures are the best of 5 runs")
    bench_parity_7b()
    bench_loss_tiny()
