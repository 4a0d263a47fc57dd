#!/usr/bin/env bash
# Makes the base image sibyl-base:bookworm locally, for machines that cannot pull one from a
# registry: a Debian 12 "minbase" root made by debootstrap, stripped of what a runtime does not
# need (package lists and caches, documentation except copyright files, man pages, message
# catalogs), imported with `docker import`. The sibyl binary needs only glibc and libgcc_s,
# which minbase has.
#
#   deploy/image/make-base.sh [--force] [--tag sibyl-base:bookworm]
#
# Skips the work when the image exists, unless --force. The Debian mirror is the one this
# machine's apt uses for bookworm (/etc/apt/sources.list.d/*.sources, else
# /etc/apt/sources.list); SIBYL_DEBIAN_MIRROR overrides it. SIBYL_BASE_INCLUDE adds packages
# (comma separated), for example ca-certificates (7 MiB more with openssl and libssl3; nothing
# in sibyl uses TLS today). Needs root and docker; installs debootstrap with apt-get when missing.
set -euo pipefail

tag=sibyl-base:bookworm
force=false
while (($#)); do
  case $1 in
    --force) force=true ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "make-base.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

human_size() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }

print_size() {
  local bytes
  bytes=$(docker image inspect -f '{{.Size}}' "$tag")
  echo "base image $tag: $(human_size "$bytes") ($bytes bytes)"
}

if ! $force && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists (--force remakes it)"
  print_size
  exit 0
fi

if ((EUID != 0)); then
  echo "make-base.sh: debootstrap needs root" >&2
  exit 1
fi

# The first URI of a bookworm "deb" source in apt's configuration.
debian_mirror() {
  local file uri
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -r $file ]] || continue
    uri=$(awk '
      function flush() {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ /[ \t]bookworm[ \t]/ &&
            enabled != "no" && uris != "") {
          split(uris, list, /[ \t]+/); print list[1]; found = 1; exit
        }
        types = ""; uris = ""; suites = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[^ \t]/ {
        key = tolower($1); sub(/:$/, "", key)
        value = $0; sub(/^[^:]*:[ \t]*/, "", value)
        if (key == "types") types = value
        else if (key == "uris") uris = value
        else if (key == "suites") suites = value
        else if (key == "enabled") enabled = tolower(value)
      }
      END { if (!found) flush() }
    ' "$file")
    if [[ -n $uri ]]; then echo "$uri"; return; fi
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $file ]] || continue
    uri=$(awk '
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == "bookworm") { print $i; exit }
      }
    ' "$file")
    if [[ -n $uri ]]; then echo "$uri"; return; fi
  done
}

mirror=${SIBYL_DEBIAN_MIRROR:-$(debian_mirror)}
if [[ -z $mirror ]]; then
  echo "make-base.sh: no bookworm source in /etc/apt; set SIBYL_DEBIAN_MIRROR" >&2
  exit 1
fi

if ! command -v debootstrap >/dev/null; then
  echo "== installing debootstrap"
  apt-get install -y debootstrap || { apt-get update && apt-get install -y debootstrap; }
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/sibyl-base.XXXXXX")
root=$work/root
cleanup() {
  # debootstrap mounts /proc and /sys inside the root while it works; never delete through
  # a mount.
  local mount
  while read -r mount; do
    umount -l "$mount" 2>/dev/null || true
  done < <(findmnt -rno TARGET | grep -F "$root/" | sort -r)
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

include=()
if [[ -n ${SIBYL_BASE_INCLUDE:-} ]]; then include=("--include=$SIBYL_BASE_INCLUDE"); fi

echo "== debootstrap --variant=minbase bookworm ($mirror)"
start=$SECONDS
if ! debootstrap --variant=minbase "${include[@]}" bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  [[ -f $root/debootstrap/debootstrap.log ]] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
  echo "make-base.sh: debootstrap failed" >&2
  exit 1
fi
echo "debootstrap took $((SECONDS - start)) s; root is $(du -sh --one-file-system "$root" | cut -f1)"

echo "== stripping"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/cache/ldconfig/aux-cache "$root"/var/cache/man "$root"/var/log/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/usr/share/lintian "$root"/usr/share/linda "$root"/usr/share/bug \
  "$root"/root/.bash_history "$root"/debootstrap
# Documentation goes, except the copyright files that must travel with the packages.
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
# Later package installs in derived images leave the same things out.
cat >"$root/etc/dpkg/dpkg.cfg.d/01-sibyl-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
# Docker provides these at run time; the build machine's values stay out of the image.
: >"$root/etc/resolv.conf"
echo localhost >"$root/etc/hostname"
: >"$root/etc/machine-id"
echo "stripped root is $(du -sh --one-file-system "$root" | cut -f1)"

echo "== docker import $tag"
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  --message "debootstrap --variant=minbase bookworm, stripped (deploy/image/make-base.sh)" \
  - "$tag" >/dev/null
print_size
