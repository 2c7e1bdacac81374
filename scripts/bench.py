"""Decode-speed benchmark on random weights: tok/s, GB/s, time to first token, compile time, peak memory.

    python scripts/bench.py --model llama-2-7b --model llama-3-8b --bandwidth
    python scripts/bench.py --model llama-3.2-1b --batch_size 8 --max_new_tokens 512 --mlp_microbench
    python scripts/bench.py --model tiny --device cpu --runs 2 --max_new_tokens 20 --no-compile --bandwidth
    python scripts/bench.py --model llama-2-7b --draft self-int8 --speculate_k 5     # speculative vs target-only

Each model is built on the meta device, materialised on the target device in --precision and filled with
random normal weights, then run through generate.py's own generate() (compiled with compile_fns() unless
--no-compile): one warm-up call timed as compile time, then --runs timed runs of a random prompt with greedy
decoding and no stop tokens, so every run decodes exactly --max_new_tokens tokens. --bandwidth first
measures the device's copy and read bandwidth, the ceiling decode GB/s is compared against. Prints a table
and appends one JSON line per model (and per measurement) to --out.

--draft measures speculative decoding (speculative.py) against target-only decoding in the same process, both
greedy from the same prompt, alternating run by run: the draft is the target's own weights quantized by a
quantize.py scheme ('self-int8'; each scheme in quantize.SCHEMES is offered as self-SCHEME), the target's
weights as they are ('self': every draft accepted, a bound), or another shape with random weights and the
target's vocabulary (which accepts almost nothing). Random weights make acceptance a property of the
quantization error, not of text; report it next to the speedup. --agreement makes the weights predictable
(make_predictable) so that drafts are accepted at a chosen rate, e.g. a bf16 target with its int4 self:

    python scripts/bench.py --model llama-2-7b --draft self-int4 --agreement 1 --speculate_k 4
"""
import argparse
import contextlib
import datetime
import gc
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import (DTYPES, compile_fns, generate, kv_cache_bytes, peak_memory_gb,  # noqa: E402
                      weight_bytes_per_token)
from speculative import acceptance_stats, compile_speculative_round, format_stats, speculative_generate  # noqa: E402
from model import FeedForward, ModelArgs, Transformer, causal_mask  # noqa: E402
from decode_kernels import (decode_attention, fuse_decode, gemv, gemv_config, int4_config, int4_matmul,  # noqa: E402
                            int8_gemv)
from quantize import (INT4_GROUP_SIZES, SCHEMES, Int4Linear, Int8Linear, make_scheme, quantizable_linears,  # noqa: E402
                      quantize_int4, quantize_int8, quantize_state_dict, swap_linears)
from tp import (apply_tp, env_world, init_distributed, rank0_output, shutdown_distributed, tp_problem,  # noqa: E402
                use_symmetric_memory)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MODELS = {
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                       head_dim=128, max_seq_len=4096, norm_eps=1e-5),
    "llama-2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672,
                        head_dim=128, max_seq_len=4096, norm_eps=1e-5),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       head_dim=128, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
                         head_dim=64, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384, head_dim=32,
                 max_seq_len=1024),
    "small": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, intermediate_size=2048,
                  head_dim=64, max_seq_len=2048),
}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on, recorded with every JSON line."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        with contextlib.suppress(OSError, StopIteration):  # platform.processor() is often empty on Linux
            name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        name = f"{name} ({torch.get_num_threads()} threads)"
    triton_version = commit = None
    with contextlib.suppress(ImportError):
        import triton
        triton_version = triton.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    return dict(device=name, torch=torch.__version__, triton=triton_version, git_commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=[sys.executable] + sys.argv)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 3, inner: int = 1) -> float:
    """Median milliseconds of one fn() call over `reps` timings of `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def measure_bandwidth(device: torch.device) -> dict:
    """Copy and read bandwidth of a ~4 GiB (CUDA) or ~1 GiB (CPU) random bf16 tensor, in GB/s (1e9)."""
    cuda = device.type == "cuda"
    gib, reps = (4, 30) if cuda else (1, 5)
    n = gib * 2**30 // 2 - 2**20  # a little under 2**31 elements, so kernels keep 32-bit indexing
    x = torch.randn(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    out = dict(kind="bandwidth", size_gb=nbytes / 1e9, dtype="bfloat16", reps=reps)
    # copy reads and writes every byte; sum and a row-wise amax read every byte once, writing next to nothing
    for name, fn, moved in (("copy", lambda: y.copy_(x), 2 * nbytes), ("sum", lambda: x.sum(), nbytes),
                            ("amax", lambda: x.view(-1, 4096).amax(dim=-1), nbytes)):
        ms = time_ms(fn, device, reps)
        out[f"{name}_ms"], out[f"{name}_gb_s"] = ms, moved / ms / 1e6
    out["read_gb_s"] = max(out["sum_gb_s"], out["amax_gb_s"])
    return out


class SeparateMLP(nn.Module):
    """model.FeedForward with the gate (w1) and up (w3) projections left as two matmuls."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1, self.w3 = (nn.Linear(args.dim, args.intermediate_size, bias=False) for _ in range(2))
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def mlp_microbench(device: torch.device, dtype: torch.dtype) -> dict:
    """One Llama-2-7B SwiGLU MLP at batch 1: gate/up fused into one [2*11008, 4096] matmul vs two matmuls."""
    args, cuda = ModelArgs(**MODELS["llama-2-7b"]), device.type == "cuda"
    x = torch.randn(1, 1, args.dim, device=device, dtype=dtype)
    out = dict(kind="mlp_microbench", shape=f"M=1 dim={args.dim} intermediate={args.intermediate_size}",
               dtype=str(dtype).split(".")[-1])
    for name, cls in (("fused", FeedForward), ("separate", SeparateMLP)):
        with torch.device("meta"):
            mlp = cls(args)
        mlp = randomize(materialize(mlp, device, dtype))  # parameters: static inputs to CUDA graphs
        compiled = torch.compile(mlp, mode="reduce-overhead" if cuda else None, fullgraph=True)

        def call():
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            compiled(x)
        with torch.no_grad():
            ms = time_ms(call, device, reps=20 if cuda else 5, inner=100 if cuda else 5)
        nbytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
        out[f"{name}_us"], out[f"{name}_gb_s"] = ms * 1e3, nbytes / ms / 1e6
        del mlp, compiled
    out["separate_over_fused"] = out["separate_us"] / out["fused_us"]
    return out


# Llama-2-7B decode matmuls at batch 1: (name, out_features, in_features)
# --round_graph: compile_speculative_round's one_graph
ROUND_GRAPHS = {"auto": None, "one": True, "per-step": False}

DECODE_MATMULS = [("wqkv", 12288, 4096), ("wo", 4096, 4096), ("w13", 22016, 4096), ("w2", 4096, 11008),
                  ("output", 32000, 4096)]


def graph_ms_per_call(fns: list, device: torch.device, reps: int = 20) -> float:
    """Milliseconds per call of fns run back to back. On CUDA they are captured once into a CUDA graph, so
    launch overhead is out; callers cycle over weight copies larger than L2 so each call reads memory."""
    if device.type != "cuda":
        return time_ms(lambda: [fn() for fn in fns], device, reps=3) / len(fns)
    for fn in fns:  # compile and warm every call before capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_ms(graph.replay, device, reps=reps) / len(fns)


