"""NVLink-multicast guard (sitecustomize). Put its folder first on PYTHONPATH.

Why: on the lent multi-GPU hosts NVLink multicast (NVLS, cuMulticast*, multimem) must never be used; one
program that uses it can take shared GPUs out of service. `site` loads this file at the start of every
Python process that inherits PYTHONPATH (the driver, vLLM's EngineCore and its spawned or forked GPU
workers, torch.compile workers). At start-up it imports only os, sys, ctypes and importlib._abc.
Two layers:

1. Environment, forced over any inherited value before a C library reads it:
     NCCL_NVLS_ENABLE=0 NCCL_NVLSTREE_ENABLE=0  NCCL NVLS (and NCCL's symmetric kernels)
     TORCH_SYMM_MEM_DISABLE_MULTICAST=1         torch CUDASymmetricMemory rendezvous
     NVSHMEM_DISABLE_NVLS=1                     NVSHMEM (torch NVSHMEM backend, DeepEP)
     TORCH_SYMMMEM=CUDA                         keep torch on the backend governed above
     VLLM_ALLREDUCE_USE_SYMM_MEM=0              vLLM SymmMemCommunicator (its default is 1)
     VLLM_ALLREDUCE_USE_FLASHINFER=0            vLLM standalone FlashInfer all-reduce
     VLLM_USE_NCCL_SYMM_MEM=0                   vLLM pynccl ncclMemAlloc / window registration
     VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm   never 'mnnvl' ('auto' picks mnnvl)
2. Lazy import hooks: each target module is patched right after its first import (nothing is imported
   here), so that every Python entry to multicast raises RuntimeError("... multicast ..."):
     cuda.bindings.driver, cuda.cuda: cuMulticastCreate / AddDevice / BindMem[_v2] / BindAddr[_v2],
         cuGetProcAddress[_v2] of *Multicast*; cuDeviceGetAttribute(MULTICAST_SUPPORTED) reports 0
     ctypes: CDLL(...)["cuMulticast*"] and CDLL(...).cuMulticast* (str or bytes names)
     torch.distributed._symmetric_memory: empty / rendezvous / get_mem_pool / get_symm_mem_workspace;
         torch._C._distributed_c10d._SymmetricMemory: empty_strided_p2p / rendezvous (the way FlashInfer's
         all-reduce workspaces and vLLM's SymmMemCommunicator reach torch's C++ cuMulticastCreate)
     flashinfer.comm*: create_allreduce_fusion_workspace; MNNVLAllReduceFusionWorkspace, SymmDeviceMemory
         and McastGPUBuffer construction
     vllm.config.vllm: the -O0..-O3 defaults fuse_allreduce_rms / fuse_gemm_comms become False (an explicit
         value in compilation_config still wins)

Out of Python's reach, so left to layer 1: torch's c10 DriverAPI and the torch.ops.symm_mem C++ ops
(TORCH_SYMM_MEM_DISABLE_MULTICAST), NCCL (NCCL_NVLS_ENABLE), NVSHMEM (NVSHMEM_DISABLE_NVLS). Not covered at
all: Cython users of cuda.bindings.cydriver (cuda.core, CuPy), and ctypes function pointers made as
prototype((name, dll)) or got from libcuda's cuGetProcAddress. The guard does not run under python -S, -I
or -E, nor in a child started without this PYTHONPATH. The sitecustomize.py this one shadows (the next one
on sys.path, e.g. Debian's) still runs. MCGUARD_VERBOSE=1 prints one line per process when installed.
"""

from __future__ import annotations

import os
import sys

try:
    from importlib._abc import Loader  # light: importlib.abc would also import importlib.resources
except ImportError:  # Python < 3.10
    from importlib.abc import Loader

# Read by mypy only: keeps `typing` (and collections.abc) out of every process's start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any, NoReturn

_FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_NVLSTREE_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMMMEM": "CUDA",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
    "VLLM_USE_NCCL_SYMM_MEM": "0",
    "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm",
}
for _k, _v in _FORCED_ENV.items():
    os.environ[_k] = _v


def _msg(what: str) -> str:
    return (
        f"NVLink multicast is forbidden on this host: {what} blocked by the "
        f"sitecustomize multicast guard (pid {os.getpid()})"
    )


