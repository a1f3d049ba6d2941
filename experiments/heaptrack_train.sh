#!/usr/bin/env bash
# Investigation (findings: docs/operations.md, "Memory"): what the Train worker allocates after
# step 100 and still holds at the end of a bench/load.py training run. Needs heaptrack and gdb
# (Debian: apt-get install heaptrack gdb) and ptrace rights. Attaches `heaptrack -p` to the
# RayTrainWorker once the load run logs step 100, records to the end of the run, then prints the held
# ("leaked") allocations, largest first. Output: $OUT/heaptrack_train.txt (text), $OUT/load.json.
#   flock /tmp/dncut-ray.lock bash experiments/heaptrack_train.sh [STEPS, default 700]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
STEPS=${1:-700}
LOG="$OUT/load.log"
.venv/bin/python bench/load.py --parts train --steps "$STEPS" --key train_heaptrack --out "$OUT/load.json" \
  > "$LOG" 2>&1 &
BENCH=$!
until grep -q "'step': 100," "$LOG"; do
  kill -0 "$BENCH" 2>/dev/null || { echo "the load run ended before step 100; see $LOG" >&2; exit 1; }
  sleep 1
done
PID=$(pgrep -f "ray::RayTrainWorker" | head -1)
(cd "$OUT" && heaptrack -p "$PID" > "$OUT/heaptrack.log" 2>&1)
wait "$BENCH"
heaptrack_print -f "$OUT"/heaptrack.*.zst -l 1 -p 0 -a 0 -T 0 -n 12 -s 6 > "$OUT/heaptrack_train.txt" 2>/dev/null
grep -E "leaked over|total memory leaked|peak heap" "$OUT/heaptrack_train.txt" | head -20
echo "full list: $OUT/heaptrack_train.txt"
