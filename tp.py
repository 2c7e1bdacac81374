"""Tensor parallelism over torch.distributed: each of N ranks holds 1/N of every attention and feed-forward matrix
(Megatron-LM's split, Shoeybi et al. 2019, arXiv:1909.08053).

    torchrun --standalone --nproc_per_node=2 generate.py --compile --checkpoint_path checkpoints/.../model.pth

- Column-parallel (output rows split, no communication): wqkv, each rank taking its q heads, its k heads and
  its v heads out of the fused [q | k | v] rows (and bias); w13, each rank taking its slice of w1 and the same
  slice of w3 out of the fused [w1 | w3] rows.
- Row-parallel (input columns split, then one all-reduce of the output): wo over the rank's heads, w2 over its
  slice of the intermediate dimension, so each block costs two all-reduces.
- The output head: vocab-parallel (rows split, logits all-gathered) or replicated; embeddings and norms are
  replicated (a decode step reads only B rows of the embedding). A tied output head stays replicated.
- Attention's n_heads / n_kv_heads become the rank's counts, so setup_caches sizes the KV cache per rank.

apply_tp resizes the modules of a model built on the meta device and registers load_state_dict pre-hooks that cut
each incoming tensor to the rank's shard, so loading a memory-mapped checkpoint copies only the shard's pages.
Quantized layers (quantize.py's layouts) shard the same way: column-parallel splits the rows of weight, scales and
offsets; row-parallel splits int8 weight columns (per-row scales replicated) and int4 columns at group boundaries.
The intermediate dimension is cut at group boundaries as evenly as it goes (Llama-2-7B's 86 groups of 128 over 4
ranks: 22, 22, 21, 21), w13's rows at exactly w2's boundaries; the last rank owns the last group's padding.
Collectives are functional (torch.distributed._functional_collectives), so torch.compile(fullgraph=True) and CUDA
graphs capture them.
"""
import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from model import ConfigError, ModelArgs, Transformer
from quantize import Int4Linear, Int8Linear


# ---------------------------------------------------------------------------------------------- processes

