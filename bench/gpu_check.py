"""GPU check: one prepared run that proves the CUDA path and measures it (run by ``bench/gpu_check.sh``).

From the repository root on a machine with an NVIDIA GPU whose Python already has a CUDA torch (no network, nothing
to install): ``bash bench/gpu_check.sh``. Steps, each in its own process with its own time budget (a crash, a hang
or a CUDA error in one step loses none of the others' figures; the JSON is rewritten after every step), in at most
8 minutes in all:

1. ``build``: ``pip install --no-build-isolation --no-deps -e .`` with ``FORCE_CUDA=1`` and sm_90 against the
   torch that is there (falling back to ``setup.py build_ext --inplace`` when pip cannot install), then which
   backend the op takes on CUDA (``active_backend``) for fp32 / bf16 / fp16 / fp64;
2. ``tests``: ``tests/modeling/ops/test_ms_deform_attn_cuda.py`` and every test marked ``gpu``;
3. ``ms_deform_attn``: ours vs the grid_sample reference, forward and forward+backward, fp32 and bf16, at the pixel
   decoder's shapes of 1024², 512² and 1333×800 inputs, batch 1 and 8 (``bench/ms_deform_attn.py``);
4. ``model``: Swin-T and Swin-L at 1024², batch 1 and 8, fp32 and bf16 autocast, ours vs transformers on the same
   weights: latency, peak memory (``torch.cuda.max_memory_allocated``), output differences (``bench/model.py``);
5. ``train_step``: Swin-T, batch 8, 1024² crops, bf16 autocast, ours vs transformers: step time and peak memory
   (``bench/train_step.py``);
6. ``post_processing``: semantic, instance and panoptic post-processing of the same outputs on CUDA and on the CPU:
   agreement and time.

Everything goes to ``$OUT`` when set, else ``runs/gpu_check/``: ``gpu_check.log`` (all output), ``gpu_check.json``
(all figures, per step: status, seconds, figures, error), ``build.log`` and ``tests.xml``. Without CUDA it exits at
once with one line. ``--smoke`` runs every step's code on the CPU at tiny sizes (no pip install): what CI checks, so
that only the CUDA-specific lines are new on the first GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480.0
# (name, seconds): each step's own limit on the GPU machine; the run as a whole stops at TOTAL_BUDGET_S. A smoke run
# on a (shared, slow) CPU gets SMOKE_BUDGET_SCALE times as long.
STEPS = [
    ("build", 170.0),
    ("tests", 90.0),
    ("ms_deform_attn", 45.0),
    ("model", 90.0),
    ("train_step", 55.0),
    ("post_processing", 30.0),
]
SMOKE_BUDGET_SCALE = 4.0
NO_CUDA_EXIT_CODE = 2


# --------------------------------------------------------------------------------------------------------------------
# The driver: runs each step in a child process, with its budget, and merges what the step recorded
# --------------------------------------------------------------------------------------------------------------------


class Log:
    """Writes lines to the console and to gpu_check.log."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def write_json(path: Path, data: dict) -> None:
    """Atomic rewrite: a reader (or a killed run) never sees half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def run_step(name: str, budget: float, args: argparse.Namespace, env: dict, log: Log, work: Path) -> dict:
    """Runs ``--step name`` in a child process (its own process group) for at most ``budget`` seconds."""
    result_path = work / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--result", str(result_path)]
    command += ["--out", str(args.out), *(["--smoke"] if args.smoke else [])]
    command += ["--fail", args.fail] if args.fail else []
    log(f"== step {name} (budget {budget:.0f} s)")
    start = time.monotonic()
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", start_new_session=True)  # fmt: skip

    def copy_output() -> None:
        for line in child.stdout:
            log(f"[{name}] {line.rstrip()}")

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        returncode = child.wait(timeout=budget)
        status = "ok" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # pip, ninja, pytest and their children too
        returncode = child.wait()
        status = "timeout"
    reader.join(timeout=5)
    recorded = json.loads(result_path.read_text()) if result_path.exists() else {}
    step = {"status": status, "returncode": returncode, "seconds": round(time.monotonic() - start, 1)}
    step.update(recorded)
    if status == "ok" and recorded.get("error"):
        step["status"] = "failed"
    error = f" ({step['error']})" if "error" in step else ""
    log(f"== step {name}: {step['status']} in {step['seconds']} s{error}")
    return step


def no_cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else the one-line reason."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable with {sys.executable} ({error})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} at {sys.executable} is a CPU build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def drive(args: argparse.Namespace) -> int:
    if not args.smoke:
        reason = no_cuda_reason()
        if reason is not None:
            print(f"gpu_check: no CUDA GPU here: {reason}; run it on a machine with an NVIDIA GPU "
                  "(or `bash bench/gpu_check.sh --smoke` for the CPU dry run)")  # fmt: skip
            return NO_CUDA_EXIT_CODE
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    scale = SMOKE_BUDGET_SCALE if args.smoke else 1.0
    budgets = {name: seconds * scale for name, seconds in STEPS}
    for override in args.budget:
        name, _, seconds = override.partition("=")
        budgets[name] = float(seconds)
    selected = [name for name, _ in STEPS if args.steps is None or name in args.steps]
    report = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}, "total_seconds": 0.0}
    json_path = args.out / "gpu_check.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in selected:
            remaining = TOTAL_BUDGET_S * scale - (time.monotonic() - start)
            if remaining < 5:
                report["steps"][name] = {"status": "skipped", "error": "the 8-minute budget is spent"}
                log(f"== step {name}: skipped (the 8-minute budget is spent)")
                continue
            step = run_step(name, min(budgets[name], remaining), args, env, log, Path(work))
            report["steps"][name] = step
            if step.get("pythonpath"):  # the build fell back to an in-place build: later steps import from there
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [step["pythonpath"], env.get("PYTHONPATH")]))
            report["total_seconds"] = round(time.monotonic() - start, 1)
            write_json(json_path, report)
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    log(f"gpu_check: {statuses} in {report['total_seconds']} s; figures in {json_path}")
    return 0 if all(status == "ok" for status in statuses.values()) else 1


# --------------------------------------------------------------------------------------------------------------------
# Inside a step's process: a recorder that rewrites the step's result file after every figure
# --------------------------------------------------------------------------------------------------------------------


class Recorder:
    """The figures of one step, saved after every update (so a step killed at its budget keeps what it measured)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"figures": {}}
        self.failed_cases: list[str] = []

    def figure(self, key: str, value) -> None:
        self.data["figures"][key] = value
        write_json(self.path, self.data)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def attempt(self, key: str, *measures: Callable[[], dict]) -> dict | None:
        """Records the figures of the first of ``measures`` that succeeds under ``key``, else the errors.

        One failing case (an out-of-memory, transformers failing where ours runs) does not end the step; the step
        still fails at its end (``raise_if_any_failed``). The later ``measures`` are fallbacks, e.g. ours alone.
        """
        errors = []
        for measure in measures:
            try:
                figures = measure()
            except Exception as error:  # noqa: BLE001  recorded, and the step goes on
                traceback.print_exc()
                errors.append(f"{type(error).__name__}: {error}"[:1000])
                continue
            if errors:
                figures = {**figures, "errors_before_fallback": errors}
                self.failed_cases.append(key)
            self.figure(key, figures)
            return figures
        self.failed_cases.append(key)
        self.figure(key, {"errors": errors})
        return None

    def raise_if_any_failed(self) -> None:
        if self.failed_cases:
            raise RuntimeError(f"cases that failed: {self.failed_cases}")


