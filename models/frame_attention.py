"""Attention over the L frames of every token in one Triton kernel: the temporal attention's "triton" kernel
(`models.layers.TemporalAttention`), for the UNet's compiled CUDA packages. The one module that imports Triton.

Why a kernel of our own: temporal attention runs a softmax over L = 16 frames for every (batch, token, head), a
few million sequences per batch-69 step. Fused attention kernels tile 64-128 queries by as many keys, so most of each
tile is empty; as matrix products ("math") the scores, weights and permuted copies go through memory several times
(about 14 ms of the paper UNet's 148 ms step on an H200, `benchmarks/results/EXPERIMENTS.md`). Here one program
loads the L x D queries, keys and values of one token for a group of heads straight from the projections' (B, L, S,
D) rows, does both products and the softmax in registers and writes the (B, L, S, D) output the output projection
reads: the memory floor is one read of q, k, v and one write.

`frame_attention` is a `torch.library.triton_op`, so torch.export and AOTInductor compile the kernel into a package;
it needs a CUDA tensor (or Triton's interpreter, TRITON_INTERPRET=1, for tests on the CPU).

`frame_layer_norm` is the temporal attention's LayerNorm plus its frame position encoding as one such op, writing its
output row by row: compiled by Inductor, that LayerNorm's output was stored frames-innermost and copied back for the
q/k/v product (about 2.6 ms of the paper UNet's 69-row step on an H200, results/EXPERIMENTS.md). An experiment
(`TemporalAttention.norm_kernel`), not yet in the packages.
"""

from __future__ import annotations

import functools

import torch

# Register tiles of (heads per program) x (frames, padded) x (head dim, padded) elements per operand: 8 heads of
# 64 for the paper UNet's 40-dim heads, 4 of 128 (80), 2 of 256 (160).
TILE_ELEMENTS = 8192


