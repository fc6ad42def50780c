#!/usr/bin/env bash
# Run HERE (not on the device) before bench/gpu.sh: puts what the device machine lacks into .bench-gpu/ (git-ignored
# through .git/info/exclude), to travel with `carry: [".bench-gpu"]`:
#   .bench-gpu/photos/  the ImageNet sample photos (the ../shared folder does not travel)
#   .bench-gpu/whl/     Python 3.12 wheels of bulklabel's pure dependencies the device image lacks (pydantic, botocore)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.bench-gpu/' .git/info/exclude 2>/dev/null || echo '/.bench-gpu/' >> .git/info/exclude
mkdir -p .bench-gpu/photos .bench-gpu/whl
cp -u ../shared/data/imagenet-sample/*.JPEG .bench-gpu/photos/
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .bench-gpu/whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    botocore==1.44.8 jmespath==1.1.0
du -sh .bench-gpu
