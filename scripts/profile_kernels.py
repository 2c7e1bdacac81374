"""Run each decode kernel format a few times on one Llama-2-7B matrix, for Nsight Compute to read its counters:

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        -k regex:_gemv_kernel|_int4_mma_kernel --launch-count 12 python3 scripts/profile_kernels.py

Launches, in order: the int4 GEMV (m = 1), the int8 GEMV (m = 1), the tensor-core int4 kernel at m = 1 on 2 warps
(mma.sync) and at m = 6 (its default config), each three times (the first compiles); the matrix is wqkv, 12288 x
4096, bf16 activations."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_kernels import _int4_mma_kernel, gemv, int4_matmul  # noqa: E402,F401
from quantize import quantize_int4, quantize_int8  # noqa: E402


def main(n: int = 12288, k: int = 4096, device: str = "cuda", dtype=torch.bfloat16):
    w = torch.randn(n, k, device=device, dtype=dtype)
    q4, q8 = quantize_int4(w, 128), quantize_int8(w)
    x1, x6 = torch.randn(1, k, device=device, dtype=dtype), torch.randn(6, k, device=device, dtype=dtype)
    mma_m1 = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=128, SPLIT_K=4, num_warps=2, num_stages=3)
    for call in (lambda: gemv(x1, *q4, bits=4, group_size=128), lambda: gemv(x1, *q8, bits=8),
                 lambda: int4_matmul(x1, *q4, 128, config=mma_m1),
                 lambda: int4_matmul(x6, *q4, 128)):
        for _ in range(3):
            call()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