def _blocker(what: str) -> Callable[..., NoReturn]:
    def _blocked(*args: Any, **kwargs: Any) -> NoReturn:
        sys.stderr.write(f"[mcguard] blocked {what} in pid {os.getpid()}\n")
        raise RuntimeError(_msg(what))

    _blocked.__name__ = "mcguard_blocked_" + what.replace(".", "_")
    return _blocked


def _set(obj: Any, name: str, value: object) -> bool:
    try:
        if hasattr(obj, name):
            setattr(obj, name, value)
            return True
    except (AttributeError, TypeError):
        sys.stderr.write(f"[mcguard] WARNING: could not patch {obj!r}.{name}\n")
    return False


def _symbol_name(symbol: object) -> str:
    return symbol.decode("ascii", "replace") if isinstance(symbol, (bytes, bytearray)) else str(symbol)


# --- cuda-python driver bindings (cuda.bindings.driver, legacy cuda.cuda) ----
_MC_DRIVER_FUNCS = (
    "cuMulticastCreate",
    "cuMulticastAddDevice",
    "cuMulticastBindMem",
    "cuMulticastBindMem_v2",
    "cuMulticastBindAddr",
    "cuMulticastBindAddr_v2",
)


def _patch_cuda_driver(mod: Any) -> None:
    if getattr(mod, "_mcguard_patched", False):
        return
    for name in _MC_DRIVER_FUNCS:
        _set(mod, name, _blocker(mod.__name__ + "." + name))

    attr_enum = getattr(mod, "CUdevice_attribute", None)
    mc_attr = getattr(attr_enum, "CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED", None)
    orig_get_attr = getattr(mod, "cuDeviceGetAttribute", None)
    if mc_attr is not None and orig_get_attr is not None:
        success = mod.CUresult.CUDA_SUCCESS

        def cuDeviceGetAttribute(*args: Any, _orig: Any = orig_get_attr, **kwargs: Any) -> Any:
            attrib = args[0] if args else kwargs.get("attrib")
            if attrib == mc_attr:
                return (success, 0)
            return _orig(*args, **kwargs)

        _set(mod, "cuDeviceGetAttribute", cuDeviceGetAttribute)

    for gpa in ("cuGetProcAddress", "cuGetProcAddress_v2"):
        orig = getattr(mod, gpa, None)
        if orig is None:
            continue

        def _gpa(symbol: Any, *args: Any, _orig: Any = orig, _n: str = gpa, **kwargs: Any) -> Any:
            s = _symbol_name(symbol)
            if "Multicast" in s:
                _blocker(f"{_n}({s})")()
            return _orig(symbol, *args, **kwargs)

        _set(mod, gpa, _gpa)
    mod._mcguard_patched = True


# --- torch symmetric memory -------------------------------------------------
def _patch_symm_class() -> None:
    try:
        from torch._C._distributed_c10d import _SymmetricMemory
    except Exception:  # torch built without distributed
        return
    symm: Any = _SymmetricMemory
    if getattr(symm, "_mcguard_patched", False):
        return
    for name in ("empty_strided_p2p", "rendezvous"):
        _set(symm, name, staticmethod(_blocker("torch _SymmetricMemory." + name)))
    import contextlib  # torch has imported it already

    with contextlib.suppress(Exception):  # the marker only saves repeating an idempotent patch
        symm._mcguard_patched = True


def _patch_torch_distributed(mod: Any) -> None:
    _patch_symm_class()


def _patch_torch_symm_mem(mod: Any) -> None:
    _patch_symm_class()
    for name in ("empty", "rendezvous", "get_mem_pool", "get_symm_mem_workspace"):
        _set(mod, name, _blocker("torch.distributed._symmetric_memory." + name))


# --- FlashInfer comm --------------------------------------------------------
def _patch_flashinfer(mod: Any) -> None:
    _set(
        mod,
        "create_allreduce_fusion_workspace",
        _blocker(mod.__name__ + ".create_allreduce_fusion_workspace"),
    )
    for cls_name in ("MNNVLAllReduceFusionWorkspace", "SymmDeviceMemory", "McastGPUBuffer"):
        cls = getattr(mod, cls_name, None)
        if isinstance(cls, type):
            _set(cls, "__init__", _blocker("flashinfer " + cls_name))


# --- vLLM optimization-level defaults ---------------------------------------
def _patch_vllm_config(mod: Any) -> None:
    for lvl in ("00", "01", "02", "03"):
        d: Any = getattr(mod, "OPTIMIZATION_LEVEL_" + lvl, None)
        try:
            pc = d["compilation_config"]["pass_config"]
        except Exception:
            continue
        for key in ("fuse_allreduce_rms", "fuse_gemm_comms"):
            if key in pc:
                pc[key] = False


