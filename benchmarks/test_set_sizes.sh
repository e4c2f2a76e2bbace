#!/usr/bin/env bash
# Test-set sizes of the shared real datasets and the image-AUROC noise floor they imply.
#
#   bash benchmarks/test_set_sizes.sh ../shared > docs/benchmarks/test_set_sizes.txt
#
# Image AUROC is the fraction of (anomalous, good) test pairs ranked correctly. Moving one good image's
# score can flip its n_anomalous pairs out of n_good * n_anomalous, i.e. change AUROC by up to 1/n_good;
# one anomalous image, by up to 1/n_anomalous. Counted: every *.png under test/good (good) and under the
# other test/ subfolders (anomalous), as anomalib's MVTecAD / MVTecLOCO datamodules read them.
set -euo pipefail
shared="${1:-../shared}"
echo "# bash benchmarks/test_set_sizes.sh $shared"
printf '%-40s %6s %10s %9s %14s\n' dataset n_good n_anomalous 1/n_good 1/n_anomalous
for d in mvtec_loco_juice_bottle/juice_bottle mvtec3d_tire_rgb/tire battery_weld/weld; do
  root="$shared/datasets/$d/test"
  good=$(find "$root/good" -type f -name '*.png' | wc -l)
  anomalous=$(find "$root" -mindepth 2 -type f -name '*.png' -not -path "$root/good/*" | wc -l)
  awk -v d="$d" -v g="$good" -v a="$anomalous" \
    'BEGIN { printf "%-40s %6d %10d %9.4f %14.4f\n", d, g, a, 1 / g, 1 / a }'
done
