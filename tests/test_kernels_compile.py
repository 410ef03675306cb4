"""Ahead-of-time compile of the dense Triton kernels for Hopper (sm_90) on a
machine without a GPU, with the installed triton and, when available, with
triton 3.6 (the version on the H100 image), whose environment has no torch.

Marked ``slow`` (a few minutes with a cold triton cache on 2 cores, seconds when
warm). Each case runs ``tests/aot_compile_check.py --quick`` (one build per semantic
variant of each kernel: semiring, softmax/log-softmax, streamed/in-register
rows, fp32/bf16 operands) in a subprocess with TRITON_INTERPRET=0, so the
interpreter setting of the other test modules does not matter. Set
SEMITRITON_AOT_FULL=1 to build every spec (all tile configurations), and
SEMITRITON_TRITON36_PYTHON to point at another interpreter with triton 3.6
(default /work/venv36/bin/python).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "aot_compile_check.py")
PY36 = os.environ.get("SEMITRITON_TRITON36_PYTHON", "/work/venv36/bin/python")


def _triton_version(python):
    try:
        r = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, TRITON_INTERPRET="0"))    # the interpreter would need numpy
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _run(python):
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = [python, SCRIPT, "--jobs", str(min(2, os.cpu_count() or 1))]
    if os.environ.get("SEMITRITON_AOT_FULL", "0") in ("", "0"):
        args.append("--quick")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    summary = [l for l in lines if l.get("summary")]
    failed = [l for l in lines if not l.get("summary") and not l.get("ok")]
    msg = "\n".join(f"{f['module']}.{f['kernel']} {f['constexprs']}: {f.get('error', '')[:1500]}"
                    for f in failed)
    assert r.returncode == 0 and summary and not failed, \
        f"AOT compile failed (rc={r.returncode}):\n{msg}\n{r.stderr[-3000:]}"
    # the signed-max kernels drop excluded terms as NaN through maxnum/minnum:
    # no NaN-propagating max/min may appear in any kernel
    nanmax = [f"{l['module']}.{l['kernel']}" for l in lines if l.get("nan_propagating_max")]
    assert not nanmax, f"NaN-propagating max/min in {nanmax}"
    return summary[0]


@pytest.mark.slow
def test_aot_compile_hopper_installed_triton():
    pytest.importorskip("triton")
    s = _run(sys.executable)
    assert s["specs"] > 0


@pytest.mark.slow
def test_aot_compile_hopper_triton36():
    if not os.path.exists(PY36):
        pytest.skip(f"no triton-3.6 interpreter at {PY36} (set SEMITRITON_TRITON36_PYTHON)")
    version = _triton_version(PY36)
    if version is None:
        pytest.skip(f"{PY36} cannot import triton")
    if not version.startswith("3.6"):
        pytest.skip(f"{PY36} has triton {version}, not 3.6")
    s = _run(PY36)
    assert s["triton"].startswith("3.6") and s["specs"] > 0
