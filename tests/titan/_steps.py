"""Training steps and step folders for the resume tests: a real optimizer step, a saved run, a step folder
damaged after its save (its DCP rewritten with one value changed, its flame_ext.json kept)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def train_step(model: torch.nn.Module, manager: Any, seed: int = 0) -> None:
    """One real step: loss on a fixed random batch, backward, the manager's own optimizers and schedulers."""
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizers = manager.states["optimizer"]
    optimizers.step()
    optimizers.zero_grad()
    manager.states["lr_scheduler"].step()
    manager.states["train_state"].step += 1


def read_step(folder: Path) -> dict[str, Any]:
    """Every entry of a step folder (tensors and the pickled non-tensor states), flat DCP keys."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    sd: dict[str, Any] = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
        for k, m in metadata.items()
    }
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def rewrite_step(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of step folder ``src`` whose DCP files are rewritten after ``edit`` changed the entries in place;
    every other file (the save-time record) copied as it was."""
    sd = read_step(src)
    edit(sd)
    dst.mkdir(parents=True)
    dcp.save(sd, checkpoint_id=str(dst), no_dist=True)
    for extra in Path(src).iterdir():
        if extra.suffix not in (".distcp",) and extra.name != ".metadata":
            shutil.copy2(extra, dst / extra.name)
    return dst


def key_ending(keys: Any, suffix: str, prefix: str = "") -> str:
    """The one key that ends with ``suffix`` (and starts with ``prefix``): 0.1 nests the model under ``model.``."""
    found = [k for k in keys if k.endswith(suffix) and k.startswith(prefix)]
    assert len(found) == 1, (suffix, found)
    return found[0]
