#!/usr/bin/env bash
# Local stand-ins for the two base images docker-compose.yml takes from Docker Hub, built
# from Debian packages, for machines that reach a Debian mirror but not Docker Hub:
#
#   MVKE_PYTHON_IMAGE (default mvke-local/python:3.11-bookworm), for python:3.11-slim-bookworm:
#       Debian bookworm's Python 3.11 with venv and pip, `python` on the path, and this
#       host's CA bundle (so that pip in a build reaches the package index the host reaches,
#       through a TLS-inspecting proxy if the host has one).
#   MVKE_REDIS_IMAGE (default mvke-local/redis:7-bookworm), for redis:7-alpine:
#       Debian bookworm's redis-server 7 with an entry point that does what the official
#       image's does for compose: data in /data (WORKDIR, VOLUME), protected mode off so
#       that other containers may connect, runs as the user redis.
#
# Use them:
#   sudo docker/local-base.sh
#   export MVKE_PYTHON_IMAGE=mvke-local/python:3.11-bookworm MVKE_REDIS_IMAGE=mvke-local/redis:7-bookworm
#   docker compose up
#
# An image that already exists is kept (CI on one machine builds each once); --force
# rebuilds. Needs root, debootstrap and the docker CLI (Debian: apt-get install debootstrap
# docker.io). The Debian mirror is the one this host's apt uses, else deb.debian.org
# (MVKE_DEBIAN_MIRROR overrides). About a minute per image on a 2-core machine.
set -euo pipefail

PYTHON_IMAGE=${MVKE_PYTHON_IMAGE:-mvke-local/python:3.11-bookworm}
REDIS_IMAGE=${MVKE_REDIS_IMAGE:-mvke-local/redis:7-bookworm}
SUITE=bookworm
FORCE=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "local-base: unknown argument $arg (--force, --help)" >&2; exit 2 ;;
    esac
done

log() { echo "local-base: $*" >&2; }
die() { log "$*"; exit 1; }

# The first Debian archive (not the security one) this host's apt uses.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && sed -n 's/^URIs:[[:space:]]*//p' "$f"
    done | tr ' ' '\n'
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] && awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f"
    done
}
MIRROR=${MVKE_DEBIAN_MIRROR:-$(host_mirror 2>/dev/null | grep -v -e security -e '^$' | head -n 1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# build NAME PACKAGES PREPARE_FN IMPORT_CHANGES...: debootstrap, prepare the tree, docker import.
build() {
    local name=$1 packages=$2 prepare=$3
    shift 3
    if image_exists "$name" && [[ $FORCE != 1 ]]; then
        log "$name exists (--force rebuilds)"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root (building $name)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local root
    root=$(mktemp -d "${TMPDIR:-/var/tmp}/mvke-base.XXXXXX")
    # shellcheck disable=SC2064  # expand $root now: it is local to this call
    trap "rm -rf '$root'" RETURN
    log "$name: debootstrap $SUITE from $MIRROR (+ $packages)"
    local t0=$SECONDS
    debootstrap --variant=minbase --include="$packages" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed for $name"; }
    rm -f "$root.log"
    # What the official slim images leave out too: package caches and lists, docs, locales.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
           "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    "$prepare" "$root"
    local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
                   --change 'ENV LANG=C.UTF-8')
    local c
    for c in "$@"; do changes+=(--change "$c"); done
    tar --numeric-owner -C "$root" -c . | docker import "${changes[@]}" \
        --message "mvke docker/local-base.sh: debootstrap $SUITE ($packages)" - "$name" >/dev/null
    log "$name: built in $((SECONDS - t0)) s, $(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

prepare_python() {
    local root=$1
    # This host's CA bundle (it may hold a TLS-inspecting proxy's CA the Debian bundle lacks).
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    chroot "$root" python --version >/dev/null
}

prepare_redis() {
    local root=$1
    mkdir -p "$root/data"
    chroot "$root" chown redis:redis /data
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Stand-in for the official redis image's entry point (docker/local-base.sh): options alone
# mean redis-server; protected mode off unless asked for (other containers connect without
# a password, as with the official image); runs as the user redis, data in /data.
set -e
case "$1" in
    -*|*.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ]; then
    case " $* " in
        *" --protected-mode "*) ;;
        *) set -- "$@" --protected-mode no ;;
    esac
    if [ "$(id -u)" = 0 ]; then
        find . ! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
EOF
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
}

command -v docker >/dev/null || die "the docker CLI is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (start dockerd)"

build "$PYTHON_IMAGE" python3,python3-venv,python3-pip,python-is-python3,ca-certificates prepare_python \
    'CMD ["python3"]'
build "$REDIS_IMAGE" redis-server prepare_redis \
    'WORKDIR /data' 'VOLUME /data' 'EXPOSE 6379' \
    'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
echo "MVKE_PYTHON_IMAGE=$PYTHON_IMAGE"
echo "MVKE_REDIS_IMAGE=$REDIS_IMAGE"
