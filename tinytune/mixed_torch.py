"""The PyTorch path of mixed batches: per-row LoRA and IA³ on stacked adapters.

The eager and training path of :mod:`tinytune.batch` (CPU tensors, autograd, anything
the fused op :func:`tinytune.kernels.lora_mixed.lora_mixed_linear` does not take). The
layout every function here consumes (the fused op's as well):

* ``row_index``: ``(B,)`` int64, the *slot* of each batch row in the stacks. The last
  slot of every stack is the identity (zero LoRA factors, unit IA³ scales), so rows
  without an adapter (``"__base__"``) or whose adapter has no layer on this module
  index it and come out unchanged.
* LoRA: ``a_stack`` ``(S, r_max, in)`` and ``bt_stack`` ``(S, r_max, out)``: each
  adapter's ``A`` and ``B^T``, zero-padded to the largest rank at this module (the
  padding contributes exact zeros), and ``scale`` ``(S,)``: ``alpha / r`` (or
  ``alpha / sqrt(r)``) per slot.
* IA³: ``l_stack`` ``(S, features)``, ones in slots without an IA³ layer.
* Embedding LoRA: ``a_stack`` ``(S, num_embeddings, r_max)``, ``bt_stack``
  ``(S, r_max, dim)``.
* Optionally, rows sorted into segments by adapter (:func:`torch_lora_mixed_grouped`):
  ``group_slots`` ``(N,)``, the distinct slots; ``rows`` ``(R,)``, the rows that use
  them, segment after segment; ``row_group`` and ``row_pos`` ``(R,)``, each of those
  rows' segment and position in it; ``group_size``, the longest segment. Rows not listed
  are left unchanged.

Rows are batch dimension 0 of ``x``; all other leading dimensions (sequence, ...) are
tokens of that row. Each row's factors are gathered and applied with batched matmuls:
the arithmetic is exactly one LoRA per token, memory traffic is one copy of the factors
per row, and nothing depends on how many adapters are stacked. Every shape depends only
on the batch shape and the stacks, never on which row uses which adapter, so
``torch.compile`` does not recompile when the assignment changes. All of it is
differentiable (training uses it).

Floor 1 (beside ``layers``): imports torch only.
"""

from __future__ import annotations

import torch

__all__ = [
    "row_groups",
    "worth_grouping",
    "worth_indexing",
    "torch_lora_mixed",
    "torch_lora_mixed_grouped",
    "torch_lora_mixed_indexed",
    "torch_ia3_mixed",
    "torch_embedding_lora_mixed",
]