def env_world() -> tuple:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def init_distributed(device) -> tuple:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on CUDA (this process on cuda:LOCAL_RANK), gloo on
    CPU. Returns (rank, world_size, the rank's device); (0, 1, device) in a plain process."""
    rank, world_size, local_rank = env_world()
    device = torch.device(device)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def shutdown_distributed():
    """Leave the process group, if this process joined one (NCCL warns at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def rank0_output(rank: int):
    """Silence stdout and stderr on ranks other than 0 (their output would repeat rank 0's). An uncaught
    exception's traceback is printed after this block exits, so crashes of any rank still show."""
    if rank == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# -------------------------------------------------------------------------------------------------- checks

def int4_group_size(quantization: Optional[dict]) -> Optional[int]:
    """The int4 group size of a checkpoint's quantization record; None for float and int8."""
    return quantization["group_size"] if quantization and quantization.get("scheme") == "int4" else None


def tp_problem(args: ModelArgs, world_size: int, quantization: Optional[dict] = None) -> Optional[str]:
    """Why this model cannot be split over world_size ranks, or None when it can."""
    if world_size == 1:
        return None
    if args.n_heads % world_size or args.n_kv_heads % world_size:
        return (f"world size {world_size} does not divide the model's {args.n_heads} attention heads and "
                f"{args.n_kv_heads} KV heads; use a world size that divides both")
    group = int4_group_size(quantization) or 1
    if -(-args.intermediate_size // group) < world_size:
        return (f"world size {world_size} exceeds the {args.intermediate_size} intermediate columns "
                f"(in groups of {group})")
    wo_columns = args.n_heads // world_size * args.head_dim
    if wo_columns % group:
        return (f"int4 group size {group} does not divide each rank's {wo_columns} attention output columns at "
                f"world size {world_size}; quantize with a smaller --groupsize or use fewer ranks")
    return None


def check_tp(args: ModelArgs, world_size: int, quantization: Optional[dict] = None):
    """Raise ConfigError (one line) when the model cannot be split over world_size ranks; call before loading."""
    problem = tp_problem(args, world_size, quantization)
    if problem:
        raise ConfigError(problem)


def shard_or_whole(args: ModelArgs, rank: int, world_size: int, quantization: Optional[dict] = None) -> tuple:
    """(rank, world_size) to load a model with when it splits over world_size ranks, else (0, 1): a whole copy on
    every rank (a speculative draft whose heads do not divide by the world size)."""
    return (rank, world_size) if tp_problem(args, world_size, quantization) is None else (0, 1)


def split_points(total: int, world_size: int, align: int = 1) -> list:
    """world_size + 1 boundaries cutting range(total) into runs of whole `align` units, as even as they go (the
    first ranks take one unit more); the last run ends at total, so it may hold a partial unit."""
    units = -(-total // align)
    base, extra = divmod(units, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(min(bounds[-1] + (base + (r < extra)) * align, total))
    return bounds


# ------------------------------------------------------------------------------------------ model surgery

def _resized(layer: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A fresh layer of layer's kind (float, int8 or int4) and dtype on its device, of another shape."""
    dtype = layer.scales.dtype if isinstance(layer, (Int8Linear, Int4Linear)) else layer.weight.dtype
    kw = dict(bias=layer.bias is not None, device=layer.weight.device, dtype=dtype)
    if isinstance(layer, Int4Linear):
        return Int4Linear(in_features, out_features, group_size=layer.group_size, **kw)
    if isinstance(layer, Int8Linear):
        return Int8Linear(in_features, out_features, **kw)
    return nn.Linear(in_features, out_features, **kw)


def _on_load(layer: nn.Module, cut):
    """Have layer.load_state_dict replace each of its incoming tensors t named `name` by cut(name, t)."""
    def hook(module, state_dict, prefix, *_):
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if prefix + name in state_dict:
                state_dict[prefix + name] = cut(name, state_dict[prefix + name])
    layer.register_load_state_dict_pre_hook(hook)


def column_parallel(layer: nn.Module, row_ranges: list) -> nn.Module:
    """This rank's rows of layer: the concatenation of row_ranges [(start, end), ...] of its output features.
    Every tensor of a linear layout (weight, bias, int8/int4 scales and offsets) has output rows as dim 0."""
    shard = _resized(layer, layer.in_features, sum(end - start for start, end in row_ranges))

    def cut(_name, t):
        parts = [t[start:end] for start, end in row_ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    _on_load(shard, cut)
    return shard


def row_parallel(layer: nn.Module, start: int, end: int, group) -> nn.Module:
    """This rank's input columns [start, end) of layer; its output, a partial sum, is all-reduced over group.
    int8 keeps its per-row scales whole; int4 takes whole groups (start on a group boundary; the rank that ends
    at in_features takes the padding too)."""
    if layer.bias is not None:  # each rank would add it once
        raise ConfigError("a row-parallel layer with a bias is not supported")
    shard = _resized(layer, end - start, layer.out_features)
    if isinstance(layer, Int4Linear):
        g = layer.group_size
        assert start % g == 0, (start, g)
        g_start, g_end = start // g, -(-end // g)
        columns = {"weight": (g_start * g // 2, g_end * g // 2),  # two columns a byte
                   "scales": (g_start, g_end), "offsets": (g_start, g_end)}
    else:
        columns = {"weight": (start, end)}  # int8 "scales" ([out]) are not cut

    def cut(name, t):
        if name not in columns:
            return t
        a, b = columns[name]
        return t[:, a:b].contiguous()  # copies the shard's columns only
    _on_load(shard, cut)
    shard.symm = None  # (buffer, group name), set by use_symmetric_memory
    shard.register_forward_hook(lambda module, _inputs, out: all_reduce(out, group, module.symm))
    return shard


def all_reduce(x: torch.Tensor, group, symm: Optional[tuple] = None) -> torch.Tensor:
    """Sum x over group. symm: (a symmetric-memory buffer, group's name). A message that fits the buffer (decode:
    a few rows) takes a one-shot all-reduce: every rank copies x into its buffer and reads all peers' buffers over
    NVLink in one kernel, with no ring steps; larger ones (prefill), and all without symm (CPU), go through NCCL or
    gloo (functional collectives, so compile captures them)."""
    if symm is not None and x.numel() <= symm[0].numel() and x.dtype == symm[0].dtype:
        buffer = symm[0][: x.numel()].view(x.shape)  # the op wants a buffer of x's shape
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buffer, x.contiguous(), "sum", symm[1])
    return funcol.all_reduce(x, "sum", group)


def use_symmetric_memory(model: nn.Module, max_rows: int = 64, group=None) -> bool:
    """Give model's row-parallel layers one shared symmetric-memory buffer of max_rows x dim elements (call on every
    rank, in the same order, after loading on CUDA), so their decode all-reduces run one-shot (all_reduce). Returns
    False, changing nothing, off CUDA, outside a process group, or where this torch lacks the op."""
    layers = [m for m in model.modules() if hasattr(m, "symm")]
    if not layers or not dist.is_initialized() or not torch.cuda.is_available():
        return False
    weight = layers[0].weight
    if not weight.is_cuda or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        return False
    import torch.distributed._symmetric_memory as symm_mem
    group = group if group is not None else dist.group.WORLD
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before rendezvous on older torch
        symm_mem.enable_symm_mem_for_group(group.group_name)
    dtype = layers[0].scales.dtype if hasattr(layers[0], "scales") else weight.dtype
    buffer = symm_mem.empty(max_rows * layers[0].out_features, dtype=dtype, device=weight.device)
    symm_mem.rendezvous(buffer, group.group_name)
    for layer in layers:
        layer.symm = (buffer, group.group_name)
    return True


def vocab_parallel(layer: nn.Module, rank: int, world_size: int, group) -> nn.Module:
    """This rank's 1/world_size of the output head's rows; the logits are all-gathered along the vocabulary."""
    rows = layer.out_features // world_size
    shard = column_parallel(layer, [(rank * rows, (rank + 1) * rows)])
    shard.register_forward_hook(lambda _module, _inputs, out: _all_gather_last_dim(out, world_size, group))
    return shard


def _all_gather_last_dim(x, world_size: int, group):
    """Concatenate every rank's x along the last dimension. Gathered along dim 0 (one contiguous block per rank),
    then laid side by side: funcol's own gather along another dim calls a helper that dynamo will not trace on
    torch 2.11."""
    # torch 2.13 renamed all_gather_tensor to all_gather_single (the old name warns); 2.11 may have only the old one
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    blocks = gather(x.contiguous(), 0, group).view(world_size, *x.shape)  # [world, *x.shape]
    return torch.cat(blocks.unbind(0), dim=-1)


def apply_tp(model: Transformer, rank: int, world_size: int, vocab_parallel_output: bool = True,
             group=None) -> Transformer:
    """Shard model, built on the meta device (and already swapped to its quantized layers), in place for `rank` of
    world_size; load_state_dict then cuts each full tensor to this rank's shard. vocab_parallel_output: split the
    output head's rows and all-gather the logits (when the head is not tied to the embedding and the vocabulary
    divides by world_size), else replicate it. group: the process group (default: the whole world)."""
    args = model.args
    w2 = model.layers[0].feed_forward.w2
    group_size = w2.group_size if isinstance(w2, Int4Linear) else None
    check_tp(args, world_size, group_size and {"scheme": "int4", "group_size": group_size})
    if world_size == 1:
        return model
    group = group if group is not None else dist.group.WORLD
    hd, inter = args.head_dim, args.intermediate_size
    heads, kv_heads = args.n_heads // world_size, args.n_kv_heads // world_size
    q_rows, kv_rows = args.n_heads * hd, args.n_kv_heads * hd
    q0, kv0 = rank * heads * hd, rank * kv_heads * hd
    qkv_ranges = [(q0, q0 + heads * hd), (q_rows + kv0, q_rows + kv0 + kv_heads * hd),
                  (q_rows + kv_rows + kv0, q_rows + kv_rows + kv0 + kv_heads * hd)]
    bounds = split_points(inter, world_size, group_size or 1)
    i0, i1 = bounds[rank], bounds[rank + 1]
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        attention.wqkv = column_parallel(attention.wqkv, qkv_ranges)
        attention.wo = row_parallel(attention.wo, q0, q0 + heads * hd, group)
        attention.n_heads, attention.n_kv_heads = heads, kv_heads
        ffn.w13 = column_parallel(ffn.w13, [(i0, i1), (inter + i0, inter + i1)])
        ffn.w2 = row_parallel(ffn.w2, i0, i1, group)
    if vocab_parallel_output and not args.tie_word_embeddings and args.vocab_size % world_size == 0:
        model.output = vocab_parallel(model.output, rank, world_size, group)
    return model