def run_logged(command: list[str], log_path: Path, env: dict | None = None, tail: int = 30) -> tuple[int, str]:
    """Runs ``command`` with its output in ``log_path``; returns the exit code and the last ``tail`` lines."""
    with log_path.open("a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    returncode = completed.returncode
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return returncode, "\n".join(lines[-tail:])


def environment() -> dict:
    """What this process sees: versions, the GPU, and which path the op takes per dtype."""
    import torch
    import transformers

    from mask2former.modeling.ops import active_backend, extension_status

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "extension": extension_status(),
        "device": device,
        "cuda_kernels_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
            "mask2former::ms_deform_attn_forward", "CUDA"
        ),
    }
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        report[f"active_backend_{device}_{str(dtype).removeprefix('torch.')}"] = active_backend(device, dtype)
    return report


def step_build(recorder: Recorder, args: argparse.Namespace) -> None:
    build_log = args.out / "build.log"
    env = dict(os.environ)
    if args.smoke:  # CI's environment already has the extension; this only exercises the calls
        command = [sys.executable, "-m", "pip", "--version"]
    else:
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env.update(FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
        command = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    recorder.figure("arch_list", env.get("TORCH_CUDA_ARCH_LIST"))
    start = time.monotonic()
    returncode, tail = run_logged(command, build_log, env)
    recorder.figure("pip_returncode", returncode)
    if returncode != 0:  # e.g. a read-only site-packages: build in place and put a shim on PYTHONPATH
        print(f"pip failed ({returncode}); last lines:\n{tail}\nbuilding in place instead", flush=True)
        returncode, tail = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], build_log, env)
        shim = Path(tempfile.gettempdir()) / "gpu_check_pythonpath"
        shim.mkdir(exist_ok=True)
        if not (shim / "mask2former").exists():
            (shim / "mask2former").symlink_to(REPO_ROOT, target_is_directory=True)
        recorder.set("pythonpath", str(shim))
        recorder.figure("in_place_returncode", returncode)
    recorder.figure("build_seconds", round(time.monotonic() - start, 1))
    text = build_log.read_text(encoding="utf-8", errors="replace")
    if "extension was not built" in text:  # setup.py's OptionalBuildExtension downgraded a compiler error
        recorder.figure("build_warning", next(line for line in text.splitlines() if "extension was not built" in line))
    # A fresh interpreter: the editable install's path hooks apply only to new processes.
    env = dict(os.environ)
    if recorder.data.get("pythonpath"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [recorder.data["pythonpath"], env.get("PYTHONPATH")]))
    probe = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--environment"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    if probe.returncode != 0:
        raise RuntimeError(f"the package does not import after the build: {probe.stderr.strip()[-2000:]}")
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    recorder.figure("environment", report)
    print(json.dumps(report, indent=1), flush=True)
    if not args.smoke and report.get("active_backend_cuda_float32") != "compiled":
        raise RuntimeError(f"the CUDA kernels are not active ({report['extension']}); see build.log")


