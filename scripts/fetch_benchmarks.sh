#!/bin/sh
# Fetches the published evaluation prompt sets into benchmarks/ (needs internet and git):
#   ViLG-300        github.com/PaddlePaddle/ERNIE       Research/ERNIE-ViLG2/data/ViLG-300.csv (no stated licence)
#   ParaPrompts-400 github.com/weijiawu/ParaDiffusion   ParaPrompts-400/ParaPrompts_400.csv    (no stated licence)
#   DPG-Bench       github.com/TencentQQGYLab/ELLA      dpg_bench/prompts/*.txt and the question
#                                                       file dpg_bench/dpg_bench.csv            (Apache-2.0)
# They are not redistributed in this repository. Usage: scripts/fetch_benchmarks.sh [DEST]
set -eu
dest=${1:-benchmarks}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sparse() {  # sparse <repo> <folder>: a shallow clone holding only that folder
  git clone --quiet --depth 1 --filter=blob:none --sparse "https://github.com/$1" "$tmp/$(basename "$1")"
  git -C "$tmp/$(basename "$1")" sparse-checkout set "$2"
}
sparse PaddlePaddle/ERNIE Research/ERNIE-ViLG2/data
sparse weijiawu/ParaDiffusion ParaPrompts-400
sparse TencentQQGYLab/ELLA dpg_bench
mkdir -p "$dest/dpg_bench"
cp "$tmp/ERNIE/Research/ERNIE-ViLG2/data/ViLG-300.csv" "$dest/"
cp "$tmp/ParaDiffusion/ParaPrompts-400/ParaPrompts_400.csv" "$dest/"
rm -rf "$dest/dpg_bench/prompts"
cp -r "$tmp/ELLA/dpg_bench/prompts" "$dest/dpg_bench/prompts"
cp "$tmp/ELLA/dpg_bench/dpg_bench.csv" "$dest/dpg_bench/dpg_bench.csv"
cp "$tmp/ELLA/LICENSE" "$dest/dpg_bench/LICENSE"
git -C "$tmp/ELLA" rev-parse HEAD > "$dest/dpg_bench/COMMIT"  # the scores in papers used 3c228f1 (2024-07-17)
echo "benchmarks in $dest: ViLG-300.csv, ParaPrompts_400.csv, $(ls "$dest/dpg_bench/prompts" | wc -l) DPG-Bench prompts," \
  "$(($(wc -l < "$dest/dpg_bench/dpg_bench.csv") - 1)) DPG-Bench question rows (ELLA $(cut -c1-7 "$dest/dpg_bench/COMMIT"))"
