# Sourced by the device scripts (gpu_check, gpu_bench, device_bench): the environment of a
# device machine, where Shoal is not installed. Wheels the image lacks travel in .whl/ and are
# unpacked to /tmp/site; Shoal's folders become the package shoal.* through links in
# /tmp/shoal-src (SHOAL_SRC=<dir>: another checkout's folders, e.g. .base/ for a before/after
# run); perf_analyzer's libraries come from .tools/lib.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
mkdir -p /tmp/shoal-src/shoal && : > /tmp/shoal-src/shoal/__init__.py
for d in server workers shm proto; do ln -sfn "${SHOAL_SRC:-$PWD}/$d" "/tmp/shoal-src/shoal/$d"; done
export PYTHONPATH="/tmp/shoal-src:$PYTHONPATH"
[ -d .tools/lib ] && export LD_LIBRARY_PATH="$PWD/.tools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
