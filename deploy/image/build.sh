#!/usr/bin/env bash
# Prepare the build context and build the trainkit image with buildah, podman or docker, then label it
# with the torch / NCCL / rdma-core versions the image really holds. Run from the repository root:
#   deploy/image/build.sh                     # VARIANT=cpu, FROM localhost/debian:bookworm, buildah
#   VARIANT=gpu BUILDER=docker IMAGE=registry.example.com/trainkit:gpu deploy/image/build.sh
# Environment: VARIANT (cpu|gpu), IMAGE, BASE_IMAGE, BUILDER (buildah|podman|docker),
# TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL (cpu: where torch's CPU wheel is, e.g.
# https://download.pytorch.org/whl/cpu), CONTEXT_ONLY=1 (prepare the context, build nothing),
# STORAGE_DRIVER (buildah/podman, default vfs: works inside containers without overlay support).
set -euo pipefail

variant=${VARIANT:-cpu}
builder=${BUILDER:-buildah}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}
build_dir=${BUILD_DIR:-deploy/.build}
context="$build_dir/context"
case "$variant" in
  cpu) base_image=${BASE_IMAGE:-localhost/debian:bookworm} ;;
  gpu) base_image=${BASE_IMAGE:-nvidia/cuda:12.8.1-runtime-ubuntu22.04} ;;
  *) echo "build.sh: VARIANT=$variant: expected cpu or gpu" >&2; exit 2 ;;
esac
image=${IMAGE:-localhost/trainkit:$variant}
if [ ! -f pyproject.toml ] || [ ! -f deploy/Dockerfile ]; then
  echo "build.sh: run from the repository root (no pyproject.toml or deploy/Dockerfile here)" >&2
  exit 2
fi

started=$(date +%s)
rm -rf "$context"
mkdir -p "$context/wheels"
# trainkit's own wheel always comes from this checkout; the cpu variant also takes torch (the CPU
# wheel) and every dependency from here, so its build needs no package index at all.
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" .
if [ "$variant" = cpu ]; then
  # torch first, alone: PyPI's Linux torch is a CUDA build; TORCH_INDEX_URL (e.g.
  # https://download.pytorch.org/whl/cpu) gets the CPU wheel where pip's own index lacks it.
  torch_index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$context/wheels" \
    "${torch_index[@]}" "$torch_spec"
  # Then everything torch and trainkit need, preferring the torch wheel already here.
  "$python" -m pip download --quiet --only-binary=:all: --dest "$context/wheels" \
    --find-links "$context/wheels" "$torch_spec" "$context"/wheels/trainkit-*.whl
fi
cp -r examples "$context/examples"
cp deploy/image/record_versions.py "$context/"
echo "build.sh: context $context ($(du -sh "$context" | cut -f1), $(ls "$context/wheels" | wc -l) wheels)"
[ "${CONTEXT_ONLY:-0}" = 1 ] && exit 0

build_args=(--build-arg "VARIANT=$variant" --build-arg "BASE_IMAGE=$base_image"
            --build-arg "TORCH_SPEC=$torch_spec")
case "$builder" in
  buildah)
    storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
    build=(buildah "${storage[@]}" bud --isolation "${ISOLATION:-chroot}") ;;
  podman)
    storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
    build=(podman "${storage[@]}" build) ;;
  docker)
    storage=()
    build=(docker build) ;;
  *) echo "build.sh: BUILDER=$builder: expected buildah, podman or docker" >&2; exit 2 ;;
esac
"${build[@]}" -f deploy/Dockerfile "${build_args[@]}" -t "$image" "$context"

# Labels from the versions file the build wrote: a second, one-line build on top of the image.
if [ "$builder" = buildah ]; then
  container=$(buildah "${storage[@]}" from --quiet "$image")
  versions=$(buildah "${storage[@]}" run --isolation chroot "$container" \
    cat /opt/trainkit/image-versions.json)
  buildah "${storage[@]}" rm "$container" >/dev/null
else
  versions=$("$builder" "${storage[@]}" run --rm --entrypoint cat "$image" /opt/trainkit/image-versions.json)
fi
unlabelled=$("$builder" "${storage[@]}" images --quiet --no-trunc "$image" | head -n1)
label() { "$python" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$versions" "$1"; }
printf 'FROM %s\n' "$image" | "${build[@]}" \
  --label "io.trainkit.torch-version=$(label torch)" \
  --label "io.trainkit.nccl-version=$(label nccl)" \
  --label "io.trainkit.rdma-core-version=$(label rdma-core)" \
  --label "io.trainkit.python-version=$(label python)" \
  -t "$image" -f - "$context"
# The unlabelled image is now untagged: drop it (its layers stay, shared with the labelled one).
labelled=$("$builder" "${storage[@]}" images --quiet --no-trunc "$image" | head -n1)
if [ -n "$unlabelled" ] && [ "$unlabelled" != "$labelled" ]; then
  "$builder" "${storage[@]}" rmi "$unlabelled" >/dev/null || true
fi
finished=$(date +%s)
size=$("$builder" "${storage[@]}" images --format '{{.Size}}' "$image" | head -n1)
echo "build.sh: $image built in $((finished - started)) s, size $size; versions $versions"
