#!/usr/bin/env bash
# Remake the shipped `reference` model and its validation numbers from DAVIS-2016 train.
#
#   scripts/reference.sh DAVIS_ROOT... [-- extra `fmapicon train` flags]
#
# DAVIS_ROOT: folders in the DAVIS layout that together hold the 30 DAVIS-2016 *train*
# sequences (e.g. ../shared/data/davis2016-dev ../shared/data/davis2016-train-extra).
# The 10 validation sequences below are never trained on; the other 20 are training video
# (unlabeled). Writes runs/reference (training), runs/reference-val (a DAVIS root of
# symbolic links to the validation sequences) and runs/reference-eval-* (J&F; -fused: with
# colour at W = 0.85, the shipped default).
# Environment: STEPS (default 1000, the shipped model), DEVICE (default auto), EXTRA (more
# training sources for --data, space-separated: e.g. the clips of scripts/extra_video.sh).
set -euo pipefail
VALIDATION="bmx-bumps bus dog-agility flamingo horsejump-low mallard-fly motorbike rollerblade stroller tennis"
roots=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  roots+=("$1"); shift
done
[ ${#roots[@]} -gt 0 ] || { echo "usage: $0 DAVIS_ROOT... [-- train flags]" >&2; exit 2; }
val=runs/reference-val; train=()
mkdir -p "$val/JPEGImages/480p" "$val/Annotations/480p" "$val/ImageSets"; : > "$val/ImageSets/val.txt"
for root in "${roots[@]}"; do
  for seq_dir in "$root"/JPEGImages/480p/*/; do
    seq=$(basename "$seq_dir")
    if [[ " $VALIDATION " == *" $seq "* ]]; then
      ln -sfn "$(cd "$seq_dir" && pwd)" "$val/JPEGImages/480p/$seq"
      ln -sfn "$(cd "$root/Annotations/480p/$seq" && pwd)" "$val/Annotations/480p/$seq"
      echo "$seq" >> "$val/ImageSets/val.txt"
    else
      train+=("$seq_dir")
    fi
  done
done
echo "training on ${#train[@]} sequences, validating on $(wc -l < "$val/ImageSets/val.txt")"
# shellcheck disable=SC2086  # EXTRA: several sources, split on spaces
fmapicon train --data "${train[@]}" ${EXTRA:-} --out runs/reference --steps "${STEPS:-1000}" --device "${DEVICE:-auto}" \
    --snapshot-every 1000 "${extra[@]}"
for model in runs/reference pixels; do
  fmapicon eval --davis "$val" --model "$model" --out "runs/reference-eval-$(basename "$model")" --force
done
# the shipped weights record the colour fusion as their default; a new run folder does not
fmapicon eval --davis "$val" --model runs/reference --pixels-weight 0.85 --out runs/reference-eval-fused --force
fmapicon eval --davis "$val" --model random:resnet-s4 --input-scale 0.504 --out runs/reference-eval-random --force
