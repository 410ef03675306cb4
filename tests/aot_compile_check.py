"""Ahead-of-time compile every dense kernel for Hopper (sm_90) without a GPU.

    python tests/aot_compile_check.py [--quick] [--ptxas-info] [--jobs N] [--only matmul,softmax,norm]

Imports the kernel modules straight from ``kernels/`` (no torch needed, so it
also runs in an environment that has only triton, e.g. triton 3.6) and
compiles each ``aot_specs()`` entry with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``.
Prints one JSON line per spec and a final summary line; exits non-zero if any
spec fails to build or needs more shared memory than an sm_90 block has. ``--ptxas-info`` also runs the bundled ptxas with ``-v`` on each
PTX and reports registers and spill bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"          # real JITFunctions, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("matmul", "softmax", "norm", "rms_norm", "logspace_gemm", "attention", "elementwise")


def load_kernels():
    """Import ``kernels/`` as a package named ``_st_kernels`` (relative imports work,
    the ``semitriton`` package and torch are not needed)."""
    path = os.path.join(ROOT, "kernels")
    spec = importlib.util.spec_from_file_location("_st_kernels", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_st_kernels"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def normalize_signature(sig: dict, constexprs: dict) -> dict:
    """Triton versions differ slightly in how constexpr arguments are spelled in
    the signature; 3.2+ (incl. 3.6 and 3.9) want every argument present and
    constexpr ones typed "constexpr"."""
    out = dict(sig)
    for k in constexprs:
        out[k] = "constexpr"
    return out


def ptxas_info(ptx: str, arch: str):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            ptxas = get_ptxas(90).path
        except TypeError:
            ptxas = get_ptxas().path
    except Exception:  # noqa: BLE001 - older/newer layouts
        import triton
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        with open(f, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", f, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    txt = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


TILE_KEYS = {"BM", "BN", "BK", "BI", "BJ", "BR", "GROUP_M"}
#: the dynamic shared memory one block may use on an H100/H200 (227 KiB); a build
#: that needs more compiles but fails to launch (OutOfResources)
SHARED_LIMIT = 232448


def variant_key(spec):
    """What makes a spec semantically different (not its tile sizes or unit strides)."""
    kernel, sig, const = spec[:3]
    consts = tuple(sorted((k, str(v)) for k, v in const.items()
                          if k not in TILE_KEYS and not (k.startswith("s_") and v == 1)))
    ptrs = tuple(sorted(v for v in sig.values() if v.startswith("*")))
    return (kernel.__name__, consts, ptrs)


def specs_of(mod) -> list:
    """The module's compile specs with their launch options (num_warps,
    num_stages) where its ``aot_specs`` can add them (``options=True``)."""
    import inspect
    if "options" in inspect.signature(mod.aot_specs).parameters:
        return mod.aot_specs(options=True)
    return mod.aot_specs()


def compile_one(args):
    mod_name, idx, want_ptxas = args
    import triton
    from triton.backends.compiler import GPUTarget

    pkg = sys.modules.get("_st_kernels") or load_kernels()
    mod = getattr(pkg, mod_name)
    spec = specs_of(mod)[idx]
    kernel, sig, const = spec[:3]
    opts = dict(spec[3]) if len(spec) > 3 else {}
    divisible = opts.pop("_divisible_by_16", [])
    names = list(kernel.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    desc = {"module": mod_name, "kernel": kernel.__name__ if hasattr(kernel, "__name__") else str(kernel),
            "constexprs": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in const.items()},
            "options": opts, "divisible": len(divisible), "signature_dtypes": sorted({v for v in sig.values() if v.startswith("*")})}
    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=normalize_signature(sig, const), constexprs=const,
                                        attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        ok = "cubin" in ck.asm and len(ck.asm["cubin"]) > 0 and "ptx" in ck.asm
        shared = getattr(ck.metadata, "shared", None)
        desc.update(ok=ok, shared=shared, seconds=round(time.time() - t0, 2))
        if shared is not None and shared > SHARED_LIMIT:
            desc.update(ok=False, error=f"needs {shared} bytes of shared memory; a block on sm_90 has "
                                        f"{SHARED_LIMIT} (it would fail to launch)")
        ptx = ck.asm["ptx"]
        desc["nan_propagating_max"] = ("max.NaN" in ptx) or ("min.NaN" in ptx)
        if want_ptxas:
            arch = re.search(r"\.target\s+(sm_\w+)", ptx)
            desc.update(ptxas_info(ptx, arch.group(1) if arch else "sm_90a"))
    except Exception as e:  # noqa: BLE001
        desc.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], seconds=round(time.time() - t0, 2))
    return desc


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptxas-info", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--only", default=",".join(MODULES))
    ap.add_argument("--quick", action="store_true",
                    help="one spec per semantic variant (tile-size alternatives skipped)")
    a = ap.parse_args(argv)
    import triton

    pkg = load_kernels()
    jobs = []
    for name in a.only.split(","):
        mod = getattr(pkg, name)
        seen = set()
        for i, spec in enumerate(specs_of(mod)):
            if a.quick:
                key = variant_key(spec)
                if key in seen:
                    continue
                seen.add(key)
            jobs.append((name, i, a.ptxas_info))
    t0 = time.time()
    if a.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(compile_one, jobs, chunksize=1)
    else:
        results = [compile_one(j) for j in jobs]
    for r in results:
        print(json.dumps(r), flush=True)
    failed = [r for r in results if not r.get("ok")]
    print(json.dumps({"summary": True, "triton": triton.__version__, "specs": len(results),
                      "failed": len(failed), "seconds": round(time.time() - t0, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
