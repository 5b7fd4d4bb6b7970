#!/usr/bin/env bash
# Build the distilld image with buildah on a machine that has no image
# registry (and no Docker engine), then check it.
#
#   bash deploy/build-image.sh            base image (if missing), image, checks
#   bash deploy/build-image.sh --no-check base image and image only
#
# 1. Base image: no registry means no python:3.11-slim-bookworm, so a local
#    one is made with debootstrap (Debian bookworm minbase + the distribution's
#    Python 3.11 + python3-venv + ca-certificates) and committed as
#    $BASE_IMAGE (default localhost/debian-python:bookworm). Skipped when that
#    image exists (REBUILD_BASE=1 forces it).
# 2. The image: `buildah bud --isolation chroot --format docker` (docker format:
#    OCI images drop HEALTHCHECK) with --build-arg BASE_IMAGE=$BASE_IMAGE. The
#    build machine's pip settings (find-links, extra index URLs, index URL, CA
#    bundle) are passed as build args, and the local directories they name are
#    mounted read-only into the build's RUN steps at the same paths, so torch
#    2.13.0+cpu comes from the wheel on disk (TORCH_INDEX_URL is emptied; it
#    names PyTorch's CPU index, which these machines cannot reach).
# 3. Checks inside the image (buildah run, chroot isolation, as the image's
#    user): `distilld --help`, `distilld policy validate /policies` with the
#    repository's policies/ mounted read-only, and a few facts (user, CPU
#    torch, healthcheck, volumes, size).
#
# Needs root, buildah and debootstrap (apt-get install -y buildah debootstrap;
# installed here when missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-python:bookworm}"
IMAGE="${IMAGE:-localhost/distilld:test}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK="${WORK_DIR:-/tmp/distilld-image-build}"
CHECK=1
[[ "${1:-}" == "--no-check" ]] && CHECK=0

say() { printf '\n== %s\n' "$*"; }

# --------------------------------------------------------------- tools ---
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
buildah --version

# ---------------------------------------------------------- base image ---
if [[ "${REBUILD_BASE:-0}" != 1 ]] && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE exists (REBUILD_BASE=1 rebuilds it)"
else
    say "base image $BASE_IMAGE: debootstrap bookworm minbase + python3"
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR"
    # Leftovers of the bootstrap: package caches and lists, logs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/* "$rootfs"/tmp/*
    tar -C "$rootfs" --numeric-owner --exclude='./proc/*' --exclude='./sys/*' \
        --exclude='./dev/*' -cf "$WORK/rootfs.tar" .
    ctr="$(buildah from scratch)"
    buildah add --quiet "$ctr" "$WORK/rootfs.tar" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 \
        --label org.opencontainers.image.description="Debian bookworm minbase + python3 (local stand-in for python:3.11-slim-bookworm)" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$WORK/rootfs.tar"
fi
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE"

# ------------------------------------------------------ pip of the host ---
# pip settings of this machine, from the environment or pip's config files.
pip_setting() { # ENV_NAME CONFIG_KEY
    local value="${!1:-}"
    if [[ -z "$value" ]] && command -v pip >/dev/null; then
        value="$(pip config get "$2" 2>/dev/null | tr '\n' ' ' || true)"
    fi
    printf '%s' "$value" | sed 's/[[:space:]]*$//'
}
index_url="$(pip_setting PIP_INDEX_URL global.index-url)"
extra_index="$(pip_setting PIP_EXTRA_INDEX_URL global.extra-index-url)"
find_links="$(pip_setting PIP_FIND_LINKS global.find-links)"
trusted_host="$(pip_setting PIP_TRUSTED_HOST global.trusted-host)"

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=")
volumes=()
[[ -n "$index_url" ]] && build_args+=(--build-arg "PIP_INDEX_URL=$index_url")
[[ -n "$extra_index" ]] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
[[ -n "$find_links" ]] && build_args+=(--build-arg "PIP_FIND_LINKS=$find_links")
[[ -n "$trusted_host" ]] && build_args+=(--build-arg "PIP_TRUSTED_HOST=$trusted_host")
# Local directories among them: mount them read-only at the same path.
for location in $index_url $extra_index $find_links; do
    dir="${location#file://}"
    [[ "$dir" == /* ]] || continue
    [[ "$dir" == */simple ]] && dir="${dir%/simple}"
    [[ -d "$dir" ]] && volumes+=(-v "$dir:$dir:ro")
done
# A CA bundle of this machine (a TLS-intercepting proxy's CA, for example).
cert="$(pip_setting PIP_CERT global.cert)"
if [[ -n "$cert" && -r "$cert" ]]; then
    volumes+=(-v "$cert:/run/build-ca.crt:ro")
    build_args+=(--build-arg "PIP_CERT=/run/build-ca.crt")
fi
if [[ -n "${ASSET_WHEELS:-}" ]]; then
    build_args+=(--build-arg "ASSET_WHEELS=$ASSET_WHEELS")
fi

# ----------------------------------------------------------------- build ---
say "buildah bud $IMAGE"
printf '  %q' "${build_args[@]}" "${volumes[@]}"; echo
start=$(date +%s)
buildah bud --isolation chroot --format docker --layers \
    "${build_args[@]}" "${volumes[@]}" -t "$IMAGE" -f Dockerfile .