_TARGETS: dict[str, Callable[[Any], None]] = {
    "cuda.bindings.driver": _patch_cuda_driver,
    "cuda.cuda": _patch_cuda_driver,
    "torch.distributed": _patch_torch_distributed,
    "torch.distributed._symmetric_memory": _patch_torch_symm_mem,
    "flashinfer.comm": _patch_flashinfer,
    "flashinfer.comm.allreduce": _patch_flashinfer,
    "flashinfer.comm.mnnvl": _patch_flashinfer,
    "flashinfer.comm.trtllm_mnnvl_ar": _patch_flashinfer,
    "vllm.config.vllm": _patch_vllm_config,
}


def _apply(name: str, mod: ModuleType) -> None:
    try:
        _TARGETS[name](mod)
    except Exception as e:  # never break the import itself; say so loudly
        sys.stderr.write(f"[mcguard] WARNING: patching {name} failed: {e!r}\n")


class _LoaderProxy(Loader):
    """The target's own loader, with the patch applied right after the module has executed."""

    def __init__(self, loader: Loader, name: str) -> None:
        self._mc_loader = loader
        self._mc_name = name

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._mc_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._mc_loader.exec_module(module)
        _apply(self._mc_name, module)

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_mc_"):  # not set yet (copy, pickle): do not recurse through __getattr__
            raise AttributeError(item)
        return getattr(self._mc_loader, item)


class _MulticastGuardFinder:
    # Recognised by this attribute, not by class: a second copy of this file (chained, or imported under
    # another name) defines another class, and two finders that each ask the other would recurse forever.
    _mcguard_finder = True

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_mcguard_finder", False):
                continue
            fs = getattr(finder, "find_spec", None)
            if fs is None:
                continue
            spec: ModuleSpec | None = fs(name, path, target) if target is not None else fs(name, path)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderProxy(spec.loader, name)
                return spec
        return None

    def invalidate_caches(self) -> None:
        pass


def _install() -> None:
    if any(getattr(f, "_mcguard_finder", False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MulticastGuardFinder())
    for name in list(_TARGETS):
        mod = sys.modules.get(name)
        if mod is not None:
            _apply(name, mod)
    # ctypes is stdlib and cheap: refuse cuMulticast* symbol lookups on any CDLL
    import ctypes

    orig_getitem = ctypes.CDLL.__getitem__
    if not getattr(orig_getitem, "_mcguard", False):

        def _mcguard_getitem(self: ctypes.CDLL, name_or_ordinal: Any, _orig: Any = orig_getitem) -> Any:
            if isinstance(name_or_ordinal, (str, bytes)):  # ctypes resolves both by name
                sym = _symbol_name(name_or_ordinal)
                if sym.startswith("cuMulticast"):
                    _blocker(f"ctypes {sym}")()
            return _orig(self, name_or_ordinal)

        _mcguard_getitem.__dict__["_mcguard"] = True
        # typeshed types CDLL.__getitem__ as a method; replacing it on the class is the point here
        ctypes.CDLL.__getitem__ = _mcguard_getitem  # type: ignore[method-assign]
    if os.environ.get("MCGUARD_VERBOSE") == "1":
        sys.stderr.write(f"[mcguard] installed in pid {os.getpid()} ({sys.argv[:1]})\n")


def _chain_shadowed(here: str) -> None:
    """Run the sitecustomize.py that this one shadows: the next one on sys.path after this file's folder.

    Only folders after ours are searched, so that two copies of the guard on the path chain one way
    (first -> second -> the shadowed one) instead of back and forth without end.
    """
    dirs = [os.path.abspath(p) for p in sys.path if p]
    later = dirs[dirs.index(here) + 1 :] if here in dirs else dirs
    for d in later:
        if d == here:
            continue
        cand = os.path.join(d, "sitecustomize.py")
        if not os.path.isfile(cand):
            continue
        try:
            with open(cand) as f:
                code = compile(f.read(), cand, "exec")
            exec(code, {"__name__": "_chained_sitecustomize", "__file__": cand})
        except Exception as e:
            sys.stderr.write(f"[mcguard] chained {cand} failed: {e!r}\n")
        return


_install()
_chain_shadowed(os.path.dirname(os.path.abspath(__file__)))
