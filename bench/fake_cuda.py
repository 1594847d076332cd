"""The machinery of bench/estimate_memory.py: a step on fake tensors (shapes and dtypes, no data), the bytes its
tensors hold at every op, and torch's CUDA autocast policy applied on the CPU.

Why the CUDA policy is emulated: on a machine without a GPU, fake tensors on a "cuda" device run a forward, and torch's
own CUDA autocast kernels apply to them (`cuda_autocast`), but not a backward: the autograd engine asks the CUDA driver
for a primary context (`GraphTask::stash_current_streams`) and fails. So the step runs on fake CPU tensors, with the
CUDA policy applied by `CudaAutocast` (a TorchFunctionMode, which acts above autograd as autocast does, so the casts are
recorded and the cast copies saved for backward as on a GPU), and `forward_trace` checks op by op that its forward
equals the forward under torch's CUDA autocast on fake CUDA tensors.
"""
import math
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

# torch's CUDA autocast op lists (docs, "Autocast Op Reference"; the same lists in aten/src/ATen/autocast_mode.cpp):
# ops run in the autocast dtype, ops run in fp32, ops whose output dtype is set to fp32, ops run in the widest input.
LOWER = frozenset("__matmul__ addbmm addmm addmv addr baddbmm bmm chain_matmul multi_dot conv1d conv2d conv3d "
                  "conv_transpose1d conv_transpose2d conv_transpose3d linear matmul mm mv prelu "
                  "scaled_dot_product_attention".split())
# + interpolate: torch 2.14's CUDA autocast runs upsample_nearest2d in fp32 (found by forward_trace's check)
FP32 = frozenset("interpolate __pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh "
                 "cosine_embedding_loss cdist cosine_similarity cross_entropy dist erfinv exp expm1 group_norm "
                 "hinge_embedding_loss kl_div l1_loss layer_norm log log10 log1p log2 margin_ranking_loss mse_loss "
                 "multilabel_margin_loss multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow "
                 "reciprocal rsqrt sinh smooth_l1_loss soft_margin_loss softplus renorm tan "
                 "triplet_margin_loss".split())
FP32_OUT = frozenset("softmax log_softmax softmin cumsum cumprod sum prod".split())
PROMOTE = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sample index_put scatter_add tensordot cat "
                    "stack".split())
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(args: Tuple, kwargs: Dict, dtype: torch.dtype) -> Tuple[Tuple, Dict]:
    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t,
                         (args, kwargs))


def gpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention as a GPU runs it: flash attention for fp16/bf16 without a mask (head dim <=
    256), else memory-efficient attention; both keep O(n) state for backward (out, logsumexp), never the n x n
    scores. (torch 2.14 may prefer cuDNN attention on H100/H200, which saves the same: out and fp32 stats.)"""
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad = any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, grad, dropout_p, is_causal,
                                                                   scale=scale)[0]


class CudaAutocast(TorchFunctionMode):
    """What torch.autocast("cuda", dtype) and a GPU's attention kernels do, for tensors on another device.

    With `policy`, each op of the lists above gets its inputs cast as CUDA autocast casts them (nested calls inside
    an op are not cast again, as with autocast); without it only attention is handled (torch's own CUDA autocast does
    the rest: `cuda_autocast`). Attention runs `gpu_attention`, its inputs cast to `dtype` first (SDPA is in CUDA
    autocast's lower-precision list; `dtype` None: fp32, no autocast)."""

    def __init__(self, dtype: Optional[torch.dtype], policy: bool = True):
        super().__init__()
        self.dtype, self.policy = dtype, policy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            if self.dtype is not None:
                args, kwargs = _cast(args, kwargs, self.dtype)
            return gpu_attention(*args, **kwargs)
        if self.dtype is None or not self.policy:
            return func(*args, **kwargs)
        if name in LOWER:
            args, kwargs = _cast(args, kwargs, self.dtype)
        elif name in FP32:
            args, kwargs = _cast(args, kwargs, torch.float32)
        elif name in FP32_OUT and args and _eligible(args[0]) and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float32
        elif name in PROMOTE:
            flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if _eligible(t)]
            if flat:
                widest = torch.float32 if any(t.dtype == torch.float32 for t in flat) else self.dtype
                args, kwargs = _cast(args, kwargs, widest)
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """torch's own CUDA autocast, switched on below `torch.autocast` (which refuses without a GPU): for a forward on
    fake CUDA tensors. Its cast cache is off, like CudaAutocast's (the cache only holds casts of trained leaves)."""
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(False)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
        torch.set_autocast_cache_enabled(was[2])


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, updated after every aten op (its output allocated, its inputs still
    alive: what an allocator's peak sees, less what a kernel allocates inside itself). Storages are counted once
    (views share them) and leave the count when freed. `granule` rounds each storage up, as an allocator does."""

    def __init__(self, granule: int = 1):
        super().__init__()
        self.granule = granule
        self.seen = WeakIdKeyDictionary()
        self.refs: List[weakref.ref] = []
        self.current = self.peak = 0
        self.peak_op = ""
        self.casts = self.casts_at_peak = 0  # bytes of cast copies of parameters (autocast's), alive / at the peak

    def add(self, *objs: Any) -> None:
        """Count tensors alive before the mode starts (modules: their parameters and buffers)."""
        for obj in objs:
            tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
            for t in tensors:
                self._track(t)
        self.peak = max(self.peak, self.current)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self.seen:
            return
        n = math.ceil(st.nbytes() / self.granule) * self.granule
        self.seen[st] = n
        self.current += n
        self.refs.append(weakref.ref(st, lambda _, n=n: self._free(n)))

    def _free(self, n: int) -> None:
        self.current -= n

    def _free_cast(self, n: int) -> None:
        self.casts -= n

    def reset_peak(self) -> None:
        self.peak, self.peak_op, self.casts_at_peak = self.current, "", self.casts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = isinstance(out, torch.Tensor) and out.untyped_storage() not in self.seen
        tree_map_only(torch.Tensor, self._track, out)
        if new and func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
            n = self.seen[out.untyped_storage()]
            self.casts += n
            self.refs.append(weakref.ref(out.untyped_storage(), lambda _, n=n: self._free_cast(n)))
        if self.current > self.peak:
            self.peak, self.peak_op, self.casts_at_peak = self.current, func.overloadpacket.__name__, self.casts
        return out


def fakeify(module: torch.nn.Module, mode: Any, device: torch.device) -> torch.nn.Module:
    """Replace a module's parameters and buffers (built on the meta device) by fake tensors on `device` of the same
    shape, dtype and requires_grad; a tensor shared by several modules stays shared."""
    made: Dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in made:
            with mode:
                f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            made[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if param else f
        return made[id(t)]
    for m in module.modules():
        for table, param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(table.items()):
                if t is not None:
                    table[name] = fake(t, param)
    return module


SKIP = {"_fused_sdp_choice", "device"}


class OpTrace(TorchDispatchMode):
    """The aten ops of a region with the shapes and dtypes of their outputs, for comparing two runs."""

    def __init__(self):
        super().__init__()
        self.ops: List[Tuple[str, Tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        moved = name == "_to_copy" and out.dtype == args[0].dtype  # a device copy (a list index going to CUDA)
        if name not in SKIP and not moved:
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            self.ops.append((name, tuple((tuple(o.shape), o.dtype) for o in outs)))
        return out


def _canonical(ops: List) -> List:
    """The casts of one op's inputs in a fixed order (autocast's C++ casts them in the compiler's argument order)."""
    out, run = [], []
    for op in ops + [("", ())]:
        if op[0] == "_to_copy":
            run.append(op)
            continue
        out += sorted(run, key=repr) + [op]
        run = []
    return out[:-1]


def first_difference(a: List, b: List) -> Optional[str]:
    """Where two op traces first differ (casts of one op's inputs in any order), or None when they are equal."""
    a, b = _canonical(a), _canonical(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"op {i}: {x} vs {y} (before: {a[max(0, i - 3):i]})"
    return None if len(a) == len(b) else f"{len(a)} vs {len(b)} ops"


def run_traced(fn: Callable[[], Any]) -> List[Tuple[str, Tuple]]:
    trace = OpTrace()
    with trace:
        fn()
    return trace.ops
