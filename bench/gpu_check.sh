#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py): builds the extension with CUDA against the torch that is installed, runs the
# CUDA tests and benchmarks, and writes a log and one JSON of all figures to $OUT (else runs/gpu_check/).
#
#   bash bench/gpu_check.sh            # on a machine with an NVIDIA GPU; at most 8 minutes
#   bash bench/gpu_check.sh --smoke    # every step's code on the CPU at tiny sizes (what CI checks)
#
# PYTHON picks the interpreter (default: python3, the one that holds torch on the GPU machines).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
