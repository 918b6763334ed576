#!/usr/bin/env bash
# Builds meshd's image without a registry: a root filesystem made of the
# meshd binary, the tools it runs (ip, tc, nsenter) and the shared
# libraries they load, imported with `docker import`. The same image as
# packaging/docker/Dockerfile, minus Debian's base.
#
#   packaging/docker/build-image.sh [MESHD] [TAG]
#     MESHD  the meshd binary (default target/release/meshd)
#     TAG    the image (default mesh/meshd:latest)
# DOCKER_HOST chooses the dockerd, as for any docker command. Run it on
# every node (or `docker save` | ssh node `docker load`).
set -euo pipefail
meshd=${1:-target/release/meshd}
tag=${2:-mesh/meshd:latest}
[ -x "$meshd" ] || { echo "build-image: no meshd at $meshd (cargo build --release -p mesh-userspace)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{usr/local/bin,bin,etc,tmp,run,var/lib/mesh,sys/fs/bpf,proc,dev}
install -m 0755 "$meshd" "$root/usr/local/bin/meshd"
for tool in ip tc nsenter; do
  path=$(command -v "$tool") || { echo "build-image: $tool is missing (iproute2, util-linux)" >&2; exit 1; }
  install -m 0755 "$path" "$root/bin/$tool"
done
# Every shared library the binaries load, and the loader, where they are.
for bin in "$root"/usr/local/bin/meshd "$root"/bin/*; do
  ldd "$bin" | awk '/=> \//{print $3} /^\t\//{print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# tc looks for its modules and ip for its tables here (both optional).
[ -d /etc/iproute2 ] && cp -r /etc/iproute2 "$root/etc/" || true
echo 'root:x:0:0:root:/:/bin/false' > "$root/etc/passwd"
tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/meshd"]' \
  --change 'CMD ["run", "--docker"]' \
  --change 'ENV PATH=/usr/local/bin:/bin' \
  - "$tag" >/dev/null
echo "built $tag from $meshd"
