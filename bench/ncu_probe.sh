#!/usr/bin/env bash
# Profile one fused-kernel launch with Nsight Compute (clocks left as they are).
# Usage: bench/ncu_probe.sh SCHEME M N K CONFIG   (CONFIG as bench/probe_kernel.py takes it)
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 200 "$NCU" --clock-control none -k regex:lowbit_matmul -c 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  --section Occupancy --section LaunchStats --section InstructionStats \
  python3 bench/probe_kernel.py "$@" > "$OUT/ncu_$1_$2.txt" 2>&1
grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Ipc|No Eligible|Active Warps Per|Eligible Warps|Block Limit|L2 Hit|Mem Busy|Max Bandwidth|Executed Ipc" "$OUT/ncu_$1_$2.txt" | head -40
