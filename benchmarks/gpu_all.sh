#!/usr/bin/env bash
# All GPU measurements of issue 17 ("Rein at the hardware's limit") in one call, sized to
# finish in under 8 minutes on one H100/H200:
#   1. benchmarks/kernel.py: one Rein layer, eager vs torch.compile (default and
#      max-autotune) vs Triton, bare op and in-model call (fp32 hidden + CLS under bf16
#      autocast), forward / backward / both, at ViT-L 512 px batch 1 and 8 and SAM-H
#      1024 px batch 1; every path checked against float64 first (exit 1 outside the bound).
#   2. benchmarks/step.py: ViT-L 512 px batch 8 training step, frozen vs Rein (torch, Triton).
#   3. vfm-adapters bench --device cuda: ViT-L 512 px batch 8, bf16 autocast, every method,
#      images/s (inference, training step) and peak memory vs the frozen host.
#   4. benchmarks/smoke_mask2former.py: 50 iterations of the paper's DINOv2-L Rein recipe.
# Each writes JSON (and PNG where the script draws one) under $OUT; at the end
# $OUT/RESULTS_rows.md collects the tables to paste into benchmarks/RESULTS.md.
#
# Usage (from the repository root):
#   OUT=/tmp/out benchmarks/gpu_all.sh            # on the GPU machine
#   OUT=/tmp/out benchmarks/gpu_all.sh --dry-run  # CPU: tiny shapes, Triton interpreter; checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_all}
PYTHON=${PYTHON:-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
status=0
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs, records failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - t0 ))s (log: $OUT/$name.log)"
  tail -n 15 "$OUT/$name.log"
  [[ $rc -ne 0 ]] && status=1
  return 0
}

if [[ $DRY -eq 1 ]]; then
  export TRITON_INTERPRET=1
  step kernel 300 $PYTHON benchmarks/kernel.py --dry-run --output-dir "$OUT/kernel"
  step step 300 $PYTHON benchmarks/step.py --dry-run --output-dir "$OUT/step"
  step bench 300 $PYTHON -m vfm_adapters.cli bench --device cpu --model tiny --image-size 28 --batch 2 --rounds 1 \
    --json "$OUT/bench.json"
  step smoke_mask2former 300 $PYTHON benchmarks/smoke_mask2former.py --cpu-tiny --output "$OUT/smoke_mask2former.json"
else
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  $PYTHON -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >"$OUT/versions.txt" 2>&1 || true
  step kernel 210 $PYTHON benchmarks/kernel.py --output-dir "$OUT/kernel" --repetitions 20 --warmup 5 \
    --shapes vit_l:512:1 vit_l:512:8 sam_h:1024:1
  step step 90 $PYTHON benchmarks/step.py --output-dir "$OUT/step" --steps 10 --warmup 3
  step bench 90 $PYTHON -m vfm_adapters.cli bench --device cuda --model vit-l --image-size 512 --batch 8 \
    --dtype bfloat16 --rounds 3 --json "$OUT/bench.json"
  step smoke_mask2former 60 $PYTHON benchmarks/smoke_mask2former.py --iters 50 --warmup 10 \
    --output "$OUT/smoke_mask2former.json"
fi

# Collect the tables for RESULTS.md (machine, command and date included).
$PYTHON - "$OUT" "$DRY" <<'PY' >"$OUT/RESULTS_rows.md" 2>"$OUT/collect.log" || status=1
import json, sys, pathlib
out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
print(f"<!-- benchmarks/gpu_all.sh{' --dry-run' if dry else ''}; machine: "
      f"{(out / 'versions.txt').read_text().strip() if (out / 'versions.txt').exists() else 'CPU dry run'} -->")
kernel = out / "kernel" / "kernel.json"
if kernel.exists():
    data = json.loads(kernel.read_text())
    print(f"\n### Rein layer ({data['device']}, torch {data['torch']}, triton {data['triton']}, {data['date']})\n")
    print("| shape | path | pass | ms | x eager | lower bound ms | within float64 bound |")
    print("|---|---|---|---:|---:|---:|---|")
    within = {(c["shape"], c["path"]): c["within"] for c in data["checks"]}
    for r in data["rows"]:
        label = f"{r['model']} {r['image']}px b{r['batch']}"
        bound = "-" if r["lower_bound_ms"] is None else f"{r['lower_bound_ms']:.4f}"
        print(f"| {label} | {r['path']} | {r['pass']} | {r['ms']:.4f} | {r['speedup_vs_eager']:.2f} | {bound} | "
              f"{within.get((label, r['path']))} |")
bench = out / "bench.json"
if bench.exists():
    data = json.loads(bench.read_text())
    print(f"\n### vfm-adapters bench ({data['settings']})\n")
    sys.path.insert(0, "src")
    from vfm_adapters.commands.bench import format_table
    print(format_table(data["rows"]))
for name in ("step/step.json", "smoke_mask2former.json"):
    path = out / name
    if path.exists():
        print(f"\n### {name}\n\n```json\n{json.dumps(json.loads(path.read_text()), indent=1)[:3000]}\n```")
PY
echo "== done in $(( $(date +%s) - started ))s, status $status; rows: $OUT/RESULTS_rows.md"
exit $status