def allreduce_microbench(device: torch.device, dtype: torch.dtype, sizes=(4096, 8192, 65536)) -> dict:
    """Microseconds per all-reduce of one row of each size under torchrun, 64 back to back in a CUDA graph (as in a
    decode step): NCCL (functional collective, as compile emits it) against the one-shot symmetric-memory op."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    group = dist.group.WORLD
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(group.group_name)
    buffer = symm_mem.empty(max(sizes), dtype=dtype, device=device)
    symm_mem.rendezvous(buffer, group.group_name)
    out = dict(kind="allreduce_microbench", world_size=dist.get_world_size(), dtype=str(dtype))
    for n in sizes:
        x = torch.randn(1, n, dtype=dtype, device=device)
        want = x.clone()
        dist.all_reduce(want)
        view = buffer[:n].view(1, n)
        got = torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", group.group_name)
        out[f"max_diff_{n}"] = (got.float() - want.float()).abs().max().item()
        nccl = [lambda: torch.ops._c10d_functional.wait_tensor(
            torch.ops._c10d_functional.all_reduce(x, "sum", group.group_name))] * 64
        one_shot = [lambda: torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", group.group_name)] * 64
        out[f"nccl_us_{n}"] = graph_ms_per_call(nccl, device) * 1e3
        out[f"symm_us_{n}"] = graph_ms_per_call(one_shot, device) * 1e3
        log(f"all-reduce [1, {n}] {dtype}: NCCL {out[f'nccl_us_{n}']:.1f} us, one-shot "
            f"{out[f'symm_us_{n}']:.1f} us, max |diff| {out[f'max_diff_{n}']:.3g}")
    return out


def weight_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of a weight of nbytes to cycle over so that together they overflow L2."""
    return max(2, int(200e6 // nbytes) + 1) if device.type == "cuda" else 1


def matmul_microbench(device: torch.device, dtype: torch.dtype) -> dict:
    """GB/s of one-row matmuls at Llama-2-7B layer shapes: F.linear (cuBLAS on GPU), and a multiply-and-sum
    reduction that inductor writes as one Triton kernel (what coordinate_descent_tuning turns an M=1 matmul
    into), without and with max-autotune."""
    cuda = device.type == "cuda"

    def mul_sum(x, w):
        return (x[:, None, :].float() * w.float()).sum(-1).to(x.dtype)

    variants = {"linear": F.linear, "mul_sum": torch.compile(mul_sum)}
    if cuda:
        variants["mul_sum_autotuned"] = torch.compile(mul_sum, mode="max-autotune-no-cudagraphs")
    out = dict(kind="matmul_microbench", dtype=str(dtype).split(".")[-1], m=1)
    with torch.no_grad():
        for name, n, k in DECODE_MATMULS:
            copies = weight_copies(n * k * 2, device)
            ws = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
            x = torch.randn(1, k, device=device, dtype=dtype)
            ref = F.linear(x.float(), ws[0].float())
            for variant, fn in variants.items():
                err = ((fn(x, ws[0]).float() - ref).norm() / ref.norm()).item()
                assert err < 2e-2, (name, variant, err)
                ms = graph_ms_per_call([lambda w=w, fn=fn: fn(x, w) for w in ws * 4], device)
                out[f"{name}_{variant}_gb_s"] = n * k * 2 / ms / 1e6
            del ws
    return out


def quantized_weights(n: int, k: int, device: torch.device, dtype: torch.dtype, group_size: int) -> dict:
    """One random weight in each format the quant microbench times: name -> (tensors, bytes read per call)."""
    w = torch.randn(n, k, device=device, dtype=dtype)
    q8, s8 = quantize_int8(w)
    q4 = quantize_int4(w, group_size)
    out = {"bf16": ((w,), n * k * w.element_size()), "int8": ((q8, s8), q8.numel() + s8.numel() * s8.element_size()),
           "int4": (q4, sum(t.numel() * t.element_size() for t in q4))}
    if device.type == "cuda":  # torch's own int4 layout (tinygemm), where this build has it
        try:
            nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
            packed = torch._convert_weight_to_int4pack(nibbles, 8)
            scales_zeros = torch.randn(k // group_size, n, 2, device=device, dtype=dtype)
            out["torch_int4pack"] = ((packed, scales_zeros), packed.numel() * packed.element_size()
                                     + scales_zeros.numel() * scales_zeros.element_size())
        except (RuntimeError, AttributeError) as e:
            log(f"torch._weight_int4pack_mm unavailable: {str(e).splitlines()[0]}")
    return out


def quant_microbench(device: torch.device, dtype: torch.dtype, ms: list, group_size: int):
    """Per Llama-2-7B decode matmul and row count m: microseconds and GB/s (of the format's own bytes) of a
    bf16 F.linear, int8 as Int8Linear computes it on CUDA (our GEMV at m = 1, else compiled dequant-matmul),
    our int4 Triton kernels, and torch's _weight_int4pack_mm; speedups are over bf16 in the same run."""
    def int8_linear(x, q, s):  # Int8Linear's path for more than one row
        return F.linear(x, q.to(x.dtype)) * s

    compile_fns(device)  # inductor set up as generate.py sets it for the decode step
    int8_compiled = torch.compile(int8_linear)
    counters = torch.zeros(max(n for _, n, _ in DECODE_MATMULS), dtype=torch.int32, device=device)  # fuse_decode's
    fns = {"bf16": F.linear,
           "int8": lambda x, q, s: int8_gemv(x, q, s, counters=counters) if x.shape[0] == 1 else int8_compiled(x, q, s),
           "int4": lambda x, p, s, o: int4_matmul(x, p, s, o, group_size, counters=counters),
           "torch_int4pack": lambda x, p, sz: torch._weight_int4pack_mm(x, p, group_size, sz)}
    with torch.no_grad():
        for name, n, k in DECODE_MATMULS:
            formats = quantized_weights(n, k, device, dtype, group_size)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                r = dict(kind="quant_microbench", matmul=name, n=n, k=k, m=m, group_size=group_size,
                         dtype=str(dtype).split(".")[-1])
                for fmt, (tensors, nbytes) in formats.items():
                    copies = [tensors] + [tuple(t.clone() for t in tensors)
                                          for _ in range(weight_copies(nbytes, device) - 1)]
                    try:
                        t_ms = graph_ms_per_call([lambda c=c, f=fns[fmt]: f(x, *c) for c in copies * 4], device)
                    except Exception as e:  # noqa: BLE001 -- a format this build cannot run is reported, not fatal
                        r[f"{fmt}_error"] = str(e).splitlines()[0][:200]
                        continue
                    r[f"{fmt}_us"], r[f"{fmt}_gb_s"] = t_ms * 1e3, nbytes / t_ms / 1e6
                    del copies
                for fmt in formats:
                    if fmt != "bf16" and f"{fmt}_us" in r:
                        r[f"{fmt}_speedup"] = r["bf16_us"] / r[f"{fmt}_us"]
                yield r
                log("quant " + " ".join(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}"
                                        for key, v in r.items() if key not in ("kind", "dtype")))
            del formats


def config_key(config: dict) -> str:
    """e.g. n8_k128_s4_w2 for BLOCK_N=8, BLOCK_K=128, SPLIT_K=4, num_warps=2 (stages: _p3)."""
    short = dict(BLOCK_M="m", BLOCK_N="n", BLOCK_K="k", SPLIT_K="s", num_warps="w", num_stages="p", ASM="a",
                 maxnreg="r")
    return "_".join(f"{short[k]}{v}" for k, v in config.items())


def int4_sweep(device: torch.device, dtype: torch.dtype, group_size: int, ms: list, matrices: list):
    """GB/s of the int4 kernels over block sizes and warps, per Llama-2-7B matmul and row count m; the best
    ones set decode_kernels.int4_config."""
    counters = torch.zeros(max(n for _, n, _ in DECODE_MATMULS), dtype=torch.int32, device=device)
    with torch.no_grad():
        for name, n, k in (m for m in DECODE_MATMULS if m[0] in matrices):
            tensors = quantize_int4(torch.randn(n, k, device=device, dtype=dtype), group_size)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(weight_copies(nbytes, device) - 1)]
            for m in ms:
                x, op = torch.randn(m, k, device=device, dtype=dtype), {}
                if m == 1:  # as decode runs int4 (decode_kernels.takes_prologue): the residual add, no prologue
                    op = dict(residual=torch.randn(1, n, device=device, dtype=dtype)) if name in ("wo", "w2") else {}
                    # the GEMV (its default: earlier sweeps' best, BENCHMARKS.md) against the tensor-core kernel
                    # on 1 or 2 warps (mma.sync, the weights' words through shared memory, unpacked in registers)
                    grid = [gemv_config(4, n, k, group_size)] + [
                        dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=128, SPLIT_K=sk, num_warps=w, num_stages=3)
                        for bn in (32, 64, 128) for bm in (8, 16) for w in (1, 2) for sk in (1, 2, 4, 8)]
                    # registers bound the warps an SM holds (BENCHMARKS.md: ncu): cap them (maxnreg, which torch's
                    # wrapper of user kernels in torch.compile does not pass on: to explore), and vary the stages
                    grid += [dict(BLOCK_N=64, BLOCK_M=8, BLOCK_K=128, SPLIT_K=sk, num_warps=1, num_stages=p, **r)
                             for sk in (4, 8) for p, r in [(3, dict(maxnreg=168)), (3, dict(maxnreg=128)),
                                                           (2, {}), (4, {})]]
                    if n <= 8192:  # few row blocks (wo, w2): more splits
                        grid += [dict(BLOCK_N=bn, BLOCK_M=8, BLOCK_K=128, SPLIT_K=16, num_warps=w, num_stages=3)
                                 for bn in (16, 32, 64) for w in (1, 2)]
                else:  # the tensor-core kernel
                    grid = [dict(BLOCK_N=bn, BLOCK_M=16 if m <= 16 else 64, BLOCK_K=128, SPLIT_K=sk, num_warps=4,
                                 num_stages=3) for bn in (64, 128) for sk in (1, 2, 4)]
                    if m <= 16:  # and on 1 or 2 warps (mma.sync)
                        grid += [dict(BLOCK_N=bn, BLOCK_M=16, BLOCK_K=128, SPLIT_K=sk, num_warps=w, num_stages=3)
                                 for bn in (16, 32, 64) for w in (1, 2) for sk in (2, 4, 8)]
                results = {}
                for config in grid:
                    key = config_key(config)
                    try:
                        calls = [lambda c=c: int4_matmul(x, *c, group_size, config=config, counters=counters, **op)
                                 for c in copies * 4]
                        t_ms = graph_ms_per_call(calls, device, reps=10)
                    except Exception as e:  # noqa: BLE001 -- e.g. too many registers: skip that config
                        log(f"int4 sweep {name} m={m} {key}: {str(e).splitlines()[0][:120]}")
                        continue
                    results[key] = nbytes / t_ms / 1e6
                best = sorted(results.items(), key=lambda kv: -kv[1])[:5]
                default = int4_config(m, n, k, group_size)
                default_key = config_key(default)
                yield dict(kind="int4_sweep", matmul=name, n=n, k=k, m=m, group_size=group_size, best=best,
                           default=default_key, default_gb_s=results.get(default_key), all=results)
                log(f"int4 sweep {name} m={m}: best {best[:3]}, default {default_key} "
                    f"{results.get(default_key) or 0:.0f} GB/s")
            del copies, tensors


