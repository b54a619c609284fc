"""The NVLink-multicast guard (``scripts/bench/gpu/mcguard/sitecustomize.py``), on CPU, against fakes.

Each test starts a fresh interpreter with the guard's folder first on PYTHONPATH and then a folder of
fake modules that stand in for cuda-python, FlashInfer and vLLM (they shadow any real ones). Each fake
multicast entry *works* unless the guard replaced it, so every check below can fail. The child prints one
JSON line with what it saw. The guard is never imported into the test process itself: it rewrites
os.environ and ctypes for the whole process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

GUARD_DIR = Path(__file__).resolve().parent.parent / "scripts" / "bench" / "gpu" / "mcguard"
TIMEOUT_S = 120

# What the guard must leave in os.environ, whatever the parent passed down.
FORCED_ENV = {
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
# The opposite of each: what a careless parent might set.
PARENT_ENV = {
    "NCCL_NVLS_ENABLE": "1",
    "NCCL_NVLSTREE_ENABLE": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0",
    "NVSHMEM_DISABLE_NVLS": "0",
    "TORCH_SYMMMEM": "NVSHMEM",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "1",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "1",
    "VLLM_USE_NCCL_SYMM_MEM": "1",
    "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "mnnvl",
}

MC_DRIVER_FUNCS = (
    "cuMulticastCreate",
    "cuMulticastAddDevice",
    "cuMulticastBindMem",
    "cuMulticastBindMem_v2",
    "cuMulticastBindAddr",
    "cuMulticastBindAddr_v2",
)

FAKE_DRIVER = """
import enum


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0


class CUdevice_attribute(enum.IntEnum):
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1
    CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED = 132


_ATTRS = {1: 1024, 132: 1}  # this fake device supports multicast


def cuDeviceGetAttribute(attrib, dev):
    return (CUresult.CUDA_SUCCESS, _ATTRS[int(attrib)])


def cuDeviceGetCount():
    return (CUresult.CUDA_SUCCESS, 2)


def cuGetProcAddress(symbol, cudaVersion, flags):
    return (CUresult.CUDA_SUCCESS, 4096)


def cuGetProcAddress_v2(symbol, cudaVersion, flags):
    return (CUresult.CUDA_SUCCESS, 4096, 0)


def _made(name):
    def entry(*args, **kwargs):
        return (CUresult.CUDA_SUCCESS, name + " ran")

    entry.__name__ = name
    return entry


cuMulticastCreate = _made("cuMulticastCreate")
cuMulticastAddDevice = _made("cuMulticastAddDevice")
cuMulticastBindMem = _made("cuMulticastBindMem")
cuMulticastBindMem_v2 = _made("cuMulticastBindMem_v2")
cuMulticastBindAddr = _made("cuMulticastBindAddr")
cuMulticastBindAddr_v2 = _made("cuMulticastBindAddr_v2")
"""

FAKE_FLASHINFER_COMM = """
def create_allreduce_fusion_workspace(backend="auto", **kwargs):
    return "workspace " + backend


def allreduce_fusion(*args, **kwargs):
    return "fused"


class MNNVLAllReduceFusionWorkspace:
    def __init__(self, *args, **kwargs):
        self.ready = True


class SymmDeviceMemory:
    def __init__(self, *args, **kwargs):
        self.ready = True


class McastGPUBuffer:
    def __init__(self, *args, **kwargs):
        self.ready = True
"""

FAKE_VLLM_CONFIG = """
def _level(fuse, **more):
    pass_config = {"fuse_allreduce_rms": fuse, "fuse_gemm_comms": fuse, **more}
    return {"compilation_config": {"pass_config": pass_config}}


OPTIMIZATION_LEVEL_00 = _level(False)
OPTIMIZATION_LEVEL_02 = _level(True, enable_sp=True)
OPTIMIZATION_LEVEL_03 = _level(True)
"""

# Run in a spawned grandchild (multiprocessing pickles the function by module name).
FAKE_PROBE = """
import os
import subprocess
import sys


