#!/usr/bin/env bash
# The GPU check of issue #14, one command, at most 8 minutes on one NVIDIA GPU with its own PyTorch:
#   1. the CUDA-marked tests (pytest -m cuda; CI has no GPU and skips them),
#   2. cmim bench: ConMIM ViT-B/16 and ViT-S/16, bf16, eager and torch.compile, MFU against the measured
#      bf16 matmul peak, and the data pipeline (JPEG decode + crops per core) against what the step needs;
#      the ViT-S eager run times the loader as with data.decode=device (workers read bytes; the batched nvJPEG
#      decode is timed on its own, next to the step, not inside it),
#   3. a 1-GPU DDP smoke run (torchrun, 20 steps, synthetic data: NCCL process group of one, DDP wrapper),
# then one table. Every part has its own time limit (470 s together: the whole stays under 8 minutes), so a
# hang costs that part only.
#
#   bash benchmarks/gpu_check.sh     # works in $GPU_CHECK_WORK (default /tmp/cmim_gpu_check); when $OUT is set
#                                    # (the device tool's folder that comes back), it gets two files: the table
#                                    # (gpu_check_table.md) and every log, status and JSON (gpu_check_logs.tgz)
#   GPU_CHECK_REHEARSE=1 bash benchmarks/gpu_check.sh
#       a rehearsal on the CPU, before GPU time is spent: the same parts, commands and table, with a tiny model,
#       one timed step and no compilation (tests/test_gpu_check.py runs it; PYTHON=... picks another torch)
#
# Dependencies: the machine's torch, torchvision, timm, safetensors, tensorboard, matplotlib, scikit-learn,
# plus the pure-Python one it lacks (omegaconf 2.4, which needs only PyYAML; pytest is there): put its wheel in
# .whl/ (BENCHMARKS.md, "GPU check", says how) and this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${GPU_CHECK_WORK:-/tmp/cmim_gpu_check}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY -c "import omegaconf" || { echo "omegaconf is missing: bring its wheel in .whl/ (BENCHMARKS.md, GPU check)"; exit 1; }
BENCH=(-m cmim.cli bench --steps 10 --rounds 3 --warmup 3 --data-items 256 --data-source jpeg)
SMALL=""  # a rehearsal's overrides, put right after each command's own (later ones win; argparse wants them together)
DEVICE="assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ "${GPU_CHECK_REHEARSE:-0}" = 1 ]; then
  SMALL="train.device=cpu model.depth=2 model.embed_dim=64 model.num_heads=2 data.img_size=64
         conmim.proj_hidden_dim=128 train.batch_size=4 train.compile=false"
  BENCH+=(--steps 1 --rounds 1 --warmup 1 --data-items 8 --peak-sizes 256)
  DEVICE="print('torch', torch.__version__, '- rehearsal on the CPU')"
fi
$PY -c "import torch; $DEVICE" | tee "$WORK/device.txt" || exit 1

part() {  # part NAME SECONDS CMD...: run CMD with a limit, log to $WORK/NAME.log, status to $WORK/NAME.rc
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo $? > "$WORK/$name.rc"
  tail -n 3 "$WORK/$name.log"
}

part cuda_tests 80 $PY -m pytest -q -m cuda -p no:cacheprovider tests
part bench_vitb_eager 70 $PY "${BENCH[@]}" configs/conmim_vit_base_in1k.yaml train.batch_size=128 $SMALL \
  --json-out "$WORK/bench_vitb_eager.json"
part bench_vitb_compiled 120 $PY "${BENCH[@]}" configs/conmim_vit_base_in1k.yaml train.batch_size=128 \
  train.compile=true $SMALL --json-out "$WORK/bench_vitb_compiled.json"
part bench_vits_eager 50 $PY "${BENCH[@]}" configs/conmim_vit_small_in1k.yaml train.batch_size=256 $SMALL \
  --data-decode device --json-out "$WORK/bench_vits_eager.json"
part bench_vits_compiled 90 $PY "${BENCH[@]}" configs/conmim_vit_small_in1k.yaml train.batch_size=256 \
  train.compile=true $SMALL --json-out "$WORK/bench_vits_compiled.json"
part ddp_smoke 60 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m cmim.cli pretrain \
  configs/conmim_vit_small_in1k.yaml data.name=synthetic data.synthetic_size=2560 data.num_workers=4 \
  train.batch_size=128 train.max_steps=20 train.log_every_steps=5 monitor.every_epochs=0 train.progress=false \
  train.tensorboard=false "train.out_dir=$WORK/ddp_smoke" $SMALL
$PY - "$WORK" <<'PYEOF' | tee "$WORK/table.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rc = lambda n: (out / f"{n}.rc").read_text().strip() if (out / f"{n}.rc").exists() else "not run"
print("\n| part | status | img/s | GFLOP/img | TFLOP/s | MFU | host syncs/step | data: cores needed (per-core items/s) |")
print("|---|---|---|---|---|---|---|---|")
tail = lambda n: ((out / f"{n}.log").read_text().strip().splitlines() or [""])[-1][:90]
print(f"| CUDA tests | rc {rc('cuda_tests')} | | | | | | {tail('cuda_tests')} |")
for name in ("bench_vitb_eager", "bench_vitb_compiled", "bench_vits_eager", "bench_vits_compiled"):
    p = out / f"{name}.json"
    if not p.exists():
        print(f"| {name} | rc {rc(name)} | | | | | | {tail(name)} |")
        continue
    r = json.loads(p.read_text())
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    data = (f"{r['data_cores_needed']:.1f} ({r['data_items_per_s_per_core']:.0f})"
            if r.get("data_cores_needed") is not None else "")
    if r.get("device_decode_img_per_s"):
        data += f"; data.decode=device: JPEG decode on the device {r['device_decode_img_per_s']:.0f} img/s"
    print(f"| {name} | rc {rc(name)} | {r['img_per_s']:.0f} | {r['flops_per_img'] / 1e9:.1f} | "
          f"{r['achieved_tflops']:.1f} (peak {r.get('peak_bf16_tflops', 0):.0f}) | {mfu} | "
          f"{r.get('host_syncs_per_step')} | {data} |")
s = out / "ddp_smoke" / "summary.json"
ddp = json.loads(s.read_text()) if s.exists() else {}
print(f"| DDP smoke (1 GPU, 20 steps) | rc {rc('ddp_smoke')} | {ddp.get('img_per_s') or 0:.0f} | | | | | "
      f"steps {ddp.get('steps')}, non-finite {ddp.get('nonfinite_steps')}, DDP {ddp.get('ddp')} |")
PYEOF
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$OUT" != "$WORK" ]; then  # two files back, checkpoints left out
  cp "$WORK/table.md" "$OUT/gpu_check_table.md"
  tar czf "$OUT/gpu_check_logs.tgz" --exclude='*.pt' -C "$WORK" .
fi
