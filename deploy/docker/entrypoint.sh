#!/bin/sh
# Entrypoint of Shoal's container images. It execs the server, so the server is PID 1 and
# gets `docker stop`'s SIGTERM itself: it drains (requests in flight finish, up to
# --exit-timeout-secs), finalizes the models and exits.
#
#   (no arguments)        shoal serve --model-repository=$SHOAL_MODEL_REPOSITORY (/models)
#   --option ...          shoal serve with those options; --model-repository=/models is
#                         added unless one is given (--model-repository, --model-store)
#   tritonserver ...      any other command runs as given: `tritonserver
#   shoal workers list    --model-repository=/models` (Triton's defaults), a shell, ...
set -eu

repository=${SHOAL_MODEL_REPOSITORY:-/models}

case "${1:-}" in
  "" | -*)
    for arg in "$@"; do
      case "$arg" in
        --model-repository | --model-repository=* | --model-store | --model-store=*)
          exec shoal serve "$@"
          ;;
      esac
    done
    exec shoal serve --model-repository="$repository" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
