"""A trained network as the dense baseline: weights from a file or an MLflow model, loaded strictly into ``net``.

``dense.checkpoint`` may name:

- a state dict file (``.pt``/``.pth``), also one that keeps it under ``state_dict`` or ``model_state_dict``, or with
  every key prefixed ``net.``/``model.``/``module.``/``_orig_mod.`` (a LightningModule's attribute, DataParallel,
  ``torch.compile``);
- a Lightning checkpoint (``.ckpt``: its ``state_dict``);
- an MLflow model: ``runs:/<run id>/model``, ``models:/<name>/<version>``, another artifact URI, or a local folder
  holding an ``MLmodel`` file (loaded with ``mlflow.pytorch.load_model``; its state dict is taken).

Keys match either ``net`` or, when gray data feeds it through :class:`~prunelab.models.factory.RepeatChannels`, the
network inside, so a checkpoint of the bare network fits the adapted one and the other way round.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from prunelab.models.factory import unwrap

log = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model_state_dict")
_PREFIXES = ("net.", "model.", "module.", "_orig_mod.")
_SHOWN = 5  # mismatching keys named in an error


def _is_mlflow(source: str) -> bool:
    path = Path(source).expanduser()
    return source.startswith(("runs:/", "models:/")) or "://" in source or (path / "MLmodel").is_file()


def _load_mlflow(source: str, key: str) -> Any:
    from mlflow.exceptions import MlflowException

    from prunelab.tracking.runs import model_log  # noqa: F401 - imports mlflow.pytorch, keeping the root logger as it was

    try:
        return mlflow.pytorch.load_model(source, map_location="cpu")
    except (MlflowException, OSError) as exc:
        raise ValueError(f"{key}: no MLflow model could be loaded from it ({type(exc).__name__}: {exc})") from exc


def _load_file(source: str, key: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such file ({path.resolve()})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # a Lightning checkpoint may hold objects beyond tensors (hyper-parameters, callback state): the user named
        # this file as their own model, so it is unpickled in full
        log.warning("%s holds objects other than tensors; loading it with full unpickling", key)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{key}: not a PyTorch file ({type(exc).__name__}: {exc})") from exc


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) or str(k).endswith("_extra_state") for k, v in obj.items())
    )


def read_state_dict(source: str, key: str = "dense.checkpoint") -> dict[str, torch.Tensor]:
    """The state dict that ``source`` holds, keys as saved (see the module docstring for what it may be).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: neither a state dict, a checkpoint holding one, a module nor an MLflow model.
    """
    key = f"{key}={source}"
    obj = _load_mlflow(source, key) if _is_mlflow(source) else _load_file(source, key)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict)), obj)
    if not _is_state(obj):
        raise ValueError(
            f"{key} holds a {type(obj).__name__} without a state dict (tensors by name), a Lightning "
            f"checkpoint or an nn.Module"
        )
    return obj


def _strip(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state`` and its versions with one, two, ... common prefixes of :data:`_PREFIXES` removed."""
    versions = [state]
    while True:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in versions[-1])), None)
        if prefix is None:
            return versions
        versions.append({k[len(prefix) :]: v for k, v in versions[-1].items()})


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _mismatch(state: dict[str, torch.Tensor], target: nn.Module) -> str:
    """What keeps ``state`` from loading strictly into ``target`` ("" when it fits)."""
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        return "; ".join(
            part
            for part in (
                f"missing keys {_shown(missing)}" if missing else "",
                f"unexpected keys {_shown(unexpected)}" if unexpected else "",
            )
            if part
        )
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    return f"shape mismatch {_shown(shapes)}" if shapes else ""


def load_dense_checkpoint(source: str, net: nn.Module) -> dict[str, torch.Tensor]:
    """Load the weights ``source`` names into ``net``, strictly (every key, every shape).

    Args:
        source: the ``dense.checkpoint`` value: a file or an MLflow model URI (module docstring).
        net: the network built for the run.

    Returns:
        ``net``'s state dict after loading (CPU copies), as the dense cache holds it.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unreadable source, or weights that do not fit ``net``; names ``dense.checkpoint=<source>``
            and the first mismatching keys or shapes.
    """
    state = read_state_dict(source)
    targets = [net] if unwrap(net) is net else [net, unwrap(net)]
    pairs = [(target, version) for target in targets for version in _strip(state)]
    # the pair whose keys agree best; its mismatch (if any) is the one worth reporting
    target, version = max(pairs, key=lambda p: len(set(p[1]) & set(p[0].state_dict())))
    problem = _mismatch(version, target)
    if problem:
        raise ValueError(f"dense.checkpoint={source} does not fit the model ({type(unwrap(net)).__name__}): {problem}")
    target.load_state_dict(version, strict=True)
    log.info("dense baseline: weights from %s", source)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
