"""The reference batch and the HF model's loss on it.

The loss a healthy converted checkpoint must reproduce at step 0 is measured once, at conversion, by the
model the user trusts: the HF one, built by transformers from the original files. It is stored per token
so that a later gap can be located by position (a gap that grows with position points at RoPE).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flame_ext.errors import ForwardUnavailableError, InputError, first_line
from flame_ext.io.hf import HFCheckpoint, refuse_remote_code
from flame_ext.io.registry import register_model_type
from flame_ext.io.specs import dtype_name

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_REFERENCE_TEXT",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_ROWS",
    "load_tokenizer",
    "reference_batch",
    "per_token_loss",
    "load_hf_model",
    "forward_unavailable",
    "forward_device",
    "run_forward",
    "compute_reference",
]

DEFAULT_REFERENCE_TEXT = Path(__file__).parents[1] / "assets" / "reference.txt"
DEFAULT_SEQ_LEN = 512
DEFAULT_ROWS = 2


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; one clear error if it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise InputError(
            f"{path}: tokenizer does not load ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
        ) from exc


def read_reference_text(path: str | Path | None) -> str:
    path = Path(path) if path is not None else DEFAULT_REFERENCE_TEXT
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read reference text ({exc})") from exc


def reference_batch(
    tokenizer: Any, text: str, seq_len: int = DEFAULT_SEQ_LEN, rows: int = DEFAULT_ROWS
) -> torch.Tensor:
    """Token ids [rows, seq_len] cut from consecutive stretches of the text (fewer rows if it is short)."""
    if seq_len < 2:
        raise InputError(f"--reference-seq-len {seq_len}: must be at least 2")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)[
        "input_ids"
    ]  # longer than the model: it is cut into rows
    n_rows = min(rows, len(ids) // seq_len)
    if n_rows == 0:
        raise InputError(
            f"reference text: {len(ids)} tokens, fewer than --reference-seq-len {seq_len}; use a longer text or a shorter length"
        )
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def per_token_loss(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy [B, L-1] in float32, as HF's ``labels=`` loss computes it before the mean."""
    logits = logits[:, :-1].float()
    targets = token_ids[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(
        targets.shape
    )


def load_hf_model(hf: HFCheckpoint, *, dtype: str | None, trust_remote_code: bool = False) -> "nn.Module":
    """Materialise the HF model the ordinary way (``from_pretrained``): the trusted side of the comparison."""
    from transformers import AutoModelForCausalLM

    register_model_type(hf.model_type, hf.source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(hf.path), **kwargs)
    return model.eval()


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


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


def forward_device(model: "nn.Module") -> torch.device:
    """Where the reference forward runs: the CPU, except for fla models on a machine with a GPU, whose Triton
    kernels run only there (the CPU keeps every other model's reference exactly reproducible)."""
    if type(model).__module__.startswith("fla.") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_forward(model: "nn.Module", token_ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` on ``token_ids`` (moved to ``forward_device`` first); ``ForwardUnavailableError``
    when this machine cannot run it."""
    device = forward_device(model)
    model.to(device)
    try:
        return model(token_ids.to(device)).logits
    except RuntimeError as exc:
        reason = forward_unavailable(exc)
        if reason is None:
            raise
        name = type(model).__name__
        raise ForwardUnavailableError(f"{name} cannot run a forward pass on this machine: {reason}") from exc


@torch.no_grad()
def compute_reference(
    hf: HFCheckpoint,
    *,
    text_path: str | Path | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run the HF model once on the reference batch; the manifest's ``reference`` record."""
    import transformers

    refuse_remote_code(hf, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path or hf.path, trust_remote_code=trust_remote_code)
    text = read_reference_text(text_path)
    token_ids = reference_batch(tokenizer, text, seq_len)
    model = load_hf_model(hf, dtype=dtype, trust_remote_code=trust_remote_code)
    losses = per_token_loss(run_forward(model, token_ids), token_ids)
    return {
        "token_ids": token_ids.tolist(),
        "seq_len": seq_len,
        "loss_mean": losses.mean().item(),
        "loss_per_token": [[round(x, 6) for x in row] for row in losses.tolist()],
        "dtype": dtype_name(next(model.parameters()).dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "text": str(text_path) if text_path else "default",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