def int8_sweep(device: torch.device, dtype: torch.dtype, matrices: list):
    """GB/s of the int8 decode GEMV over block sizes, split-K and warps, per Llama-2-7B matmul, each with the op the
    decode step folds into it; the best ones set decode_kernels.gemv_config."""
    counters = torch.zeros(max(n for _, n, _ in DECODE_MATMULS), dtype=torch.int32, device=device)
    with torch.no_grad():
        for name, n, k in (m for m in DECODE_MATMULS if m[0] in matrices):
            q8, s8 = quantize_int8(torch.randn(n, k, device=device, dtype=dtype))
            nbytes = q8.numel() + s8.numel() * s8.element_size()
            copies = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(weight_copies(nbytes, device) - 1)]
            x, op = decode_op(name, n, k, device, dtype)  # with the op the decode step folds in
            results = {}
            grid = [dict(BLOCK_N=bn, BLOCK_K=512, SPLIT_K=sk, num_warps=w) for bn in (16, 32, 64)
                    for sk in (1, 2, 4, 8) for w in (2, 4, 8)]
            # more, smaller programs (wqkv's 768 programs fill 23 of an SM's 32 warps, BENCHMARKS.md: ncu), and
            # longer blocks (more bytes in flight a warp)
            grid += [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=w) for bn, bk in [(8, 512), (8, 1024),
                                                                                        (16, 1024)]
                     for sk in (1, 2, 4) for w in (4, 8)]
            for config in grid:
                t_ms = graph_ms_per_call([lambda c=c: gemv(x, c[0], c[1], bits=8, config=config,
                                                           counters=counters, **op)
                                          for c in copies * 4], device, reps=10)
                results[config_key(config)] = nbytes / t_ms / 1e6
            best = sorted(results.items(), key=lambda kv: -kv[1])[:5]
            default_key = config_key(gemv_config(8, n, k, prologue=op.get("prologue")))
            yield dict(kind="int8_sweep", matmul=name, n=n, k=k, m=1, best=best,
                       default=default_key, default_gb_s=results.get(default_key), all=results)
            log(f"int8 sweep {name}: best {best[:3]}, default {default_key} {results.get(default_key) or 0:.0f} GB/s")
            del copies


