#!/usr/bin/env bash
# Make a Debian bookworm base image locally (debootstrap + buildah), for hosts that reach a Debian
# mirror but no image registry. The CPU variant builds FROM it: BASE_IMAGE=localhost/debian:bookworm.
# Needs root, debootstrap and buildah. Usage: deploy/image/debian-base.sh [WORK_DIR]
set -euo pipefail

work_dir=${1:-deploy/.build}
image=${DEBIAN_BASE_IMAGE:-localhost/debian:bookworm}
# The mirror apt already uses on this host (deb822 or one-line sources), else Debian's CDN.
mirror=${DEBIAN_MIRROR:-$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list 2>/dev/null | grep -oE 'https?://[^ ]+' | grep -v security | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}
storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")

if buildah "${storage[@]}" inspect --type image "$image" >/dev/null 2>&1; then
  echo "debian-base: $image exists; remove it (buildah rmi $image) to rebuild"
  exit 0
fi
rootfs="$work_dir/bookworm-rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
echo "debian-base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
# Like the official image: no package caches, apt keeps none either.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
container=$(buildah "${storage[@]}" from scratch)
trap 'buildah "${storage[@]}" rm "$container" >/dev/null 2>&1 || true' EXIT
mountpoint=$(buildah "${storage[@]}" mount "$container")
tar -C "$rootfs" -cf - . | tar -C "$mountpoint" -xf -
buildah "${storage[@]}" umount "$container" >/dev/null
buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash "$container"
buildah "${storage[@]}" commit --rm "$container" "$image"
trap - EXIT
rm -rf "$rootfs"
echo "debian-base: $image ready"
