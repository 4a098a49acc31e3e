"""What both sides of a weight sync compare, and how tensors are packed into buckets (pure torch: no
Ray, no vLLM, so the controller and the tests import it without starting either)."""

from __future__ import annotations

from typing import Any

# ----------------------------------------------------------------------------------------------
# Digests: what both sides compare
# ----------------------------------------------------------------------------------------------
DIGEST_CHUNK_ELEMENTS = 1 << 22


def tensor_digest(t, chunk_elements: int = DIGEST_CHUNK_ELEMENTS) -> tuple[int, float, float]:
    """(numel, float64 sum, float64 sum of squares) of one tensor.

    Taken in chunks of ``chunk_elements``: a float64 copy of the whole tensor and its square
    would be 16 bytes per element at once, 5 GB for Qwen2.5-VL-3B's 151,936 x 2048 embedding,
    on the engine (inside ``load_weights``) and on the learner alike. That spike is what pushed a
    23 GB CI machine over Ray's memory limit during the 3B-shaped weight push. Chunks of 4M
    elements cost 64 MB; both sides chunk the same way, so their sums agree to float64 rounding."""
    import torch

    flat = t.detach().reshape(-1)
    total, total_sq = (
        torch.zeros((), dtype=torch.float64, device=flat.device),
        torch.zeros((), dtype=torch.float64, device=flat.device),
    )
    for start in range(0, flat.numel(), chunk_elements):
        x = flat[start : start + chunk_elements].to(torch.float64)
        total += x.sum()
        total_sq += torch.dot(x, x)
    return int(flat.numel()), float(total), float(total_sq)


def params_checksum(named_params) -> dict:
    """Order-independent totals over ``(name, tensor)`` pairs plus a digest per name."""
    return checksum_of({name: tensor_digest(t) for name, t in named_params})


def checksum_of(per_name: dict) -> dict:
    """The :func:`params_checksum` record of per-name digests already taken."""
    return {
        "numel": sum(v[0] for v in per_name.values()),
        "sum": sum(v[1] for v in per_name.values()),
        "sum_sq": sum(v[2] for v in per_name.values()),
        "per_name": per_name,
    }


def compare_digests(learner: dict, engine: dict | None, rel_tol: float = 1e-9) -> list[str]:
    """Differences between two :func:`params_checksum` results, as readable lines (empty: same).
    Names must match exactly, then each tensor's element count, sum and sum of squares."""
    if engine is None:
        return ["the engine has received no weights through the protocol yet"]
    a, b = learner["per_name"], engine["per_name"]
    out = [f"sent but not received: {n}" for n in sorted(set(a) - set(b))]
    out += [f"received but not sent: {n}" for n in sorted(set(b) - set(a))]
    for n in sorted(set(a) & set(b)):
        (na, sa, qa), (nb, sb, qb) = a[n], b[n]
        if na != nb or abs(sa - sb) > rel_tol * max(1.0, abs(sa)) or abs(qa - qb) > rel_tol * max(1.0, qa):
            out.append(
                f"{n}: learner (numel {na}, sum {sa:.9g}, sum_sq {qa:.9g}) vs engine (numel {nb}, sum {sb:.9g}, sum_sq {qb:.9g})"
            )
    return out


# ----------------------------------------------------------------------------------------------
# Packing (pure torch): named tensors <-> uint8 buckets of about bucket_bytes
# ----------------------------------------------------------------------------------------------
def plan_buckets(meta: list[tuple[str, Any, tuple[int, ...]]], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``meta`` ((name, dtype, shape)) per bucket: consecutive tensors until the next
    would pass ``bucket_bytes``; a tensor larger than that is a bucket of its own. Both sides run
    this on the same metadata, so they cut the stream at the same places."""
    import torch

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, (_, dtype, shape) in enumerate(meta):
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pack(tensors) -> Any:
    """One contiguous uint8 tensor holding ``tensors`` back to back."""
    import torch

    flat = [t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)


def unpack(buf, meta: list[tuple[str, Any, tuple[int, ...]]]) -> list[tuple[str, Any]]:
    """Inverse of :func:`pack` for ``meta`` ((name, dtype, shape) per tensor, in order)."""
    import torch

    sizes = [_numel(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in meta]
    if sum(sizes) != buf.numel():
        raise ValueError(f"bucket holds {buf.numel()} bytes but its metadata describes {sum(sizes)}")
    out, off = [], 0
    for (name, dtype, shape), n in zip(meta, sizes):
        out.append((name, buf[off : off + n].view(dtype).reshape(tuple(shape))))
        off += n
    return out


def _dtype(name: str):
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name in weight update metadata: {name!r}")
    return dt