def gpu_test_files() -> list[str]:
    """Test files with a ``gpu`` mark, the CUDA op tests first (found by text: importing them all is slow)."""
    files = {"tests/modeling/ops/test_ms_deform_attn_cuda.py"}
    for path in (REPO_ROOT / "tests").rglob("test_*.py"):
        if re.search(r"mark\.gpu\b", path.read_text(encoding="utf-8", errors="replace")):
            files.add(str(path.relative_to(REPO_ROOT)))
    return sorted(files, key=lambda name: (not name.endswith("test_ms_deform_attn_cuda.py"), name))


def step_tests(recorder: Recorder, args: argparse.Namespace) -> None:
    files = gpu_test_files()
    recorder.figure("files", files)
    junit = args.out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "--continue-on-collection-errors",
               f"--junitxml={junit}", *files]  # fmt: skip
    returncode = subprocess.run(command, cwd=REPO_ROOT).returncode
    recorder.figure("pytest_returncode", returncode)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error")), None)
        if problem is not None:
            counts["failed" if problem.tag == "failure" else "errors"] += 1
            message = (problem.get("message") or "").splitlines()[:1]
            failures.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(message)}"[:300])
        elif any(child.tag == "skipped" for child in case):
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    recorder.figure("counts", counts)
    recorder.figure("failures", failures)
    if counts["failed"] or counts["errors"] or (not args.smoke and counts["passed"] == 0):
        raise RuntimeError(f"tests: {counts}")


def step_ms_deform_attn(recorder: Recorder, args: argparse.Namespace) -> None:
    import ms_deform_attn as deform_bench  # bench/ is sys.path[0]
    import torch

    device = "cpu" if args.smoke else "cuda"
    sizes = [(32, 64)] if args.smoke else [(1024, 1024), (512, 512), (800, 1333)]
    batches, repeats = ([1, 2], 1) if args.smoke else ([1, 8], 10)
    bandwidth = deform_bench.copy_bandwidth_gbs(device)
    recorder.figure("copy_bandwidth_gbs", bandwidth)
    for dtype in (torch.float32, torch.bfloat16):
        for height, width in sizes:  # the most important shapes first: a step cut at its budget keeps them
            for batch_size in batches:
                key = f"{str(dtype).removeprefix('torch.')}/{width}x{height}/batch{batch_size}"
                case = (height, width), batch_size, device, dtype, repeats, bandwidth
                recorder.attempt(key, partial(deform_bench.run_case, *case))
                if device == "cuda":
                    torch.cuda.empty_cache()
    recorder.raise_if_any_failed()


