"""Fit the geometric judge's thresholds on rendered shapes and store them with its held-out accuracy.

    python examples/shapes/calibrate_geometry.py            # writes benchmarks/results/geometry_judge_calibration.json

Renders `--n-fit` images (``data.make_batch``, 24x24, seed `--seed`; half of them blurred, dimmed, on a grey
background and noisy: ``geometry.augment``), fits the shape and hue thresholds (``geometry.calibrate``), and reports
the accuracy per shape and per colour on `--n-test` fresh renders (seed + 1), clean and augmented. Deterministic:
the same arguments give the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.geometry import DEFAULT_CALIBRATION, calibrate  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-fit", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = calibrate(n_fit=args.n_fit, n_test=args.n_test, seed=args.seed, size=args.size)
    result["command"] = "python examples/shapes/calibrate_geometry.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["thresholds"]))
    for name, rep in result["report"].items():
        per = ", ".join(f"{k} {v:.4f}" for k, v in {**rep["per_shape"], **rep["per_colour"]}.items())
        print(f"{name}: both {rep['both']:.4f}, shape {rep['shape']:.4f}, colour {rep['colour']:.4f} ({per})")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
