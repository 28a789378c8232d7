"""Swapping a complete weight set into an engine's parameters: by copy, or by adoption.

`copy_into` copies each tensor into the parameter's own storage (one copy per version).
`adopt_into` makes each parameter's storage the given tensor itself (no copy): on the shm
transport those are views into the segment every same-node worker has mapped, so a version
is copied exactly once, by learner rank 0 when it packs the segment.

An adopted parameter's storage is shared with other workers and must never be written. The
caller keeps the names of such "borrowed" parameters in a set both functions update: a copy
into a borrowed parameter first gives it private storage, so a worker served through the
object store after an adoption never writes into the segment the other workers serve from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_complete(version: int, params: Mapping[str, torch.Tensor],
                   named_tensors: Mapping[str, torch.Tensor]) -> None:
    """Every parameter covered, no unknown name: a partial swap would serve mixed versions."""
    unknown = sorted(set(named_tensors) - set(params))
    missing = sorted(set(params) - set(named_tensors))
    if unknown or missing:
        raise KeyError(f"weight update v{version}: unknown names {unknown[:5]}, missing {missing[:5]}")


@torch.no_grad()
def copy_into(version: int, params: Mapping[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor],
              borrowed: set[str]) -> None:
    """Copy every tensor into its parameter's private storage (dtype converted)."""
    check_complete(version, params, named_tensors)
    for name, tensor in named_tensors.items():
        _copy_one(name, params[name], tensor, borrowed)


@torch.no_grad()
def adopt_into(version: int, params: Mapping[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor],
               borrowed: set[str]) -> int:
    """Point each parameter's `.data` at its tensor when shape, dtype and device match (the
    caller guarantees the tensors stay valid and unchanged until the next swap); copy the
    others into private storage. Returns how many were adopted."""
    check_complete(version, params, named_tensors)
    adopted = 0
    for name, tensor in named_tensors.items():
        param = params[name]
        if tensor.shape == param.shape and tensor.dtype == param.dtype and tensor.device == param.device:
            param.data = tensor
            borrowed.add(name)
            adopted += 1
        else:
            _copy_one(name, param, tensor, borrowed)
    return adopted


def _copy_one(name: str, param: torch.Tensor, tensor: torch.Tensor, borrowed: set[str]) -> None:
    if name in borrowed:  # shared with other workers: take private storage, never write theirs
        param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        borrowed.discard(name)
    param.copy_(tensor)
