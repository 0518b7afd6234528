# Source on the GPU machine (no network, nothing installed): lay the package out under /tmp/pkg as pip would.
mkdir -p /tmp/pkg/nuwaxl && cp -r nuwaxl/* /tmp/pkg/nuwaxl/ && for d in models export engine runtime train; do
  rm -rf /tmp/pkg/nuwaxl/$d && cp -r $d /tmp/pkg/nuwaxl/$d; done
# Pure-Python wheels the machine lacks (polygraphy, for the build's parity gate), if sent along in $NUWAXL_WHEELS:
# a wheel is a zip of the installed files.
for w in ${NUWAXL_WHEELS:+$NUWAXL_WHEELS/*.whl}; do python3 -m zipfile -e "$w" /tmp/pkg; done
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d /tmp/ort ]; then export PYTHONPATH=/tmp/ort:$PYTHONPATH; fi
