"""Tensor fingerprints: a few float64 sums that say whether a tensor arrived exactly as it was written.

One fingerprint is ``len(TERMS)`` numbers, computed on the values as stored (after any dtype cast):

* ``nonfinite``: how many values are NaN or inf (those count as 0 in every sum below);
* ``sum``, ``sum_sq``, ``sum_abs``: what the values are, whatever their order;
* six position-weighted sums, with weights computed from each value's GLOBAL row index ``i`` and column
  index ``j`` (trailing dimensions flattened into columns; a 1-D tensor has one column):
  ``sum x p(i)``, ``sum x q(i)``, ``sum x p(j)``, ``sum x q(j)``, ``sum x p(i) q(j)``, ``sum x q(i) p(j)``.
  ``p`` and ``q`` are two Weyl sequences, ``2 frac((k + 1) a) - 1`` with ``a`` the golden ratio and
  ``sqrt(2)`` (no two indices below 2^30 share a weight). They see where each value sits: swapped rows
  move the row terms, swapped columns the column terms, and the mirrored pairs give the fingerprint of the
  transpose from the same numbers.

Every term is a sum over elements, so the fingerprint of a tensor is the sum of the fingerprints of any
blocks that tile it, each computed with the block's global offsets: an FSDP/TP rank computes its part from
its local shard and one all-reduce (sum) gives the single-process value. Only float64 summation order
differs, which ``TOLERANCE`` covers (see docs/fingerprints.md for the measurement).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = [
    "ALGORITHM",
    "TERMS",
    "TOLERANCE",
    "TRAINING_DTYPES",
    "Recorder",
    "as_record",
    "fingerprint",
    "block_fingerprint",
    "block_fingerprints",
    "exact_widening",
    "rounding_dtypes",
    "local_fingerprint",
    "matches",
    "transposed",
]

ALGORITHM = "flame-ext-weyl-v1"
TERMS = (
    "nonfinite",
    "sum",
    "sum_sq",
    "sum_abs",
    "row_p",
    "row_q",
    "col_p",
    "col_q",
    "row_p_col_q",
    "row_q_col_p",
)
# Relative to each term's scale (sum_abs for the linear terms, sum_sq for itself). Measured float64
# summation-order differences (whole tensor against 3x3 blocks or two workers: 2.4e-15; against the chunking
# of the first release, which wrote the manifests already out there: 1.9e-14) on 4096 x 11008 and other
# shapes (bench/bench_fingerprint.py); 1e-11 leaves 500x margin and still sees one value changed by 2% of
# the mean |x| in a 7B-sized projection.
TOLERANCE = 1e-11
_P, _Q = (math.sqrt(5) - 1) / 2, math.sqrt(2) - 1
# Values per float64 chunk (1 MB): the chunk, its source and the accumulators stay in one core's 2 MB L2 cache
# (2^18 values spilled out of it: each pass then ran ~1.7x slower, measured on this project's CPU).
_CHUNK = 1 << 17
# On an accelerator the sums run where the tensor lives (no copy to the host); each chunk costs a few kernel
# launches there, so chunks are larger: 32 MB of float64, small beside any model that needs a GPU.
_DEVICE_CHUNK = 1 << 22


def _chunk_values(device: torch.device) -> int:
    return _CHUNK if device.type == "cpu" else _DEVICE_CHUNK


_LINEAR = [i for i, t in enumerate(TERMS) if t not in ("nonfinite", "sum_sq", "sum_abs")]
_MIRROR = {"row_p": "col_p", "row_q": "col_q", "row_p_col_q": "row_q_col_p"}


def _weights(index: torch.Tensor) -> torch.Tensor:
    """[len(index), 2]: p and q at the given global indices (float64, identical whichever block asks), on
    ``index``'s device."""
    k = index.to(torch.float64) + 1
    return torch.stack([torch.frac(k * _P), torch.frac(k * _Q)], dim=1) * 2 - 1


def _row_weights(row0: int, rows: int, device: torch.device) -> torch.Tensor:
    """[3, rows]: 1, p(i), q(i) for the global rows ``row0 ...``; built once per block, sliced per chunk."""
    w = torch.ones((3, rows), dtype=torch.float64, device=device)
    w[1:] = _weights(torch.arange(row0, row0 + rows, device=device)).t()
    return w


