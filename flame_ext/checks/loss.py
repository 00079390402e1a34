"""The loss on the reference batch: ``diagnose --loss`` loads the checkpoint the way a trainer does and
compares its loss with the HF model's, as a mean and token by token (``token_delta``). The rules the guard
applies to its own step-0 loss live here too: the per-token figure, the ``loss_gap`` problem with its
positional hints, and the reference batch's vocabulary check.

The model is built on ``meta``, materialised with ``to_empty()`` and filled by
``torch.distributed.checkpoint`` (strict for the model keys the checkpoint holds), exactly the path of
flame and torchtitan. Non-persistent buffers are then set from the config, as the training guard's
repair does, so the loss judges the checkpoint's weights; the hazard that the trainer itself leaves
those buffers wrong is reported separately (``buffers.load_path_hazards``).

The model runs in the dtype the HF reference was measured in, so a healthy checkpoint reproduces the
reference to rounding noise, and a gap above a threshold means the weights compute something else.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flame_ext.checks.nonpersistent_buffers import check_buffers
from flame_ext.errors import ForwardUnavailableError, InputError
from flame_ext.io.dcp import load_state
from flame_ext.io.hf import HFCheckpoint, build_meta_model
from flame_ext.io.hf_logging import transformers_quiet
from flame_ext.io.specs import TensorSpec
from flame_ext.model.reference_loss import per_token_loss, run_forward
from flame_ext.report import LossComparison, Problem, bucket_label

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LossResult",
    "build_like_trainer",
    "load_into",
    "reference_for",
    "check_loss",
    "loss_by_position",
    "token_delta",
    "compare_loss",
    "positional_hint",
    "loss_gap_problem",
    "embedding_rows",
    "model_positions",
    "reference_fit_problem",
]

_FOREIGN_HINT = (
    "diagnose against the model the reference was recorded for, or record one for this model with "
    "`flame-ext reference --model HF --out FILE` and pass it with --reference"
)

logger = logging.getLogger(__name__)


def loss_by_position(observed: torch.Tensor, reference: torch.Tensor, buckets: int = 4) -> list[dict[str, Any]]:
    """Mean observed and reference loss over equal position ranges (columns of the [B, L-1] tables)."""
    n = observed.shape[1]
    edges = [round(i * n / buckets) for i in range(buckets + 1)]
    out = []
    for start, end in zip(edges, edges[1:]):
        if end > start:
            out.append(
                {
                    "start": start,
                    "end": end,
                    "observed": observed[:, start:end].mean().item(),
                    "reference": reference[:, start:end].mean().item(),
                }
            )
    return out


def token_delta(observed: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean |observed - reference| over every predicted token of the [B, n] tables, in nats.

    The mean loss lets errors of opposite sign cancel: one layer's square q_proj transposed in a 4-layer
    Mistral moved the mean by +0.04 nats and each token by 0.24 on average. An absolute difference cannot
    cancel, and averaged over the batch it stays as calm as the mean on a healthy load (rounding noise, a
    few hundredths in bf16: docs/guard.md). Non-finite when any token's loss is: such a load never passes.
    """
    return (observed.double() - reference.double()).abs().mean().item()


def compare_loss(
    observed: torch.Tensor, reference: dict[str, Any], threshold: float, token_threshold: float
) -> LossComparison:
    """Observed per-token loss [B, L-1] against the manifest's reference record: the mean gap is judged
    against ``threshold``, the per-token one (``token_delta``) against ``token_threshold``."""
    for name, value in (("loss threshold", threshold), ("per-token loss threshold", token_threshold)):
        if not (value >= 0 and math.isfinite(value)):
            raise InputError(f"{name} {value}: must be a finite number >= 0")
    ref = torch.tensor(reference["loss_per_token"], dtype=torch.float32)
    if ref.shape != observed.shape:
        raise InputError(f"reference per-token loss has shape {tuple(ref.shape)}, observed {tuple(observed.shape)}")
    return LossComparison(
        reference=float(reference["loss_mean"]),
        observed=observed.float().mean().item(),
        threshold=threshold,
        by_position=loss_by_position(observed.float(), ref),
        first_position_delta=(observed[:, 0].float().mean() - ref[:, 0].mean()).item(),
        curve={"observed": observed.float().mean(0).tolist(), "reference": ref.mean(0).tolist()},
        token_delta=token_delta(observed, ref),
        token_threshold=token_threshold,
    )