def _rows3d(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., F)`` -> ``(B, tokens, F)`` (a view where possible)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def torch_lora_mixed(
    x: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    bt_stack: torch.Tensor,
    scale: torch.Tensor,
    row_index: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """``out[b] + scale[s] * (x[b] @ A[s]^T) @ B[s]^T`` with ``s = row_index[b]``.

    Args:
        x: ``(B, ..., in)`` inputs of the adapted linear layer.
        out: ``(B, ..., out)`` the layer's output.
        a_stack: ``(S, r, in)`` stacked ``A`` factors.
        bt_stack: ``(S, r, out)`` stacked, transposed ``B`` factors.
        scale: ``(S,)`` per-slot scaling.
        row_index: ``(B,)`` int64 slot of each row.
        inplace: Accumulate into ``out`` itself when dtypes allow (saves a copy of the
            output; only for an ``out`` that nothing else reads and autograd does not
            track).

    Returns:
        A tensor shaped and typed like ``out`` (``out`` itself when updated in place).
        The LoRA branch runs in the stacks' dtype (as the single-adapter layer runs in
        its parameters' dtype).
    """
    b = x.shape[0]
    x3 = _rows3d(x)
    if x3.dtype != a_stack.dtype:
        x3 = x3.to(a_stack.dtype)
    a = a_stack.index_select(0, row_index)  # (B, r, in)
    bt = bt_stack.index_select(0, row_index)  # (B, r, out)
    s = scale.index_select(0, row_index).to(a.dtype).view(b, 1, 1)
    h = torch.bmm(x3, a.transpose(1, 2)) * s  # (B, T, r)
    out3 = _rows3d(out)
    if out3.dtype == bt.dtype:
        # One batched GEMM with the add folded in.
        if inplace:
            return out3.baddbmm_(h, bt).view(out.shape)
        return torch.baddbmm(out3, h, bt).view(out.shape)
    delta = torch.bmm(h, bt).to(out.dtype).view(out.shape)
    return out.add_(delta) if inplace else out + delta


def torch_lora_mixed_indexed(
    x: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    bt_stack: torch.Tensor,
    scale: torch.Tensor,
    row_index: torch.Tensor,
) -> torch.Tensor:
    """:func:`torch_lora_mixed` written for ``torch.compile``: each row reads its
    adapter's factors by index inside the two products, with no gathered copy.

    Both products are written as a broadcast product summed over the reduced dimension,
    which inductor compiles into one loop nest each that loads ``A[s]`` and ``B[s]``
    through the row's slot (indirect indexing): the factors are read straight from the
    stacks (from cache when rows share an adapter), never copied per row as the
    gather's ``index_select`` does nor packed per adapter as grouping does, and the
    update is added to ``out`` in the same kernel. Every shape depends only on the batch
    and the stacks, so a new assignment does not recompile. In eager mode it would
    materialize the broadcast products: use :func:`torch_lora_mixed` or
    :func:`torch_lora_mixed_grouped` there.

    Args:
        x: ``(B, ..., in)`` inputs of the adapted linear layer.
        out: ``(B, ..., out)`` the layer's output (not modified).
        a_stack: ``(S, r, in)`` stacked ``A`` factors.
        bt_stack: ``(S, r, out)`` stacked, transposed ``B`` factors.
        scale: ``(S,)`` per-slot scaling.
        row_index: ``(B,)`` int64 slot of each row.

    Returns:
        A new tensor shaped and typed like ``out``; the LoRA branch runs in the stacks'
        dtype (as in :func:`torch_lora_mixed`).
    """
    b = x.shape[0]
    x3 = _rows3d(x)
    if x3.dtype != a_stack.dtype:
        x3 = x3.to(a_stack.dtype)
    a = a_stack[row_index]  # (B, r, in): an indexed load inside the sum below
    h = (x3.unsqueeze(-2) * a.unsqueeze(1)).sum(-1)  # (B, T, r)
    h = h * scale[row_index].to(h.dtype).view(b, 1, 1)
    bt = bt_stack[row_index]  # (B, r, out)
    delta = (h.unsqueeze(-1) * bt.unsqueeze(1)).sum(-2)  # (B, T, out)
    return out + delta.to(out.dtype).view(out.shape)


def torch_lora_mixed_grouped(
    x: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    bt_stack: torch.Tensor,
    scale: torch.Tensor,
    group_slots: torch.Tensor,
    rows: torch.Tensor,
    row_group: torch.Tensor,
    row_pos: torch.Tensor,
    group_size: int,
    inplace: bool = False,
) -> torch.Tensor:
    """:func:`torch_lora_mixed` with rows grouped by adapter: each adapter's factors are
    read once for all its rows, instead of once per row.

    The rows of each segment are packed into a zero-padded ``(N, group_size, tokens, in)``
    block, so the batched matmuls see one matrix per distinct adapter. That pays off when
    rows have few tokens and share adapters (decode); with many tokens per row the
    packing costs more than the per-row gather saves.

    ``x``, ``out``, ``a_stack``, ``bt_stack`` and ``scale`` are as in :func:`torch_lora_mixed`.

    Args:
        group_slots: ``(N,)`` int64 distinct slots.
        rows: ``(R,)`` int64 rows using them, sorted by segment.
        row_group: ``(R,)`` int64 segment of each listed row.
        row_pos: ``(R,)`` int64 position of each listed row in its segment.
        group_size: The longest segment's length.
        inplace: Accumulate into ``out`` itself (see :func:`torch_lora_mixed`).

    Returns:
        A tensor shaped and typed like ``out``.
    """
    n = group_slots.shape[0]
    x3 = _rows3d(x)
    t = x3.shape[1]
    a = a_stack.index_select(0, group_slots)  # (N, r, in)
    bt = bt_stack.index_select(0, group_slots)  # (N, r, out)
    xs = x3.index_select(0, rows).to(a.dtype)  # (R, T, in)
    if n == 1:
        packed = xs.reshape(1, -1, xs.shape[-1])  # one segment: no padding needed
    else:
        packed = xs.new_zeros((n, group_size, t, xs.shape[-1]))
        packed[row_group, row_pos] = xs
        packed = packed.view(n, group_size * t, -1)
    s = scale.index_select(0, group_slots).to(a.dtype).view(n, 1, 1)
    d = torch.bmm(torch.bmm(packed, a.transpose(1, 2)) * s, bt)  # (N, G*T, out)
    if n == 1:
        delta = d.view(-1, t, d.shape[-1])
    else:
        delta = d.view(n, group_size, t, -1)[row_group, row_pos]  # (R, T, out)
    out3 = _rows3d(out)
    delta = delta.to(out3.dtype)
    if inplace:
        return out3.index_add_(0, rows, delta).view(out.shape)
    return out3.index_add(0, rows, delta).view(out.shape)


def torch_ia3_mixed(
    x: torch.Tensor, l_stack: torch.Tensor, row_index: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """``x[b] * l[row_index[b]]``, broadcast over the row's tokens.

    Args:
        x: ``(B, ..., F)`` tensor to scale (inputs or outputs of a linear layer).
        l_stack: ``(S, F)`` stacked IA³ scales.
        row_index: ``(B,)`` int64 slot of each row.
        inplace: Scale ``x`` itself (see :func:`torch_lora_mixed`).

    Returns:
        A tensor shaped and typed like ``x``.
    """
    scales = l_stack.index_select(0, row_index).to(x.dtype)  # (B, F)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x.mul_(scales.view(shape)) if inplace else x * scales.view(shape)


def torch_embedding_lora_mixed(
    ids: torch.Tensor,
    out: torch.Tensor,
    a_stack: torch.Tensor,
    bt_stack: torch.Tensor,
    scale: torch.Tensor,
    row_index: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """``out[b] + scale[s] * A[s][ids[b]] @ B[s]^T`` with ``s = row_index[b]``.

    Args:
        ids: ``(B, ...)`` integer token ids.
        out: ``(B, ..., dim)`` the embedding's output.
        a_stack: ``(S, num_embeddings, r)`` stacked ``A`` tables.
        bt_stack: ``(S, r, dim)`` stacked, transposed ``B`` factors.
        scale: ``(S,)`` per-slot scaling.
        row_index: ``(B,)`` int64 slot of each row.
        inplace: Accumulate into ``out`` itself (see :func:`torch_lora_mixed`).

    Returns:
        A tensor shaped and typed like ``out``.
    """
    b = ids.shape[0]
    num = a_stack.shape[1]
    # One flat table: row b looks up a_stack[s].
    flat_ids = ids.reshape(b, -1) + (row_index * num).view(b, 1)
    h = torch.nn.functional.embedding(flat_ids, a_stack.reshape(-1, a_stack.shape[-1]))  # (B, T, r)
    bt = bt_stack.index_select(0, row_index)
    s = scale.index_select(0, row_index).to(h.dtype).view(b, 1, 1)
    delta = torch.bmm(h * s, bt).to(out.dtype).view(out.shape)
    return out.add_(delta) if inplace else out + delta


def row_groups(slots: list[int], identity: int, device: torch.device) -> tuple:
    """Rows sorted into segments by slot, the identity slot's rows left out.

    Args:
        slots: Each row's slot.
        identity: The identity slot (its rows come out unchanged: no segment).
        device: Where the index tensors go.

    Returns:
        ``(n, size, group_slots, rows, row_group, row_pos)`` as
        :func:`torch_lora_mixed_grouped` takes them: ``n`` segments, the longest
        ``size`` rows (``n == 0`` if every row is an identity row), and four index
        tensors, views of one int64 tensor made in one step.
    """
    segments: dict[int, list[int]] = {}
    for i, slot in enumerate(slots):
        if slot != identity:
            segments.setdefault(slot, []).append(i)
    members = list(segments.values())
    n = len(members)
    size = max((len(m) for m in members), default=0)
    rows = [i for m in members for i in m]
    r = len(rows)
    index = torch.tensor(
        list(segments)
        + rows
        + [g for g, m in enumerate(members) for _ in m]
        + [p for m in members for p in range(len(m))],
        dtype=torch.long,
    )
    if device.type != "cpu":
        index = index.to(device)
    return n, size, index[:n], index[n : n + r], index[n + r : n + 2 * r], index[n + 2 * r :]


def worth_grouping(batch: int, tokens: int, rank: int, n: int, size: int) -> bool:
    """Whether reading each adapter once (:func:`torch_lora_mixed_grouped`) beats a gather
    per row (:func:`torch_lora_mixed`).

    Per row, the gather copies the row's factors (``rank`` per feature); grouping reads
    them once per distinct adapter but copies the rows' tokens into padded segments
    (``size * tokens`` per feature and segment) and runs a few more small ops. Measured
    on the CPU (bench/bench_mixed.py shapes), grouping pays off when that traffic model
    gives it less than a quarter of the gather's: decode-sized rows that mostly share a
    few adapters.

    Args:
        batch: Rows in the batch.
        tokens: Tokens per row.
        rank: The stacks' (padded) rank.
        n: Segments (distinct adapters other than the identity).
        size: The longest segment's rows.

    Returns:
        Whether to group.
    """
    return 4 * n * (rank + size * tokens) < batch * rank


# Tokens per row up to which torch_lora_mixed_indexed beats the gather under
# torch.compile on the CPU (tinytune-bench models, 64 rows, 1 thread: faster at 1 and 16
# tokens, about even at 32, slower at 64, where the gather's batched matmuls reuse each
# row's factors for many tokens).
INDEXED_MAX_TOKENS = 16


def worth_indexing(tokens: int) -> bool:
    """Whether a compiled mixed call reads each row's factors by index inside the
    products (:func:`torch_lora_mixed_indexed`) rather than gathering them
    (:func:`torch_lora_mixed`).

    The indexed loops read the factors once per row with no copy, which wins for
    decode-sized rows; with many tokens per row the gather's copy is paid once and its
    batched matmuls (the BLAS library's) are faster than inductor's loops. A decision
    on a shape, so a compiled graph makes it once (no recompile for a new assignment).

    Args:
        tokens: Tokens per row.

    Returns:
        Whether to take the indexed path.
    """
    return tokens <= INDEXED_MAX_TOKENS
