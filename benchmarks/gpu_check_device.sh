#!/usr/bin/env bash
# The GPU check on a lent device machine (benchmarks/device_kit.py prepares it here and prints the
# calls): install the carried wheels (.whl/, named in the call's carry) over the machine's image,
# say what runs, then run benchmarks/gpu_check.py into $OUT (its report, JSON and profiles, and
# this call's log come back; at most 8 files).
#
# Usage, in the repository root there: bash benchmarks/gpu_check_device.sh PARTS BUDGET_S [CHECK_ARGS...]
# (CHECK_ARGS go to gpu_check.py: `--cpu-smoke` rehearses the whole call on a machine without a GPU).
set -uo pipefail
parts=${1:?usage: gpu_check_device.sh PARTS BUDGET_S [CHECK_ARGS...]}
budget=${2:?usage: gpu_check_device.sh PARTS BUDGET_S [CHECK_ARGS...]}
shift 2
out=${OUT:?OUT is unset: run this through the device tool, or set OUT to a folder for the report}
mkdir -p "$out"
log="$out/log.txt"
say() { echo "$@" | tee -a "$log"; }

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    say "no wheels in .whl/: run 'python benchmarks/device_kit.py wheels' here first and name .whl in the call's carry"
    exit 2
fi
# --target: the image's own site-packages stay as they are; the carried versions come first on the path
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" 2>&1 | tee -a "$log" || { say "installing the carried wheels failed"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
versions='
import deepspeed, pydantic, torch, transformers

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"DeepSpeed {deepspeed.__version__} from {deepspeed.__file__}, pydantic {pydantic.VERSION}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device")
'
python3 -c "$versions" 2>&1 | tee -a "$log" || { say "the check's imports failed on this machine"; exit 2; }
python3 benchmarks/gpu_check.py --parts "$parts" --budget-s "$budget" --out-dir "$out" "$@" 2>&1 | tee -a "$log"
