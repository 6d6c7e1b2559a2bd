#!/usr/bin/env bash
# Ship the trained joint model as the default: export (float16 storage), evaluate it beside the
# old default on the same validation splits, retrain the cellularity regressors on its maps, and
# measure its speed beside the old default's, back to back. Run from the repository root after
# `wsiseg train --config configs/lite0_unet_joint_20x.yaml` has finished.
set -euo pipefail
RUN=${RUN:-runs/lite0-unet-joint-20x}
NEW=lite0-unet-joint-20x
OLD=unet-bn-nuclei-classes-20x
DATA=../shared/data
R=benchmarks/results/default_model
mkdir -p $R
wsiseg export $RUN/$NEW wsiseg/weights/$NEW
# the validation splits: MoNuSeg (one image per organ), TNBC (patients 05, 11), CoNSeP/MoNuSAC classes
wsiseg eval --model $NEW --model $OLD --model unet-bn-marker-monuseg-20x --tnbc $DATA/tnbc/train --classes \
    --tune --backend torch --json $R/eval_val.json | tee $R/eval_val.txt
# the cellularity regressors on the new maps (PROXY label; validation by source image/slide)
wsiseg cellularity train --model $NEW --data consep:$DATA/consep/train --data monusac:$DATA/monusac \
    --val-every consep=5,monusac=4 -o wsiseg/weights/cellularity-lgbm-proxy --importance $R/lgbm_importance.png
wsiseg cellularity train --regressor cnn --width quarter --epochs 25 --model $NEW --data consep:$DATA/consep/train \
    --data monusac:$DATA/monusac --val-every consep=5,monusac=4 -o wsiseg/weights/cellularity-cnn-proxy
