"""The reference batch and the HF model's loss on it.

The loss a healthy converted checkpoint must reproduce at step 0 is measured once, at conversion, by the
model the user trusts: the HF one, built by transformers from the original files. It is stored per token
so that a later gap can be located by position (a gap that grows with position points at RoPE).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flame_ext.command_options import check_device
from flame_ext.errors import CheckpointFormatError, ForwardUnavailableError, InputError, first_line
from flame_ext.io.hf import HFCheckpoint, refuse_remote_code
from flame_ext.io.registry import register_model_type

if TYPE_CHECKING:
    from torch import nn

    from flame_ext.model.streamed import StreamedModel

__all__ = [
    "DEFAULT_REFERENCE_TEXT",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_ROWS",
    "load_tokenizer",
    "reference_batch",
    "per_token_loss",
    "load_hf_model",
    "forward_unavailable",
    "run_forward",
    "compute_reference",
    "prepare_reference",
    "reference_record",
    "ReferenceForward",
    "ReferenceStopped",
    "read_reference_text",
    "TOKENIZER_FILES",
    "has_tokenizer",
    "NonFiniteReference",
    "MAX_TEXT_BYTES",
]

# Prose, code, tables, arithmetic and a dozen languages interleaved in short passages, so that the first
# 1024 tokens of a byte-level tokenizer already cover five kinds of text (see assets/corpus/SOURCE.md).
DEFAULT_REFERENCE_TEXT = Path(__file__).parents[1] / "assets" / "reference_mixed.txt"
DEFAULT_SEQ_LEN = 512
DEFAULT_ROWS = 2
MAX_TEXT_BYTES = 8 * 1024 * 1024


class NonFiniteReference(CheckpointFormatError):
    """The HF model's loss on the reference batch is NaN or Inf: there is no reference to record."""


# The files one of transformers' tokenizer classes loads from; a model folder may have none of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a folder holds tokenizer files at all (an HF model folder need not)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; one clear error if it does not load, saying what to do when the folder has no
    tokenizer files (transformers says only "Couldn't instantiate the backend tokenizer from one of: ")."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not has_tokenizer(path):
        raise InputError(
            f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}), and the reference batch is text "
            "cut into tokens by the model's own tokenizer: copy the tokenizer files from where the model came from "
            "into this folder, or name a folder that has them (diagnose --tokenizer DIR); `flame-ext convert "
            "--no-reference` converts without the reference loss"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise InputError(
            f"{path}: tokenizer does not load ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
        ) from exc


def read_reference_text(path: str | Path | None) -> str:
    """The reference text: a regular UTF-8 file, of which the first ``MAX_TEXT_BYTES`` are used (the batch
    needs a few thousand tokens; a device such as /dev/zero, or a FIFO, would never end)."""
    path = Path(path) if path is not None else DEFAULT_REFERENCE_TEXT
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(f"--reference-text {path}: not a regular file; give a text file")
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES)
        # A cut in the middle of a character drops that character only.
        return raw.decode("utf-8", errors="ignore" if len(raw) == MAX_TEXT_BYTES else "strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--reference-text {path}: cannot read reference text ({str(exc)[:160]})") from exc


