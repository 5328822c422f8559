#!/usr/bin/env bash
# libFuzzer on tinyprop's native kernels (src/tinyprop/native/kernels.c) with AddressSanitizer
# and UBSan, NaN / ±Inf / denormal floats allowed; the harness is tests/native/fuzz_native.c.
#
#   benchmarks/fuzz_native.sh            # FUZZ_SECONDS=600 (ten minutes)
#   FUZZ_SECONDS=60 make fuzz-native     # the same through make
#
# Needs clang and its libFuzzer runtime; installs Debian's clang-14 and libclang-rt-14-dev
# when clang is missing (as root, or with sudo). Prints libFuzzer's final stats (execution
# count, coverage); exits non-zero on any finding (the crashing input is left in build/).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-600}"
clang="$(command -v clang || command -v clang-14 || true)"
if [ -z "$clang" ]; then
  echo "clang not found: installing clang-14 and libclang-rt-14-dev"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >/dev/null
  clang="$(command -v clang || command -v clang-14)"
fi
build="$here/build/fuzz-native"
mkdir -p "$build/corpus"
"$clang" -std=c99 -g -O1 -march=native -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=all -I"$here/tests/native" \
  "$here/tests/native/fuzz_native.c" "$here/src/tinyprop/native/kernels.c" -lm \
  -o "$build/fuzz_native"
cd "$build"
./fuzz_native -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=512 \
  -print_final_stats=1 corpus