def report():
    from cuda.bindings import driver

    try:
        driver.cuMulticastCreate(None)
        blocked = "no"
    except RuntimeError as e:
        blocked = str(e)
    return {
        "pid": os.getpid(),
        "env": os.environ.get("VLLM_ALLREDUCE_USE_SYMM_MEM"),
        "guards": sum(type(f).__name__ == "_MulticastGuardFinder" for f in sys.meta_path),
        "blocked": blocked,
    }
"""

FAKES = {
    "cuda/__init__.py": "",
    "cuda/bindings/__init__.py": "",
    "cuda/bindings/driver.py": FAKE_DRIVER,
    "cuda/cuda.py": "from cuda.bindings.driver import *\n",  # the legacy module, as in cuda-python 12
    "flashinfer/__init__.py": "",
    "flashinfer/comm/__init__.py": FAKE_FLASHINFER_COMM,
    "vllm/__init__.py": "",
    "vllm/config/__init__.py": "",
    "vllm/config/vllm.py": FAKE_VLLM_CONFIG,
    "mcprobe.py": FAKE_PROBE,
}

# Top of every child script: `outcome` records what a call did, JSON-safe.
PRELUDE = f"""
import json
import os
import sys

FORCED_KEYS = {sorted(FORCED_ENV)!r}
MC_DRIVER_FUNCS = {MC_DRIVER_FUNCS!r}


def outcome(fn):
    try:
        return {{"returned": fn()}}
    except RuntimeError as e:
        return {{"raised": str(e)}}