def growing_with_position(by_position: list[dict[str, Any]]) -> bool:
    """True when the gap rises across position buckets: the signature of broken positional encoding."""
    gaps = [b["observed"] - b["reference"] for b in by_position]
    return len(gaps) >= 3 and gaps[-1] > gaps[0] + 0.05 and all(b >= a - 0.02 for a, b in zip(gaps, gaps[1:]))


def first_position_right(cmp: LossComparison) -> bool:
    """True when the loss is off overall but not at the first predicted position.

    That position's token attends only to itself: at distance 0 a rotary embedding is the identity and a
    softmax over one key is 1 whatever the query and key, so a fault in positional encoding or in the
    query/key projections leaves it exact, while any other fault (values, outputs, MLPs, norms, embeddings)
    changes it too. Measured on the tiny models: q/k channels in the wrong rotary layout gap 0.25-0.84 nats
    overall and 0 at the first position; the 128-position buckets of ``growing_with_position`` miss it,
    because the damage is complete a few positions in.
    """
    first = cmp.first_position_delta
    gap, threshold = _failed_gap(cmp)
    return (
        first is not None and math.isfinite(first) and math.isfinite(gap) and gap > threshold and abs(first) < 0.1 * gap
    )


def _failed_gap(cmp: LossComparison) -> tuple[float, float]:
    """(the gap that failed, its threshold): the mean's when it fails, else the per-token one."""
    if cmp.mean_ok and not cmp.tokens_ok:
        return cmp.token_delta, cmp.token_threshold  # type: ignore[return-value]
    return abs(cmp.delta), cmp.threshold


def positional_hint(cmp: LossComparison) -> str | None:
    """What the shape of a loss gap says about its cause, when it points at attention; None otherwise."""
    if growing_with_position(cmp.by_position):
        return (
            "the gap grows with position: positional encoding differs from the HF model's (RoPE inv_freq, "
            "rope_theta / rope_scaling in the config, or a q/k projection permuted for another rotary layout)"
        )
    if first_position_right(cmp):
        return (
            "the first position (its token attends only to itself) matches the HF model and later ones do not: "
            "how tokens attend to each other differs: positional encoding (RoPE inv_freq, rope_theta / "
            "rope_scaling, q/k channels in another rotary layout) or the query/key projections"
        )
    return None