def decode_op(name: str, n: int, k: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(x, gemv keywords) for Llama-2-7B matrix `name` as the decode step's DecodeBlock runs it: RMSNorm before
    wqkv, w13 and the head, SwiGLU before w2 (x is [gate | up]), the residual add after wo and w2."""
    x = torch.randn(1, 2 * k if name == "w2" else k, device=device, dtype=dtype)
    if name in ("wqkv", "w13", "output"):
        return x, dict(prologue="rmsnorm", norm_weight=torch.rand(k, device=device, dtype=dtype) + 0.5, eps=1e-5)
    kw = dict(residual=torch.randn(1, n, device=device, dtype=dtype))
    return x, dict(kw, prologue="swiglu") if name == "w2" else kw


def float_gemv_sweep(device: torch.device, dtype: torch.dtype, matrices: list):
    """GB/s of decode_kernels.py's GEMV on float weights over block sizes, split-K and warps, per Llama-2-7B matmul
    with the op the decode step folds into it (decode_op), against the default config without that op and cuBLAS."""
    counters = torch.zeros(max(n for _, n, _ in DECODE_MATMULS), dtype=torch.int32, device=device)
    with torch.no_grad():
        for name, n, k in (m for m in DECODE_MATMULS if m[0] in matrices):
            w = torch.randn(n, k, device=device, dtype=dtype)
            nbytes = w.numel() * w.element_size()
            copies = [w] + [w.clone() for _ in range(weight_copies(nbytes, device) - 1)]
            x, op = decode_op(name, n, k, device, dtype)
            results = {}
            for config in [dict(BLOCK_N=bn, BLOCK_K=1024, SPLIT_K=sk, num_warps=nw, num_stages=ns) for bn in (2, 4, 8)
                           for sk in (1, 2) for nw in (4, 8) for ns in (2, 3)]:
                t_ms = graph_ms_per_call([lambda c=c: gemv(x, c, config=config, counters=counters, **op)
                                          for c in copies * 4], device, reps=10)
                results[config_key(config)] = nbytes / t_ms / 1e6
            default = gemv_config(0, n, k, prologue=op.get("prologue"))
            t_default = graph_ms_per_call([lambda c=c: gemv(x, c, counters=counters, **op) for c in copies * 4],
                                          device, reps=10)
            x_plain = x[:, :k].contiguous()
            t_plain = graph_ms_per_call([lambda c=c: gemv(x_plain, c, counters=counters) for c in copies * 4], device,
                                        reps=10)
            t_cublas = graph_ms_per_call([lambda c=c: F.linear(x_plain, c) for c in copies * 4], device, reps=10)
            best = sorted(results.items(), key=lambda kv: -kv[1])[:5]
            r = dict(kind="gemv_sweep", matmul=name, n=n, k=k, op=op.get("prologue") or "residual", best=best,
                     default=config_key(default), default_gb_s=nbytes / t_default / 1e6,
                     plain_gb_s=nbytes / t_plain / 1e6, cublas_gb_s=nbytes / t_cublas / 1e6, all=results)
            log(f"float gemv sweep {name} ({r['op']}): best {best[:3]}, default {r['default']} "
                f"{r['default_gb_s']:.0f} GB/s; without the op {r['plain_gb_s']:.0f}, cuBLAS {r['cublas_gb_s']:.0f}")
            yield r
            del copies, w


def attention_microbench(device: torch.device, dtype: torch.dtype, seq: int = 216) -> dict:
    """Microseconds of one decode-step attention at the Llama-2-7B shape (one query, 32 heads of 128, against a
    static cache of `seq` positions under its mask), compiled, with each SDPA backend allowed alone."""
    import torch._inductor.config as inductor_config

    flags = {"cudnn": torch.backends.cuda.enable_cudnn_sdp, "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
             "math": torch.backends.cuda.enable_math_sdp, "flash": torch.backends.cuda.enable_flash_sdp}
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    cache_setting, inductor_config.fx_graph_cache = inductor_config.fx_graph_cache, False  # a graph per backend
    q = torch.randn(1, 32, 1, 128, device=device, dtype=dtype)
    caches = [(torch.randn(1, 32, seq, 128, device=device, dtype=dtype),
               torch.randn(1, 32, seq, 128, device=device, dtype=dtype)) for _ in range(32)]
    mask = causal_mask(seq, None, device)[None, None, [seq // 2]]  # [1, 1, 1, seq]: half the cache filled
    result = {}
    try:
        for backend in ("cudnn", "efficient", "math"):
            for name, enable in flags.items():
                enable(name == backend)
            torch._dynamo.reset()
            attend = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   fullgraph=True)
            try:
                result[backend] = 1e3 * graph_ms_per_call([lambda kv=kv: attend(q, *kv, mask) for kv in caches],
                                                          device)
            except Exception as e:  # noqa: BLE001 -- a backend that cannot take this input (or this device)
                log(f"attention {backend}: {str(e).splitlines()[0][:120]}")
    finally:
        for enable, on in zip(flags.values(), before):
            enable(on)
        inductor_config.fx_graph_cache = cache_setting
        torch._dynamo.reset()
    # ours (decode_kernels.decode_attention: RoPE, the cache write and attention from the wqkv output), a few configs
    qkv = torch.randn(1, 96 * 128, device=device, dtype=dtype)
    rope = torch.randn(1, 64, 2, device=device)
    pos = torch.tensor([seq // 2], device=device)
    counters = torch.zeros(32, dtype=torch.int32, device=device)
    for chunk, block_s, warps in ((256, 64, 4), (64, 64, 4), (32, 32, 2), (32, 32, 1), (32, 16, 1), (16, 16, 1),
                                  (16, 16, 2)):
        config = dict(CHUNK=chunk, BLOCK_S=block_s, num_warps=warps)
        result[f"ours chunk {chunk} block {block_s} warps {warps}"] = 1e3 * graph_ms_per_call(
            [lambda kv=kv: decode_attention(qkv, rope, *kv, pos, 32, 32, config=config, counters=counters)
             for kv in caches], device)
    log("attention per decode layer (us): " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return dict(kind="attention_microbench", seq=seq, us=result)


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A module built on meta, cast there (free), then given uninitialised storage on the device."""
    return module.to(dtype=dtype).to_empty(device=device).eval()


@torch.no_grad()
def randomize(module: nn.Module) -> nn.Module:
    """Random normal weights in place (std 0.02; norm scales 1 + noise): no zeros, no second copy."""
    for name, p in module.named_parameters():
        p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02)
    return module


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, quantization: str,
                group_size: int = 128, rank: int = 0, world_size: int = 1,
                vocab_parallel_output: bool = True, symmetric_memory: bool = True) -> Transformer:
    """Random weights for this rank's tensor-parallel shard (the whole model when world_size is 1), made on the
    device one tensor at a time: never the whole model, nor a float copy of a quantized one (70B bf16 does not fit
    one GPU). A quantized layer gets a random float weight of its own shape, converted by quantize.py's function."""
    with torch.device("meta"):
        model = Transformer(args)
    if quantization != "none":
        swap_linears(model, make_scheme(quantization, group_size))
    apply_tp(model, rank, world_size, vocab_parallel_output)
    model = materialize(model, device, dtype)
    if args.tie_word_embeddings:  # to_empty gives each module its own tensor; share one again
        model.output.weight = model.tok_embeddings.weight
    randomize(model)  # the float parameters; quantized weights are buffers
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (Int8Linear, Int4Linear)):
                w = torch.empty(layer.out_features, layer.in_features, device=device, dtype=dtype).normal_(0.0, 0.02)
                quantized = quantize_int8(w) if isinstance(layer, Int8Linear) else quantize_int4(w, layer.group_size)
                for buffer, value in zip((layer.weight, layer.scales, getattr(layer, "offsets", None)), quantized):
                    buffer.copy_(value)
                del w, quantized
    if world_size > 1 and symmetric_memory:
        use_symmetric_memory(model)
    return model


def quantize_in_memory(model: Transformer, mode: str, group_size: int = 128) -> Transformer:
    """quantize.py's own conversion (mode by name, 'none' for none; int4 with group_size), applied in memory."""
    if mode != "none":
        names = [name for name, *_ in quantizable_linears(model)]
        scheme = make_scheme(mode, group_size)
        state_dict = quantize_state_dict(model.state_dict(), names, scheme)
        swap_linears(model, scheme)
        model.load_state_dict(state_dict, assign=True)
    return model


