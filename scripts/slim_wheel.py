"""Drop files from a wheel, in place, and their lines from its RECORD, so that pip installs the rest as before.

    python scripts/slim_wheel.py WHEEL PATTERN [PATTERN ...]      (fnmatch patterns on the paths inside the wheel)

scripts/device-wheels.sh uses it on bitsandbytes: the GPU image's torch is built for CUDA 13.0, and the wheel's
builds for CUDA 11.8-12.8 and ROCm and XPU are 34 of its 41 MiB, which the 64 MiB a device call carries cannot spare.
"""

import fnmatch
import sys
import zipfile
from pathlib import Path


def slim_wheel(wheel: Path, patterns: list[str]) -> list[str]:
    """Rewrite ``wheel`` without the members matching any pattern; returns the dropped names (an error if none)."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        dropped = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not dropped:
            raise SystemExit(f"{wheel.name}: no member matches {patterns}")
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info)
                if info.filename == record:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                dst.writestr(info, data)
    tmp.replace(wheel)
    return dropped


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path = Path(sys.argv[1])
    before = path.stat().st_size
    gone = slim_wheel(path, sys.argv[2:])
    print(f"{path.name}: dropped {len(gone)} files, {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB")
