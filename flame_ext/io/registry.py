"""Which model types transformers can build here: its own, plus flash-linear-attention's (fla) when installed.

flame trains fla models (GLA, DeltaNet, RWKV7, ...). transformers knows them only after ``import fla``, whose
model packages register their config and model classes with the Auto classes; flame's own converter starts
with that import. flame-ext does the same, but only when a config asks for a type transformers does not know
or one of fla's, so converting an OLMo never pays for importing fla. fla registers with ``exist_ok=True``, so
for ``mamba`` and ``mamba2`` (types transformers has too) fla's classes win, as they do inside flame.
"""

from __future__ import annotations

import functools
import importlib
import warnings

from flame_ext.errors import InputError, first_line

__all__ = ["FLA_PACKAGE", "FLA_MODEL_TYPES", "fla_install_hint", "register_model_type", "transformers_major"]

FLA_PACKAGE = "flash-linear-attention"

# ``model_type`` of every config class in ``fla.models`` of flash-linear-attention 0.5.2 and 0.6.0 (read from
# their configuration_*.py). Listed here so that a missing fla is named without importing anything; a type
# fla adds later is still found, because an unknown type makes flame-ext try fla when it is installed.
FLA_MODEL_TYPES = frozenset(
    {
        # in 0.5.2 and 0.6.0
        "abc",
        "bitnet",
        "comba",
        "delta_net",
        "deltaformer",
        "forgetting_transformer",
        "gated_deltanet",
        "gated_deltaproduct",
        "gla",
        "gsa",
        "hgrn",
        "hgrn2",
        "kda",
        "lightnet",
        "linear_attn",
        "log_linear_mamba2",
        "mamba",
        "mamba2",
        "mamba3",
        "mesa_net",
        "mla",
        "moba",
        "mom",
        "nsa",
        "parallax",
        "path_attn",
        "raven",
        "retnet",
        "rodimus",
        "rwkv6",
        "rwkv7",
        "samba",
        "transformer",
        "wall_transformer",
        "yoco",
        # new in 0.6.0
        "cat",
        "cyclic_flow_attention",
        "precond_gated_deltanet",
        "precond_kda",
        "stickbreaking_attn",
    }
)


def transformers_major() -> int:
    """The installed transformers' major version: 4.x and 5.x read configs and build models differently."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def fla_install_hint() -> str:
    """The install line for the installed transformers generation (fla 0.6 needs transformers >= 5.6.2)."""
    if transformers_major() >= 5:
        return f"pip install {FLA_PACKAGE}"
    return f"pip install {FLA_PACKAGE}==0.5.2 triton==3.8.0 (fla 0.6 needs transformers >= 5.6.2)"


@functools.cache
def _import_fla() -> str | None:
    """Import ``fla.models`` once (registering its classes); None on success, else why it failed."""
    try:
        with warnings.catch_warnings():
            # "Triton is not supported on current platform, roll back to CPU": true on a CPU machine, and
            # said where it matters (a forward pass that cannot run; see model.reference_loss).
            warnings.simplefilter("ignore")
            importlib.import_module("fla.models")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "fla":
            return "is not installed"
        return f"does not import ({first_line(exc)})"
    except Exception as exc:  # a broken install fails in many ways (a Triton version fla does not fit, ...)
        return f"does not import ({type(exc).__name__}: {first_line(exc)})"
    return None


def register_model_type(model_type: str, source: str) -> None:
    """Make transformers' Auto classes know ``model_type``; call before building a model from a config.

    Imports fla for its model types and for types transformers does not know. Raises ``InputError`` naming
    the package to install when an fla type cannot be built because fla is missing or broken.
    """
    from transformers import CONFIG_MAPPING

    known = model_type in CONFIG_MAPPING
    if model_type not in FLA_MODEL_TYPES and known:
        return
    failure = _import_fla()
    if failure is None or known:
        return  # registered; or fla is absent and transformers builds its own mamba / mamba2
    if model_type in FLA_MODEL_TYPES:
        raise InputError(
            f"{source}: model_type {model_type!r} is a flash-linear-attention (fla) model, and fla {failure}; "
            f"install it: {fla_install_hint()}"
        )