def build_draft(draft: str, target: Transformer, device: torch.device, dtype: torch.dtype,
                group_size: int = 128) -> Transformer:
    """'self': the target's weights (shared, not copied); 'self-SCHEME': them quantized by quantize.py's SCHEME
    (the float tensors it does not quantize stay shared); a shape name: random weights, the target's vocabulary."""
    if draft == "self" or draft.startswith("self-"):
        with torch.device("meta"):
            model = Transformer(target.args)
        model.load_state_dict(target.state_dict(), assign=True)
        return quantize_in_memory(model.eval(), draft.removeprefix("self").removeprefix("-") or "none", group_size)
    return build_model(ModelArgs(**dict(MODELS[draft], vocab_size=target.args.vocab_size)), device, dtype, "none")


@torch.no_grad()
def make_predictable(model: Transformer, successor: Tensor, layer_scale: float = 0.01) -> Transformer:
    """Weights under which the model's greedy next token is successor[token], for speculative benchmarks on random
    weights (where a draft and a target otherwise never agree): embeddings of std 1 that the layers barely move
    (their output projections scaled by layer_scale), and output rows that are the embeddings of the tokens they
    follow. The layers still run in full on nonzero values; shapes and bytes read per step do not change. A tied
    output is untied (same bytes read per step). Float weights only."""
    model.tok_embeddings.weight.normal_(0.0, 1.0)
    for layer in model.layers:
        layer.attention.wo.weight.mul_(layer_scale)
        layer.feed_forward.w2.weight.mul_(layer_scale)
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(torch.empty_like(model.tok_embeddings.weight), requires_grad=False)
    model.output.weight.index_copy_(0, successor, model.tok_embeddings.weight)  # row successor[t] = embedding of t
    return model


def disagreeing_successor(successor: Tensor, agreement: float, generator: torch.Generator) -> Tensor:
    """A permutation equal to `successor` on a random fraction `agreement` of the tokens and different from it on
    every other token (those are rotated among themselves), so a draft built on it is accepted with probability
    about `agreement` per position."""
    changed = torch.randperm(len(successor), generator=generator)[:round((1 - agreement) * len(successor))]
    changed = changed.to(successor.device)
    result = successor.clone()
    if len(changed) > 1:
        result[changed] = successor[changed.roll(1)]
    return result


def apply_inductor_overrides(settings: list):
    """--inductor_config KEY=VALUE experiments, on top of compile_fns' settings."""
    import torch._inductor.config as inductor_config
    for setting in settings:
        key, value = setting.split("=", 1)
        *parents, leaf = key.split(".")  # e.g. triton.enable_pdl
        target = inductor_config
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, {"True": True, "False": False}.get(value, value))


