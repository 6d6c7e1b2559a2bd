#!/bin/bash
# A/B of the blend thread (RunConfig.blend_thread), interleaved, 3 rounds, on this machine's CPU:
# the sample slide (I/O-only and whole pipeline) and the 10k px mosaic (I/O-only; make it with
# `python benchmarks/tools/make_slide.py --size 10000`). Results: benchmarks/results/blend_thread_ab/.
set -e
cd "$(dirname "$0")/.."
MOSAIC=${MOSAIC:-.gpu/slides/mosaic-10000px-mpp0.25-seed0.tif}
OUT=benchmarks/results/blend_thread_ab
mkdir -p $OUT
for i in 1 2 3; do
  for mode in on off; do
    name=$([ $mode = on ] && echo thread || echo serial)
    wsiseg bench wsiseg/data/CMU-1-Small-Region.svs --device cpu --stages blend_write_only,end_to_end \
      --blend-thread $mode --json $OUT/sample_${name}_$i.json
    wsiseg bench "$MOSAIC" --device cpu --stages blend_write_only --blend-thread $mode \
      --json $OUT/mosaic10k_${name}_$i.json
  done
done