def _columns(global_shape: Sequence[int], local_shape: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """The global flattened column index of each local column (trailing dims flattened, row-major)."""
    if len(global_shape) <= 1:
        return torch.zeros(1, dtype=torch.long)
    index = torch.zeros((), dtype=torch.long)
    for d in range(1, len(global_shape)):
        index = index.unsqueeze(-1) * global_shape[d] + (offsets[d] + torch.arange(local_shape[d]))
    return index.reshape(-1)


def exact_widening(narrow: str, wide: str) -> bool:
    """Whether every value of dtype ``narrow`` (NaN and inf included) is also a value of ``wide``, so that a
    cast from one to the other is exact by construction (bf16 -> fp32, fp16 -> fp32; a dtype to itself).

    Floating point: ``wide`` has at least the precision, the range and the smallest subnormal of ``narrow``.
    Integers: ``wide``'s range holds ``narrow``'s. Never between the two kinds."""
    if narrow == wide:
        return True
    a, b = getattr(torch, narrow, None), getattr(torch, wide, None)
    if not isinstance(a, torch.dtype) or not isinstance(b, torch.dtype) or a.is_complex or b.is_complex:
        return False
    if a.is_floating_point != b.is_floating_point or torch.bool in (a, b):
        return False
    if a.is_floating_point:
        fa, fb = torch.finfo(a), torch.finfo(b)
        return fb.eps <= fa.eps and fb.max >= fa.max and fb.smallest_normal * fb.eps <= fa.smallest_normal * fa.eps
    ia, ib = torch.iinfo(a), torch.iinfo(b)
    return ib.min <= ia.min and ib.max >= ia.max


# The dtypes a trainer holds parameters in: a record verifies a load at any of them exactly.
TRAINING_DTYPES = ("float32", "bfloat16", "float16")


def rounding_dtypes(stored: str) -> tuple[str, ...]:
    """The training dtypes that values stored as ``stored`` reach only by rounding (a cast that is not exact by
    construction): float32 -> (bfloat16, float16), bfloat16 -> (float16,), float16 -> (bfloat16,).
    Their fingerprints are recorded beside the plain one (``Recorder(rounded=True)``)."""
    dtype = getattr(torch, stored, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return ()
    return tuple(d for d in TRAINING_DTYPES if not exact_widening(stored, d))


def block_fingerprint(
    block: torch.Tensor,
    offsets: Sequence[int],
    global_shape: Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    workers: int = 1,
) -> torch.Tensor:
    """The fingerprint contribution of ``block``, which sits at ``offsets`` in a tensor of ``global_shape``,
    of its values cast to ``dtype`` (None: as they are; cast chunk by chunk, never a whole copy).

    The sums run on ``block``'s device (a GPU shard is not copied to the host); the result is on the CPU.

    ``workers`` > 1 splits the rows among that many threads, each running torch single-threaded (see
    ``_parallel_sums``); it changes torch's process-wide thread count while it runs, so only a caller that owns
    the process at that moment (the guard, before step 1) may ask for it.
    """
    return block_fingerprints(block, offsets, global_shape, (dtype,), workers=workers)[0]


def block_fingerprints(
    block: torch.Tensor,
    offsets: Sequence[int],
    global_shape: Sequence[int],
    dtypes: Sequence[torch.dtype | None],
    *,
    workers: int = 1,
) -> torch.Tensor:
    """``[len(dtypes), len(TERMS)]``: ``block_fingerprint`` at each of ``dtypes``, in one pass over the block
    (each chunk is read once and cast to each dtype while it is in cache)."""
    if workers <= 1 or torch.get_num_threads() == 1:
        return _block_fingerprints(block, offsets, global_shape, tuple(dtypes), workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for the small operations too: an idle OpenMP team spins between them
    try:
        return _block_fingerprints(block, offsets, global_shape, tuple(dtypes), workers)
    finally:
        torch.set_num_threads(threads)


def _block_fingerprints(
    block: torch.Tensor,
    offsets: Sequence[int],
    global_shape: Sequence[int],
    dtypes: tuple[torch.dtype | None, ...],
    workers: int,
) -> torch.Tensor:
    shape = tuple(block.shape)
    rows = shape[0] if shape else 1
    device = block.device
    out = torch.zeros((len(dtypes), len(TERMS)), dtype=torch.float64, device=device)
    if block.numel() == 0:
        return out.cpu()
    x2d = block.reshape(rows, -1)
    dtypes = tuple(None if d == x2d.dtype else d for d in dtypes)
    row0 = offsets[0] if len(offsets) else 0
    col_w = _weights(_columns(global_shape, shape, offsets).to(device))  # [cols, 2]: p(j), q(j)
    # bf16 -> fp16 from the plain pass (see _fp16_change): the fp16 sums are summed only if it cannot say.
    scan = x2d.dtype == torch.bfloat16 and torch.float16 in dtypes and x2d.is_contiguous()
    summed = tuple(dict.fromkeys(d for d in (None, *dtypes) if not (scan and d == torch.float16)))
    row_w = _row_weights(row0, rows, device)
    sums = _parallel_sums(x2d, row_w, summed, False, workers, scan)
    if not all(math.isfinite(s) for s in sums.sum_sq):  # rare (a NaN or inf: x*x is not finite): count, sum as 0
        sums = _parallel_sums(x2d, row_w, summed, True, workers, False)
    change = _fp16_change(x2d, sums, row0, col_w) if scan else None
    if scan and change is None:
        extra = _parallel_sums(x2d, row_w, (torch.float16,), True, workers, False)
        sums.append(extra)
        summed = (*summed, torch.float16)
    for i, dtype in enumerate(dtypes):
        k = summed.index(None if change is not None and dtype == torch.float16 else dtype)
        acc = sums.acc[k]
        out[i, 0] = sums.nonfinite[k]
        out[i, 1] = acc[0].sum()
        out[i, 2] = sums.sum_sq[k]
        out[i, 3] = sums.sum_abs[k]
        out[i, 4:6] = acc[1:].sum(1)
        out[i, 6:8] = acc[0] @ col_w
        out[i, 8] = acc[1] @ col_w[:, 1]
        out[i, 9] = acc[2] @ col_w[:, 0]
        if change is not None and dtype == torch.float16:
            out[i] += change
    return out.cpu()


# bfloat16 -> float16 without a second pass. A bf16 value (8 significant bits) converts exactly when its
# magnitude lies in [2^-17, 65280] (fp16 normals hold 11 bits; its subnormals, spaced 2^-24, hold all 8 bits
# down to 2^-17), so the fp16 fingerprint is the plain one plus the change of the few values below 2^-17 (in a
# trained 4096x11008 projection: 3e-4 of them). The plain pass finds them while each chunk's |x| is in cache:
# the chunk seen as _GROUP rows, the columns whose smallest |x| is below 2^-17 (an elementwise minimum across
# the rows: a min over each row of _GROUP values does not vectorise and ran ~10x slower; a column holding a
# zero is taken too, harmlessly). Only those columns' values are rounded and summed at their positions. That
# replaces a second cast-and-sum pass (~1.1 CPU-s per GB of bf16 on this project's CPU). A value that would
# overflow (or a NaN/inf), or small values in more than a quarter of the columns, leave it to the full pass.
_GROUP = 16
_FP16_EXACT = (2.0**-17, 65280.0)  # 65280: the largest bf16 below fp16's largest value, 65504


def _fp16_change(x2d: torch.Tensor, sums: _Sums, row0: int, col_w: torch.Tensor) -> torch.Tensor | None:
    """What the block's fingerprint gains when its bf16 values are rounded to fp16 (None: sum them instead)."""
    # sum x^2 <= 65280^2: no |x| beyond 65280 (a block holding larger values, or a NaN/inf, takes the full pass).
    if sums.nonfinite[0] or not sums.sum_sq[0] <= _FP16_EXACT[1] ** 2:
        return None
    index = sums.small_positions()
    if len(index) * 4 > x2d.numel():
        return None
    values = x2d.reshape(-1).index_select(0, index)
    x = values.double()
    d = values.float().to(torch.float16).double() - x
    changed = d.nonzero().flatten()
    index, x, d = index[changed], x[changed], d[changed]
    cols = x2d.shape[1]
    wr = _weights(index // cols + row0)  # [k, 2]: p(i), q(i)
    wc = col_w[index % cols]  # [k, 2]: p(j), q(j)
    out = torch.zeros(len(TERMS), dtype=torch.float64, device=x.device)
    out[1] = d.sum()
    out[2] = (2 * x + d).mul(d).sum()  # (x + d)^2 - x^2
    out[3] = ((x + d).abs() - x.abs()).sum()
    out[4:6] = d @ wr
    out[6:8] = d @ wc
    out[8] = (d * wr[:, 0]) @ wc[:, 1]
    out[9] = (d * wr[:, 1]) @ wc[:, 0]
    return out


def _parallel_sums(
    x2d: torch.Tensor,
    row_w: torch.Tensor,
    dtypes: tuple[torch.dtype | None, ...],
    mask: bool,
    workers: int,
    scan: bool,
) -> _Sums:
    """The block's sums, its rows split among ``workers`` threads when it is large enough to be worth it.

    Each thread runs torch single-threaded (``block_fingerprint`` sees to it) on its own rows and the parts are
    added (the fingerprint is a sum over rows). Torch's own intra-op threads would split every small operation
    instead: one OpenMP barrier per operation, thousands per tensor, and on a machine busy with other work each
    barrier waits for a descheduled thread (measured on a 2-core machine under load: 2 intra-op threads took 40x
    the wall time of these 2 workers; independent workers do not wait for each other).
    """
    rows = x2d.shape[0]
    workers = max(1, min(workers, x2d.numel() // (2 * _CHUNK), rows)) if x2d.device.type == "cpu" else 1
    if workers == 1:
        return _Sums(x2d, row_w, dtypes, mask, scan)
    cuts = [rows * w // workers for w in range(workers + 1)]
    cols = x2d.shape[1]
    with ThreadPoolExecutor(workers) as pool:
        parts = list(
            pool.map(
                lambda r: _Sums(x2d[r[0] : r[1]], row_w[:, r[0] : r[1]], dtypes, mask, scan, r[0] * cols),
                zip(cuts, cuts[1:]),
            )
        )
    total = parts[0]
    for part in parts[1:]:
        total.add(part)
    return total


class _Sums:
    """One pass over a 2-D block in float64 chunks of at most ``_CHUNK`` values (cache-sized, so the block is
    never copied whole), for each of ``dtypes`` (None: the values as they are): per column ``sum_i x``,
    ``sum_i x p(i)``, ``sum_i x q(i)`` in one matrix product with the row weights, plus ``sum x^2`` and
    ``sum |x|``. Four passes over each chunk and dtype, all in cache: the float64 copy (rounded to the dtype
    first, then widened exactly), the product, the dot product, and ``abs_`` + sum (in place: the chunk is a
    scratch copy)."""

    def __init__(
        self,
        x2d: torch.Tensor,
        row_w: torch.Tensor,
        dtypes: tuple[torch.dtype | None, ...],
        mask: bool,
        scan: bool = False,
        base: int = 0,
    ) -> None:
        rows, cols = x2d.shape
        device = self.device = x2d.device
        step = max(1, _chunk_values(device) // cols)
        # With ``scan`` (dtypes[0] is None), for ``_fp16_change``: grids of the chunks' column minima of |x|
        # (the first chunk's flat offset, the chunks' length, one row per chunk), and the positions of the
        # values outside any column.
        self.minima: list[tuple[int, int, torch.Tensor]] = []
        self.rest: list[torch.Tensor] = []
        if scan and rows >= step:
            grid = torch.empty((rows // step, step * cols // _GROUP), dtype=torch.float64, device=device)
            self.minima.append((base, step * cols, grid))
        buffer = torch.empty((min(step, rows), cols), dtype=torch.float64, device=device)
        staging = {d: torch.empty((min(step, rows), cols), dtype=d, device=device) for d in dtypes if d is not None}
        # A 16-bit source is rounded to the other 16-bit dtype through float32 (exact, then one rounding: the
        # same values): torch's direct bf16 <-> fp16 cast runs ~3x slower than the two casts together.
        wide = (
            torch.empty((min(step, rows), cols), dtype=torch.float32, device=device)
            if staging and x2d.dtype in (torch.bfloat16, torch.float16)
            else None
        )
        self.acc = [torch.zeros((3, cols), dtype=torch.float64, device=device) for _ in dtypes]
        self.nonfinite = [0] * len(dtypes)
        squares: list[list[torch.Tensor]] = [[] for _ in dtypes]
        absolutes: list[list[torch.Tensor]] = [[] for _ in dtypes]
        for start in range(0, rows, step):
            chunk = x2d[start : start + step]
            source = chunk if wide is None else wide[: len(chunk)].copy_(chunk)
            for i, dtype in enumerate(dtypes):
                x = buffer[: len(chunk)]
                x.copy_(chunk if dtype is None else staging[dtype][: len(chunk)].copy_(source))
                if mask:
                    bad = ~torch.isfinite(x)
                    self.nonfinite[i] += int(bad.sum())
                    x.masked_fill_(bad, 0.0)
                flat = x.view(-1)
                squares[i].append(torch.dot(flat, flat))
                self.acc[i].addmm_(row_w[:, start : start + len(x)], x)
                absolutes[i].append(flat.abs_().sum())
                if scan and i == 0:
                    self._scan(flat, base + start * cols)
        self.sum_sq = [float(torch.stack(s).sum()) for s in squares]
        self.sum_abs = [float(torch.stack(a).sum()) for a in absolutes]

    def _scan(self, magnitudes: torch.Tensor, offset: int) -> None:
        """Keep, for the chunk seen as _GROUP rows, each column's smallest |x| (one vectorised minimum across the
        rows, into a grid made once per block; the rest is done once per block, in ``small_positions``)."""
        span = len(magnitudes) // _GROUP
        first, stride, grid = self.minima[-1] if self.minima else (0, 0, torch.empty(0))
        c = (offset - first) // stride if stride else -1
        if not (stride and len(magnitudes) == stride and 0 <= c < len(grid)):  # a block's last, shorter chunk
            grid = torch.empty((1, span), dtype=magnitudes.dtype, device=magnitudes.device)
            self.minima.append((offset, len(magnitudes), grid))
            first, stride, grid = self.minima[-1]
            c = 0
        if span:
            torch.amin(magnitudes[: span * _GROUP].view(_GROUP, span), 0, out=grid[c])
        if span * _GROUP < len(magnitudes):  # the last few values: taken as they are
            self.rest.append(offset + torch.arange(span * _GROUP, len(magnitudes), device=magnitudes.device))

    def small_positions(self) -> torch.Tensor:
        """The flat positions of the values that may lie below 2^-17: each column whose minimum is."""
        parts = list(self.rest)
        rows = torch.arange(_GROUP, device=self.device)
        for first, stride, grid in self.minima:
            chunk, column = (grid < _FP16_EXACT[0]).nonzero().unbind(1)
            parts.append((first + chunk * stride + column)[:, None].add(rows * grid.shape[1]).flatten())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=self.device)

    def add(self, other: _Sums) -> None:
        for i in range(len(self.acc)):
            self.acc[i] += other.acc[i]
            self.nonfinite[i] += other.nonfinite[i]
            self.sum_sq[i] += other.sum_sq[i]
            self.sum_abs[i] += other.sum_abs[i]
        self.minima += other.minima
        self.rest += other.rest

    def append(self, other: _Sums) -> None:
        """Add ``other``'s dtypes after this one's (the same block)."""
        self.acc += other.acc
        self.nonfinite += other.nonfinite
        self.sum_sq += other.sum_sq
        self.sum_abs += other.sum_abs


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """The fingerprint of a whole (local, plain) tensor."""
    return block_fingerprint(t.detach(), [0] * t.dim(), tuple(t.shape))


class Recorder:
    """Fingerprints of tensors written block by block (rows [start, end) at a time), from several threads.

    ``values[key]`` is the fingerprint of the values as written. With ``rounded=True``, ``rounded[key]`` also
    holds, for each dtype of ``rounding_dtypes(the block's dtype)``, the fingerprint of the values rounded to it
    (what a trainer holding its parameters at that dtype loads), from the same pass over each block.

    Each block's share is computed outside the lock (torch releases the GIL for the sums), then added.
    The writer threads are the parallelism here: each computes its share with one torch thread. With torch's
    intra-op (OpenMP) threads, every thread calling would start its own team for every small operation, and
    each operation would wait at a barrier for threads the other writers keep busy (on 2 cores under load
    that doubled the fingerprint's CPU time at conversion). The thread count in force when the recorder
    was made is put back after each block.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], *, rounded: bool = False) -> None:
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.values = {k: torch.zeros(len(TERMS), dtype=torch.float64) for k in self.shapes}
        self.rounded: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.shapes} if rounded else {}
        self._lock = threading.Lock()
        self._threads = torch.get_num_threads()

    def add_rows(self, key: str, start: int, block: torch.Tensor) -> None:
        shape = self.shapes[key]
        offsets = [start] + [0] * (len(shape) - 1) if shape else []
        targets = rounding_dtypes(str(block.dtype).removeprefix("torch.")) if self.rounded else ()
        torch.set_num_threads(1)
        try:
            parts = block_fingerprints(block, offsets, shape, (None, *(getattr(torch, d) for d in targets)))
        finally:
            torch.set_num_threads(self._threads)
        with self._lock:
            self.values[key] += parts[0]
            for dtype, part in zip(targets, parts[1:]):
                into = self.rounded[key]
                into[dtype] = into[dtype] + part if dtype in into else part


def nonfinite_keys(values: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose fingerprint counts a NaN or Inf: the writing pass finds them at no extra cost (a separate
    ``isfinite`` over every block as it was written cost 350 MB of resident memory on a 1 GB conversion)."""
    return sorted(k for k, fp in values.items() if fp[0] > 0)


def as_record(fp: torch.Tensor) -> list[float | int]:
    """A fingerprint as stored in JSON: the non-finite count as an int, then the sums (always finite)."""
    return [int(fp[0]), *(float(v) for v in fp[1:])]


def local_fingerprint(
    value: torch.Tensor, dtype: torch.dtype | None = None, *, workers: int | None = None
) -> torch.Tensor:
    """This rank's share of a parameter's fingerprint, of its values cast to ``dtype`` (None: as they are, which
    is what the guard compares); sum it over all ranks.

    ``workers`` (default: torch's intra-op thread count, the cores the trainer gave this rank) threads share
    the work, as in ``block_fingerprint``: call it where nothing else runs torch in this process meanwhile.

    A DTensor contributes its local shard at the shard's global offsets, divided by the number of ranks
    holding a copy of that shard (Replicate mesh dims), so the sum over ranks counts each value once and a
    replica that differs still moves the total. A plain tensor is held whole by every rank: 1/world each.
    """
    value = value.detach()
    workers = torch.get_num_threads() if workers is None else workers
    placements = getattr(value, "placements", None)
    if placements is None:
        return block_fingerprint(value, [0] * value.dim(), tuple(value.shape), dtype, workers=workers) / _world()
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert isinstance(value, DTensor)  # what has placements
    mesh = value.device_mesh
    if any(type(p).__name__ == "_StridedShard" for p in placements):
        # FSDP over TP interleaves the shards: gather the whole tensor (a collective on this mesh) instead.
        full = value.full_tensor()
        return block_fingerprint(full, [0] * full.dim(), tuple(full.shape), dtype, workers=workers) / _world()
    local = value.to_local()
    _, offsets = compute_local_shape_and_global_offset(tuple(value.shape), mesh, placements)
    copies = math.prod(mesh.size(d) for d, p in enumerate(placements) if not p.is_shard())
    return block_fingerprint(local, list(offsets), tuple(value.shape), dtype, workers=workers) / copies


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scales(fp: torch.Tensor) -> torch.Tensor:
    """Each term's scale: |sum x w| <= sum |x| for weights in [-1, 1]; sum_sq and sum_abs scale themselves."""
    s = torch.full((len(TERMS),), float(fp[3]), dtype=torch.float64)
    s[2] = fp[2]
    s[0] = 0.0
    return s


def matches(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float], tol: float = TOLERANCE) -> bool:
    """Whether two fingerprints are the same up to float64 summation order (non-finite counts exactly)."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a[0] != b[0]:
        return False
    scale = torch.maximum(_scales(a), _scales(b))
    return bool(((a - b).abs() <= tol * scale).all())


def _as_tensor(fp: torch.Tensor | Sequence[float]) -> torch.Tensor:
    return fp if isinstance(fp, torch.Tensor) else torch.tensor(list(fp), dtype=torch.float64)


def transposed(fp: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The fingerprint of the transpose of a 2-D tensor, from its own fingerprint (rows and columns swap)."""
    fp = _as_tensor(fp).clone()
    for a, b in _MIRROR.items():
        i, j = TERMS.index(a), TERMS.index(b)
        fp[i], fp[j] = fp[j].clone(), fp[i].clone()
    return fp