def bench_model(name: str, a: argparse.Namespace, device: torch.device, read_gb_s, quantization: str,
                decode_kernels: str, allreduce: str = "symm") -> dict:
    args = ModelArgs(**MODELS[name])
    model = build_model(args, device, DTYPES[a.precision], quantization, a.groupsize, a.rank, a.world_size,
                        a.vocab_parallel_output, symmetric_memory=allreduce == "symm")
    symm = any(getattr(m, "symm", None) is not None for m in model.modules())
    if decode_kernels == "on":
        fuse_decode(model)
    model.setup_caches(a.batch_size, a.prompt_len + a.max_new_tokens)
    kw = dict(temperature=0.0, stop_ids=())  # greedy; no stop tokens, so every run decodes max_new_tokens
    if a.compile:
        kw["prefill_fn"], kw["decode_fn"] = compile_fns(device)
        apply_inductor_overrides(a.inductor_config)
    # from its own generator: every tensor-parallel rank must see the same prompt
    prompt = torch.randint(0, args.vocab_size, (a.batch_size, a.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    t0 = time.perf_counter()
    generate(model, prompt, a.max_new_tokens, **kw)  # compiles and captures CUDA graphs when compiling
    compile_s = time.perf_counter() - t0
    log(f"{name}: warm-up{' (compile)' if a.compile else ''} {compile_s:.1f} s")
    weight_read = weight_bytes_per_token(model)
    step_bytes = weight_read + kv_cache_bytes(model, a.batch_size)
    runs = []
    for i in range(a.runs):
        t = {}
        generate(model, prompt, a.max_new_tokens, timings=t, **kw)
        assert t["decode_steps"] == a.max_new_tokens - 1, t
        steps_s = t["decode_steps"] / t["decode_s"]
        r = dict(t, ttft_ms=t["prefill_s"] * 1e3, tok_s=steps_s * a.batch_size, gb_s=steps_s * step_bytes / 1e9)
        runs.append(r)
        log(f"{name}: run {i + 1}: {r['tok_s']:.1f} tok/s, {r['gb_s']:.1f} GB/s, first token {r['ttft_ms']:.1f} ms")
    med = {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "gb_s", "ttft_ms")}
    if a.profile and device.type == "cuda":
        profile_decode(model, prompt, kw, device)
    # every stored tensor (int8 weights are buffers), shared ones once; caches are not in the state dict
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    # peak memory: on CUDA since the last reset (per model); on CPU the process's max RSS so far
    # under tensor parallelism: gb_s, weights_gb, weight_read_gb, step_read_gb and peak memory are rank 0's
    return dict(kind="model", model=name, model_args=MODELS[name], precision=a.precision, quantization=quantization,
                decode_kernels=decode_kernels, allreduce=("symm" if symm else "nccl") if a.world_size > 1 else None,
                group_size=a.groupsize if quantization == "int4" else None, world_size=a.world_size,
                vocab_parallel_output=a.vocab_parallel_output if a.world_size > 1 else None,
                inductor_config=a.inductor_config, sdpa=a.sdpa, batch_size=a.batch_size,
                prompt_len=a.prompt_len, max_new_tokens=a.max_new_tokens, compile=a.compile, **med, compile_s=compile_s,
                peak_memory_gb=peak_memory_gb(device), weights_gb=sum(seen.values()) / 1e9,
                weight_read_gb=weight_read / 1e9, step_read_gb=step_bytes / 1e9,
                fraction_of_read_bw=med["gb_s"] / read_gb_s if read_gb_s else None, runs=runs)


def bench_speculative(name: str, a: argparse.Namespace, device: torch.device, quantization: str) -> list:
    """Greedy decode tok/s of the target alone and of speculative decoding with a.draft, in alternating runs from
    one prompt; the draft alone too, so the cost of a draft step relative to a target step is on record. With
    a.agreement (a named-shape draft): one record per value, the models' weights made predictable
    (make_predictable) with the draft agreeing with the target on that fraction of the vocabulary. A self draft
    takes only agreement 1: the target is made predictable and the draft built from it, so it agrees as far as
    its quantization lets it (the acceptance measured says how far)."""
    args, dtype, k = ModelArgs(**MODELS[name]), DTYPES[a.precision], a.speculate_k
    target = build_model(args, device, dtype, quantization)
    self_draft = a.draft.startswith("self")
    if a.agreement:
        generator = torch.Generator().manual_seed(5)
        successor = torch.randperm(args.vocab_size, generator=generator).to(device)
        make_predictable(target, successor)
    draft = build_draft(a.draft, target, device, dtype, a.groupsize)
    draft_output = None
    if a.agreement and not self_draft:
        make_predictable(draft, successor)
        draft_output = draft.output.weight  # rewritten in place per agreement: captured graphs keep its address
    if a.decode_kernels[0] == "on":
        fuse_decode(target), fuse_decode(draft)
    for model in (target, draft):
        model.setup_caches(1, a.prompt_len + a.max_new_tokens + k)
    kw = dict(temperature=0.0, stop_ids=())  # no stop tokens: every run decodes max_new_tokens
    spec_kw = dict(kw, speculate_k=k)
    if a.compile:
        kw["prefill_fn"], kw["decode_fn"] = compile_fns(device)
        spec_kw["prefill_fn"] = kw["prefill_fn"]
        apply_inductor_overrides(a.inductor_config)
    round_fns = {g: compile_speculative_round(device, ROUND_GRAPHS[g]) for g in a.round_graph} if a.compile else {}
    prompt = torch.randint(0, args.vocab_size, (1, a.prompt_len), device=device)
    records = []
    for agreement, round_graph in itertools.product(a.agreement or [None], a.round_graph):
        if draft_output is not None:
            with torch.no_grad():
                draft_output.index_copy_(0, disagreeing_successor(successor, agreement, generator),
                                         draft.tok_embeddings.weight)
        if a.compile:
            spec_kw["round_fn"] = round_fns[round_graph]
        tag = (f"{name} + draft {a.draft}" + ("" if agreement is None else f" (agreement {agreement})")
               + ("" if len(a.round_graph) == 1 else f" (round graph {round_graph})"))
        t0 = time.perf_counter()
        target_rows = generate(target, prompt, a.max_new_tokens, **kw)
        log(f"{tag}: target warm-up {time.perf_counter() - t0:.1f} s")
        t1 = time.perf_counter()
        generate(draft, prompt, a.max_new_tokens, **kw)  # a second graph of the same step, for the draft
        log(f"{tag}: draft warm-up {time.perf_counter() - t1:.1f} s")
        t1 = time.perf_counter()
        spec_rows, _ = speculative_generate(target, draft, prompt, a.max_new_tokens, **spec_kw)
        log(f"{tag}: speculative round warm-up {time.perf_counter() - t1:.1f} s")
        warmup_s = time.perf_counter() - t0
        log(f"{tag}: warm-up{' (compile)' if a.compile and not records else ''} {warmup_s:.1f} s")
        # Greedy speculative output is the target's token for token in exact arithmetic; a k+1-token forward rounds
        # differently from a 1-token one, so in bf16 a near-tie can flip: record where the outputs first differ.
        first_difference = next((i for i, (x, y) in enumerate(zip(target_rows[0], spec_rows[0])) if x != y), None)
        runs, counts = [], [0] * (k + 1)
        for i in range(a.runs):
            t_target, t_draft, t_spec = {}, {}, {}
            generate(target, prompt, a.max_new_tokens, timings=t_target, **kw)
            generate(draft, prompt, a.max_new_tokens, timings=t_draft, **kw)
            _, stats = speculative_generate(target, draft, prompt, a.max_new_tokens, timings=t_spec, **spec_kw)
            counts = [c + n for c, n in zip(counts, stats["accepted_counts"])]
            r = {f"{who}_tok_s": t["decode_steps"] / t["decode_s"]
                 for who, t in (("target", t_target), ("draft", t_draft), ("speculative", t_spec))}
            r["speedup"] = r["speculative_tok_s"] / r["target_tok_s"]
            r["mean_accepted"] = stats["mean_accepted"]
            runs.append(r)
            log(f"{tag}: run {i + 1}: target {r['target_tok_s']:.1f} tok/s, speculative "
                f"{r['speculative_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), draft alone {r['draft_tok_s']:.1f} tok/s; "
                f"{format_stats(stats)}")
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        total = acceptance_stats(counts)
        records.append(dict(kind="speculative", model=name, model_args=MODELS[name], precision=a.precision,
                            quantization=quantization, draft=a.draft, agreement=agreement, speculate_k=k,
                            round_graph=round_graph if a.compile else None,
                            prompt_len=a.prompt_len, max_new_tokens=a.max_new_tokens, compile=a.compile,
                            inductor_config=a.inductor_config, **med,
                            acceptance_by_position=total["acceptance_by_position"], accepted_counts=counts,
                            first_difference=first_difference, compile_s=warmup_s,
                            peak_memory_gb=peak_memory_gb(device), runs=runs))
    return records


def profile_decode(model, prompt, kw, device, steps: int = 21, top: int = 24):
    """Print where a decode step's device time goes: the kernels by total time, per step, and how much of
    the step's wall time no kernel covers (launch gaps)."""
    generate(model, prompt, steps, **kw)
    t = {}
    generate(model, prompt, steps, timings=t, **kw)
    wall_us = t["decode_s"] / t["decode_steps"] * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, prompt, steps, **kw)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    log(f"profile: {total / (steps - 1):.0f} us of kernels per step (prefill included), "
        f"{sum(e.count for e in events) / (steps - 1):.0f} kernels per step; "
        f"decode step wall time {wall_us:.0f} us unprofiled")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        log(f"  {e.device_time_total / (steps - 1):8.1f} us/step {e.count / (steps - 1):6.1f}x "
            f"{e.device_time_total / max(e.count, 1):7.1f} us each  {e.key[:70]}")


def label(record: dict) -> str:
    q, world = record.get("quantization", "none"), record.get("world_size", 1)
    return (record["model"] + ("" if q == "none" else f" {q}") + (f" g{record['group_size']}" if record.get("group_size") else "")
            + (f" tp{world}" if world > 1 else "") + (" unfused" if record.get("decode_kernels") == "off" else "")
            + (" nccl" if record.get("allreduce") == "nccl" else ""))