def reference_batch(
    tokenizer: Any, text: str, seq_len: int = DEFAULT_SEQ_LEN, rows: int = DEFAULT_ROWS
) -> torch.Tensor:
    """Token ids [rows, seq_len] cut from consecutive stretches of the text (fewer rows if it is short)."""
    if seq_len < 2:
        raise InputError(f"--reference-seq-len {seq_len}: must be at least 2")
    if rows < 1:
        raise InputError(f"--reference-rows {rows}: must be at least 1")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)[
        "input_ids"
    ]  # longer than the model: it is cut into rows
    n_rows = min(rows, len(ids) // seq_len)
    if n_rows == 0:
        raise InputError(
            f"reference text: {len(ids)} tokens, fewer than --reference-seq-len {seq_len}; "
            "use a longer text or a shorter length"
        )
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def per_token_loss(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy [B, L-1] in float32, as HF's ``labels=`` loss computes it before the mean.

    One row at a time: the float32 copy of a row's logits is what this holds at once (205 MB for a
    100k vocabulary at 512 tokens), not the batch's. Each token's loss depends on its own logits only, so
    the result is the same as the whole batch at once.
    """
    targets = token_ids[:, 1:].to(logits.device)
    rows = [F.cross_entropy(logits[i, :-1].float(), targets[i], reduction="none") for i in range(logits.shape[0])]
    return torch.stack(rows)


def load_hf_model(hf: HFCheckpoint, *, dtype: str | None, trust_remote_code: bool = False) -> "nn.Module":
    """Materialise the HF model the ordinary way (``from_pretrained``): the trusted side of the comparison."""
    from transformers import AutoModelForCausalLM

    register_model_type(hf.model_type, hf.source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        # ``dtype`` since transformers 4.56 (4.57 warns on ``torch_dtype`` on stderr); ``torch_dtype`` before.
        kwargs["dtype" if _transformers_version() >= (4, 56) else "torch_dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(hf.path), **kwargs)
    return model.eval()


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def reference_device(name: str) -> torch.device:
    """``--reference-device`` (checked by ``check_device``): auto is the GPU when torch sees one, else the CPU."""
    check_device(name)
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _losses_whole(
    hf: HFCheckpoint, token_ids: torch.Tensor, dtype: str, trust_remote_code: bool, device: torch.device | None = None
) -> tuple[torch.Tensor, str | None]:
    model = load_hf_model(hf, dtype=dtype, trust_remote_code=trust_remote_code).to(device or "cpu")
    logits = run_forward(model, token_ids, device or "cpu")
    return per_token_loss(logits, token_ids).cpu(), getattr(model.config, "_attn_implementation", None)


def _meta_reached(exc: BaseException) -> bool:
    """A weight used outside the block that holds it: the forward touched a ``meta`` tensor."""
    return isinstance(exc, (RuntimeError, NotImplementedError)) and "meta" in str(exc).lower()


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


class ReferenceStopped(Exception):
    """The streamed forward was stopped between blocks because the work beside it failed or was interrupted."""


@dataclass
class ReferenceForward:
    """One reference forward, in three steps so that a converter can run it beside its writer.

    ``prepare`` builds the model on ``meta`` and reads no weights (on the main thread: building changes
    torch's process-wide default dtype). ``run`` streams the weights block by block and may run on another
    thread; ``before_block`` may raise to stop it between blocks. ``losses`` gives the result, and loads the
    whole model for a model that could not be streamed (notes say so, with the memory it took).
    """

    hf: HFCheckpoint
    token_ids: torch.Tensor
    dtype: str
    device: torch.device
    trust_remote_code: bool = False
    streamed: "StreamedModel | None" = None
    not_streamable: str | None = None
    result: tuple[torch.Tensor, str | None] | None = None

    @classmethod
    def prepare(
        cls, hf: HFCheckpoint, token_ids: torch.Tensor, dtype: str, *, trust_remote_code: bool, device: torch.device
    ) -> "ReferenceForward":
        from flame_ext.model.streamed import NotStreamable, build_streamed

        fwd = cls(hf, token_ids, dtype, device, trust_remote_code)
        try:
            fwd.streamed = build_streamed(hf, dtype, trust_remote_code=trust_remote_code, device=device)
        except NotStreamable as exc:
            fwd.not_streamable = _reason(exc)
        return fwd

    @torch.no_grad()
    def run(self, before_block: Callable[[], None] | None = None) -> None:
        """The streamed forward; a model found not streamable is left for ``losses`` to load whole."""
        from flame_ext.model.streamed import NotStreamable

        sm, self.streamed = self.streamed, None  # the meta model goes with this call
        if sm is None:
            return
        sm.before_block = before_block
        try:
            with sm.hooked():
                logits = run_forward(sm.module, self.token_ids, self.device)
                losses = per_token_loss(logits, self.token_ids).cpu()
            self.result = losses, getattr(sm.module.config, "_attn_implementation", None)
        except (NotStreamable, RuntimeError, NotImplementedError) as exc:
            if not isinstance(exc, NotStreamable) and not _meta_reached(exc):
                raise
            self.not_streamable = _reason(exc)

    @torch.no_grad()
    def losses(self) -> tuple[torch.Tensor, str | None, list[str]]:
        """Per-token loss [B, L-1], the attention implementation, and notes."""
        from flame_ext.model.streamed import whole_model_bytes

        if self.result is not None:
            return *self.result, []
        losses, attn = _losses_whole(self.hf, self.token_ids, self.dtype, self.trust_remote_code, self.device)
        size = whole_model_bytes(self.hf, self.dtype) / 1e9
        note = (
            f"reference loss computed with the whole model in memory ({size:.1f} GB at {self.dtype}); "
            f"cannot stream: {self.not_streamable}"
        )
        return losses, attn, [note[:240]]


def reference_losses(
    hf: HFCheckpoint,
    token_ids: torch.Tensor,
    dtype: str,
    *,
    trust_remote_code: bool = False,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, str | None, list[str]]:
    """Per-token loss [B, L-1] of the HF model at ``dtype``, its attention implementation, and notes.

    Streamed block by block (memory: the largest block, not the model); a model that cannot be walked
    that way is loaded whole, and the note says so with what it costs.
    """
    fwd = ReferenceForward.prepare(
        hf, token_ids, dtype, trust_remote_code=trust_remote_code, device=device or torch.device("cpu")
    )
    fwd.run()
    return fwd.losses()


_NO_TRITON_DRIVER = re.compile(r"^0 active drivers \(\[\]\)")  # triton.runtime.driver with no GPU backend


def forward_unavailable(exc: BaseException) -> str | None:
    """Why a forward pass that raised ``exc`` cannot run on this machine at all, or None for any other failure.

    Recognises exactly one failure: Triton asked for its active driver where there is none (no GPU), which
    is how fla's kernels fail on a CPU-only machine. Everything else is a real error and stays one.
    """
    if isinstance(exc, ForwardUnavailableError):
        return str(exc)
    if isinstance(exc, RuntimeError) and _NO_TRITON_DRIVER.match(str(exc)):
        return f"its Triton kernels need a GPU, and Triton finds none on this machine ({first_line(exc)})"
    return None


def run_forward(model: "nn.Module", token_ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The logits of ``model`` on ``token_ids`` (no KV cache: a cache would keep every layer's keys and values);
    ``ForwardUnavailableError`` when this machine cannot run it."""
    try:
        return model(token_ids.to(device), use_cache=False).logits
    except RuntimeError as exc:
        reason = forward_unavailable(exc)
        if reason is None:
            raise
        name = type(model).__name__
        raise ForwardUnavailableError(f"{name} cannot run a forward pass on this machine: {reason}") from exc


def prepare_reference(
    hf: HFCheckpoint,
    *,
    text_path: str | Path | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    rows: int = DEFAULT_ROWS,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_path: str | Path | None = None,
    device: str = "cpu",
) -> ReferenceForward:
    """Tokenizer, reference batch and the model on ``meta``: everything before the first weight is read.
    Bad input (remote code, tokenizer, text) is refused here."""
    refuse_remote_code(hf, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path or hf.path, trust_remote_code=trust_remote_code)
    token_ids = reference_batch(tokenizer, read_reference_text(text_path), seq_len, rows)
    return ReferenceForward.prepare(
        hf,
        token_ids,
        dtype or hf.torch_dtype or "float32",
        trust_remote_code=trust_remote_code,
        device=reference_device(device),
    )


def reference_record(fwd: ReferenceForward, text_path: str | Path | None = None) -> dict[str, Any]:
    """The manifest's ``reference`` record of a forward that ran (``notes`` says how, when it could not stream)."""
    import transformers

    losses, attn, notes = fwd.losses()
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        raise NonFiniteReference(
            f"{fwd.hf.source}: the HF model's loss on the reference batch is NaN or Inf at {bad} of "
            f"{losses.numel()} positions ({fwd.dtype}); check its weights, or record the reference at float32"
        )
    return {
        "token_ids": fwd.token_ids.tolist(),
        "seq_len": fwd.token_ids.shape[1],
        "loss_mean": losses.mean().item(),
        "loss_per_token": [[round(x, 6) for x in row] for row in losses.tolist()],
        "dtype": fwd.dtype,
        "attn_implementation": attn,
        "device": fwd.device.type,
        "text": str(text_path) if text_path else "default",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "notes": notes,
    }


def compute_reference(hf: HFCheckpoint, **options: Any) -> dict[str, Any]:
    """Run the HF model once on the reference batch; the manifest's ``reference`` record. ``options`` are
    ``prepare_reference``'s (text_path, seq_len, rows, dtype, trust_remote_code, tokenizer_path, device)."""
    fwd = prepare_reference(hf, **options)
    fwd.run()
    return reference_record(fwd, options.get("text_path"))