def step_model(recorder: Recorder, args: argparse.Namespace) -> None:
    import model as model_bench  # bench/ is sys.path[0]
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    models = ["tiny-swin"] if args.smoke else ["swin-t", "swin-l"]
    size, batches = (64, [2]) if args.smoke else (1024, [1, 8])
    iterations, warmup = (1, 1) if args.smoke else (5, 2)
    for name in models:
        torch.manual_seed(0)
        ours, reference = model_bench.build_models(model_bench.load_config(name), device)
        for batch_size in batches:
            pixel_values = torch.randn(batch_size, 3, size, size, device=device)
            for autocast in (None, torch.bfloat16):
                key = f"{name}/{size}/batch{batch_size}/{'bf16-autocast' if autocast else 'fp32'}"
                case = pixel_values, iterations, warmup, autocast
                figures = recorder.attempt(
                    key,
                    partial(model_bench.compare_forward, {"ours": ours, "transformers": reference}, *case),
                    partial(model_bench.compare_forward, {"ours": ours}, *case),  # fallback: ours alone
                )
                if figures is not None and "speedup" in figures:
                    print(f"{key}: ours {figures['ours']['median_ms']:.1f} ms, transformers "
                          f"{figures['transformers']['median_ms']:.1f} ms, x{figures['speedup']:.2f}, peak ratio "
                          f"{figures['peak_ratio']:.2f}", flush=True)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del ours, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    recorder.raise_if_any_failed()


def step_train_step(recorder: Recorder, args: argparse.Namespace) -> None:
    import model as model_bench  # bench/ is sys.path[0]
    import torch
    import train_step as train_bench

    device = torch.device("cpu" if args.smoke else "cuda")
    name, batch_size, size = ("tiny-swin", 2, 64) if args.smoke else ("swin-t", 8, 1024)
    steps, warmup = (1, 1) if args.smoke else (5, 2)
    torch.manual_seed(0)
    config = model_bench.load_config(name)
    ours, reference = model_bench.build_models(config, device)
    pixel_values = torch.randn(batch_size, 3, size, size, device=device)
    mask_labels, class_labels = train_bench.make_targets(batch_size, size, config.num_labels, 10, device)
    labels = (pixel_values, mask_labels, class_labels, steps, warmup, torch.bfloat16)
    figures = recorder.attempt(
        f"{name}/{size}/batch{batch_size}/bf16-autocast",
        partial(train_bench.compare_training_step, {"ours": ours, "transformers": reference}, *labels),
        partial(train_bench.compare_training_step, {"ours": ours}, *labels),  # fallback: ours alone
    )
    print(json.dumps(figures, indent=1), flush=True)
    recorder.raise_if_any_failed()


def trained_like_outputs(batch_size: int, num_queries: int, num_classes: int, mask_size: tuple[int, int]) -> dict:
    """Model-like outputs: a few confident queries own blobs of the image with sharp masks, the rest say no-object."""
    import torch

    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(batch_size, num_queries, num_classes + 1, generator=generator)
    class_logits[..., -1] += 6.0  # "no object"
    confident = min(12, num_queries)
    labels = torch.randint(0, num_classes, (batch_size, confident), generator=generator)
    class_logits[:, :confident, -1] = -6.0
    class_logits[:, :confident].scatter_(-1, labels[..., None], 9.0)
    height, width = mask_size
    rows = torch.arange(height).view(1, 1, -1, 1).float()
    cols = torch.arange(width).view(1, 1, 1, -1).float()
    centres = torch.rand(batch_size, num_queries, 2, 1, 1, generator=generator)
    radius = 0.15 * min(height, width) * (0.5 + torch.rand(batch_size, num_queries, 1, 1, generator=generator))
    distance = ((rows - centres[:, :, 0] * height) ** 2 + (cols - centres[:, :, 1] * width) ** 2).sqrt()
    # (B, Q, h, w): about +radius inside a blob, negative outside
    noise = torch.randn(batch_size, num_queries, height, width, generator=generator)
    mask_logits = (radius - distance) / 2 + 0.1 * noise
    return {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}