@dataclass
class LossResult:
    comparison: LossComparison | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    handler = logging.NullHandler()
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def build_like_trainer(hf: HFCheckpoint, dtype: str, *, trust_remote_code: bool = False) -> "nn.Module":
    """The HF model class on ``meta`` at ``dtype`` (buffers keep the dtype the class gives them), then
    ``to_empty()``: every parameter and buffer is uninitialised memory until something fills it."""
    model = build_meta_model(hf, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.to_empty(device="cpu").eval()


def load_into(
    model: "nn.Module",
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    key_map: dict[str, str],
    *,
    through_hooks: bool = False,
) -> list[str]:
    """``dcp.load`` every model tensor the checkpoint holds (strict: a planned key that cannot be read fails).

    ``through_hooks``: the state dict's tensors are handed back with ``load_state_dict``, for a model whose
    ``state_dict()`` hooks return copies (torchtitan's fused q/k/v splits ``wqkv`` into ``wq``/``wk``/``wv``
    and merges them again on load), as torchtitan's own checkpoint load does.
    Returns the model keys that could not be loaded (absent, or another shape): the caller decides.
    """
    state = model.state_dict()
    wanted: dict[str, torch.Tensor] = {}
    not_loaded = []
    for key, tensor in state.items():
        ckpt_key = key_map.get(key)
        spec = found.get(ckpt_key) if ckpt_key else None
        if spec is None or tuple(spec.shape) != tuple(tensor.shape):
            not_loaded.append(key)
            continue
        wanted[ckpt_key] = tensor  # type: ignore[index]
    load_state(folder, wanted)
    if through_hooks and not not_loaded:
        model.load_state_dict(state)
    return not_loaded


def reference_for(
    hf: HFCheckpoint, manifest: dict[str, Any] | None, *, dtype: str, tokenizer: str | None, trust_remote_code: bool
) -> tuple[dict[str, Any], str]:
    """The HF reference record and where it came from: the manifest's, else measured now from the HF side."""
    ref = (manifest or {}).get("reference")
    if ref is not None:
        return (
            ref,
            f"the recorded HF reference ({ref.get('dtype')}, measured with transformers "
            f"{ref.get('transformers_version', '?')})",
        )
    from flame_ext.checks.tokenizer import has_tokenizer
    from flame_ext.model.reference_loss import compute_reference

    if tokenizer is None and not has_tokenizer(hf.path):
        raise InputError(
            f"--loss: no recorded reference and no tokenizer in {hf.source} to make the reference batch; "
            "pass --tokenizer, or --reference FILE written by `flame-ext reference`"
        )

    with transformers_quiet():
        ref = compute_reference(hf, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer_path=tokenizer)
    return ref, f"the HF model measured now ({ref['dtype']}, default reference text)"


def loss_gap_problem(cmp: LossComparison, *, what: str, next_step: str, values_differ: bool = False) -> Problem:
    """The ``loss_gap`` error: both losses, what the gap's shape says about its cause, then ``next_step``.

    Evidence first: when tensors are known to differ (``values_differ``), they explain the gap, and the
    shape of the gap by position, only a clue, is not offered as a cause.
    """
    if not cmp.mean_ok:
        detail = (
            f"{what} {cmp.observed:.4f} vs HF reference {cmp.reference:.4f}: delta {cmp.delta:+.4f} nats exceeds "
            f"the threshold {cmp.threshold}"
        )
    else:
        detail = (
            f"{what} {cmp.observed:.4f} vs HF reference {cmp.reference:.4f} (delta {cmp.delta:+.4f}, within the "
            f"threshold {cmp.threshold}), but the tokens disagree: mean |per-token loss difference| "
            f"{cmp.token_delta:.4f} nats exceeds the per-token threshold {cmp.token_threshold}; by position: "
            + ", ".join(f"{bucket_label(b)} {b['observed'] - b['reference']:+.4f}" for b in cmp.by_position)
        )
    if values_differ:
        cause = "the loaded weights differ from the expected ones (see the value problems)"
    else:
        cause = positional_hint(cmp) or "the weights compute something else than the HF model"
    return Problem("loss_gap", "error", None, detail, f"{cause}; {next_step}")


def embedding_rows(parts: Iterable[nn.Module]) -> int | None:
    """Rows of the model's largest embedding table (its vocabulary); None when it has no ``nn.Embedding``."""
    rows = [m.num_embeddings for p in parts for m in p.modules() if isinstance(m, torch.nn.Embedding)]
    return max(rows, default=None)


def model_positions(parts: Iterable[nn.Module]) -> int | None:
    """The longest sequence the model's config says it takes (``max_position_embeddings``, GPT-2's
    ``n_positions``); None when the model has no such config (a torchtitan-native model)."""
    for part in parts:
        config = getattr(part, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def reference_fit_problem(
    token_ids: list[list[int]], parts: Iterable[nn.Module], name: str, hint: str
) -> Problem | None:
    """A reference batch the model cannot take, found before any forward pass: a token id it has no embedding
    row for (the batch was made for another tokenizer), or rows longer than its positions (a forward pass
    quadratic in the length, past what the model was built for). The schema already caps any row at
    ``io.manifest_schema.MAX_REFERENCE_TOKENS``; this is the bound of the model at hand."""
    parts = list(parts)
    vocab, positions = embedding_rows(parts), model_positions(parts)
    top = max((max(row) for row in token_ids if row), default=-1)
    length = max((len(row) for row in token_ids), default=0)
    if vocab is not None and top >= vocab:
        detail = (
            f"{name}: reference token id {top} is outside the model's vocabulary of {vocab}: the reference was made "
            "for another tokenizer or model"
        )
    elif positions is not None and length > positions:
        detail = (
            f"{name}: reference rows of {length:,} tokens are longer than the model's max_position_embeddings "
            f"({positions:,}): the reference was made for another model, or with a --reference-seq-len this model "
            "cannot take"
        )
    else:
        return None
    return Problem("manifest", "error", None, detail, hint)


def _device_for(model: "nn.Module") -> torch.device:
    """fla models run where their Triton kernels can (a GPU when there is one); every other model on the CPU,
    where its loss is reproducible to the bit."""
    if type(model).__module__.startswith("fla.") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _available_bytes() -> int | None:
    """Memory the kernel can still give this process (``MemAvailable``); None where /proc/meminfo is not."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _set_buffers_as_the_guard(model: "nn.Module") -> tuple[list[Problem], list[str]]:
    """The guard's buffer repair on the model built on ``meta``: the modules holding non-persistent buffers get
    the memory ``to_empty()`` gives them (their own tensors only: rotary embeddings, no weights), then
    ``check_buffers`` sets each from the config, or says it cannot. Needs no weight and no forward pass."""
    from flame_ext.model.buffer_rebuild import nonpersistent_buffer_modules

    for _, module, _ in list(nonpersistent_buffer_modules(model)):
        module.to_empty(device="cpu", recurse=False)
    # The repairs are stated in the report's notes.
    with _quiet(logging.getLogger("flame_ext.checks.nonpersistent_buffers")):
        return check_buffers(model, repair=True)


def _streamed_losses(sm: Any, token_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-token loss [B, L-1] of the checkpoint streamed block by block; ``NotStreamable`` when a weight is
    used outside its block (the forward reached a ``meta`` tensor)."""
    from flame_ext.model.streamed import NotStreamable

    sm.device = device
    try:
        with sm.hooked():
            return per_token_loss(run_forward(sm.module, token_ids, device), token_ids).cpu()
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" in str(exc).lower():
            raise NotStreamable(str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__) from exc
        raise


def _whole_model_losses(
    hf: HFCheckpoint,
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    key_map: dict[str, str],
    token_ids: torch.Tensor,
    run_dtype: str,
    why: str,
    trust_remote_code: bool,
) -> tuple[torch.Tensor | None, str]:
    """The whole model built, loaded and run as before streaming, for a model that cannot be streamed; with
    the note saying so. None (and why) when it would not fit in the memory this machine has left: a load the
    kernel kills says nothing, so it is not started."""
    from flame_ext.model.streamed import whole_model_bytes

    need = whole_model_bytes(hf, run_dtype)
    available = _available_bytes()
    if available is not None and need > 0.9 * available:
        return None, (
            f"loss not measured: the checkpoint cannot be loaded block by block ({why}), and the whole model needs "
            f"{need / 1e9:.1f} GB at {run_dtype}, more than the {available / 1e9:.1f} GB this machine has available"
        )
    model = build_like_trainer(hf, run_dtype, trust_remote_code=trust_remote_code)
    load_into(model, folder, found, key_map)
    with _quiet(logging.getLogger("flame_ext.checks.nonpersistent_buffers")):
        check_buffers(model, repair=True)  # its problems were reported by _set_buffers_as_the_guard
    device = _device_for(model)
    observed = per_token_loss(run_forward(model.to(device), token_ids, device), token_ids)
    return observed, f"loss computed with the whole model in memory ({need / 1e9:.1f} GB at {run_dtype}): {why}"[:240]


@torch.no_grad()
def check_loss(
    hf: HFCheckpoint,
    folder: str | Path,
    found: dict[str, TensorSpec | None],
    key_map: dict[str, str],
    manifest: dict[str, Any] | None,
    *,
    threshold: float,
    token_threshold: float,
    dtype: str,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    value_problems: bool = False,
    reference_name: str = "the reference",
    on_stage: Callable[[str], None] = lambda s: None,
) -> LossResult:
    """Build as the trainer does, load, repair buffers, run the reference batch, compare; a mean gap above
    ``threshold``, or a per-token one above ``token_threshold``, is an error.

    The checkpoint is loaded and run one block at a time (``CheckpointStreamedModel``: memory is the largest
    block, not the model); a model that cannot be walked that way is loaded whole, and a note says so.
    ``reference_name`` names where ``manifest``'s reference came from, for a problem with it.
    """
    from flame_ext.model.streamed import NotStreamable
    from flame_ext.model.streamed_checkpoint import CheckpointStreamedModel, unloadable_keys

    result = LossResult(None)
    try:
        ref, origin = reference_for(hf, manifest, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    except ForwardUnavailableError as exc:
        ref, origin = None, str(exc)
    run_dtype = str(ref.get("dtype") or dtype) if ref else dtype
    on_stage("building the model on meta as the trainer does")
    sm = CheckpointStreamedModel.build(hf, run_dtype, folder, found, key_map, trust_remote_code=trust_remote_code)
    name = reference_name if (manifest or {}).get("reference") is not None else origin
    foreign = ref and reference_fit_problem(ref["token_ids"], [sm.module], name, _FOREIGN_HINT)
    if foreign:
        result.problems.append(foreign)
        result.notes.append("loss not measured: the reference batch is not for this model")
        return result
    not_loaded = unloadable_keys(sm.module, found, key_map, sm.tied)
    if not_loaded:
        result.notes.append(not_loaded_note(not_loaded))
        return result
    problems, repaired = _set_buffers_as_the_guard(sm.module)
    result.problems.extend(problems)
    if repaired:
        result.notes.append(
            f"set {len(repaired)} non-persistent buffer(s) from the config before the loss, as the guard's repair "
            f"does: {', '.join(repaired)}"
        )
    if ref is None:  # the buffers are checked all the same: they do not need the forward pass
        result.notes.append(f"loss not measured: {origin}; run `flame-ext diagnose --loss` on a machine that can")
        return result
    token_ids = torch.tensor(ref["token_ids"], dtype=torch.long)
    on_stage("loading the checkpoint with torch.distributed.checkpoint and running the reference batch, block by block")
    try:
        observed: torch.Tensor | None
        try:
            observed = _streamed_losses(sm, token_ids, _device_for(sm.module))
            how = f"loaded and run one block at a time (largest block {sm.largest_block / 1e6:,.1f} MB)"
        except NotStreamable as exc:
            on_stage("loading the whole model (it cannot be streamed) and running the reference batch")
            observed, how = _whole_model_losses(
                hf, folder, found, key_map, token_ids, run_dtype, str(exc), trust_remote_code
            )
            if observed is None:
                result.notes.append(how)
                return result
    except ForwardUnavailableError as exc:
        result.notes.append(f"loss not measured: {exc}; run `flame-ext diagnose --loss` on a machine that can")
        return result
    cmp = compare_loss(observed, ref, threshold, token_threshold)
    result.comparison = cmp
    result.notes.append(
        f"loss compared with {origin}, model run in {run_dtype} on {tuple(token_ids.shape)} tokens, {how}"
    )
    if not cmp.ok:
        next_step = (
            "re-convert from the HF source with `flame-ext convert`"
            if value_problems
            else "run with --values to find the tensors that differ, or re-convert with `flame-ext convert`"
        )
        result.problems.append(
            loss_gap_problem(cmp, what="loss on the reference batch", next_step=next_step, values_differ=value_problems)
        )
    return result


def not_loaded_note(not_loaded: list[str]) -> str:
    """Why the loss was not measured when model tensors cannot be loaded from the checkpoint."""
    shown = ", ".join(not_loaded[:3]) + (" ..." if len(not_loaded) > 3 else "")
    return (
        f"loss not measured: {len(not_loaded)} model tensors cannot be loaded from the checkpoint ({shown}); "
        "a trainer's load fails on them (see the key and shape problems)"
    )
