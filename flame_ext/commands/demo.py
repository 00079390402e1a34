"""``flame-ext demo``: the whole workflow on the embedded tiny OLMo2, in under a minute on a CPU.

convert -> diagnose -> start training twice the way flame does (model built on ``meta``, parallelized,
``to_empty()``, ``post_init()``, then the installed torchtitan's CheckpointManager loads ``step-0``):

1. as flame does it on transformers 4.x, where ``post_init()`` leaves the RoPE ``inv_freq`` buffer as
   ``to_empty()`` left it (uninitialised memory), with ``initial_load_repair_buffers`` off: the guard
   stops the run before step 1 and says why;
2. the same with the repair on: the guard recomputes the buffer, the step-0 loss matches the HF
   reference, and a few training steps run.

With transformers 5.x ``post_init()`` recomputes the buffer, so run 1 puts back what ``to_empty()`` left
(exactly what 4.x keeps) and says so. Single process, CPU; the validating CheckpointManager is the one
for the installed torchtitan generation (0.1.x: flame's; 0.3.x). Exit 0 when both runs behave as above.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flame_ext.command_options import DemoOptions

__all__ = ["run", "TrainResult", "train_flame_shaped"]

STEPS = 3
SEQ_LEN = 256
BATCH = 2
LR = 1e-4


@dataclass
class TrainResult:
    """What one flame-shaped start did: the guard's verdict and, if it passed, the training losses."""

    aborted: bool
    message: str = ""
    report: Any = None
    simulated: bool = False
    left_by_to_empty: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def _say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------- the model


def _flame_model(hf_path: Path, *, simulate_tf4: bool) -> tuple[torch.nn.Module, bool, dict[str, torch.Tensor]]:
    """Build the model as flame's train.py does; returns (model, simulated, what to_empty left in the buffers).

    ``simulate_tf4``: with transformers >= 5, put back into every non-persistent buffer what ``to_empty()``
    left there, after ``post_init()`` recomputed it: the state transformers 4.x leaves the model in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame_ext.checks.nonpersistent_buffers import nonpersistent_buffer_modules
    from flame_ext.io.registry import transformers_major

    config = AutoConfig.from_pretrained(str(hf_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model.apply(lambda m: setattr(m, "_is_hf_initialized", False))  # flame: defer init until after parallelize
    # parallelize: on one rank flame's parallelize_fla applies nothing (no FSDP with dp_shard = 1).
    model.to_empty(device="cpu")
    left = {
        f"{name}.{b}": module.get_buffer(b).clone()
        for name, module, names in nonpersistent_buffer_modules(model)
        for b in names
    }
    with torch.no_grad():
        model.post_init()
    simulated = False
    if simulate_tf4 and transformers_major() >= 5:
        with torch.no_grad():
            for name, module, names in nonpersistent_buffer_modules(model):
                for b in names:
                    module.get_buffer(b).copy_(left[f"{name}.{b}"])
        simulated = True
    model.train()
    return model, simulated, left


# ---------------------------------------------------------------------------------------- one run


def _guard_settings(repair: bool) -> dict[str, Any]:
    """The guard switched on, repair on or off (``GuardConfig`` fields)."""
    return {"validate_initial_load": True, "initial_load_repair_buffers": repair, "initial_load_max_loss_delta": 0.1}


def _batches(hf_path: Path) -> Iterator[torch.Tensor]:
    """Training batches [BATCH, SEQ_LEN] from the bundled corpus, as flame's dataloader gives them."""
    from flame_ext.model.reference_loss import load_tokenizer

    corpus = sorted((Path(__file__).parents[1] / "assets" / "corpus").glob("*.txt"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in corpus)
    ids = load_tokenizer(hf_path)(text, add_special_tokens=False)["input_ids"]
    per_batch = BATCH * SEQ_LEN
    for start in range(0, len(ids) - per_batch + 1, per_batch):
        yield torch.tensor(ids[start : start + per_batch]).view(BATCH, SEQ_LEN)


def train_flame_shaped(
    hf_path: Path,
    dump: Path,
    *,
    repair: bool,
    simulate_tf4: bool,
    steps: int = STEPS,
    on_built: Callable[[TrainResult], None] = lambda r: None,
) -> TrainResult:
    """One flame-shaped start: build, load ``dump/checkpoint/step-0`` with the guard on, then train ``steps``.

    ``on_built`` sees the result (buffers as ``to_empty()`` left them, simulated or not) before the load.
    """
    from flame_ext.errors import InitialLoadValidationError
    from flame_ext.titan.managers import build_checkpoint_manager

    torch.manual_seed(0)
    model, simulated, left = _flame_model(hf_path, simulate_tf4=simulate_tf4)
    training = build_checkpoint_manager([model], dump, guard=_guard_settings(repair), lr=LR, steps=STEPS)
    manager, optimizers, schedulers = training.manager, training.optimizers, training.lr_schedulers
    result = TrainResult(aborted=False, simulated=simulated, left_by_to_empty=left)
    on_built(result)
    try:
        manager.load(step=-1)
    except InitialLoadValidationError as exc:
        result.aborted, result.message, result.report = True, str(exc), exc.report
        return result
    result.report = manager.initial_load_report
    batches = _batches(hf_path)
    for _ in range(steps):
        input_ids = next(batches)
        optimizers.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids.clone()).loss  # flame: labels = input_ids, HF shifts
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizers.step()
        schedulers.step()
        result.losses.append(loss.item())
    return result