def available() -> bool:
    """Whether Triton imports here (torch's CUDA wheels bring it; the CPU wheels do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launcher(kernel):
    """(how to launch `kernel`, whether it runs in Triton's interpreter). torch.export and Inductor trace a kernel
    through wrap_triton, which takes compiled kernels only (torch 2.11 rejects the interpreter's); interpreted
    kernels (CPU tests) run eagerly."""
    import triton

    interpreted = not isinstance(kernel, triton.runtime.jit.JITFunction)
    return (kernel if interpreted else torch.library.wrap_triton(kernel)), interpreted


@functools.cache
def _op():
    """(the triton_op, whether its kernel runs in Triton's interpreter), defined on first use (Triton reads
    TRITON_INTERPRET when a kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def frame_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, L, H, DH, scale,
                               sqb, sql, sqs, skb, skl, sks, svb, svl, svs, sob, sol, sos,
                               BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)  # b * S + s
        b = token // S
        s = token % S
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        frame = tl.arange(0, BLOCK_L)
        j = tl.arange(0, BLOCK_D)
        h3, f3, j3 = h[:, None, None], frame[None, :, None], j[None, None, :]
        ok = (h3 < H) & (f3 < L) & (j3 < DH)
        col = h3 * DH + j3  # channel within D = H * DH
        q = tl.load(q_ptr + b * sqb + s * sqs + f3 * sql + col, mask=ok, other=0.0)
        k = tl.load(k_ptr + b * skb + s * sks + f3 * skl + col, mask=ok, other=0.0)
        v = tl.load(v_ptr + b * svb + s * svs + f3 * svl + col, mask=ok, other=0.0)
        scores = tl.dot(q, tl.permute(k, (0, 2, 1))) * scale  # (BLOCK_H, BLOCK_L, BLOCK_L), fp32
        scores = tl.where(frame[None, None, :] < L, scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
        weights = weights / tl.sum(weights, axis=2)[:, :, None]
        out = tl.dot(weights.to(v.dtype), v)  # (BLOCK_H, BLOCK_L, BLOCK_D), fp32
        tl.store(o_ptr + b * sob + s * sos + f3 * sol + col, out.to(o_ptr.dtype.element_ty), mask=ok)

    launch, interpreted = _launcher(frame_attention_kernel)

    @torch.library.triton_op("nuwaxl::frame_attention", mutates_args=())
    def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, frames, s, d = q.shape
        d_head = d // num_heads
        out = torch.empty((b, frames, s, d), device=q.device, dtype=q.dtype)
        block_l = max(16, _next_pow2(frames))  # tl.dot needs at least 16 rows and columns
        block_d = max(16, _next_pow2(d_head))
        block_h = max(1, min(_next_pow2(num_heads), TILE_ELEMENTS // (block_l * block_d)))
        grid = (b * s, triton.cdiv(num_heads, block_h))
        launch[grid](
            q, k, v, out, s, frames, num_heads, d_head, d_head ** -0.5,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            BLOCK_H=block_h, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
        return out

    return frame_attention, interpreted


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over dim 1 of (B, L, S, D) queries, keys and values, for each token and each of
    `num_heads` heads of D / num_heads channels (the last dim must have stride 1): (B, L, S, D), the heads side by
    side as their input. The same function as `TemporalAttention`'s "math" kernel."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("frame_attention needs q, k and v with unit stride in their last dim (call .contiguous())")
    if q.shape[-1] % num_heads:
        raise ValueError(f"D={q.shape[-1]} is not divisible by num_heads={num_heads}")
    op, interpreted = _op()
    if q.device.type != "cuda" and not interpreted:
        raise ValueError(f"frame_attention runs on CUDA tensors (got {q.device.type}); on the CPU use "
                         "TemporalAttention's 'math' kernel, or Triton's interpreter (TRITON_INTERPRET=1) in tests")
    return op(q, k, v, num_heads)


@functools.cache
def _norm_op():
    """(the frame_layer_norm triton_op, whether it runs in Triton's interpreter), defined on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def frame_layer_norm_kernel(x_ptr, w_ptr, b_ptr, pe_ptr, o_ptr, N, S, L, D, eps,
                                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of (B, L, S) in order
        cols = tl.arange(0, BLOCK_D)
        ok = (rows[:, None] < N) & (cols[None, :] < D)
        at = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(ok, x - mean[:, None], 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        frame = (rows // S) % L
        pe = tl.load(pe_ptr + frame[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(o_ptr + at, (y * w[None, :] + b[None, :] + pe).to(o_ptr.dtype.element_ty), mask=ok)

    launch, interpreted = _launcher(frame_layer_norm_kernel)

    @torch.library.triton_op("nuwaxl::frame_layer_norm", mutates_args=())
    def frame_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
                         eps: float) -> torch.Tensor:
        b, frames, s, d = x.shape
        x = x.contiguous()
        out = torch.empty((b, frames, s, d), device=x.device, dtype=x.dtype)
        n, block_d = b * frames * s, _next_pow2(d)
        block_r = max(1, min(16, 4096 // block_d))
        launch[(triton.cdiv(n, block_r),)](x, weight, bias, table, out, n, s, frames, d, eps,
                                           BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
        return out

    return frame_layer_norm, interpreted


def frame_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of (B, L, S, D) `x` (`weight`, `bias`: (D,)) plus the (L, D) frame position
    `table` added to each frame's tokens: (B, L, S, D), written row-major. The same function as
    `layer_norm(x) + table[:, None]`."""
    if table.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"position table {tuple(table.shape)} does not match (L, D) = {(x.shape[1], x.shape[-1])}")
    op, interpreted = _norm_op()
    if x.device.type != "cuda" and not interpreted:
        raise ValueError(f"frame_layer_norm runs on CUDA tensors (got {x.device.type}); on the CPU use "
                         "TemporalAttention's 'torch' norm kernel, or Triton's interpreter (TRITON_INTERPRET=1) in "
                         "tests")
    return op(x, weight, bias, table.to(x.dtype), eps)
