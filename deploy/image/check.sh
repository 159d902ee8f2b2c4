#!/usr/bin/env bash
# Checks that the built image behaves as a pod needs it to, on a host with buildah and root:
#   1. its config: ENTRYPOINT tini -- trainkit-run, a non-root USER, version labels = what is inside
#   2. `trainkit-run --help` and `trainkit doctor` work (buildah run)
#   3. a 2-process job trains (examples/train_minimal.py) under the image's own entrypoint, with
#      tini as PID 1 of a fresh PID namespace
#   4. SIGTERM to PID 1 reaches the workers, they save one agreed checkpoint and the container
#      exits 75 (EXIT_PREEMPTED); `trainkit ckpt list` then shows the committed step
# `buildah run --isolation chroot` shares the host's PID namespace (the command is not PID 1 and
# a signal cannot be sent "to the container"), so 3 and 4 run the image's rootfs the way a runtime
# does: unshare --pid --fork --mount-proc + chroot, as the image's user, with a memory-backed
# /dev/shm. Usage: deploy/image/check.sh [IMAGE]   (default localhost/trainkit:cpu)
set -euo pipefail

image=${1:-localhost/trainkit:cpu}
storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
started=$(date +%s)
fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }
step() { echo "check.sh: $*"; }

container=$(buildah "${storage[@]}" from --quiet "$image")
rootfs=$(buildah "${storage[@]}" mount "$container")
cleanup() {
  buildah "${storage[@]}" umount "$container" >/dev/null 2>&1 || true
  buildah "${storage[@]}" rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "1. image config"
config=$(buildah "${storage[@]}" inspect --type image "$image")
python3 - "$config" "$rootfs/opt/trainkit/image-versions.json" <<'PY' || fail "image config"
import json, sys
config = json.loads(sys.argv[1])["OCIv1"]["config"]
versions = json.load(open(sys.argv[2]))
assert config["Entrypoint"] == ["tini", "--", "trainkit-run"], config["Entrypoint"]
user = config.get("User", "")
assert user and user.split(":")[0] not in ("", "0", "root"), f"runs as root: User={user!r}"
labels = config["Labels"]
for key, name in (("torch", "torch"), ("nccl", "nccl"), ("rdma-core", "rdma-core")):
    label = labels.get(f"io.trainkit.{name}-version")
    assert label == versions[key], f"label io.trainkit.{name}-version={label!r}, image has {versions[key]!r}"
print(f"   entrypoint {config['Entrypoint']}, user {user}, versions {versions}")
PY

step "2. trainkit-run --help, trainkit doctor"
buildah "${storage[@]}" run --isolation chroot "$container" -- trainkit-run --help >/dev/null \
  || fail "trainkit-run --help"
buildah "${storage[@]}" run --isolation chroot "$container" -- trainkit doctor --no-peers \
  || fail "trainkit doctor"

# Runs the image's entrypoint + ARGS as PID 1 of a new PID and mount namespace, as the image's user.
user=$(buildah "${storage[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
run_as_pod() {
  unshare --pid --fork --mount --mount-proc="$rootfs/proc" /bin/sh -c '
    rootfs=$1; user=$2; shift 2
    mount --rbind /dev "$rootfs/dev"
    mount -t tmpfs -o size=1g,mode=1777 shm "$rootfs/dev/shm"
    for file in /etc/hosts /etc/resolv.conf; do
      touch "$rootfs$file"; mount --bind -o ro "$file" "$rootfs$file"
    done
    exec chroot --userspec="$user" "$rootfs" /usr/bin/env -i \
      PATH=/opt/trainkit/bin:/usr/bin:/bin HOME=/home/trainkit LANG=C.UTF-8 TINI_SUBREAPER=1 \
      "$@"' run_as_pod "$rootfs" "$user" env "${extra_env[@]}" tini -- trainkit-run "$@"
}

step "3. 2-process job under tini as PID 1"
extra_env=()
run_as_pod --standalone --nproc-per-node 2 /opt/trainkit/examples/train_minimal.py --steps 60 \
  --log-every 20 || fail "training job exited $?"

step "4. SIGTERM to PID 1 -> agreed save -> exit 75"
checkpoints=/checkpoints/check
extra_env=(TRAINKIT_GRACE_PERIOD_S=60)
log=$(mktemp)
run_as_pod --standalone --nproc-per-node 2 /opt/trainkit/examples/train_minimal.py --steps 100000 \
  --log-every 50 --checkpoint-dir "$checkpoints" >"$log" 2>&1 &
job_pid=$!   # the subshell running run_as_pod; its child is unshare, whose child is PID 1
# Wait until PID 1 of the new namespace is tini (after sh and chroot exec'd) and workers step.
deadline=$((SECONDS + 300))
init_pid=""
while [ $SECONDS -lt $deadline ]; do
  unshare_pid=$(pgrep -x -P "$job_pid" unshare || true)
  init_pid=$([ -n "$unshare_pid" ] && pgrep -P "$unshare_pid" | head -n1 || true)
  if [ -n "$init_pid" ] && [ "$(cat /proc/"$init_pid"/comm 2>/dev/null)" = tini ] \
     && grep -qE "step +50 " "$log"; then
    break
  fi
  sleep 1
done
grep -qE "step +50 " "$log" || { cat "$log"; fail "no training progress within 300 s"; }
nspid=$(awk '/^NSpid/ {print $NF}' /proc/"$init_pid"/status)
[ "$nspid" = 1 ] || fail "tini is PID $nspid in the container, not 1"
step "   PID 1 is $(cat /proc/"$init_pid"/comm) (host pid $init_pid); sending SIGTERM"
kill -TERM "$init_pid"
set +e
wait "$job_pid"
code=$?
set -e
tail -n 5 "$log"
[ "$code" = 75 ] || { cat "$log"; fail "exit code $code after SIGTERM, expected 75"; }
buildah "${storage[@]}" run --isolation chroot "$container" -- trainkit ckpt list "$checkpoints" \
  || fail "no committed checkpoint after the preemption save"
rm -f "$log"
step "all checks passed in $(( $(date +%s) - started )) s"