# ---------------------------------------------------------------------------------------- the story


class _NoJSONRecord(logging.Filter):
    """The guard's one-line JSON record is for log collectors; the demo shows the same findings as text."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("flame-ext initial-load report:")


@contextmanager
def _quiet_hosts(guard_level: int = logging.INFO) -> Iterator[None]:
    """Show the guard's own log lines, indented; keep torchtitan's, transformers' and DCP's chatter out."""
    import warnings

    from flame_ext.io.hf_logging import transformers_quiet

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("      | %(message)s"))
    handler.addFilter(_NoJSONRecord())
    ours, root = logging.getLogger("flame_ext"), logging.getLogger()
    saved = (ours.level, ours.propagate, root.level)
    ours.addHandler(handler)
    ours.setLevel(guard_level)
    ours.propagate = False
    root.setLevel(logging.ERROR)
    try:
        with transformers_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "torch.distributed ... assuming a single process"
            yield
    finally:
        ours.removeHandler(handler)
        ours.level, ours.propagate, root.level = saved


def _convert(hf_path: Path, step0: Path) -> float:
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    summary = convert_hf_to_dcp(ConvertOptions(model=str(hf_path), checkpoint=str(step0), progress=False, force=True))
    _say(f"    {summary.line()}")
    ref = (summary.manifest or {})["reference"]  # a conversion always records its manifest
    _say(
        f"    HF reference loss {ref['loss_mean']:.4f} nats on {len(ref['token_ids'])}x{ref['seq_len']} tokens, "
        "recorded in flame_ext.json"
    )
    return float(ref["loss_mean"])


def _diagnose(hf_path: Path, step0: Path) -> bool:
    from flame_ext.commands.diagnose import DiagnoseOptions, diagnose

    report = diagnose(DiagnoseOptions(checkpoint=str(step0), model=str(hf_path), values=True, loss=True))
    for line in report.render_text().splitlines():
        _say(f"    {line}")
    return report.ok


def _describe_buffers(left: dict[str, torch.Tensor]) -> str:
    return "; ".join(f"{k} = [{', '.join(f'{v:.3g}' for v in t.flatten()[:3].tolist())}, ...]" for k, t in left.items())


def _run_broken(hf_path: Path, dump: Path) -> bool:
    import transformers

    _say("[3/4] start training as flame does on transformers 4.x, initial_load_repair_buffers = false")
    _say(
        "    meta build -> parallelize (nothing on 1 rank) -> to_empty() -> post_init() -> "
        "CheckpointManager.load(step-0)"
    )

    def built(result: TrainResult) -> None:
        if result.simulated:
            _say(
                f"    SIMULATED: transformers {transformers.__version__} recomputes inv_freq in post_init(); as 4.x "
                "would, "
                "the demo put back what to_empty() left there:"
            )
        else:
            _say(
                f"    transformers {transformers.__version__}: post_init() left the buffers as to_empty() left them "
                "(real, not simulated):"
            )
        _say(f"      {_describe_buffers(result.left_by_to_empty)}")

    with _quiet_hosts(logging.WARNING):
        result = train_flame_shaped(hf_path, dump, repair=False, simulate_tf4=True, on_built=built)
    if not result.aborted:
        _say("    UNEXPECTED: the guard let this run start")
        return False
    kinds = sorted({p.kind for p in result.report.errors}) if result.report is not None else []
    _say(f"    the guard stopped the run before step 1 ({', '.join(kinds) or 'see message'}):")
    for line in result.message.splitlines():
        _say(f"      {line}")
    return "buffer_mismatch" in kinds


def _run_repaired(hf_path: Path, dump: Path, reference: float) -> bool:
    _say("[4/4] the same start with initial_load_repair_buffers = true")
    _say("    (built the same way, buffers left as to_empty() left them; the guard repairs them after the load)")
    with _quiet_hosts():
        result = train_flame_shaped(hf_path, dump, repair=True, simulate_tf4=True)
    if result.aborted:
        _say("    UNEXPECTED: the guard stopped this run:")
        for line in result.message.splitlines():
            _say(f"      {line}")
        return False
    lo = result.report.loss
    _say(
        f"    guard passed: step-0 loss {lo.observed:.4f} vs HF reference {lo.reference:.4f} (delta {lo.delta:+.4f}, "
        f"threshold {lo.threshold})"
    )
    for i, loss in enumerate(result.losses, 1):
        _say(f"    step {i}  loss {loss:.4f}")
    return abs(lo.observed - reference) <= lo.threshold and all(torch.isfinite(torch.tensor(result.losses)))


def _story(work: Path) -> bool:
    import transformers

    from flame_ext import __version__
    from flame_ext.io.hf import DEFAULT_MODEL

    hf_path = DEFAULT_MODEL
    dump = work / "exp"
    step0 = dump / "checkpoint" / "step-0"
    _say(
        f"flame-ext {__version__} demo: transformers {transformers.__version__}, torchtitan "
        f"{_installed('torchtitan')}, "
        f"torch {torch.__version__}; working in {work}"
    )
    _say(f"[1/4] convert: flame-ext convert --model {hf_path} --checkpoint {step0}")
    with _quiet_hosts(logging.ERROR):
        reference = _convert(hf_path, step0)
        _say(f"[2/4] diagnose: flame-ext diagnose --checkpoint {step0} --model {hf_path} --values --loss")
        diagnosed = _diagnose(hf_path, step0)
    stopped = _run_broken(hf_path, dump)
    trained = _run_repaired(hf_path, dump, reference)
    ok = diagnosed and stopped and trained
    _say(
        f"demo {'behaved as expected' if ok else 'did NOT behave as expected'}: checkpoint "
        f"{'clean' if diagnosed else 'NOT clean'}, broken start {'stopped' if stopped else 'NOT stopped'}, "
        f"repaired start {'trained' if trained else 'did NOT train'}"
    )
    return ok


def _installed(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run(opts: DemoOptions) -> int:
    """``flame-ext demo [--workdir DIR]``: 0 when the demo behaved as expected, 1 otherwise."""
    from flame_ext.convert.summary import command_seconds

    if opts.workdir:
        work = Path(opts.workdir)
        shutil.rmtree(work / "exp", ignore_errors=True)  # the demo's own folder from an earlier run
        work.mkdir(parents=True, exist_ok=True)
        ok = _story(work)
    else:
        with tempfile.TemporaryDirectory(prefix="flame-ext-demo-") as tmp:
            ok = _story(Path(tmp))
    _say(f"({command_seconds():.1f} s)")  # the command's wall time, start-up and imports included
    return 0 if ok else 1