out = {{}}
"""


def _write_fakes(root: Path) -> Path:
    fakes = root / "fakes"
    for rel, text in FAKES.items():
        path = fakes / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return fakes


def _run(
    tmp_path: Path,
    body: str,
    *,
    env: dict[str, str] | None = None,
    path_before_fakes: tuple[Path, ...] = (),
) -> tuple[dict[str, Any], str]:
    """Run PRELUDE + body in a fresh interpreter; return its last stdout line (JSON) and its stderr."""
    fakes = _write_fakes(tmp_path)
    script = tmp_path / "probe.py"
    epilogue = '\nif __name__ == "__main__":  # not again in a spawned child\n    print(json.dumps(out))\n'
    script.write_text(PRELUDE + textwrap.dedent(body) + epilogue)
    child_env = {k: v for k, v in os.environ.items() if k not in FORCED_ENV and k != "MCGUARD_VERBOSE"}
    child_env["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR), *map(str, path_before_fakes), str(fakes)])
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=child_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result, proc.stderr


def _assert_blocked(result: dict[str, Any], what: str) -> None:
    assert "raised" in result, f"{what} was not blocked: {result}"
    assert "multicast" in result["raised"], f"{what}: {result['raised']}"


def test_env_is_forced_over_the_parents_values_and_nothing_heavy_is_imported(tmp_path: Path) -> None:
    result, _ = _run(
        tmp_path,
        """
        out["env"] = {k: os.environ.get(k) for k in FORCED_KEYS}
        heavy = ("torch", "cuda", "flashinfer", "vllm")
        out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        """,
        env=PARENT_ENV,
    )
    assert result["env"] == FORCED_ENV
    assert result["heavy"] == []


def test_cuda_driver_multicast_entries_raise_and_the_rest_works(tmp_path: Path) -> None:
    result, stderr = _run(
        tmp_path,
        """
        from cuda.bindings import driver as d

        out["mc"] = {n: outcome(lambda n=n: getattr(d, n)(None, 0)) for n in MC_DRIVER_FUNCS}
        from cuda.bindings.driver import cuMulticastCreate  # a later from-import gets the blocker too

        out["from_import"] = outcome(lambda: cuMulticastCreate(None))
        out["gpa_mc"] = outcome(lambda: d.cuGetProcAddress("cuMulticastCreate", 12000, 0))
        out["gpa_v2_mc_bytes"] = outcome(lambda: d.cuGetProcAddress_v2(b"cuMulticastBindMem", 12000, 0))
        out["gpa_other"] = outcome(lambda: d.cuGetProcAddress("cuMemAlloc", 12000, 0))
        out["count"] = outcome(d.cuDeviceGetCount)
        mc = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED
        other = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK
        out["attr_mc"] = outcome(lambda: d.cuDeviceGetAttribute(mc, 0))
        out["attr_mc_kw"] = outcome(lambda: d.cuDeviceGetAttribute(attrib=mc, dev=0))
        out["attr_other"] = outcome(lambda: d.cuDeviceGetAttribute(other, 0))
        from cuda import cuda as legacy

        out["legacy_mc"] = outcome(lambda: legacy.cuMulticastCreate(None))
        out["legacy_attr_mc"] = outcome(lambda: legacy.cuDeviceGetAttribute(mc, 0))
        """,
    )
    for name in MC_DRIVER_FUNCS:
        _assert_blocked(result["mc"][name], name)
    _assert_blocked(result["from_import"], "from cuda.bindings.driver import cuMulticastCreate")
    _assert_blocked(result["gpa_mc"], "cuGetProcAddress('cuMulticastCreate')")
    _assert_blocked(result["gpa_v2_mc_bytes"], "cuGetProcAddress_v2(b'cuMulticastBindMem')")
    _assert_blocked(result["legacy_mc"], "cuda.cuda.cuMulticastCreate")
    assert result["gpa_other"] == {"returned": [0, 4096]}
    assert result["count"] == {"returned": [0, 2]}
    assert result["attr_mc"] == {"returned": [0, 0]}  # the fake device says 1
    assert result["attr_mc_kw"] == {"returned": [0, 0]}
    assert result["legacy_attr_mc"] == {"returned": [0, 0]}
    assert result["attr_other"] == {"returned": [0, 1024]}
    assert "[mcguard] blocked cuda.bindings.driver.cuMulticastCreate" in stderr


def test_flashinfer_workspaces_raise_and_the_import_machinery_still_works(tmp_path: Path) -> None:
    result, _ = _run(
        tmp_path,
        """
        import copy
        import importlib

        import flashinfer.comm as fc

        out["workspace"] = outcome(lambda: fc.create_allreduce_fusion_workspace(backend="mnnvl"))
        for cls in ("MNNVLAllReduceFusionWorkspace", "SymmDeviceMemory", "McastGPUBuffer"):
            out[cls] = outcome(lambda cls=cls: getattr(fc, cls)(1).ready)
        out["other"] = outcome(fc.allreduce_fusion)
        out["is_package"] = fc.__spec__.loader.is_package("flashinfer.comm")
        out["copied_loader"] = type(copy.copy(fc.__loader__)).__name__
        importlib.reload(fc)  # a reload runs the module again: the patch must come back with it
        out["after_reload"] = outcome(lambda: fc.create_allreduce_fusion_workspace(backend="trtllm"))
        """,
    )
    for what in ("workspace", "MNNVLAllReduceFusionWorkspace", "SymmDeviceMemory", "McastGPUBuffer"):
        _assert_blocked(result[what], what)
    _assert_blocked(result["after_reload"], "create_allreduce_fusion_workspace after reload")
    assert result["other"] == {"returned": "fused"}
    assert result["is_package"] is True
    assert result["copied_loader"] == "_LoaderProxy"


def test_vllm_fusion_defaults_come_out_false(tmp_path: Path) -> None:
    result, _ = _run(
        tmp_path,
        """
        from vllm.config import vllm as vc

        out = {lvl: getattr(vc, "OPTIMIZATION_LEVEL_" + lvl)["compilation_config"]["pass_config"]
               for lvl in ("00", "02", "03")}
        """,
    )
    off = {"fuse_allreduce_rms": False, "fuse_gemm_comms": False}
    assert result == {"00": off, "02": {**off, "enable_sp": True}, "03": off}  # other keys untouched


def test_ctypes_lookups_of_multicast_symbols_raise(tmp_path: Path) -> None:
    result, _ = _run(
        tmp_path,
        """
        import ctypes

        lib = ctypes.CDLL(None)
        out["item"] = outcome(lambda: lib["cuMulticastCreate"])
        out["item_bytes"] = outcome(lambda: lib[b"cuMulticastCreate"])
        out["attr"] = outcome(lambda: lib.cuMulticastBindMem)
        out["other"] = outcome(lambda: lib["strlen"] is not None and lib.printf is not None)
        """,
    )
    for what in ("item", "item_bytes", "attr"):
        _assert_blocked(result[what], what)
    assert result["other"] == {"returned": True}


def test_spawned_and_subprocess_children_have_the_guard(tmp_path: Path) -> None:
    result, _ = _run(
        tmp_path,
        """
        import concurrent.futures
        import multiprocessing
        import subprocess

        import mcprobe

        if __name__ == "__main__":
            # A child must force the value itself, not only inherit ours.
            os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "1"
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                out["spawn"] = pool.submit(mcprobe.report).result(timeout=100)
            code = "import json, mcprobe; print(json.dumps(mcprobe.report()))"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
            out["subprocess"] = json.loads(run.stdout.strip().splitlines()[-1])
            out["pid"] = os.getpid()
        """,
    )
    for how in ("spawn", "subprocess"):
        child = result[how]
        assert child["pid"] != result["pid"], how
        assert child["env"] == "0", how
        assert child["guards"] == 1, how
        assert "multicast" in child["blocked"], how


@pytest.mark.parametrize("guard_copies", [0, 1])
def test_a_shadowed_sitecustomize_runs_once(tmp_path: Path, guard_copies: int) -> None:
    # A second copy of the guard on the path (e.g. /tmp/mcguard and the repository's folder) used to
    # chain back and forth and install finders that asked each other forever (RecursionError on import).
    shadowed = tmp_path / "shadowed"
    shadowed.mkdir()
    (shadowed / "sitecustomize.py").write_text(
        "import os\n"
        'os.environ["MCGUARD_TEST_CHAINED"] = os.environ.get("MCGUARD_TEST_CHAINED", "") + __name__ + ";"\n'
    )
    copies = []
    for i in range(guard_copies):
        copy_dir = tmp_path / f"guard_copy{i}"
        copy_dir.mkdir()
        shutil.copy(GUARD_DIR / "sitecustomize.py", copy_dir / "sitecustomize.py")
        copies.append(copy_dir)
    result, stderr = _run(
        tmp_path,
        """
        out["chained"] = os.environ.get("MCGUARD_TEST_CHAINED")
        out["guards"] = sum(type(f).__name__ == "_MulticastGuardFinder" for f in sys.meta_path)
        from vllm.config import vllm as vc

        out["o2"] = vc.OPTIMIZATION_LEVEL_02["compilation_config"]["pass_config"]["fuse_allreduce_rms"]
        """,
        env={"MCGUARD_VERBOSE": "1"},
        path_before_fakes=(*copies, shadowed),
    )
    assert result == {"chained": "_chained_sitecustomize;", "guards": 1, "o2": False}
    assert stderr.count("[mcguard] installed in pid") == 1, stderr
    assert "[mcguard] chained" not in stderr, stderr  # no chained file failed


def test_torch_symmetric_memory_is_blocked(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    result, _ = _run(
        tmp_path,
        """
        import torch

        if not torch.distributed.is_available():
            out["skip"] = "this torch has no torch.distributed"
        else:
            from torch._C._distributed_c10d import _SymmetricMemory as S

            # patched when `import torch` imported torch.distributed, before _symmetric_memory is imported
            out["cls_rendezvous"] = outcome(lambda: S.rendezvous(torch.empty(1), "0"))
            out["cls_empty_strided_p2p"] = outcome(lambda: S.empty_strided_p2p((1,), (1,), torch.float32))
            import torch.distributed._symmetric_memory as sm

            for name in ("empty", "rendezvous", "get_mem_pool", "get_symm_mem_workspace"):
                if hasattr(sm, name):
                    out[name] = outcome(lambda name=name: str(getattr(sm, name)(16, device="cpu")))
        """,
    )
    if "skip" in result:
        pytest.skip(result["skip"])
    assert {"cls_rendezvous", "cls_empty_strided_p2p", "empty", "rendezvous"} <= result.keys()
    for what, got in result.items():
        _assert_blocked(got, what)
