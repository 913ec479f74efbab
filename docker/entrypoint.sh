#!/bin/sh
# Container entrypoint (also usable outside Docker): prepares the data directories, then runs
#   (no arguments) or flags    -> odise-ls serve --host $HOST --port $PORT [flags]
#   an odise-ls subcommand     -> odise-ls <subcommand> ...   (e.g. prelabel, export)
#   any program on PATH        -> that program                (e.g. bash)
set -eu

HOST=${HOST:-0.0.0.0}
PORT=${PORT:-9090}

fail() {
    echo "odise-entrypoint: $*" >&2
    exit 1
}

prepare_dir() {
    # $1 = variable name, $2 = its value; an unset variable is left to the application default.
    [ -n "$2" ] || return 0
    mkdir -p "$2" 2>/dev/null || fail "cannot create $1=$2; mount a writable volume there"
    [ -w "$2" ] || fail "$1=$2 is not writable by uid $(id -u); run 'chown -R $(id -u) <host dir>' on the mounted volume"
}

prepare_dir ODISE_WEIGHTS_DIR "${ODISE_WEIGHTS_DIR:-}"
prepare_dir MODEL_DIR "${MODEL_DIR:-}"

if [ -f /.dockerenv ]; then
    case "${LABEL_STUDIO_URL:-}" in
        *://localhost*|*://127.0.0.1*)
            echo "odise-entrypoint: warning: LABEL_STUDIO_URL=$LABEL_STUDIO_URL is this container itself;" \
                 "use the Label Studio service name (http://label-studio:8080) or the host's IP" >&2 ;;
    esac
fi

if [ $# -eq 0 ]; then
    set -- serve
fi
case "$1" in
    -*) set -- serve "$@" ;;
esac

if [ "$1" = serve ]; then
    shift
    exec odise-ls serve --host "$HOST" --port "$PORT" "$@"
fi

case "$(command -v "$1" 2>/dev/null || true)" in
    /*) exec "$@" ;;
esac
exec odise-ls "$@"