echo "build took $(( $(date +%s) - start )) s"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"

((CHECK)) || exit 0

# ---------------------------------------------------------------- checks ---
# Files go into the checked containers with `buildah copy`, before their first
# `buildah run`, not with `-v` at /policies: `buildah run` binds its own copy of
# each image VOLUME at that path, made from the container's files at its first
# run; a -v bind to the same path was intermittently hidden by it, and files
# copied in after the first run never showed (buildah 1.28). Docker and
# compose do not have this problem.
ctr="$(buildah from --quiet "$IMAGE")"
smoke_ctr=""
trap 'buildah rm "$ctr" $smoke_ctr >/dev/null 2>&1 || true' EXIT
buildah copy --quiet --chown 10001:10001 "$ctr" "$ROOT/policies/" /policies/ >/dev/null
in_image() { buildah run --isolation chroot "$@"; }

say "image config"
buildah inspect --type image --format \
'user={{.Docker.Config.User}} entrypoint={{.Docker.Config.Entrypoint}} cmd={{.Docker.Config.Cmd}}
volumes={{range $k, $v := .Docker.Config.Volumes}}{{$k}} {{end}}
healthcheck={{.Docker.Config.Healthcheck}}
' "$IMAGE"
buildah inspect --type image --format '{{range .Docker.Config.Env}}{{println .}}{{end}}' "$IMAGE" \
    | grep -E '^(DISTILLD_|PATH=)'

say "id; torch; the heavy imports (after the trims)"
in_image "$ctr" -- sh -c 'id; python -c "import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda:\", torch.version.cuda)"; command -v pip gcc cc curl || echo "no pip, compiler or curl on PATH"'
in_image "$ctr" -- python -c "
import time; t = time.time()
import numpy, pandas, scipy.stats, sklearn, statsmodels.api, pyarrow, sympy, transformers, peft, evidently
from evidently import Report
from evidently.presets import DataDriftPreset
import distilld.cli, distilld.app
print(f'imports ok in {time.time() - t:.1f} s')"

say "distilld --help"
in_image "$ctr" -- distilld --help

say "distilld policy validate /policies (the repository's policies/ copied in)"
in_image "$ctr" -- distilld policy validate /policies

# The image's HEALTHCHECK command, exactly as configured.
healthcheck="$(buildah inspect --type image --format '{{index .Docker.Config.Healthcheck.Test 3}}' "$IMAGE")"

say "healthcheck command without a daemon (must fail)"
if in_image "$ctr" -- python -c "$healthcheck" 2>/dev/null; then
    echo "healthcheck passed with no daemon running: wrong"; exit 1
else
    echo "healthcheck exit status non-zero (unhealthy), as expected"
fi

# distilld run for real, when the quick-start models exist on this machine
# (bash daemon/dev.sh demo makes models/rotten-tomatoes-minilm and
# models/rotten-tomatoes-teacher): embedded
# broker, the rotten-tomatoes policy, the healthcheck polled until it passes,
# then SIGTERM. HTTP on port 18080 (chroot isolation shares the host's network).
# The model goes in through a readable copy mounted at /mnt/models (not at the
# /models volume, see above): the demo saves some files 0600 as root, and the
# daemon runs as uid 10001.
if [[ -d "$ROOT/models/rotten-tomatoes-minilm" && -d "$ROOT/models/rotten-tomatoes-teacher" ]]; then
    say "distilld run (embedded broker, rotten-tomatoes policy and models): healthcheck, SIGTERM"
    smoke_models="$WORK/smoke-models"
    rm -rf "$smoke_models" && mkdir -p "$smoke_models"
    cp -r "$ROOT/models/rotten-tomatoes-minilm" "$ROOT/models/rotten-tomatoes-teacher" "$smoke_models/"
    chmod -R a+rX "$smoke_models"
    smoke_ctr="$(buildah from --quiet "$IMAGE")"
    buildah copy --quiet --chown 10001:10001 "$smoke_ctr" "$ROOT/policies/rotten-tomatoes.yaml" /policies/ >/dev/null
    in_image -v "$smoke_models:/mnt/models:ro" "$smoke_ctr" -- sh -c '
        export DISTILLD_HTTP_PORT=18080 DISTILLD_MODELS_DIR=/mnt/models
        distilld run > /tmp/run.log 2>&1 & pid=$!
        ok=""
        for i in $(seq 1 120); do
            if python -c "$1" 2>/dev/null; then ok=$i; break; fi
            kill -0 $pid 2>/dev/null || break
            sleep 1
        done
        [ -n "$ok" ] && echo "healthcheck passed after about ${ok} s" || echo "healthcheck never passed"
        kill -TERM $pid 2>/dev/null; wait $pid; echo "distilld run exit status after SIGTERM: $?"
        echo "--- first and last log lines (stdout):"; head -n 3 /tmp/run.log; echo ...; tail -n 3 /tmp/run.log
        [ -n "$ok" ]' sh "$healthcheck"
    rm -rf "$smoke_models"
fi

say "done: $IMAGE"
