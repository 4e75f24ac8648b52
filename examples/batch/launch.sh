#!/usr/bin/env bash
# Run the example jobs on one process, then on two (torchrun; on GPUs use --nproc_per_node = number of GPUs).
# Rerunning the same command resumes: finished rows are kept, the rest run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
NPROC="${NPROC:-1}"
OUT="${OUT:-outputs/batch}"
if [ "$NPROC" -gt 1 ]; then
    # accelerate launch --num_processes N also works on GPU machines; on a CPU-only machine it starts ONE process,
    # so torchrun is used here. Each process gets --threads 1 to share the CPU fairly.
    torchrun --nproc_per_node "$NPROC" -m pipelines.cli batch examples/batch/jobs.jsonl --out "$OUT" --threads 1 "$@"
else
    python -m pipelines.cli batch examples/batch/jobs.jsonl --out "$OUT" "$@"
fi