def compare_results(task: str, on_device: list, on_cpu: list) -> dict:
    """Pixels that differ (fraction) and segment lists that differ, per image."""
    mismatched, total, segment_lists_differ, max_score_difference = 0, 0, 0, 0.0
    for device_result, cpu_result in zip(on_device, on_cpu):
        device_map = device_result if task == "semantic" else device_result["segmentation"]
        cpu_map = cpu_result if task == "semantic" else cpu_result["segmentation"]
        mismatched += int((device_map.cpu() != cpu_map).sum())
        total += cpu_map.numel()
        if task != "semantic":
            device_info, cpu_info = device_result["segments_info"], cpu_result["segments_info"]
            labels = [(info["id"], info["label_id"]) for info in device_info]
            segment_lists_differ += labels != [(info["id"], info["label_id"]) for info in cpu_info]
            scores = [abs(a["score"] - b["score"]) for a, b in zip(device_info, cpu_info)]
            max_score_difference = max([max_score_difference, *scores])
    return {
        "mismatched_pixel_fraction": mismatched / max(total, 1),
        "images_with_other_segments": segment_lists_differ,
        "max_score_difference": max_score_difference,
    }


def step_post_processing(recorder: Recorder, args: argparse.Namespace) -> None:
    from mask2former import Mask2FormerImageProcessor

    device = "cpu" if args.smoke else "cuda"
    batch_size, mask_size, target = (2, (24, 32), (96, 128)) if args.smoke else (2, (256, 336), (1024, 1333))
    outputs = trained_like_outputs(batch_size, 100, 133, mask_size)
    on_device = {key: value.to(device) for key, value in outputs.items()}
    processor = Mask2FormerImageProcessor()
    tasks: dict[str, Callable] = {
        "semantic": processor.post_process_semantic_segmentation,
        "instance": processor.post_process_instance_segmentation,
        "panoptic": processor.post_process_panoptic_segmentation,
    }
    for task, post_process in tasks.items():
        case = task, post_process, outputs, on_device, [target] * batch_size
        figures = recorder.attempt(task, partial(compare_post_processing, *case))
        print(f"{task}: {figures}", flush=True)
    recorder.raise_if_any_failed()


def compare_post_processing(task: str, post_process: Callable, outputs: dict, on_device: dict, sizes: list) -> dict:
    """Times ``post_process`` on the CPU outputs and on the device outputs (after a warm-up each) and compares."""
    import torch

    device = next(iter(on_device.values())).device.type
    timings, results = {}, {}
    for where, inputs in (("cpu", outputs), (device, on_device)):
        post_process(inputs, target_sizes=sizes)  # warm-up
        if where == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[where] = post_process(inputs, target_sizes=sizes)
        if where == "cuda":
            torch.cuda.synchronize()
        timings[f"{where}_ms"] = (time.perf_counter() - start) * 1e3
    figures = {**timings, **compare_results(task, results[device], results["cpu"])}
    if task != "semantic":
        figures["segments"] = sum(len(result["segments_info"]) for result in results[device])
    figures["agrees"] = figures["mismatched_pixel_fraction"] <= 1e-4 and figures["images_with_other_segments"] == 0
    return figures


STEP_FUNCTIONS: dict[str, Callable[[Recorder, argparse.Namespace], None]] = {
    "build": step_build,
    "tests": step_tests,
    "ms_deform_attn": step_ms_deform_attn,
    "model": step_model,
    "train_step": step_train_step,
    "post_processing": step_post_processing,
}


def run_inside_step(args: argparse.Namespace) -> int:
    recorder = Recorder(args.result)
    try:
        if args.fail == args.step:
            raise RuntimeError(f"--fail {args.step}: failing on purpose")
        STEP_FUNCTIONS[args.step](recorder, args)
    except Exception as error:  # noqa: BLE001  recorded for the driver, which carries on with the next step
        traceback.print_exc()
        recorder.set("error", f"{type(error).__name__}: {error}"[:2000])
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every step's code on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO_ROOT / "runs" / "gpu_check"),
                        help="output folder (default: $OUT, else runs/gpu_check)")  # fmt: skip
    parser.add_argument("--steps", type=lambda text: text.split(","), default=None,
                        help=f"comma-separated subset of {','.join(name for name, _ in STEPS)}")  # fmt: skip
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                        help="override one step's time budget")  # fmt: skip
    parser.add_argument("--fail", default=None, metavar="STEP", help="make STEP fail on purpose (checks isolation)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # inside a step's process
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.environment:
        print(json.dumps(environment()))
        return 0
    if args.step is not None:
        return run_inside_step(args)
    unknown = set(args.steps or []) - set(STEP_FUNCTIONS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; expected some of {list(STEP_FUNCTIONS)}")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
