#!/usr/bin/env bash
# The CIFAR-10 jobs of one GPU run, prepared to fit in about 9 minutes on one H100/H200.
#
#   OUT=<results dir> bash benchmarks/gpu/run.sh
#
# Inputs in $GPU_INPUTS (default .gpu/, git-ignored): cifar10-jpeg.zip (the JPEG copy of CIFAR-10) and
# float_resnet20.pt (the project's float ResNet-20 baseline, `qcnn train ... --out runs/float_resnet20`).
# Small nets leave a large GPU mostly idle, so the jobs run side by side, one process each:
#   1. alone on the GPU: quantizer kernel throughput (benchmarks/quantizer_kernels.py) and QAT step time
#      over float step time (benchmarks/qat_step_time.py);
#   2. the QAT-I table: PACT, DoReFa, LSQ, Zhuang progressive and guided at W4A4 and W2A2 (first/last 8-bit)
#      against the float baseline fine-tuned for the same epochs (`qcnn bench`, one cell per process);
#      beside it FQN W4A4 and W8A8 (all layers), CLIP-Q fine-tuning with the searched per-layer (p, b),
#      Bi-Real ResNet-20 (two-step), WAGE 2-8-8-8 VGG-7 from scratch and its float VGG-7 baseline;
#   3. when the QAT-I table is done: the whole equal-bit-width grid (`qcnn bench --suite cifar10`) at a
#      shorter budget until the time runs out (cells not started stay pending; the bench resumes).
# Every job ends by RUN_SECONDS (default 540); then the results are packed into $OUT.
# PHASES (default "1 2 3") picks the phases: PHASES=3 runs the whole grid alone with every worker (WORKERS,
# default 15) for the whole budget; a bench directory carried in $GPU_INPUTS/bench_grid (results.json of an
# earlier run) is resumed, its finished cells skipped.
set -u
PHASES=${PHASES:-1 2 3}
has_phase() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
T0=$(date +%s)
RUN_SECONDS=${RUN_SECONDS:-540}
OUT=${OUT:-gpu_out}
G=${GPU_INPUTS:-.gpu}
R=${GPU_RUNS:-/tmp/qcnn_gpu_runs}
EPOCHS_QAT=${EPOCHS_QAT:-8}      # QAT-I table cells and the fine-tuned float reference
EPOCHS_GRID=${EPOCHS_GRID:-3}    # the whole grid
DEVICE=${DEVICE:-cuda}
# smoke test of this script on a CPU: DEVICE=cpu SMOKE=1 (tiny budgets, same commands)
if [ -n "${SMOKE:-}" ]; then
    B_X=(--train-images 512) Q_X=(--limit-train 512 --limit-test 500) T_X=(--train-images 512)
    K_X=(--numel 65536) S_X=(--only "lsq W4A4") WORKERS=${WORKERS:-3}
else
    B_X=() Q_X=() T_X=() K_X=() S_X=()
fi
mkdir -p "$OUT" "$R"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 QCNN_PROGRESS=0
PY=${PYTHON:-python3}
DATA=$G/cifar10-jpeg.zip
FLOAT=$G/float_resnet20.pt
COMMON=(--dataset cifar10 --data-dir "$DATA")

left() {
    local t=$((RUN_SECONDS - ($(date +%s) - T0)))
    echo $((t < 1 ? 1 : t))
}
log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/log.txt"; }
# job NAME CMD...: run CMD in the background until the deadline (SIGINT, SIGKILL 15 s later)
job() {
    local name=$1
    shift
    (
        timeout -k 15 -s INT "$(left)" "$@" >"$R/$name.log" 2>&1
        log "$name finished rc=$?"
    ) &
    log "$name started (pid $!)"
}

log "start: $(nproc) CPUs"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$OUT/log.txt"
$PY -c "from qcnn.data import get_data; b = get_data('cifar10', data_dir='$DATA', device='$DEVICE')
print('cifar10 cached:', len(b.train), 'train batches,', len(b.test), 'test batches')" 2>&1 | tee -a "$OUT/log.txt"

if has_phase 1; then
log "phase 1: kernels and step time"
timeout 60 $PY benchmarks/quantizer_kernels.py --device "$DEVICE" --min-run 0.1 "${K_X[@]}" --out "$R/kernels" >"$R/kernels.log" 2>&1
log "kernels rc=$?"
timeout 75 $PY benchmarks/qat_step_time.py --device "$DEVICE" --batch 128 --threads 1 --steps 5 --rounds 3 --warmup 3 \
    "${S_X[@]}" --out "$R/step_time" >"$R/step_time.log" 2>&1