def free_memory(device: torch.device):
    torch._dynamo.reset()
    if device.type == "cuda":
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()  # its memory pool holds the graphs' activations
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def save(path: Optional[Path], record: dict, env: dict):
    """Append one JSON line as soon as a measurement is done, so a later crash loses nothing (path None: tensor-
    parallel ranks other than 0, which record nothing)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**record, **env}) + "\n")


def main(a: argparse.Namespace):
    """a.rank, a.world_size: this process under torchrun (0, 1 alone); a.device: its device."""
    device = torch.device(a.device)
    torch.manual_seed(1234)
    env, records = environment(device), []
    log(f"{env['device']}, torch {env['torch']}, triton {env['triton']}")
    bw = None
    if a.bandwidth:
        bw = measure_bandwidth(device)
        records.append(bw)
        save(a.out, bw, env)
        log(f"bandwidth: copy {bw['copy_gb_s']:.0f} GB/s, read {bw['read_gb_s']:.0f} GB/s "
            f"(sum {bw['sum_gb_s']:.0f}, amax {bw['amax_gb_s']:.0f})")
        free_memory(device)
    if a.matmul_microbench:
        records.append(matmul_microbench(device, DTYPES[a.precision]))
        save(a.out, records[-1], env)
        free_memory(device)
    if a.quant_microbench:
        for r in quant_microbench(device, DTYPES[a.precision], a.quant_m, a.groupsize):
            records.append(r)
            save(a.out, r, env)
        free_memory(device)
    if a.attention_microbench:
        records.append(attention_microbench(device, DTYPES[a.precision]))
        save(a.out, records[-1], env)
    if a.gemv_sweep:
        for r in float_gemv_sweep(device, DTYPES[a.precision], a.sweep_matrix):
            records.append(r)
            save(a.out, r, env)
        free_memory(device)
    if a.int4_sweep:
        for r in int4_sweep(device, DTYPES[a.precision], a.groupsize, a.quant_m, a.sweep_matrix):
            records.append(r)
            save(a.out, r, env)
        free_memory(device)
    if a.int8_sweep:
        for r in int8_sweep(device, DTYPES[a.precision], a.sweep_matrix):
            records.append(r)
            save(a.out, r, env)
        free_memory(device)
    if a.allreduce_microbench:
        records.append(allreduce_microbench(device, DTYPES[a.precision]))
        save(a.out, records[-1], env)
    if a.sdpa != "default":  # which SDPA kernel attention compiles to (flash cannot take the cache mask)
        torch.backends.cuda.enable_cudnn_sdp(a.sdpa == "cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(a.sdpa == "efficient")
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_math_sdp(a.sdpa == "math")
    if a.max_autotune:  # let inductor time Triton templates against cuBLAS for every matmul shape
        import torch._inductor.config as inductor_config
        inductor_config.max_autotune_gemm = True
    if a.mlp_microbench:
        records.append(mlp_microbench(device, DTYPES[a.precision]))
        save(a.out, records[-1], env)
        log(f"mlp: fused {records[-1]['fused_us']:.1f} us, separate {records[-1]['separate_us']:.1f} us")
        free_memory(device)
    for name in a.model:
        for quantization, decode_kernels, allreduce in itertools.product(a.quantize or ["none"], a.decode_kernels,
                                                                         a.allreduce[:1 if a.world_size == 1 else None]):
            kind = "speculative" if a.draft else "model"
            try:
                done = (bench_speculative(name, a, device, quantization) if a.draft else
                        [bench_model(name, a, device, bw and bw["read_gb_s"], quantization, decode_kernels, allreduce)])
            except torch.cuda.OutOfMemoryError as e:
                log(f"{name}: out of memory: {str(e).splitlines()[0]}")
                done = [dict(kind=kind, model=name, quantization=quantization, error="out of memory")]
            free_memory(device)  # the model's last reference was in bench_model's frame
            for record in done:
                records.append(record)
                save(a.out, record, env)
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    if bw:
        print(f"bandwidth ({bw['size_gb']:.1f} GB bf16): copy {bw['copy_gb_s']:.1f} GB/s, "
              f"read {bw['read_gb_s']:.1f} GB/s (sum {bw['sum_gb_s']:.1f}, amax {bw['amax_gb_s']:.1f})")
    for r in records:
        if r["kind"] == "matmul_microbench":
            for name, *_ in DECODE_MATMULS:
                print(f"matmul {name} M=1: " + ", ".join(f"{k[len(name) + 1:-5]} {v:.0f}" for k, v in r.items()
                                                         if k.startswith(name + "_")) + " GB/s")
        if r["kind"] == "quant_microbench":
            print(f"quant {r['matmul']:<7} m={r['m']:<3}" + "".join(
                f" | {f} {r[f + '_us']:.1f} us {r[f + '_gb_s']:.0f} GB/s" + (f" x{r[f + '_speedup']:.2f}" if f != "bf16" else "")
                for f in ("bf16", "int8", "int4", "torch_int4pack") if f + "_us" in r))
        if r["kind"] in ("int4_sweep", "int8_sweep"):
            print(f"{r['kind'][:4]} sweep {r['matmul']} m={r['m']}: best "
                  + ", ".join(f"{c} {v:.0f}" for c, v in r["best"][:3])
                  + f" GB/s; default {r['default']} {r['default_gb_s'] or 0:.0f} GB/s")
        if r["kind"] == "mlp_microbench":
            print(f"mlp {r['shape']} {r['dtype']}: fused {r['fused_us']:.1f} us ({r['fused_gb_s']:.1f} GB/s), "
                  f"separate {r['separate_us']:.1f} us ({r['separate_gb_s']:.1f} GB/s)")
    if a.draft:
        print_speculative([r for r in records if r["kind"] == "speculative"], a)
        return
    header = (f"{'model':<20}{'tok/s':>10}{'GB/s':>9}{'%read':>7}{'TTFT ms':>9}{'compile s':>10}{'peak GB':>9}"
              f"{'weights GB':>11}")
    print(header + "\n" + "-" * len(header))
    for r in (r for r in records if r["kind"] == "model"):
        if "error" in r:
            print(f"{label(r):<20}{r['error']:>10}")
        else:
            frac = "-" if r["fraction_of_read_bw"] is None else f"{100 * r['fraction_of_read_bw']:.0f}"
            print(f"{label(r):<20}{r['tok_s']:>10.1f}{r['gb_s']:>9.2f}{frac:>7}{r['ttft_ms']:>9.1f}"
                  f"{r['compile_s']:>10.1f}{r['peak_memory_gb']:>9.3f}{r['weights_gb']:>11.3f}")
    print(f"batch {a.batch_size}, prompt {a.prompt_len}, {a.max_new_tokens} new tokens, {a.precision}, "
          f"compile {'on' if a.compile else 'off'}, median of {a.runs}; appended to {a.out}")


def print_speculative(records: list, a: argparse.Namespace):
    header = (f"{'model':<20}{'draft':>22}{'agree':>6}{'k':>3}{'target tok/s':>14}{'spec tok/s':>12}{'speedup':>9}"
              f"{'draft tok/s':>13}{'accepted/step':>15}  acceptance by position")
    print(header + "\n" + "-" * (len(header) + 10))
    for r in records:
        if "error" in r:
            print(f"{label(r):<20}{r['error']:>22}")
            continue
        agreement = "-" if r.get("agreement") is None else f"{r['agreement']:.2f}"
        draft = r["draft"] if r.get("round_graph") in (None, "auto") else f"{r['draft']} ({r['round_graph']})"
        print(f"{label(r):<20}{draft:>22}{agreement:>6}{r['speculate_k']:>3}{r['target_tok_s']:>14.1f}"
              f"{r['speculative_tok_s']:>12.1f}{r['speedup']:>8.2f}x{r['draft_tok_s']:>13.1f}"
              f"{r['mean_accepted']:>10.2f} of {r['speculate_k']}  "
              + " ".join(f"{x:.2f}" for x in r["acceptance_by_position"]))
        if r["first_difference"] is not None:
            print(f"  (greedy outputs first differ at token {r['first_difference']}: rounding, see bench_speculative)")
    print(f"batch 1, prompt {a.prompt_len}, {a.max_new_tokens} new tokens, greedy, {a.precision}, "
          f"compile {'on' if a.compile else 'off'}, median of {a.runs}; appended to {a.out}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decode-speed benchmark of named model shapes on random weights.")
    p.add_argument("--model", action="append", choices=list(MODELS), required=True, help="repeat for several")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("bench_results/results.jsonl"))
    p.add_argument("--bandwidth", action="store_true", help="measure copy and read bandwidth first")
    p.add_argument("--matmul_microbench", action="store_true",
                   help="GB/s of one-row matmuls at Llama-2-7B shapes, several lowerings")
    p.add_argument("--inductor_config", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inductor setting after compile_fns, e.g. coordinate_descent_tuning=False")
    p.add_argument("--quantize", action="append", choices=["none", *SCHEMES],
                   help="weights as quantize.py converts them; repeat to compare in one run (default: none)")
    p.add_argument("--groupsize", type=int, default=128, choices=INT4_GROUP_SIZES, help="int4 group size")
    p.add_argument("--quant_microbench", action="store_true",
                   help="bf16 vs int8 vs int4 (ours, and torch's _weight_int4pack_mm) matmuls at Llama-2-7B shapes")
    p.add_argument("--quant_m", type=int, action="append", default=None, metavar="M",
                   help="rows for --quant_microbench; repeat (default: 1 and 6, a k=5 speculative verify)")
    p.add_argument("--attention_microbench", action="store_true", help="decode attention per SDPA backend")
    p.add_argument("--gemv_sweep", action="store_true", help="sweep the float decode GEMV's block sizes")
    p.add_argument("--int4_sweep", action="store_true", help="sweep the int4 decode kernel's block sizes")
    p.add_argument("--int8_sweep", action="store_true", help="sweep the int8 decode GEMV's block sizes")
    p.add_argument("--sweep_matrix", action="append", choices=[m[0] for m in DECODE_MATMULS], default=None,
                   help="with --gemv_sweep / --int4_sweep / --int8_sweep: only these Llama-2-7B matrices "
                   "(default: all)")
    p.add_argument("--profile", action="store_true", help="print the decode step's kernels by device time")
    p.add_argument("--decode_kernels", action="append", choices=["on", "off"],
                   help="decode_kernels.py's decode layer (CUDA) or inductor's kernels (off); repeat to compare "
                        "(default: on)")
    p.add_argument("--sdpa", choices=["default", "cudnn", "efficient", "math"], default="default",
                   help="allow only this scaled_dot_product_attention backend (default: torch's choice)")
    p.add_argument("--max_autotune", action="store_true", help="inductor autotunes each matmul (max_autotune_gemm)")
    p.add_argument("--mlp_microbench", action="store_true", help="time a fused vs separate gate/up SwiGLU MLP")
    p.add_argument("--draft", choices=["self", *(f"self-{s}" for s in SCHEMES), *MODELS],
                   help="speculative decoding with this draft against target-only decoding (see above)")
    p.add_argument("--speculate_k", type=int, default=5, help="with --draft: tokens drafted per target step")
    p.add_argument("--round_graph", action="append", choices=list(ROUND_GRAPHS),
                   help="with --draft: the compiled round as one graph, or a graph per step (default auto: per step "
                        "on CUDA, one graph elsewhere; speculative.compile_speculative_round); repeat to compare")
    p.add_argument("--agreement", type=float, action="append", metavar="A",
                   help="with a named-shape --draft: predictable synthetic weights (make_predictable) on which the "
                        "draft's greedy token equals the target's on a fraction A of the vocabulary; repeat to sweep. "
                        "With a self draft only 1: the draft is built from the predictable target")
    p.add_argument("--allreduce", action="append", choices=["symm", "nccl"],
                   help="under torchrun: decode all-reduces one-shot over symmetric memory where the GPUs allow "
                        "(symm, the default, as generate.py does) or through NCCL; repeat to compare")
    p.add_argument("--allreduce_microbench", action="store_true",
                   help="under torchrun on CUDA: time one-row all-reduces, NCCL against one-shot symmetric memory")
    p.add_argument("--vocab_parallel_output", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun: split the output head's rows and all-gather the logits (else replicate it)")
    a = p.parse_args()
    a.quant_m = a.quant_m or [1, 6]
    a.decode_kernels = a.decode_kernels or ["on"]
    a.sweep_matrix = a.sweep_matrix or [m[0] for m in DECODE_MATMULS]
    a.round_graph = a.round_graph or ["auto"]
    a.allreduce = a.allreduce or ["symm"]
    if a.prompt_len < 1 or a.max_new_tokens < 2 or a.runs < 1 or a.batch_size < 1:
        p.error("need --prompt_len >= 1, --max_new_tokens >= 2, --runs >= 1 and --batch_size >= 1")
    if a.round_graph != ["auto"] and not (a.draft and a.compile):
        p.error("--round_graph picks how a compiled speculative round is built: give it with --draft and --compile")
    if a.draft and (a.batch_size != 1 or a.speculate_k < 1):
        p.error("--draft needs --batch_size 1 and --speculate_k >= 1")
    if a.agreement and (not a.draft or any(q != "none" for q in a.quantize or [])
                        or not all(0 <= x <= 1 for x in a.agreement)):
        p.error("--agreement A (0 <= A <= 1) needs a --draft and float weights (no --quantize)")
    if a.agreement and a.draft.startswith("self") and a.agreement != [1.0]:
        p.error("a self draft is built from the target, so only --agreement 1 applies to it (it agrees as far as "
                "its quantization lets it)")
    if a.draft and a.draft.startswith("self") and any(q != "none" for q in a.quantize or []):
        p.error("--draft self/self-SCHEME builds the draft from a float target: leave out --quantize")
    for name in a.model:
        if a.prompt_len + a.max_new_tokens > MODELS[name]["max_seq_len"]:
            p.error(f"--prompt_len + --max_new_tokens exceeds {name}'s context of {MODELS[name]['max_seq_len']}")
    return a


def fail(msg: str):
    if env_world()[0] == 0:  # under torchrun, rank 0 speaks for all
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    cli = parse_args()
    try:
        dev = torch.device(cli.device)
    except RuntimeError:
        fail(f"--device {cli.device!r} is not a device (try cuda, cuda:0 or cpu)")
    if dev.type not in ("cuda", "cpu"):
        fail(f"--device {cli.device!r}: only cuda and cpu are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch.cuda.is_available() is False (no GPU, or a CPU-only torch)")
    if dev.type == "cpu" and (cli.quant_microbench or cli.int4_sweep or cli.int8_sweep or cli.gemv_sweep):
        fail("--quant_microbench, --int4_sweep, --int8_sweep and --gemv_sweep time Triton kernels: use --device cuda")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"--device {cli.device}: only {torch.cuda.device_count()} GPU(s) visible")
    cli.rank, cli.world_size, _ = env_world()
    if cli.allreduce_microbench and (cli.world_size == 1 or dev.type != "cuda"):
        fail("--allreduce_microbench times NCCL and symmetric memory: run it under torchrun on CUDA")
    if cli.world_size > 1 and (cli.draft or cli.matmul_microbench or cli.quant_microbench or cli.int4_sweep
                               or cli.int8_sweep or cli.mlp_microbench):
        fail("under torchrun only model decode speed is measured; run --draft and the microbenchmarks without it")
    for model_name in cli.model:
        for scheme in cli.quantize or ["none"]:
            problem = tp_problem(ModelArgs(**MODELS[model_name]), cli.world_size,
                                 None if scheme == "none" else make_scheme(scheme, cli.groupsize))
            if problem:
                fail(f"{model_name}: {problem}")
    try:
        with rank0_output(cli.rank):  # only rank 0 prints and records
            cli.rank, cli.world_size, cli.device = init_distributed(dev)
            if cli.rank:
                cli.out = None
            main(cli)
    finally:
        shutdown_distributed()
