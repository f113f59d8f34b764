#!/usr/bin/env bash
# Makes a base image for the Tern Dockerfile from this machine's own files, for machines that
# cannot pull one: the dynamic loader and the libraries BINARY links (glibc, libgcc), and a
# non-root user 65532 ("nonroot"), as in gcr.io/distroless/cc-debian12:nonroot.
#
#   deploy/docker/base-image.sh [BINARY] [TAG]    (defaults: target/release/tern tern-base:local)
#
# The image suits binaries built on this machine (the same glibc).
set -euo pipefail
bin=${1:-target/release/tern}
tag=${2:-tern-base:local}
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release first)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# Each library as ldd resolves it, and the loader at the path the binary names.
for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
mkdir -p "$root/etc" "$root/tmp" "$root/home/nonroot"
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/home/nonroot"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
tar -C "$root" --numeric-owner -c . | docker import \
    --message "tern base: loader and libraries of $(basename "$bin"), user nonroot" - "$tag" >/dev/null
echo "$tag"