log "step time rc=$?"
fi

QAT_PID=
if has_phase 2; then
log "phase 2: training jobs"
job qat_table $PY -m qcnn bench --suite cifar10 --init "$FLOAT" --data-dir "$DATA" --epochs "$EPOCHS_QAT" \
    --workers "${WORKERS:-11}" --threads 1 --methods zhuang_guided,zhuang_progressive,pact,dorefa,lsq --bits 4/4,2/2 \
    --device "$DEVICE" "${B_X[@]}" --out "$R/bench_qat_table"
QAT_PID=$!
job fqn_w4a4 $PY -m qcnn qat --recipe recipes/fqn.yaml --model resnet20 --init "$FLOAT" "${COMMON[@]}" \
    --w-bits 4 --a-bits 4 --epochs 8 --device "$DEVICE" "${Q_X[@]}" --out "$R/fqn_w4a4" --json
job fqn_w8a8 $PY -m qcnn qat --recipe recipes/fqn.yaml --model resnet20 --init "$FLOAT" "${COMMON[@]}" \
    --w-bits 8 --a-bits 8 --epochs 8 --device "$DEVICE" "${Q_X[@]}" --out "$R/fqn_w8a8" --json
job clipq $PY -m qcnn qat --recipe benchmarks/gpu/clipq_resnet20.yaml --model resnet20 --init "$FLOAT" \
    "${COMMON[@]}" --device "$DEVICE" "${Q_X[@]}" --out "$R/clipq_resnet20" --json
job bireal $PY -m qcnn qat --recipe recipes/bireal.yaml --model resnet20 --init "$FLOAT" "${COMMON[@]}" \
    --epochs 9 --batch-size 256 --device "$DEVICE" "${Q_X[@]}" --out "$R/bireal_resnet20" --json
job wage $PY -m qcnn qat --recipe benchmarks/gpu/wage_vgg7.yaml --model vgg7 "${COMMON[@]}" \
    --device "$DEVICE" "${Q_X[@]}" --out "$R/wage_vgg7" --json
job vgg7_float $PY -m qcnn train --model vgg7 "${COMMON[@]}" --epochs 12 --optimizer sgd --lr 0.05 \
    --momentum 0.9 --schedule onecycle --wd 5e-4 --batch-size 128 --device "$DEVICE" "${T_X[@]}" --out "$R/vgg7_float" --json
fi

[ -n "$QAT_PID" ] && wait "$QAT_PID"
if has_phase 3 && [ "$(left)" -gt 90 ]; then
    log "phase 3: the whole grid, $(left) s left"
    if [ -d "$G/bench_grid" ] && [ ! -d "$R/bench_grid" ]; then
        cp -r "$G/bench_grid" "$R/bench_grid" && log "resuming $G/bench_grid"
    fi
    has_phase 2 && GRID_WORKERS=${WORKERS:-10} || GRID_WORKERS=${WORKERS:-15}
    job grid $PY -m qcnn bench --suite cifar10 --init "$FLOAT" --data-dir "$DATA" --epochs "$EPOCHS_GRID" \
        --workers "$GRID_WORKERS" --threads 1 --time-limit $(($(left) - 75)) \
        --methods qcode,uniform,uniform_qat,pact,lsq,dorefa,wrpn,hwgq,zhuang_progressive,zhuang_guided,bireal,elq,nonuniform,vnq,fqn \
        --bits 4/4,2/2,8/8,1/2,2/fp --device "$DEVICE" "${B_X[@]}" --out "$R/bench_grid"
fi
wait
log "all jobs done; packing"

# logs, metrics, results and reports (no weights) in one archive; chosen checkpoints in two more
(cd "$R" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.qcz' .)
(cd "$R" && tar czf "$OUT/models_single.tgz" --ignore-failed-read fqn_w4a4/model.pt fqn_w8a8/model.pt \
    clipq_resnet20/model.pt bireal_resnet20/model.pt 2>/dev/null)
(cd "$R" && find bench_qat_table/cells -name model.pt -print0 2>/dev/null | tar czf "$OUT/models_qat_table.tgz" \
    --null -T - 2>/dev/null)
ls -la "$OUT" | tee -a "$OUT/log.txt"
log "done"
