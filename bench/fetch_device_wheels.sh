#!/usr/bin/env bash
# Fetch, here (where the package registries answer), what the lent GPU machine lacks, packed to
# travel with the device tool's `run` calls: at most 64 MiB a call, working tree included
# (../shared/FACTS.md, "The GPU machine"). The machine has PyTorch, Lightning, torchmetrics, numpy,
# pillow and PyYAML, but no DALI, omegaconf or wandb, and no registry access.
#
#   .devwheels/small/   omegaconf and DALI's small dependencies (wheels for CPython 3.12, x86-64),
#                       and MANIFEST.sha256 naming every part            -- about 6 MB
#   .devwheels/parts/   the DALI 2.4 (CUDA 13), nvImageCodec, nvJPEG and nvCOMP wheels, slimmed to
#                       what CPython 3.12 loads (the other Pythons' extension modules, headers and
#                       the nvlzcat tool dropped; RECORD rewritten to match), tarred and cut into
#                       parts of PART_MIB MiB: bundle.tar.part00, part01, ...
#
# .devwheels/ is ignored through .git/info/exclude: wheels are never committed, and only the paths a
# call names in `carry` travel. bench/device_check.sh joins the parts on the machine, checks them
# against the manifest and installs everything with `pip install --no-index --no-deps --target`.
#
#   bash bench/fetch_device_wheels.sh     # about 20 s; prints the device calls to make
#
# Sizes (measured 2026-11-27): 210 MiB of slimmed wheels, so 4 parts and 4 calls. xz over them
# saves only 8% (the wheels are zip-compressed already): not worth its 6 minutes of CPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.devwheels
PART_MIB=${PART_MIB:-60}

BIG=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
     nvidia-libnvcomp-cu13==5.3.0.16)
# DALI's other requirements the machine lacks (six, packaging and numpy it has), and omegaconf
# (PyYAML is there). Compiled ones are CPython 3.12 builds: the machine's python3 is 3.12.
SMALL=(omegaconf==2.4.0 astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0
       libcst==1.9.0)

mkdir -p .git/info
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude

download() {  # into $1, for CPython 3.12 on manylinux x86-64
    local dir=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

rm -rf "$DEST/small" "$DEST/parts" "$DEST/slim"
mkdir -p "$DEST/wheels" "$DEST/small" "$DEST/parts" "$DEST/slim"
echo "downloading ${#BIG[@]} large and ${#SMALL[@]} small wheels ..."
download "$DEST/wheels" "${BIG[@]}"
download "$DEST/small" "${SMALL[@]}"

echo "slimming the large wheels to CPython 3.12 ..."
"$PY" - "$DEST/wheels" "$DEST/slim" "${BIG[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path

src, dst, specs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
other_python = re.compile(r"\.cpython-3\d+t?-x86_64-linux-gnu\.so$")
def drop(name: str) -> bool:
    if other_python.search(name) and ".cpython-312-" not in name:
        return True  # an extension module for another Python
    parts = name.split("/")
    return "include" in parts[:-1] or name.startswith("nvidia/libnvcomp/bin/")
for spec in specs:
    dist = spec.split("==")[0].replace("-", "_")
    version = spec.split("==")[1]
    (wheel,) = src.glob(f"{dist}-{version}-*.whl")
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(dst / wheel.name, "w") as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        gone = set()
        for info in zin.infolist():
            if info.filename == record_name:
                continue
            if drop(info.filename):
                gone.add(info.filename); dropped += info.compress_size
                continue
            zout.writestr(info, zin.read(info.filename), compress_type=info.compress_type, compresslevel=6)
            kept += info.compress_size
        record = [ln for ln in zin.read(record_name).decode().splitlines() if ln.split(",")[0] not in gone]
        zout.writestr(record_name, "\n".join(record) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    print(f"  {wheel.name}: {kept / 1e6:.1f} MB kept, {dropped / 1e6:.1f} MB dropped")
EOF

echo "packing and cutting into ${PART_MIB} MiB parts ..."
bundle="$DEST/bundle.tar"
tar -C "$DEST/slim" -cf "$bundle" .
name=$(basename "$bundle")
split -b "${PART_MIB}M" -d -a 2 "$bundle" "$DEST/parts/$name.part"
(cd "$DEST/parts" && sha256sum "$name".part* > ../small/MANIFEST.sha256)
(cd "$DEST" && sha256sum "$name" | sed 's#  #  whole:#' >> small/MANIFEST.sha256)
rm -rf "$bundle" "$DEST/slim"

echo
echo "ready: $(du -sh "$DEST/small" | cut -f1) of small wheels; parts:"
ls -l "$DEST/parts" | awk 'NR > 1 {printf "  %s  %.1f MiB\n", $NF, $5 / 1048576}'
echo
echo "Device calls (each within 30 s of the last one's end, or the machine and its /tmp are gone):"
parts=("$DEST"/parts/*)
last=$((${#parts[@]} - 1))
for i in "${!parts[@]}"; do
    if [ "$i" -lt "$last" ]; then
        echo "  run(command=\"bash bench/device_check.sh stash\", carry=[\"${parts[$i]}\"], timeout_s=60)"
    else
        echo "  run(command=\"bash bench/device_check.sh\", carry=[\"${parts[$i]}\", \"$DEST/small\"], timeout_s=540)"
    fi
done
