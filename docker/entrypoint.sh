#!/bin/sh
# coffea-hq container entry point: the first argument picks the role.
#   server [hq-server options]   listens on 0.0.0.0:8786 unless told otherwise
#   worker [hq-worker options]   server URL from $HQ_URL or the first option
#   local  [coffea-hq local options]
#   anything else is run as given (e.g. "python", "sh")
set -eu
role="${1:-server}"
[ "$#" -gt 0 ] && shift
case "$role" in
    server) exec hq-server --host "${HQ_HOST:-0.0.0.0}" "$@" ;;
    worker) exec hq-worker "$@" ;;
    local)  exec coffea-hq local "$@" ;;
    *)      exec "$role" "$@" ;;
esac
