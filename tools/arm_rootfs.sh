#!/usr/bin/env bash
# Build (once, cached) an arm64 Debian userland with python3 and edgellm's runtime wheels, for running the
# edgellm runtime on emulated ARM:  qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 ...
#
#   tools/arm_rootfs.sh [ROOT]    prints ROOT when it is ready (default: $EDGELLM_CACHE/arm64-rootfs,
#                                 else ~/.cache/edgellm/arm64-rootfs)
#
# How: debootstrap --foreign downloads Debian bookworm arm64 (minbase + python3) and the .debs are
# unpacked with dpkg-deb (nothing arm64 is executed, so no chroot or binfmt is needed); pip then
# installs the aarch64 manylinux wheels of numpy, the TVM runtime and edgellm's runtime dependencies
# into ROOT/opt/edgellm-site (use it as PYTHONPATH), without TVM's compiler library. Needs: debootstrap, qemu-user-static, pip, network
# access to the Debian mirror in this machine's apt sources (or $EDGELLM_DEBIAN_MIRROR) and to PyPI.
set -euo pipefail

STAMP="v2 bookworm py3.11 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1"
CACHE="${EDGELLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgellm}"
ROOT="${1:-$CACHE/arm64-rootfs}"
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy psutil gguf tokenizers jinja2 tqdm
        threadpoolctl platformdirs)

if [ -f "$ROOT/.edgellm-rootfs" ] && [ "$(cat "$ROOT/.edgellm-rootfs")" = "$STAMP" ]; then
  echo "$ROOT"; exit 0
fi

for tool in debootstrap dpkg-deb qemu-aarch64-static; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    pkg=$tool; [ "$tool" = qemu-aarch64-static ] && pkg=qemu-user-static
    echo "arm_rootfs: $tool is missing: apt-get install $pkg" >&2; exit 2
  fi
done
PATH="$PATH:/usr/sbin:/sbin"

mirror="${EDGELLM_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then   # the mirror apt already uses for the main Debian archive
  mirror=$(grep -hoE '^URIs: *[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | head -n1 | sed 's/^URIs: *//') || true
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hoE '^deb +(\[[^]]*\] +)?[^ ]+/debian/? +' /etc/apt/sources.list 2>/dev/null \
             | head -n1 | awk '{print $NF}') || true
fi
if [ -z "$mirror" ]; then
  echo "arm_rootfs: no Debian mirror found in /etc/apt sources: set EDGELLM_DEBIAN_MIRROR" >&2; exit 2
fi

mkdir -p "$(dirname "$ROOT")"
TMP="$ROOT.tmp.$$"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$TMP"
echo "arm_rootfs: debootstrap bookworm arm64 from $mirror into $TMP" >&2
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$TMP" "$mirror" >"$TMP.log" 2>&1 \
  || { tail -n 20 "$TMP.log" >&2; rm -f "$TMP.log"; exit 1; }
rm -f "$TMP.log"
for deb in "$TMP"/var/cache/apt/archives/*.deb; do
  dpkg-deb -x "$deb" "$TMP"
done
rm -f "$TMP"/var/cache/apt/archives/*.deb
[ -x "$TMP/usr/bin/python3.11" ] || { echo "arm_rootfs: python3.11 missing after unpacking" >&2; exit 1; }

echo "arm_rootfs: installing aarch64 wheels into $TMP/opt/edgellm-site" >&2
python3 -m pip install --quiet --disable-pip-version-check --no-compile --target "$TMP/opt/edgellm-site" \
  --only-binary=:all: --implementation cp --python-version 3.11 \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  "${WHEELS[@]}" >&2

# a device has only the TVM runtime: drop the 230 MB compiler library, so that any import of the compiler
# on the emulated device fails loudly instead of passing unnoticed
rm -f "$TMP/opt/edgellm-site/tvm/lib/libtvm_compiler.so"

echo "$STAMP" > "$TMP/.edgellm-rootfs"
rm -rf "$ROOT"
mv "$TMP" "$ROOT"
trap - EXIT
echo "$ROOT"
