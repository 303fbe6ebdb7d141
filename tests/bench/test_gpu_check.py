"""bench/gpu_check.sh on a machine without a GPU: the one-line exit, and the CPU smoke run of every step's code.

The smoke run executes each step's Python code on the CPU at tiny sizes, so that on the first GPU run only the
CUDA-specific lines are new; it also checks the driver's promises: one process per step, the JSON rewritten after
each step, a failing or overrunning step isolated from the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"


def run_check(*arguments: str, out: Path, **environment: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), **environment)
    return subprocess.run(["bash", str(SCRIPT), *arguments], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip


def test_exits_at_once_with_one_line_without_cuda(tmp_path):
    result = run_check(out=tmp_path / "out", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU here"), lines
    assert "--smoke" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = run_check("--smoke", out=out)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["build", "tests", "ms_deform_attn", "model", "train_step", "post_processing"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "ok")

    environment = steps["build"]["figures"]["environment"]
    assert environment["extension"].startswith("compiled extension loaded"), environment
    assert environment["active_backend_cpu_float32"] == "compiled"
    counts = steps["tests"]["figures"]["counts"]
    assert counts["skipped"] > 0 and counts["failed"] == counts["errors"] == 0  # gpu tests: skipped on the CPU
    assert "tests/modeling/ops/test_ms_deform_attn_cuda.py" in steps["tests"]["figures"]["files"]

    cases = {key: value for key, value in steps["ms_deform_attn"]["figures"].items() if "/" in key}
    assert sorted(cases) == ["bfloat16/64x32/batch1", "bfloat16/64x32/batch2", "float32/64x32/batch1",
                             "float32/64x32/batch2"]  # fmt: skip
    for key, figures in cases.items():
        assert figures["forward_ours_ms"] > 0 and figures["forward_backward_speedup"] > 0
        assert figures["forward_difference"] < (1e-5 if key.startswith("float32") else 1e-2), (key, figures)

    for key, figures in steps["model"]["figures"].items():
        assert figures["ours"]["median_ms"] > 0 and figures["transformers"]["median_ms"] > 0, key
        tolerance = 1e-4 if key.endswith("fp32") else 0.1
        assert figures["class_queries_logits_relative_difference"] < tolerance, (key, figures)
        assert figures["masks_queries_logits_relative_difference"] < tolerance, (key, figures)
    (train,) = steps["train_step"]["figures"].values()
    assert train["ours"]["median_ms"] > 0 and train["transformers"]["median_ms"] > 0 and train["speedup"] > 0

    for task in ("semantic", "instance", "panoptic"):
        assert steps["post_processing"]["figures"][task]["agrees"], task
    assert steps["post_processing"]["figures"]["panoptic"]["segments"] > 0

    log = (out / "gpu_check.log").read_text()
    assert "== step post_processing: ok" in log and (out / "build.log").exists() and (out / "tests.xml").exists()


def test_a_failing_or_overrunning_step_loses_no_other_figures(tmp_path):
    out = tmp_path / "out"
    result = run_check("--smoke", "--steps", "build,tests,post_processing", "--fail", "build", "--budget",
                       "post_processing=0.01", out=out)  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["build"]["status"] == "failed" and "failing on purpose" in steps["build"]["error"]
    assert steps["tests"]["status"] == "ok" and steps["tests"]["figures"]["counts"]["skipped"] > 0
    assert steps["post_processing"]["status"] == "timeout"
    assert list(steps) == ["build", "tests", "post_processing"]
