"""torchtitan's own models (llama3, qwen3, deepseek_v3, ...): the model a run trains, chosen as torchtitan's CLI
chooses it, with its state-dict adapter.

``--layout torchtitan:<module> --titan-config <function>`` names what the run passes as ``--module <module>
--config <function>``; the module is resolved by torchtitan's own ``ConfigManager`` (a short name such as
``llama3``, or a dotted path to a module with a ``config_registry``). What a conversion needs from it: the keys,
shapes and dtypes the model's ``state_dict()`` asks for (the model built on ``meta``, no memory), and the model's
``StateDictAdapter`` (``from_hf`` / ``to_hf``), which is the only mapping used: flame-ext has no key table of its
own.

torchtitan 0.1 (flame's pin) has no state-dict adapters: the native layout is refused there, with one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flame_ext.errors import InputError
from flame_ext.io.specs import TensorSpec, dtype_name

__all__ = ["NATIVE_PREFIX", "NativeModel", "is_native", "native_module", "resolve_native"]

NATIVE_PREFIX = "torchtitan:"


def is_native(layout: str | None) -> bool:
    """True for ``torchtitan:<module>``: keys as torchtitan's own model names them."""
    return bool(layout) and str(layout).startswith(NATIVE_PREFIX)


def native_module(layout: str) -> str:
    """``llama3`` for ``torchtitan:llama3``; refuses an empty module name."""
    module = layout[len(NATIVE_PREFIX) :]
    if not module:
        raise InputError(f"--layout {layout!r}: name torchtitan's model module, e.g. torchtitan:llama3")
    return module


@dataclass
class NativeModel:
    """A torchtitan model as a run configures it: where it was found, its spec and its adapter."""

    module: str  # as given: ``llama3`` or a dotted path
    config: str  # the config function (torchtitan's ``--config``)
    name: str  # ModelSpec.name
    flavor: str  # ModelSpec.flavor
    model_config: Any  # the model's BaseModel.Config
    adapter: Any  # an instance of the model's state-dict adapter

    @property
    def layout(self) -> str:
        return NATIVE_PREFIX + self.module

    def record(self) -> dict[str, str]:
        """What the manifest records of the native model."""
        import torchtitan

        return {
            "module": self.module,
            "config": self.config,
            "name": self.name,
            "flavor": self.flavor,
            "adapter": type(self.adapter).__name__,
            "torchtitan_version": getattr(torchtitan, "__version__", "unknown"),
        }

    def meta_model(self) -> torch.nn.Module:
        """The model built on ``meta`` as the trainer builds it (no memory, no init)."""
        with torch.device("meta"):
            return self.model_config.build()

    def tied(self) -> bool:
        return bool(getattr(self.model_config, "enable_weight_tying", False))


def state_specs(model: torch.nn.Module) -> dict[str, TensorSpec]:
    """Every key the model's ``state_dict()`` holds (what a torchtitan load asks for), with shape and dtype."""
    return {k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in model.state_dict().items()}


def _refuse_old_torchtitan() -> None:
    try:
        found = importlib.util.find_spec("torchtitan.protocols.state_dict_adapter")
    except ModuleNotFoundError:
        found = None
    if found is None:
        import importlib.metadata as md

        try:
            version = md.version("torchtitan")
        except md.PackageNotFoundError:
            raise InputError(
                "--layout torchtitan:<module> needs torchtitan >= 0.3 installed (pip install 'flame-ext[titan]')"
            ) from None
        raise InputError(
            f"--layout torchtitan:<module> needs torchtitan >= 0.3: the installed torchtitan {version} has no "
            "state-dict adapters to map HF names to its models' own (for torchtitan 0.1 and flame, convert with "
            "HF names: --layout flat)"
        )


def resolve_native(layout: str, config: str | None, hf_assets_path: str | None) -> NativeModel:
    """The model ``--module <module> --config <config>`` would train, and its adapter; refuses in one line."""
    module = native_module(layout)
    _refuse_old_torchtitan()
    if not config:
        raise InputError(
            f"--layout {layout} needs --titan-config: the config function the run passes as torchtitan's --config "
            f"(e.g. --titan-config {module.rsplit('.', 1)[-1]}_debugmodel)"
        )
    from torchtitan.config.manager import ConfigManager

    with _quiet():
        try:
            trainer_config = ConfigManager().parse_args(["--module", module, "--config", config])
        except (ImportError, ValueError, SystemExit) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"--layout {layout} --titan-config {config}: torchtitan cannot load it: {first}") from None
        spec = getattr(trainer_config, "model_spec", None)
        if spec is None or getattr(spec, "state_dict_adapter", None) is None:
            raise InputError(
                f"--layout {layout} --titan-config {config}: the model has no state-dict adapter (ModelSpec."
                "state_dict_adapter), so torchtitan itself cannot map HF weights to it"
            )
        adapter = spec.state_dict_adapter(spec.model, hf_assets_path)
    return NativeModel(module, config, spec.name, spec.flavor, spec.model, adapter)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchtitan's log lines and warnings while its training config is built (about the training run, e.g. "HF
    assets path ... does not exist"), not about this conversion: held back."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
