"""Opt-in speed paths: `torch.compile` with an eager fallback, and the CUDA-only fast paths (TF32, fused AdamW,
channels-last).

Nothing here changes a CPU run unless asked: compile is off by default (on this project's CPU it did not pay, see
bench/RESULTS.md "torch.compile vs eager"), and TF32 and fused AdamW only act on CUDA devices. bench/gpu_check.py
measures each of them on a GPU.
"""
import functools
import logging
import os
import shutil
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

log = logging.getLogger(__name__)

COMPILED_FLAG = "_ldm_compiled"  # set on a module whose forward compile_module replaced


def on_cuda(device: torch.device) -> bool:
    """Whether `device` is a CUDA device (asked of a tensor there: the library names no device)."""
    return torch.empty(0, device=device).is_cuda


def compile_unavailable(device: torch.device, backend: Union[str, Callable] = "inductor") -> Optional[str]:
    """Why `torch.compile(backend=...)` cannot work for `device` here, or None when it should."""
    try:
        import torch._dynamo
        torch._dynamo.is_dynamo_supported()  # raises on Python versions dynamo does not support
    except Exception as e:  # noqa: BLE001 (any failure means the same to the user: no compile)
        return f"torch.compile is not supported on this Python/torch ({e})"
    if backend != "inductor":
        return None
    if on_cuda(device):
        from torch.utils._triton import has_triton
        return None if has_triton() else "the inductor backend needs Triton for CUDA (`pip install triton`)"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None and shutil.which("clang++") is None:
            return f"the inductor backend needs a C++ compiler on the CPU ({compiler} not found)"
    return None


def compile_module(module: torch.nn.Module, device: torch.device, backend: Union[str, Callable] = "inductor",
                   mode: Optional[str] = None, dynamic: Optional[bool] = None) -> bool:
    """Compile `module`'s forward in place (parameter names and checkpoints stay as they are); returns whether it
    will run compiled. Where the backend cannot compile, here or at the first call, it logs why and stays eager."""
    if getattr(module, COMPILED_FLAG, False):
        return True
    reason = compile_unavailable(device, backend)
    if reason:
        log.warning("torch.compile is off: %s. Running eager (drop --compile / model.params.compile to silence "
                    "this).", reason)
        return False
    eager = module.forward
    compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=dynamic)

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001: decided below by whether eager runs
            out = eager(*args, **kwargs)  # a genuine error in the model raises here, from eager code
            log.warning("torch.compile failed (%s: %s); %s runs eager from now on", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", type(module).__name__)
            module.forward = eager
            setattr(module, COMPILED_FLAG, False)
            return out

    module.forward = forward
    setattr(module, COMPILED_FLAG, True)
    return True


def use_tf32(device: torch.device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (a 10-bit mantissa in the product, fp32
    accumulation); returns whether it did. No effect elsewhere."""
    if not on_cuda(device):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def adamw_options(params: Iterable[torch.Tensor]) -> Dict[str, bool]:
    """Extra torch.optim.AdamW arguments: fused=True when every parameter is a floating CUDA tensor (one kernel for
    the whole update); nothing otherwise, which keeps torch's default (foreach) path and its numerics."""
    params = list(params)
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """4-d weights in channels-last memory order (convolutions then pick NHWC kernels); keys are unchanged."""
    return module.to(memory_format=torch.channels_last)


def apply_fast_paths(module: torch.nn.Module, device: torch.device, compile: bool = False,
                     channels_last: bool = False, tf32: bool = True) -> Dict[str, bool]:
    """The speed options for a network that runs on `device`: TF32 (CUDA only), channels-last, torch.compile.
    Returns what is on, for the log."""
    applied = {"tf32": tf32 and use_tf32(device), "channels_last": channels_last, "compile": False}
    if channels_last:
        to_channels_last(module)
    if compile:
        applied["compile"] = compile_module(module, device)
    on = [k for k, v in applied.items() if v]
    if on:
        log.info("fast paths on %s: %s", type(module).__name__, ", ".join(on))
    return applied


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether compile_module has `module` running compiled (False again after a fallback to eager)."""
    return bool(getattr(module, COMPILED_FLAG, False))

