"""Exact, cheap weight checksums that the learner and the rollout engine compute the same way.

vLLM fuses some HF parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj: the model class's
`packed_modules_mapping`). The learner fuses its tensors the same way before hashing, so both
sides hash identical tensors under identical names.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_MODULUS = 65521  # largest prime below 2**16: position weights stay small


# elements hashed at a time: a multiple of the modulus, so every chunk starts at a position
# weight of 1 and shares one precomputed weight vector (8 MB of int64 per device); the int64
# temporaries stay ~16 MB for any tensor
_CHUNK = 16 * _MODULUS
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(_CHUNK, device=device, dtype=torch.int64) % _MODULUS + 1
    return _WEIGHTS[device]


def tensor_checksum(tensor: torch.Tensor) -> int:
    """A position-weighted integer sum of the float32 bit patterns: sum_i bits_i * (i mod 65521 + 1).

    Exact (bit-level: any changed bit changes the sum with overwhelming probability), order
    sensitive (a permutation changes it), computed on the tensor's device, and independent of the
    storage dtype as long as both sides up-cast to float32 (bf16 -> fp32 is exact).
    Integer overflow wraps identically on every device, so the result is deterministic.
    Memory is bounded: the tensor is hashed in chunks of `_CHUNK` elements (inside an engine that
    has reserved its memory, a full int64 copy of a 1 GB embedding would not fit).
    """
    flat = tensor.detach().reshape(-1)  # a copy only when the tensor is a non-contiguous slice
    weights = _position_weights(flat.device)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        total += (chunk.float().view(torch.int32).to(torch.int64) * weights[: chunk.numel()]).sum()
    return int(total.item())


def fuse_like_engine(
    named: "OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor]",
    packed_modules: dict[str, list[str]],
) -> "OrderedDict[str, torch.Tensor]":
    """Map HF names/tensors onto the engine's fused names by concatenating parts along dim 0."""
    part_to_fused = {part: fused for fused, parts in packed_modules.items() for part in parts}
    order = {part: i for parts in packed_modules.values() for i, part in enumerate(parts)}
    groups: "OrderedDict[str, list[tuple[int, torch.Tensor]]]" = OrderedDict()
    for name, tensor in named.items():
        pieces = name.split(".")
        fused_name, rank = name, 0
        for i, piece in enumerate(pieces):
            if piece in part_to_fused:
                fused_name = ".".join(pieces[:i] + [part_to_fused[piece]] + pieces[i + 1 :])
                rank = order[piece]
                break
        groups.setdefault(fused_name, []).append((rank, tensor))
    fused = OrderedDict()
    for name, parts in groups.items():
        parts.sort(key=lambda item: item[0])
        fused[name] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim=0)
    return fused


def checksums(named: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: tensor_checksum(tensor) for name, tensor in named.items() if tensor.numel() > 0}


def narrow_to(tensor: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor | None:
    """The leading `shape` block of `tensor`, or None if it does not fit.

    Engines pad some tensors (vLLM rounds the vocab rows of embeddings up to a multiple of 64);
    the learner's tensor is the unpadded leading block, and only that block is compared.
    """
    if tensor.dim() != len(shape) or any(have < want for have, want in zip(tensor.shape, shape)):
        return None
    for dim, size in enumerate(shape):
        tensor = tensor.narrow(dim, 0, size)
    return tensor


# How an engine tensor maps onto the learner's: a list of pieces (dim, local_start, global_start,
# length), each saying that `length` rows along `dim` starting at `local_start` in the engine's
# tensor hold the learner's rows starting at `global_start`. An unsharded tensor is one piece
# covering the learner's rows (an engine may pad beyond them: vLLM rounds vocab rows up to a
# multiple of 64). A tensor-parallel shard has one piece per fused part (q, k, v of qkv_proj).
Piece = tuple[int, int, int, int]


def held_checksums(named: dict[str, torch.Tensor], layout: dict[str, list[Piece]]) -> dict[str, list[int]]:
    """The engine side: checksums of each piece of each tensor the engine holds."""
    return {name: [tensor_checksum(named[name].narrow(dim, local, length)) for dim, local, _, length in pieces]
            for name, pieces in layout.items() if name in named}


def expected_checksums(named: dict[str, torch.Tensor], layout: dict[str, list[Piece]]) -> dict[str, list[int]]:
    """The learner side: checksums of the rows of its full tensors that each engine piece holds.

    Names the learner has but the layout lacks get an empty list: `diff_checksums` then reports
    them as absent in the engine.
    """
    result = {}
    for name, tensor in named.items():
        if tensor.numel() == 0:
            continue
        sums = []
        for dim, _, start, length in layout.get(name, []):
            fits = dim < tensor.dim() and start + length <= tensor.shape[dim]
            sums.append(tensor_checksum(tensor.narrow(dim, start, length)) if fits else -1)
        result[name] = sums
    return result


def diff_checksums(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Human-readable differences, empty when the two agree exactly."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"{name}: sent by the learner, absent in the engine")
        elif name not in expected:
            problems.append(f"{name}: held by the engine, never sent by the learner")
        elif expected[name] != actual[name]:
            problems.append(f"{name}: checksum {actual[name]} != learner's {expected[name]}")
    return problems

