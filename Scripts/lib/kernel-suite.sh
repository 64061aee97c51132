#!/usr/bin/env bash
# Runs the kernel suite, inside the VM or directly as root on a kernel with dm-snapshot:
# two lanes at once (each runs its tests one at a time), then the tests that must run alone.
# The tests of one lane share nothing with the other's: each has its own devices, loop
# devices, state directory and journal, and checks only its own (guard leaves the devices
# of another state directory's runs alone). The VM has two CPUs: two lanes keep both busy.
#
#   kernel-suite.sh TESTS RESULTS [FILTER]
#
# Writes RESULTS/kernel-*.xml and .log. With FILTER, the matching tests run in one lane.
set -u
tests=$1 results=$2 filter=${3:-}
export GUARD_RESULTS_DIR="$results"
suite() { "$tests" --testing-library swift-testing "$@"; }
# Every guard process the tests started that crashed (a Swift trap, a fault; the crash
# points' SIGKILL leaves no such line): Scripts/test fails on any.
# Only lines from after the suite started (run directly on a host, the log is older).
read -r since _ </proc/uptime
crashes() {
  dmesg | awk -v since="$since" '{t = $0; sub(/^\[ */, "", t); sub(/\].*/, "", t)} t + 0 >= since + 0' |
    grep -aE '(traps|segfault).* in guard(-test|-watchdog)?\[' >"$results/kernel-crashes.log" || true
}
trap crashes EXIT

if [ -n "$filter" ]; then
  suite --filter "KernelTests.*$filter" --skip PowerLoss --xunit-output "$results/kernel-a.xml" >"$results/kernel-a.log" 2>&1
  exit 0
fi
# Lane a: these suites. Lane b: every other kernel test, so a new suite is never left out.
lane_a='KernelTests\.Kernel/(CrashKernelTests|FaultKernelTests|ReassemblyKernelTests|JSONContractKernelTests|DeviceMapperKernelTests|IsolationKernelTests|CoexistenceKernelTests)'
# Alone: checks that see the whole machine (libdevmapper's udev cookies are not per device,
# and a test beside it that kills guard mid-transaction leaves one).
alone='keptRunRolledBackLater'
suite --filter "$lane_a" --skip "$alone" --xunit-output "$results/kernel-a.xml" >"$results/kernel-a.log" 2>&1 &
suite --filter KernelTests --skip "($lane_a|$alone|PowerLoss)" --xunit-output "$results/kernel-b.xml" >"$results/kernel-b.log" 2>&1 &
wait
suite --filter "$alone" --xunit-output "$results/kernel-alone.xml" >"$results/kernel-alone.log" 2>&1
exit 0
