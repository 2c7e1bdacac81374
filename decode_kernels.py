"""Triton kernels for the decode step, and the module swap that runs a model's one-token step on them.

A decode step multiplies one row x by every weight matrix, so its time is the time to read the weights, plus
what every kernel launch costs. One kernel, _gemv_kernel, does every such product: float (bf16/fp16) weights,
int8 and int4 (quantize.py's layouts). It also takes over the ops around the matmul, so that a layer is five
kernels, not a dozen:
- rmsnorm: y = W (x * g) * rsqrt(mean(x^2) + eps); the sum of squares is gathered in the same pass over x,
  and the row's scale factor is applied once at the end (it is one number per row).
- swiglu: x holds [gate | up] (the fused w1/w3 output) and the kernel reads silu(gate) * up.
- residual: y = r + W x, the residual stream's add.
_decode_attention_kernel does the rest of attention for one token: RoPE, the KV cache write, split-KV softmax.
fuse_decode(model) swaps each TransformerBlock for a DecodeBlock and the final norm + output head for a
DecodeLinear, in place, after loading. With more than one token (prefill, speculative verify) or off CUDA, the
model's own modules run, unchanged. _int4_mma_kernel multiplies rows by int4 weights on tensor cores: one row (int4
decode: int4_config picks it for every Llama-2-7B matrix), the k + 1 rows of a speculative verify, a prefill.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Transformer, TransformerBlock

try:  # Triton ships with CUDA builds of torch; without it every layer keeps its PyTorch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PROLOGUES = {None: 0, "rmsnorm": 1, "swiglu": 2}

if triton is not None:
    @triton.jit
    def _load_x(x_ptr, g_ptr, cols, K, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr):
        """x[cols] in float32 after the prologue, and its contribution to the sum of squares (rmsnorm)."""
        if EVEN_K:
            x = tl.load(x_ptr + cols).to(tl.float32)
        else:
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        squares = x * x
        if PROLOGUE == 1:
            g = tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = x * g
        if PROLOGUE == 2:  # x is [gate | up]: silu(gate) * up
            up = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = x * tl.sigmoid(x) * up
        return x, squares

    @triton.jit
    def _gemv_kernel(x_ptr, g_ptr, w_ptr, s_ptr, o_ptr, r_ptr, y_ptr, part_ptr, ss_ptr, count_ptr, N,
                     K: tl.constexpr, row_words, stride_wn, stride_sn, blocks_per_split, eps, BITS: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     PROLOGUE: tl.constexpr, SPLIT_K: tl.constexpr, RESIDUAL: tl.constexpr,
                     ASM: tl.constexpr):
        """y[N] = W @ prologue(x) for one row x (decode), RESIDUAL: y = r + W @ prologue(x), the residual stream's
        add done before the one rounding to y's dtype. BITS = 0: float weights [N, K]. BITS = 4: int4 with a scale
        and offset per GROUP columns (BLOCK_K <= GROUP, so a block lies in one group). BITS = 8: signed int8 with
        one scale per row (GROUP and o_ptr unused).

        Split-K (SPLIT_K programs share a block of rows, each a share of K: more loads in flight when N is small)
        in one launch: each program leaves its partial sums (part [SPLIT_K, N] float32; rmsnorm: its sum of
        squares, ss [blocks, SPLIT_K]) and counts itself in at count[pid_n]; the last to arrive adds the partials
        up in split order (so the result does not depend on which one that is), finishes the epilogue and puts
        the counter back to 0 for the next launch. This is the threadFenceReduction pattern of NVIDIA's CUDA
        samples (CUTLASS calls it serial split-K); it saves the reduction kernel after every GEMV.

        Quantized weights: each int32 word of a row holds 32 / BITS values, column (32 / BITS) t + i at bits
        BITS * i. Moving a value u to the top mantissa bits (22 down) and or-ing in the exponent of 1.0 gives
        f = 1 + u / 2^BITS with two integer ops, no int-to-float conversion (a slow instruction). Then u * s + o
        = f * (2^BITS s) + (o - 2^BITS s), so a group adds 2^BITS s * sum(x f) + (o - 2^BITS s) * sum(x): one
        multiply-add per weight, the scales applied once per group. int8 stores b = u - 128; with ASM (NVIDIA GPUs)
        its bytes become f = 1 + u / 2^15 by one PRMT each (_int8_as_float_asm): 35% fewer instructions a loop
        iteration than the shift and LOP3 (sm_90 SASS, 16 rows x 512 columns on 4 warps)."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if SPLIT_K == 1:  # a loop of known length, which the compiler can unroll and pipeline
            k_start, k_end = 0, (K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        else:
            k_start = split * blocks_per_split * BLOCK_K  # (so the compiler knows its multiples: wide loads)
            k_end = tl.minimum(k_start + blocks_per_split * BLOCK_K, (K + BLOCK_K - 1) // BLOCK_K * BLOCK_K)
        if BITS == 0:
            # float weights: a [BLOCK_N, BLOCK_K] float32 tile of products, reduced once at the end
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x, sq = _load_x(x_ptr, g_ptr, cols, K, EVEN_K, PROLOGUE)
                if EVEN_K:
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None], other=0.0)
                else:
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + cols[None, :],
                                mask=n_ok[:, None] & (cols < K)[None, :], other=0.0)
                acc2 += w.to(tl.float32) * x[None, :]
                ss += sq
            acc = tl.sum(acc2, axis=1)
        else:
            PER_WORD: tl.constexpr = 32 // BITS
            WORDS: tl.constexpr = BLOCK_K // PER_WORD
            MANTISSA: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
            # [BLOCK_N, WORDS] float32 tiles, reduced across threads once at the end, not once per block
            acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            xf = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # int8: sum(x f) over the whole share of K
            x_sum = tl.zeros((WORDS,), dtype=tl.float32)
            ss = tl.zeros((WORDS,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                t = k0 // PER_WORD + tl.arange(0, WORDS)
                if EVEN_K:  # (int4 rows are padded to whole groups, so they never end inside a block)
                    words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :], mask=n_ok[:, None], other=0)
                else:  # the last block runs past the row's end
                    words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :],
                                    mask=n_ok[:, None] & (t < row_words)[None, :], other=0)  # [BN, WORDS]
                if BITS == 8:
                    words = words ^ -0x7F7F7F80  # 0x80808080 as int32: signed bytes b -> unsigned u = b + 128
                    if ASM:  # f = 1 + u / 2^15, one PRMT a value
                        f8 = _int8_as_float_asm(words)
                if BITS == 4:  # a group's sums: x f, and x for the offset term
                    xf = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                    x_sum = tl.zeros((WORDS,), dtype=tl.float32)
                for i in tl.static_range(PER_WORD):
                    x, sq = _load_x(x_ptr, g_ptr, PER_WORD * t + i, K, EVEN_K, PROLOGUE)  # value i's columns
                    if BITS == 8 and ASM:
                        f = f8[i]
                    else:
                        if BITS * i <= 23 - BITS:
                            bits = words << (23 - BITS - BITS * i)
                        else:
                            bits = words >> (BITS * i - 23 + BITS)
                        f = ((bits & MANTISSA) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + u / 2^BITS
                    xf += x[None, :] * f
                    x_sum += x
                    ss += sq
                if BITS == 4:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                    o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                    acc2 += xf * (16 * s)[:, None] + x_sum[None, :] * (o - 16 * s)[:, None]
            if BITS == 8:  # one scale s per row: u * s - 128 s, u = UNIT (f - 1)
                UNIT: tl.constexpr = 32768 if ASM else 256
                s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
                acc = tl.sum(xf, axis=1) * (UNIT * s) + tl.sum(x_sum, axis=0) * (-128 * s - UNIT * s)
            else:
                acc = tl.sum(acc2, axis=1)
        ss = tl.sum(ss, axis=0)
        if SPLIT_K == 1:
            _gemv_epilogue(acc, ss, r_ptr, y_ptr, rn, n_ok, K, eps, PROLOGUE, RESIDUAL)
        else:
            tl.store(part_ptr + split * N + rn, acc, mask=n_ok)
            if PROLOGUE == 1:
                tl.store(ss_ptr + pid_n * SPLIT_K + split, ss)
            tl.debug_barrier()  # every thread's stores come before the program's arrival (one thread's atomic)
            if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                # the last program: the others' stores are visible after the acquire; .cg reads them from L2, where
                # they are, not from an L1 line this SM may hold from before
                total = _sum_splits(part_ptr, rn, n_ok, N, SPLIT_K)
                total_ss = tl.load(ss_ptr + pid_n * SPLIT_K, cache_modifier=".cg").to(tl.float32)  # (rmsnorm's)
                if PROLOGUE == 1:
                    for i in tl.static_range(1, SPLIT_K):
                        total_ss += tl.load(ss_ptr + pid_n * SPLIT_K + i, cache_modifier=".cg").to(tl.float32)
                tl.store(count_ptr + pid_n, 0)
                _gemv_epilogue(total, total_ss, r_ptr, y_ptr, rn, n_ok, K, eps, PROLOGUE, RESIDUAL)

    @triton.jit
    def _sum_splits(part_ptr, at, ok, split_stride, SPLIT_K: tl.constexpr):
        """The SPLIT_K partial sums at part[i * split_stride + at], added in split order; .cg reads them from L2,
        where the other programs' stores are, not from an L1 line this SM may hold from before."""
        total = tl.load(part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        for i in tl.static_range(1, SPLIT_K):
            total += tl.load(part_ptr + i * split_stride + at, mask=ok, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def _gemv_epilogue(acc, ss, r_ptr, y_ptr, rn, n_ok, K: tl.constexpr, eps, PROLOGUE: tl.constexpr,
                       RESIDUAL: tl.constexpr):
        """y[rn] = acc, times rmsnorm's rsqrt(mean of x^2 + eps) (ss: the sum of x^2), plus the residual r[rn]."""
        if PROLOGUE == 1:
            acc = acc * tl.rsqrt(ss / K + eps).to(tl.float32)
        if RESIDUAL:
            acc += tl.load(r_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_as_float(words, i: tl.constexpr, dtype: tl.constexpr):
        """128 + u for the 4-bit value u at bits 4i of each int32 word, exact in any float dtype: u goes to the
        mantissa bits 16..19 of the float32 128.0 (0x43000000), whose unit in the last place there is 1."""
        if 4 * i <= 16:
            bits = words << (16 - 4 * i)
        else:
            bits = words >> (4 * i - 16)
        return ((bits & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True).to(dtype)

    @triton.jit
    def _int8_as_float_asm(words):
        """The four bytes u of each int32 word as float32 1 + u / 2^15, one PRMT each: the byte goes to the mantissa
        bits 8..15 of 1.0 (0x3F800000), beside the constant's own bytes; a shift and a LOP3 would put it at bits
        15..22 (_gemv_kernel's portable path). Exact; the products x f keep 16 bits of u's share."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 one;
            mov.b32 one, 0x3F800000;
            prmt.b32 $0, $4, one, 0x7604;
            prmt.b32 $1, $4, one, 0x7614;
            prmt.b32 $2, $4, one, 0x7624;
            prmt.b32 $3, $4, one, 0x7634;
            }""",
            constraints="=r,=r,=r,=r,r", args=[words], dtype=(tl.float32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _int4_as_bf16_asm(words, HIGH: tl.constexpr):
        """Four values of _int4_as_float(words, i, bfloat16), i = 0..3 (HIGH: 4..7), in eight integer instructions per
        two words: the asm takes two neighbouring words a, b of a row (pack=2; neighbours along K in the MMA
        operand's layout, which holds two K-neighbours a register) and returns register pairs (value i of a, value i
        of b), the operand's own packing. A PRMT puts a's low (HIGH: high) half beside b's, each LOP3 (a & b) | c
        then moves two nibbles, 16 bits apart, into the mantissas of a pair of bfloat16 128.0 (0x4300), whose unit
        in the last place is 1; shifts bring the next nibbles down. Four values at a time, not eight, halve the
        registers the unpacked tile holds."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 c, q;
            prmt.b32 c, $4, $5, """ + ("0x7632" if HIGH else "0x5410") + """;
            lop3.b32 $0, c, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 q, c, 4;
            lop3.b32 $1, q, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 q, c, 8;
            lop3.b32 $2, q, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 q, c, 12;
            lop3.b32 $3, q, 0x000F000F, 0x43004300, 0xEA;
            }""",
            constraints="=r,=r,=r,=r,r,r", args=[words], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)

    @triton.jit
    def _int4_mma_kernel(x_ptr, g_ptr, w_ptr, s_ptr, o_ptr, r_ptr, y_ptr, part_ptr, ss_ptr, count_ptr, M, N, K,
                         row_words, stride_xm, stride_wn, stride_sn, stride_ym, blocks_per_split, eps,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, RESIDUAL: tl.constexpr, ASM: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr,
                         ONE_ROW: tl.constexpr):
        """y[M, N] = W prologue(x[M, K]) (+ r) with int4 W on tensor cores (decode, speculative verify, prefill),
        computed transposed, y.T = W x.T: the weights are the MMA's first operand and x.T, padded to BLOCK_M >= 8
        rows, the small second one. PROLOGUE as _gemv_kernel's (rmsnorm: x * g in the products, each row's
        rsqrt(mean(x^2) + eps) at the end; swiglu: x [M, 2K] = [gate | up]).

        Word t of a row holds columns 8t + i (i = 0..7), so W x.T splits into 8 products over K / 8: W_i
        [BLOCK_N, BLOCK_K / 8] (value i of each word) times x_i.T (x's columns 8t + i). With a group of at least
        BLOCK_K columns, W_i is 128 + u, exact in 16 bits and made by bit operations only, and the group's scale s
        and offset o come after the block's products, from u s + o = (128 + u) s + (o - 128 s): acc += s * (W'x) +
        (o - 128 s) * sum(x). Smaller groups (32, 64) dequantize each weight, u s + o, before the product.
        Split-K: as _gemv_kernel (partials [SPLIT_K, M, N] float32, the last program of a block of rows to arrive
        adds them up in order; rmsnorm's sums of squares likewise, ss [row blocks, SPLIT_K, BLOCK_M]); it needs all
        M rows in one BLOCK_M. EVEN_K: K is a multiple of BLOCK_K, so no block runs past a row's end. Rows of x past
        M read row M - 1 instead of masking: they only reach columns of y.T that are not stored. ONE_ROW (M = 1,
        decode): x's block is read once, [1, BLOCK_K], split by value position and broadcast to the MMA's columns,
        and sum(x) taken over it in one reduction: 14% fewer instructions a loop iteration than loading x_i at each
        position into the MMA operand's layout, which holds each value 8 times, and 15% more tok/s end to end
        (BENCHMARKS.md). More rows read x at each position: for them splitting the block took more instructions."""
        pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        WORDS: tl.constexpr = BLOCK_K // 8
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        # from a count of blocks, so that the compiler knows k0 // 8 a multiple of 16: 16-byte cp.async of the words
        k_start = split * blocks_per_split * BLOCK_K
        k_end = tl.minimum(k_start + blocks_per_split * BLOCK_K, tl.cdiv(K, BLOCK_K) * BLOCK_K)
        x_rows = x_ptr + tl.minimum(rm, M - 1)[None, :] * stride_xm  # [1, BLOCK_M]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # rmsnorm's squares of x, summed over columns at the end
        squares = tl.zeros((1, BLOCK_K) if ONE_ROW else (WORDS, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            t = k0 // 8 + tl.arange(0, WORDS)
            if EVEN_K:
                w_ok = n_ok[:, None] & (t >= 0)[None, :]  # (a broadcast mask the compiler folds)
            else:  # rows are padded to whole groups, not whole blocks
                w_ok = n_ok[:, None] & (t < row_words)[None, :]
            words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :], mask=w_ok, other=0)  # [BLOCK_N, WORDS]
            s, o = words, words  # (unused with whole-block groups)
            if GROUP < BLOCK_K:  # a word's 8 columns lie in one group (a multiple of 8 columns)
                at = rn[:, None] * stride_sn + (8 * t[None, :]) // GROUP
                s = tl.load(s_ptr + at, mask=w_ok, other=0.0).to(tl.float32)  # [BLOCK_N, WORDS]
                o = tl.load(o_ptr + at, mask=w_ok, other=0.0).to(tl.float32) - 128 * s
            x = x_rows  # (ONE_ROW: the block of x [1, BLOCK_K] after the prologue, in x's dtype)
            if ONE_ROW:
                x, sq = _load_x(x_ptr, g_ptr, k0 + tl.arange(0, BLOCK_K)[None, :], K, EVEN_K, PROLOGUE)
                if PROLOGUE == 1:
                    squares += sq
                x = x.to(x_ptr.dtype.element_ty)
            # the block's products, and sum(x) for the offsets; x_i.T [WORDS, BLOCK_M] are x's columns 8t + i
            block, x_sum, squares = _int4_mma_half(
                tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), tl.zeros((WORDS, BLOCK_M), dtype=tl.float32),
                squares, words, s, o, x, x_rows, g_ptr, 8 * t[:, None], K, False, GROUP < BLOCK_K, ASM,
                DOT_PRECISION, EVEN_K, PROLOGUE, ONE_ROW)
            block, x_sum, squares = _int4_mma_half(block, x_sum, squares, words, s, o, x, x_rows, g_ptr,
                                                   8 * t[:, None], K, True, GROUP < BLOCK_K, ASM, DOT_PRECISION,
                                                   EVEN_K, PROLOGUE, ONE_ROW)
            if GROUP < BLOCK_K:
                acc += block
            else:
                g = k0 // GROUP
                s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                if ONE_ROW:
                    x_total = tl.sum(x.to(tl.float32), axis=1)  # [1]
                else:
                    x_total = tl.sum(x_sum, axis=0)  # [BLOCK_M]
                acc += s[:, None] * block + (o - 128 * s)[:, None] * x_total[None, :]
        y_at = rm[None, :] * stride_ym + rn[:, None]  # y.T's [BLOCK_N, BLOCK_M] tile
        y_ok = n_ok[:, None] & m_ok[None, :]
        ss = tl.sum(squares, axis=1 if ONE_ROW else 0)  # [1] or [BLOCK_M]
        if SPLIT_K == 1:
            if PROLOGUE == 1:
                acc = acc * tl.rsqrt(ss / K + eps)[None, :]
            if RESIDUAL:
                acc += tl.load(r_ptr + y_at, mask=y_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_at, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
        else:
            part_at = rm[None, :] * N + rn[:, None]
            tl.store(part_ptr + split * M * N + part_at, acc, mask=y_ok)
            ss_at = pid_n * SPLIT_K * BLOCK_M + tl.arange(0, BLOCK_M)
            if PROLOGUE == 1:
                tl.store(ss_ptr + ss_at + split * BLOCK_M, ss)
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = _sum_splits(part_ptr, part_at, y_ok, M * N, SPLIT_K)
                if PROLOGUE == 1:
                    total_ss = _sum_splits(ss_ptr, ss_at, ss_at >= 0, BLOCK_M, SPLIT_K)
                    total = total * tl.rsqrt(total_ss / K + eps)[None, :]
                tl.store(count_ptr + pid_n, 0)
                if RESIDUAL:
                    total += tl.load(r_ptr + y_at, mask=y_ok, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_at, total.to(y_ptr.dtype.element_ty), mask=y_ok)

    @triton.jit
    def _int4_mma_half(block, x_sum, squares, words, s, o, x, x_rows, g_ptr, cols, K, HIGH: tl.constexpr,
                       SCALE: tl.constexpr, ASM: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                       PROLOGUE: tl.constexpr, ONE_ROW: tl.constexpr):
        """block += W_i x_i.T for values i = 0..3 (HIGH: 4..7) of the block's words (_int4_mma_kernel); x_i are x's
        columns cols + i (cols = 8t [WORDS, 1]): ONE_ROW, split from x, the row's block [1, BLOCK_K]; otherwise
        read from x_rows at each step, x_sum += x_i.T (and squares += x_i.T^2 before the prologue). SCALE:
        dequantize each weight first, u s + o, given s and o - 128 s (small groups)."""
        dtype: tl.constexpr = x_rows.dtype.element_ty
        first: tl.constexpr = 4 if HIGH else 0
        if ASM:
            w_a, w_b, w_c, w_d = _int4_as_bf16_asm(words, HIGH)
        else:
            w_a, w_b = _int4_as_float(words, first, dtype), _int4_as_float(words, first + 1, dtype)
            w_c, w_d = _int4_as_float(words, first + 2, dtype), _int4_as_float(words, first + 3, dtype)
        x_a, x_b, x_c, x_d = x, x, x, x  # (read at each step unless ONE_ROW)
        if ONE_ROW:  # column 8t + 4e + 2d + c: split off e (the half), then c, then d
            x = tl.permute(tl.reshape(x, (1, x.shape[1] // 8, 2, 2, 2)), (0, 1, 3, 4, 2))  # [1, WORDS, d, c, e]
            x_low, x_high = tl.split(x)
            if HIGH:
                x_c0, x_c1 = tl.split(x_high)  # [1, WORDS, d]
            else:
                x_c0, x_c1 = tl.split(x_low)
            x_a, x_c = tl.split(x_c0)  # [1, WORDS]
            x_b, x_d = tl.split(x_c1)
        block, x_sum, squares = _int4_mma_step(block, x_sum, squares, w_a, s, o, x_a, x_rows, g_ptr, cols + first, K,
                                               SCALE, DOT_PRECISION, EVEN_K, PROLOGUE, ONE_ROW)
        block, x_sum, squares = _int4_mma_step(block, x_sum, squares, w_b, s, o, x_b, x_rows, g_ptr, cols + first + 1,
                                               K, SCALE, DOT_PRECISION, EVEN_K, PROLOGUE, ONE_ROW)
        block, x_sum, squares = _int4_mma_step(block, x_sum, squares, w_c, s, o, x_c, x_rows, g_ptr, cols + first + 2,
                                               K, SCALE, DOT_PRECISION, EVEN_K, PROLOGUE, ONE_ROW)
        block, x_sum, squares = _int4_mma_step(block, x_sum, squares, w_d, s, o, x_d, x_rows, g_ptr, cols + first + 3,
                                               K, SCALE, DOT_PRECISION, EVEN_K, PROLOGUE, ONE_ROW)
        return block, x_sum, squares

    @triton.jit
    def _int4_mma_step(block, x_sum, squares, w_i, s, o, x_i, x_rows, g_ptr, cols, K, SCALE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr,
                       ONE_ROW: tl.constexpr):
        """One value position's product: block += W_i x_i.T, x_i given [1, WORDS] (ONE_ROW: broadcast to the MMA's
        columns) or read at x's columns cols [WORDS, 1] (_load_x: the prologue in float32, rounded back to x's
        dtype for the MMA)."""
        if SCALE:
            w_i = (w_i.to(tl.float32) * s + o).to(w_i.dtype)
        if ONE_ROW:
            x_i = tl.broadcast_to(tl.trans(x_i), (x_i.shape[1], block.shape[1]))  # [WORDS, BLOCK_M]
        else:
            x_i, sq = _load_x(x_rows, g_ptr, cols, K, EVEN_K, PROLOGUE)  # [WORDS, BLOCK_M] float32
            x_i = x_i.to(x_rows.dtype.element_ty)
            if PROLOGUE == 1:
                squares += sq
            x_sum += x_i.to(tl.float32)
        return tl.dot(w_i, x_i, block, input_precision=DOT_PRECISION), x_sum, squares

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, rope_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, y_ptr, part_ptr, ml_ptr,
                                 count_ptr, stride_ch, stride_cs, window, QK_SCALE: tl.constexpr, H: tl.constexpr,
                                 H_KV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        """One query token's attention for query head program_id(0) over cache positions [split * CHUNK, (split + 1)
        * CHUNK) (split = program_id(1)), from the wqkv output row qkv [(H + 2 H_KV) D]: RoPE on q and k, the new k
        and v written to the cache at pos, then softmax(q K^T) V over the cached positions, split-KV as in
        flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"). The current position's score
        comes from registers, so no program reads the cache row that this launch writes. With SPLITS > 1 each
        split leaves its unnormalised sum [D] and (max, sum of weights) in part and ml, and the head's last split
        to finish (count[head], as in _gemv_kernel's split-K) combines them into y [H D]. Scores are in base 2
        (QK_SCALE = log2(e) / sqrt(D)); the sliding window (window > 0) keeps positions j with pos - j < window."""
        head, split = tl.program_id(0), tl.program_id(1)
        kv_head = head // (H // H_KV)
        pos = tl.load(pos_ptr).to(tl.int32)
        half = tl.arange(0, D // 2)
        cos, sin = tl.load(rope_ptr + 2 * half), tl.load(rope_ptr + 2 * half + 1)  # rope row [D/2, 2]
        dtype = k_cache_ptr.dtype.element_ty
        # q and k rotated in float32 and rounded to the cache's dtype, as the model's own path rounds them
        q_even = tl.load(qkv_ptr + head * D + 2 * half).to(tl.float32)
        q_odd = tl.load(qkv_ptr + head * D + 2 * half + 1).to(tl.float32)
        q_even, q_odd = ((q_even * cos - q_odd * sin).to(dtype).to(tl.float32) * QK_SCALE,
                         (q_odd * cos + q_even * sin).to(dtype).to(tl.float32) * QK_SCALE)
        k_base = k_cache_ptr + kv_head * stride_ch
        v_base = v_cache_ptr + kv_head * stride_ch
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, pos)  # the cached positions of this split, the current one excluded
        if window > 0:
            lo = tl.maximum(lo, pos - window + 1)
        m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)  # running max of the scores
        l = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)  # running sum of exp2(score - m)
        acc = tl.zeros((D,), tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            k_even = tl.load(k_base + s[:, None] * stride_cs + 2 * half[None, :], mask=ok[:, None], other=0.0)
            k_odd = tl.load(k_base + s[:, None] * stride_cs + 2 * half[None, :] + 1, mask=ok[:, None], other=0.0)
            scores = tl.sum(k_even.to(tl.float32) * q_even[None, :] + k_odd.to(tl.float32) * q_odd[None, :], axis=1)
            scores = tl.where(ok, scores, float("-inf"))  # [BLOCK_S]
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp2(scores - m_new)
            alpha = tl.exp2(m - m_new)
            v = tl.load(v_base + s[:, None] * stride_cs + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l = l * alpha + tl.sum(p, axis=0)
            m = m_new
        if split == pos // CHUNK:  # this split holds the current position: its k and v come from qkv
            k_off, v_off = H * D + kv_head * D, (H + H_KV) * D + kv_head * D
            k_even = tl.load(qkv_ptr + k_off + 2 * half).to(tl.float32)
            k_odd = tl.load(qkv_ptr + k_off + 2 * half + 1).to(tl.float32)
            k_even, k_odd = (k_even * cos - k_odd * sin).to(dtype), (k_odd * cos + k_even * sin).to(dtype)
            v = tl.load(qkv_ptr + v_off + tl.arange(0, D)).to(dtype)
            score = tl.sum(k_even.to(tl.float32) * q_even + k_odd.to(tl.float32) * q_odd, axis=0)
            m_new = tl.maximum(m, score)
            p, alpha = tl.exp2(score - m_new), tl.exp2(m - m_new)
            acc = acc * alpha + p * v.to(tl.float32)
            l = l * alpha + p
            m = m_new
            if head % (H // H_KV) == 0:  # one program per KV head writes the cache row
                tl.store(k_base + pos * stride_cs + 2 * half, k_even)
                tl.store(k_base + pos * stride_cs + 2 * half + 1, k_odd)
                tl.store(v_base + pos * stride_cs + tl.arange(0, D), v)
        if SPLITS == 1:
            tl.store(y_ptr + head * D + tl.arange(0, D), (acc / l).to(y_ptr.dtype.element_ty))
        else:
            tl.store(part_ptr + (split * H + head) * D + tl.arange(0, D), acc)
            tl.store(ml_ptr + (split * H + head) * 2, m)
            tl.store(ml_ptr + (split * H + head) * 2 + 1, l)
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                # the splits' partial sums weighted by exp2(their max - the overall max), over the weights' sum;
                # a split with no position in range left max -inf and sum 0: its weight is 0
                splits = tl.arange(0, BLOCK_SPLITS)
                at = (splits * H + head) * 2
                maxes = tl.load(ml_ptr + at, mask=splits < SPLITS, other=float("-inf"), cache_modifier=".cg")
                sums = tl.load(ml_ptr + at + 1, mask=splits < SPLITS, other=0.0, cache_modifier=".cg")
                weight = tl.exp2(maxes - tl.max(maxes, axis=0))  # [BLOCK_SPLITS]
                parts = tl.load(part_ptr + (splits[:, None] * H + head) * D + tl.arange(0, D)[None, :],
                                mask=(splits < SPLITS)[:, None], other=0.0, cache_modifier=".cg")  # [BLOCK_SPLITS, D]
                out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(sums * weight, axis=0)
                tl.store(y_ptr + head * D + tl.arange(0, D), out.to(y_ptr.dtype.element_ty))
                tl.store(count_ptr + head, 0)


def gemv_config(bits: int, n: int, k: int, group_size: int = 128, prologue: Optional[str] = None) -> dict:
    """Block sizes, split-K and warps of _gemv_kernel per weight format, shape and prologue; tuned on an H200 with
    scripts/bench.py --gemv_sweep --int4_sweep --int8_sweep, each matrix with the op the decode step folds into it
    (BENCHMARKS.md). Split-K pays where N is small (wo, w2: more programs, more loads in flight)."""
    if bits == 4:
        return dict(BLOCK_N=32, BLOCK_K=min(group_size, 128), SPLIT_K=8, num_warps=2 if n <= 8192 else 1)
    if bits == 8:
        if n <= 8192:
            return dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=4, num_warps=4)
        return dict(BLOCK_N=16 if n <= 24576 else 32, BLOCK_K=512, SPLIT_K=1, num_warps=4)
    if prologue == "rmsnorm":  # (wqkv, w13, the head) 8 rows a program share the work on x: 8-12% over 4 rows
        return dict(BLOCK_N=8, BLOCK_K=1024, SPLIT_K=1, num_warps=4, num_stages=2)
    if k > 8192:  # (w2, after SwiGLU)
        return dict(BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, num_warps=8, num_stages=2)
    return dict(BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, num_warps=8)


def gemv(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, offsets: Optional[Tensor] = None, *,
         bits: int = 0, group_size: Optional[int] = None, config: Optional[dict] = None,
         prologue: Optional[str] = None, norm_weight: Optional[Tensor] = None, eps: float = 0.0,
         residual: Optional[Tensor] = None, counters: Optional[Tensor] = None) -> Tensor:
    """One row x [1, K] (swiglu: [1, 2K]) times weight.T (plus residual [1, N]) -> [1, N] with _gemv_kernel.
    weight: float [N, K] (bits 0), int8 [N, K] (bits 8, scales [N]) or int4 packed uint8 [N, Kp/2] (bits 4,
    scales and offsets [N, Kp/group_size]). prologue: None, "rmsnorm" (norm_weight, eps) or "swiglu".
    counters: split-K's arrival counters, int32 zeros (the kernel leaves them zero), at least one per block of
    rows; without them a split-K config zeroes fresh ones (a memset before the kernel). config: gemv_config's keys;
    "ASM": False takes int8's portable unpacking."""
    x = x.contiguous()
    n = weight.shape[0]
    k = x.shape[1] // 2 if prologue == "swiglu" else x.shape[1]
    config = dict(config or gemv_config(bits, n, k, group_size or 128, prologue))
    split = config.pop("SPLIT_K", 1)
    asm = config.pop("ASM", bits == 8 and x.is_cuda and torch.version.hip is None)  # PTX: NVIDIA's, not ROCm's
    w = weight if bits == 0 else weight.view(torch.int32)
    blocks, row_blocks = triton.cdiv(k, config["BLOCK_K"]), triton.cdiv(n, config["BLOCK_N"])
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    part = ss = y
    if split > 1:
        part = torch.empty(split, n, device=x.device, dtype=torch.float32)
        ss = torch.empty(row_blocks, split, device=x.device, dtype=torch.float32) if prologue == "rmsnorm" else y
        if counters is None or counters.numel() < row_blocks:
            counters = torch.zeros(row_blocks, device=x.device, dtype=torch.int32)
    scale_stride = 1 if scales is None or scales.dim() == 1 else scales.stride(0)
    _gemv_kernel[(row_blocks, split)](
        x, x if norm_weight is None else norm_weight, w, w if scales is None else scales,
        w if offsets is None else offsets, y if residual is None else residual, y, part, ss,
        y if split == 1 else counters, n, k, w.shape[1], w.stride(0), scale_stride, triton.cdiv(blocks, split), eps,
        BITS=bits, GROUP=group_size or 1, EVEN_K=k % config["BLOCK_K"] == 0, PROLOGUE=PROLOGUES[prologue],
        SPLIT_K=split, RESIDUAL=residual is not None, ASM=asm, **config)
    return y


def int4_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Block sizes, split-K and warps for int4_matmul, from H200 sweeps (BENCHMARKS.md, 2026-12-03 fifth session;
    scripts/bench.py --int4_sweep --quant_m 1 --quant_m 6 repeats them). One row (decode): the tensor-core kernel
    on mma.sync (1-2 warps, x padded to 8 rows, x's block read once), 32 rows a program where the registers of 64
    on one warp (190 a thread) would leave fewer programs an SM; it now beats the GEMV (gemv_config) on square
    matrices too (wo: 1186 against 961 GB/s). Up to 16 rows (a speculative verify): 16 rows of x a program, 2
    warps, split-K so that there are enough programs (the whole row block's partials then meet in one program).
    Prefill: 64 rows a program on 4 warps (wgmma)."""
    if m == 1:
        if n <= 8192:  # (wo, w2)
            return dict(BLOCK_N=32, BLOCK_M=8, BLOCK_K=128, SPLIT_K=8, num_warps=2, num_stages=3)
        if n <= 16384:  # (wqkv)
            return dict(BLOCK_N=32, BLOCK_M=8, BLOCK_K=128, SPLIT_K=4, num_warps=1, num_stages=3)
        if n <= 24576:  # (w13)
            return dict(BLOCK_N=64, BLOCK_M=8, BLOCK_K=128, SPLIT_K=4, num_warps=1, num_stages=3)
        return dict(BLOCK_N=32, BLOCK_M=8, BLOCK_K=128, SPLIT_K=2, num_warps=1, num_stages=3)
    if m <= 16:
        if n <= 8192:  # (wo, w2)
            return dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=8, num_warps=2, num_stages=3)
        if n <= 24576:
            return dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=4, num_warps=2, num_stages=3)
        return dict(BLOCK_N=128, BLOCK_M=16, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3)
    if n <= 8192:  # (wo, w2: few row blocks, so split K)
        return dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3)


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
                residual: Optional[Tensor] = None, config: Optional[dict] = None,
                counters: Optional[Tensor] = None, prologue: Optional[str] = None,
                norm_weight: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """x [M, K] (swiglu: [M, 2K]) @ dequant(packed).T (+ residual [M, N]) -> [M, N] with the Triton kernels (CUDA,
    or CPU under TRITON_INTERPRET=1): _int4_mma_kernel, or _gemv_kernel where config is a GEMV's (no BLOCK_M; one
    row). prologue, norm_weight, eps: as gemv's. config: int4_config's keys (BLOCK_K 128, 16 words a row, for the
    tensor-core kernel; "ASM": False takes the portable unpacking); counters: gemv's."""
    x = x.contiguous()
    m = x.shape[0]
    k = x.shape[1] // 2 if prologue == "swiglu" else x.shape[1]
    n = packed.shape[0]
    config = dict(config or int4_config(m, n, k, group_size))
    if "BLOCK_M" not in config:  # a GEMV config (one row)
        return gemv(x, packed, scales, offsets, bits=4, group_size=group_size, config=config, residual=residual,
                    counters=counters, prologue=prologue, norm_weight=norm_weight, eps=eps)
    split = config.pop("SPLIT_K", 1)
    if m > config["BLOCK_M"]:  # a row block's partials meet in one program, so all rows must be in one
        split = 1
    # the inline PTX unpacking: NVIDIA GPUs (not ROCm's), bfloat16 activations
    asm = config.pop("ASM", x.is_cuda and torch.version.hip is None and x.dtype == torch.bfloat16)
    w = packed.view(torch.int32)
    blocks, row_blocks = triton.cdiv(k, config["BLOCK_K"]), triton.cdiv(n, config["BLOCK_N"])
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = ss = y
    if split > 1:
        part = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        if prologue == "rmsnorm":
            ss = torch.empty(row_blocks, split, config["BLOCK_M"], device=x.device, dtype=torch.float32)
        if counters is None or counters.numel() < row_blocks:
            counters = torch.zeros(row_blocks, device=x.device, dtype=torch.int32)
    grid = (row_blocks, triton.cdiv(m, config["BLOCK_M"]), split)
    _int4_mma_kernel[grid](
        x, x if norm_weight is None else norm_weight, w, scales, offsets, y if residual is None else residual, y,
        part, ss, y if split == 1 else counters, m, n, k, w.shape[1], x.stride(0), w.stride(0), scales.stride(0),
        y.stride(0), triton.cdiv(blocks, split), eps, GROUP=group_size, SPLIT_K=split,
        RESIDUAL=residual is not None, ASM=asm, EVEN_K=k % config["BLOCK_K"] == 0, PROLOGUE=PROLOGUES[prologue],
        ONE_ROW=m == 1,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32: exact products, not TF32's
        **config)
    return y


def attention_config(max_seq_length: int) -> dict:
    """decode_attention's cache positions per program (CHUNK), per loop step (BLOCK_S) and warps: chunks of 16
    positions, one warp each (the fastest of the configs `scripts/bench.py --attention_microbench` times on an H200
    at 216 positions: 5.9 us a layer against 6.9 for 32-position chunks); longer caches at most 64 chunks
    (flash-decoding) of a power of two positions each, 32 a step on 2 warps."""
    chunk = max(16, triton.next_power_of_2(triton.cdiv(max_seq_length, 64)))
    return dict(CHUNK=chunk, BLOCK_S=min(chunk, 32), num_warps=1 if chunk <= 16 else 2)


def decode_attention(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, n_heads: int,
                     n_kv_heads: int, sliding_window: Optional[int] = None, config: Optional[dict] = None,
                     counters: Optional[Tensor] = None) -> Tensor:
    """Attention of one new token, from the wqkv output qkv [1, (n_heads + 2 n_kv_heads) head_dim] at position
    input_pos [1]: RoPE (rope [1, head_dim/2, 2], interleaved pairs), k and v written into the caches [1, n_kv_heads,
    max_seq, head_dim] at input_pos, attention over positions 0..input_pos (the last sliding_window of them)
    -> [1, n_heads head_dim], in qkv's dtype. What model.Attention computes for one row, in one kernel.
    config: attention_config's keys. counters: int32 zeros, at least n_heads (as gemv's; default: fresh ones)."""
    head_dim, max_seq = k_cache.shape[-1], k_cache.shape[2]
    config = config or attention_config(max_seq)
    splits = triton.cdiv(max_seq, config["CHUNK"])
    y = torch.empty(1, n_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    part = ml = y
    if splits > 1:
        part = torch.empty(splits, n_heads, head_dim, device=qkv.device, dtype=torch.float32)
        ml = torch.empty(splits, n_heads, 2, device=qkv.device, dtype=torch.float32)
        if counters is None or counters.numel() < n_heads:
            counters = torch.zeros(n_heads, device=qkv.device, dtype=torch.int32)
    _decode_attention_kernel[(n_heads, splits)](
        qkv.contiguous(), rope.contiguous(), k_cache, v_cache, input_pos, y, part, ml,
        y if splits == 1 else counters, k_cache.stride(1), k_cache.stride(2), sliding_window or 0,
        QK_SCALE=1.4426950408889634 / head_dim ** 0.5, H=n_heads, H_KV=n_kv_heads, D=head_dim, SPLITS=splits,
        BLOCK_SPLITS=triton.next_power_of_2(splits), **config)
    return y


def int8_gemv(x: Tensor, weight: Tensor, scales: Tensor, config: Optional[dict] = None,
              counters: Optional[Tensor] = None) -> Tensor:
    """x [1, K] @ (weight * scales[:, None]).T -> [1, N] for int8 weight [N, K], K a multiple of 4."""
    return gemv(x, weight, scales, bits=8, config=config, counters=counters)


# ------------------------------------------------------------------------------------------- module swap

def linear_gemv(x: Tensor, linear: nn.Module, **kw) -> Tensor:
    """gemv on whatever weights `linear` holds (nn.Linear, quantize.Int8Linear or Int4Linear), plus its bias.
    kw: gemv's prologue arguments and residual (a linear with a bias adds it after the bias)."""
    residual = kw.pop("residual", None) if linear.bias is not None else None
    w = linear.weight
    if w.dtype == torch.int8:
        y = gemv(x, w, linear.scales, bits=8, **kw)
    elif w.dtype == torch.uint8:  # the GEMV or the tensor-core kernel, as int4_config picks
        y = int4_matmul(x, w, linear.scales, linear.offsets, linear.group_size, **kw)
    else:
        y = gemv(x, w, **kw)
    if linear.bias is not None:
        y = y + linear.bias
    return y if residual is None else y + residual


def runs_gemv(linear: nn.Module) -> bool:
    """Whether a one-row `linear` can run through _gemv_kernel: nn.Linear, quantize.Int8Linear or Int4Linear with
    nothing hooked in front of it (a hook after it, TP's all-reduce or gather, is called on the kernel's output)."""
    from quantize import Int4Linear, Int8Linear

    return type(linear) in (nn.Linear, Int8Linear, Int4Linear) and not linear._forward_pre_hooks


def takes_prologue(linear: nn.Module) -> bool:
    """Whether `linear`'s GEMV also does the op in front of it (RMSNorm, SwiGLU): float and int8 weights. int4 takes
    x as is: both its kernels take the prologues (int4_matmul) but measured slower end to end with them than with
    inductor's separate RMSNorm and SwiGLU kernels (BENCHMARKS.md: 369 against 405 tok/s with RMSNorm folded into
    the tensor-core kernel, 2026-12-03)."""
    return runs_gemv(linear) and linear.weight.dtype != torch.uint8


def project(x: Tensor, linear: nn.Module, norm: Optional[nn.Module] = None, swiglu: bool = False,
            residual: Optional[Tensor] = None, counters: Optional[Tensor] = None) -> Tensor:
    """linear(op(x)) + residual for one row x [1, K], op the RMSNorm `norm`, or (swiglu) silu(gate) * up of x =
    [gate | up], or nothing: one GEMV kernel where runs_gemv(linear), op in it where takes_prologue(linear), the
    residual add in it unless forward hooks (tensor parallelism's all-reduce or gather) must see the product
    first. counters: gemv's split-K workspace."""
    fold = takes_prologue(linear)
    if not fold:
        if norm is not None:
            x = norm(x)
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
    if not runs_gemv(linear):
        y = linear(x)
        return y if residual is None else y + residual
    hooks = list(linear._forward_hooks.values())
    kw = dict(counters=counters, residual=None if hooks else residual)
    if fold and swiglu:
        kw["prologue"] = "swiglu"
    if fold and norm is not None:
        kw.update(prologue="rmsnorm", norm_weight=norm.weight, eps=norm.eps)
    y = linear_gemv(x, linear, **kw)
    for hook in hooks:
        y = hook(linear, (x,), y)
    return y + residual if hooks and residual is not None else y


class DecodeLinear(nn.Module):
    """`linear` after the RMSNorm `norm` (the output head), the two in one GEMV kernel when the input is one row;
    otherwise the plain modules. counters: gemv's split-K workspace."""

    def __init__(self, linear: nn.Module, norm: nn.Module, counters: Tensor):
        super().__init__()
        self.linear, self.norm = linear, norm
        self.register_buffer("counters", counters, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == x.shape[-1]:
            return project(x.reshape(1, -1), self.linear, self.norm, counters=self.counters).view(*x.shape[:-1], -1)
        return self.linear(self.norm(x))


class DecodeBlock(TransformerBlock):
    """A TransformerBlock (the same modules, so the same state-dict keys) whose one-token step is five kernels:
    RMSNorm + wqkv, attention (RoPE, the cache write, split-KV softmax), wo + the residual add, RMSNorm + w13,
    SwiGLU + w2 + the residual add. Several tokens (prefill, speculative verify) run TransformerBlock.forward.
    counters: the kernels' split workspace (int32 zeros, one per output row of the widest linear), shared by every
    block: the kernels run one after another and each leaves it zero."""

    def __init__(self, block: TransformerBlock, sliding_window: Optional[int], counters: Tensor):
        nn.Module.__init__(self)
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self.sliding_window = sliding_window
        self.register_buffer("counters", counters, persistent=False)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Optional[Tensor]) -> Tensor:
        attention, ff, counters = self.attention, self.feed_forward, self.counters
        if x.shape[0] * x.shape[1] != 1 or input_pos is None or attention.kv_cache is None:
            return super().forward(x, rope, mask, input_pos)
        x = x.view(1, -1)  # [1, dim]
        qkv = project(x, attention.wqkv, self.attention_norm, counters=counters)  # [1, (n_heads + 2 n_kv_heads) hd]
        cache = attention.kv_cache
        y = decode_attention(qkv, rope, cache.k_cache, cache.v_cache, input_pos, attention.n_heads,
                             attention.n_kv_heads, self.sliding_window, counters=counters)  # [1, n_heads head_dim]
        h = project(y, attention.wo, residual=x, counters=counters)
        u = project(h, ff.w13, self.ffn_norm, counters=counters)  # [1, 2 intermediate]: [gate | up]
        return project(u, ff.w2, swiglu=True, residual=h, counters=counters).view(1, 1, -1)


def fuse_decode(model: Transformer, use_kernel: Optional[bool] = None) -> Transformer:
    """Run the model's one-token decode step on this file's kernels, by swapping modules in place (after the weights
    are loaded): each TransformerBlock becomes a DecodeBlock, the final RMSNorm and output head a DecodeLinear.
    Tensor parallel shards keep their forward hooks (the all-reduce, the gather). use_kernel defaults to: on CUDA
    with Triton; set it True on CPU only under TRITON_INTERPRET=1 (tests). Blocks whose sizes the kernels do not
    take (head_dim not a power of two, widths not multiples of 8) are left as they are; a model already swapped is
    left as it is."""
    device = model.tok_embeddings.weight.device
    if use_kernel is None:
        use_kernel = triton is not None and device.type == "cuda"
    if not use_kernel:
        return model
    args = model.args
    hd = args.head_dim
    rows = max([m.weight.shape[0] for m in model.modules() if runs_gemv(m)] + [args.n_heads])
    counters = torch.zeros(rows, dtype=torch.int32, device=device)
    if hd & (hd - 1) == 0 and hd >= 4 and args.dim % 8 == 0 and args.intermediate_size % 8 == 0:
        for i, layer in enumerate(model.layers):
            if not isinstance(layer, DecodeBlock):
                model.layers[i] = DecodeBlock(layer, args.sliding_window, counters)
    if runs_gemv(model.output) and args.dim % 8 == 0:
        model.output, model.norm = DecodeLinear(model.output, model.norm, counters), nn.Identity()
    return model
