#!/usr/bin/env bash
# The mask + shape-marker U-Nets trained on one CUDA GPU side by side, each keeping the weights
# with the best validation AJI (select: aji) rather than pixel Dice.
#   benchmarks/experiments/gpu_marker_aji.sh HALF_DATA OUT [SECONDS]
set -u
D=$1; O=$2; S=${3:-330}
mkdir -p "$O"
common=(--config configs/unet_bn_marker_monuseg_20x.yaml --data "$D" --set data_mpp=0.5 --set device=cuda
        --set "max_seconds=$S" --set steps=1000000 --set amp=true --set workers=4 --set select=aji --set val_every=250)
python3 -m wsiseg.cli train "${common[@]}" --out "$O/m16" --set batch_size=16 --set lr=0.001 > "$O/m16.log" 2>&1 &
python3 -m wsiseg.cli train "${common[@]}" --out "$O/m16b32" --set batch_size=32 --set lr=0.002 > "$O/m16b32.log" 2>&1 &
python3 -m wsiseg.cli train "${common[@]}" --out "$O/m32" --set batch_size=16 --set lr=0.002 --set init_from=null \
    --set "arch_kwargs={base: 32, depth: 4, out_channels: 2}" --set id=unet-bn32-marker-monuseg-20x > "$O/m32.log" 2>&1 &
wait
for f in "$O"/*.log; do echo "== $f"; grep -E "AJI|done|Error" "$f" | tail -n 3; done
