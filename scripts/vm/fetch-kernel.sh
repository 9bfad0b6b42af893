#!/usr/bin/env bash
# Download and unpack one Debian kernel (image + modules + headers) for the VM tier.
#
# Usage: fetch-kernel.sh SUITE [PACKAGE]   e.g. bullseye, bookworm, bookworm-backports
# Prints the unpacked tree's path. Uses a PRIVATE apt configuration (own sources list, lists,
# cache): the machine's apt sources are never read for this nor changed. Downloads are kept
# under $MESHBPF_VM_CACHE (default /var/cache/meshbpf-vm), so a second run does no network I/O.
set -euo pipefail

suite=${1:?usage: fetch-kernel.sh SUITE [PACKAGE]}
meta=${2:-linux-image-amd64}
cache=${MESHBPF_VM_CACHE:-/var/cache/meshbpf-vm}
mirror=${MESHBPF_VM_MIRROR:-}
if [ -z "$mirror" ]; then
  # Same mirror host as the machine's own sources (read, never changed).
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
             2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

apt_dir=$cache/apt/$suite
tree=$cache/kernels/$suite
if [ -e "$tree/.complete" ]; then echo "$tree"; exit 0; fi

mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/cache"
: > "$apt_dir/status"   # an empty dpkg status: the machine's installed versions must not win
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
  > "$apt_dir/sources.list"
apt_opts=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
          -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache"
          -o Dir::Cache::Archives="$apt_dir/archives" -o APT::Get::List-Cleanup=0
          -o Dir::State::status="$apt_dir/status" -o Debug::NoLocking=1
          -o APT::Sandbox::User=root)
if [ ! -e "$apt_dir/lists/.updated" ]; then
  apt-get "${apt_opts[@]}" update -qq >&2
  touch "$apt_dir/lists/.updated"
fi

# linux-image-amd64 (a meta package) depends on linux-image-<abi>-amd64[-unsigned].
dep() { apt-cache "${apt_opts[@]}" show "$1" | sed -n 's/^Depends: //p' | head -1 | tr ',' '\n' \
          | sed 's/ *(.*//; s/^ *//; s/ |.*//' | grep -E "^$2" | head -1; }
image=$(dep "$meta" 'linux-image-[0-9]')
[ -n "$image" ] || { echo "fetch-kernel: no kernel image behind $meta in $suite" >&2; exit 1; }
abi=${image#linux-image-}; abi=${abi%-unsigned}       # e.g. 5.10.0-35-amd64
hdr=linux-headers-$abi
common=$(dep "$hdr" 'linux-headers-.*-common')
kbuild=$(dep "$hdr" 'linux-kbuild-')
pkgs=("$image" "$hdr" "$common")
[ -n "$kbuild" ] && pkgs+=("$kbuild")

debs=$cache/debs/$suite
mkdir -p "$debs"
( cd "$debs" && for p in "${pkgs[@]}"; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get "${apt_opts[@]}" download -qq "$p" >&2
  done )

rm -rf "$tree.tmp"; mkdir -p "$tree.tmp"
for p in "${pkgs[@]}"; do
  for deb in "$debs/${p}"_*.deb; do dpkg-deb -x "$deb" "$tree.tmp"; break; done
done
# The headers' build/source links are absolute (/usr/src/...): inside the guest the tree is
# mounted at /mnt/kernel, so point them there.
mod=$tree.tmp/lib/modules/$abi
[ -d "$mod" ] || { echo "fetch-kernel: $image has no lib/modules/$abi" >&2; exit 1; }
ln -sfn "/mnt/kernel/usr/src/linux-headers-$abi" "$mod/build"
ln -sfn "/mnt/kernel/usr/src/${common}" "$mod/source"
# Debian's kbuild symlinks in the headers point at /usr/lib/linux-kbuild-X: present them too.
while IFS= read -r l; do
  t=$(readlink "$l"); case $t in /usr/*) ln -sfn "/mnt/kernel$t" "$l";; esac
done < <(find "$tree.tmp/usr/src" -maxdepth 2 -type l)
[ -e "$mod/modules.dep" ] || depmod -b "$tree.tmp" "$abi"
echo "$abi" > "$tree.tmp/.abi"
touch "$tree.tmp/.complete"
rm -rf "$tree"; mv "$tree.tmp" "$tree"
echo "$tree"
