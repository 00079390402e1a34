"""Which one-tensor damages the loss gate catches on its own (fingerprint verification off), at threshold 0.1.

    .venv/bin/python bench/bench_loss_gate.py [--text FILE]     (also runs in .venv-titan01)

The damages and the four architectures are those of the guard's value catalogue
(tests/titan/test_value_catalogue.py): each source is converted by `flame-ext convert` (reference recorded on
the default batch, or on ``--text``), one tensor (or pair) of the DCP is changed afterwards with
``flame_ext.json`` kept, and the checkpoint is loaded through the installed torchtitan's real
``ValidatingCheckpointManager`` with ``initial_load_verify_values = false``, so only the loss gate can stop it.
Printed: the step-0 loss delta against the HF reference and whether the gate stopped the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "titan")]

from _models import hf_like_trainer  # noqa: E402
from diagnose.conftest import _cache_key, convert, load_all, one_thread, save_dcp, tied_model, train_tiny  # noqa: E402
from support.titan_hosts import build_manager  # noqa: E402
from titan.test_value_catalogue import ARCHS, CASES, _qwen3  # noqa: E402

from flame_ext.errors import InitialLoadValidationError  # noqa: E402
from flame_ext.model.reference_loss import DEFAULT_REFERENCE_TEXT  # noqa: E402

THRESHOLD = 0.1


class _Dirs:
    """``tmp_path_factory.mktemp`` for the fixtures' own functions."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


def sources(root: Path) -> dict[str, Path]:
    """The catalogue's four HF folders; trained Llama / Qwen2 shared with the tests' cache."""
    tiny = ROOT / "flame_ext" / "assets" / "tiny-olmo2"
    cache = ROOT / ".pytest_cache" / "d" / "flame-ext-diagnose-models"
    trained = {"olmo2": tiny}
    for arch in ("llama", "qwen2"):
        folder = cache / _cache_key(arch, tiny)
        if not (folder / "model.safetensors").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            train_tiny(arch, folder, tiny)
        trained[arch] = folder
    dirs = _Dirs(root)
    return {
        "olmo2": tiny,
        "llama": trained["llama"],
        "qwen2_tied": tied_model._get_wrapped_function()(trained, dirs),
        "qwen3": _qwen3(root / "qwen3", tiny),
    }


def gate(hf: Path, checkpoint: Path, run: Path) -> tuple[float, bool]:
    """Step-0 loss delta (NaN for a non-finite loss) and whether the loss gate stopped the load."""
    manager = build_manager(
        hf_like_trainer(hf),
        run,
        initial_load_path=str(checkpoint),
        validate_initial_load=True,
        initial_load_verify_values=False,
        initial_load_max_loss_delta=THRESHOLD,
    )
    try:
        with one_thread():
            manager.load()
        report = manager.initial_load_report
    except InitialLoadValidationError as exc:
        report = exc.report
    kinds = {p.kind for p in report.problems if p.severity == "error"}
    assert kinds <= {"loss_gap", "nonfinite"}, kinds  # nothing but the loss pass may stop these loads
    delta = report.loss.delta
    return (math.nan if delta is None or not math.isfinite(delta) else delta), bool(kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", help=f"reference text (default {DEFAULT_REFERENCE_TEXT.name})")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the guard's own report lines; the table is the output
    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = sources(root)
        t0 = time.perf_counter()
        rows: dict[str, dict[str, tuple[float, bool]]] = {}
        for arch in ARCHS:
            config = json.loads((src[arch] / "config.json").read_text())
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            healthy = {}
            for base in ("fp32", "bf16"):
                kw = {"dtype": "bfloat16"} if base == "bf16" else {}
                healthy[base] = convert(src[arch], root / f"{arch}-{base}", reference_text=args.text, **kw)
            rows.setdefault("(untouched)", {})[arch] = gate(src[arch], healthy["fp32"], root / f"run-{arch}")
            for name, (edit, _, base) in sorted(CASES.items()):
                damaged = save_dcp(
                    edit(load_all(healthy[base]), head_dim), root / f"{arch}-{name}", manifest_from=healthy[base]
                )
                rows.setdefault(name, {})[arch] = gate(src[arch], damaged, root / f"run-{arch}-{name}")
        text = args.text or f"default ({DEFAULT_REFERENCE_TEXT.name})"
        print(f"loss gate alone, threshold {THRESHOLD}, reference text {text}; transformers {transformers.__version__}")
        print(f"torch {torch.__version__}; {time.perf_counter() - t0:.0f} s\n")
        print("| damage | " + " | ".join(ARCHS) + " | caught |")
        print("|---|" + "---|" * len(ARCHS) + "---|")
        for name, by_arch in rows.items():
            cells = [f"{d:+.4f} {'caught' if c else 'passed'}" for d, c in (by_arch[a] for a in ARCHS)]
            caught = sum(c for _, c in by_arch.values())
            print(f"| {name} | " + " | ".join(cells) + f" | {caught}/{len(ARCHS)} |")


if __name__ == "__main__":
    main()
