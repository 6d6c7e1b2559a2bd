#!/usr/bin/env bash
# Train the zoo's instance models side by side on one CUDA GPU within a time budget, then score
# each on the MoNuSeg validation split (wsiseg eval --tune) on the same machine.
#
#   benchmarks/experiments/gpu_zoo_train.sh HALF_DATA VAL_DATA OUT [SECONDS]
#
# HALF_DATA: the MoNuSeg training folder resampled to 0.5 um/px (wsiseg.train.datasets.write_monuseg,
# the same pixels the loader would make, a quarter of the bytes to copy); VAL_DATA: the 7
# validation images at their native 0.25 um/px (MoNuSeg layout) for wsiseg eval; SECONDS: each
# training's budget (the cosine schedule runs to it). Every run uses the repository's configs,
# with only the device, speed and budget keys overridden (and, where named, batch size / lr / id).
set -u
D=$1; V=$2; O=$3; S=${4:-330}
mkdir -p "$O"
common=(--data "$D" --set data_mpp=0.5 --set device=cuda --set "max_seconds=$S" --set steps=1000000)
train() {  # name, then config arguments
    local name=$1; shift
    python3 -m wsiseg.cli train "$@" "${common[@]}" --out "$O/$name" > "$O/$name.log" 2>&1 &
}
# seed 000's modified U-Net + seed 002's shape-marker head (base 16, shipped size), from the nucleus model
train marker16 --config configs/unet_bn_marker_monuseg_20x.yaml --set amp=true --set workers=3 \
    --set batch_size=16 --set lr=0.001 --set val_every=250
# the same head on a U-Net twice as wide, from random weights
train marker32 --config configs/unet_bn_marker_monuseg_20x.yaml --set amp=true --set workers=3 \
    --set batch_size=16 --set lr=0.002 --set val_every=250 --set init_from=null \
    --set "arch_kwargs={base: 32, depth: 4, out_channels: 2}" --set id=unet-bn32-marker-monuseg-20x
# seed 002: USE-Net (SE-ResNet-50 U-Net, mask + marker), random init
train usenet --config configs/use_net_seresnet50_monuseg_20x.yaml --set amp=true --set workers=3 \
    --set batch_size=16 --set lr=0.001 --set val_every=250
# seed 001: U-Net on a ResNet-50 encoder, weighted CE + Dice with border weights, random init
train resnet50 --config configs/unet_resnet50_monuseg_20x.yaml --set amp=true --set workers=2 \
    --set batch_size=16 --set lr=0.001 --set val_every=250
# seeds 001/004: Mask R-CNN ResNet-101 FPN, random init (float32: detection losses)
train maskrcnn --config configs/maskrcnn_r101_monuseg_20x.yaml --set workers=3 \
    --set batch_size=8 --set lr=0.01 --set warmup_steps=200 --set val_every=250
sleep 90
for f in "$O"/*.log; do echo "== $f"; tail -n 3 "$f"; done
wait
for f in "$O"/*.log; do echo "== $f"; grep -E "val Dice|done|Error|error" "$f" | tail -n 4; done
# score every trained model on the validation images (instances, AJI, PQ, mAP; thresholds tuned)
for d in "$O"/*/; do
    m=$(ls "$d"*.safetensors 2>/dev/null | head -n 1)
    [ -n "$m" ] || continue
    n=$(basename "$d")
    timeout "${EVAL_SECONDS:-170}" python3 -m wsiseg.cli eval --model "$m" --data "$V" --tune --device cuda \
        --json "$O/eval_$n.json" > "$O/eval_$n.log" 2>&1 &
done
wait
for f in "$O"/eval_*.log; do echo "== $f"; tail -n 12 "$f"; done
