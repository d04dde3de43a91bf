"""alibi-detect's online detectors on streams exported by bench/drift.py (runs in the numpy<2 venv).

    .venv-alibi/bin/python bench/alibi_online.py STREAMS.npz RESULT.json

alibi-detect 0.13.0 pins numpy<2 while this project (and River) need numpy 2, so ``make bench-extras`` gives it
a venv of its own and bench/drift.py runs this script there, in the same benchmark run, on the same feature
vectors and the same replicates as every other row. Protocol identical to bench/drift.py's ``run_method``:
delay = tiles after the change point to the first alarm, a false alarm before the change point resets the
detector, FA counted over pre-change tiles and the no-shift streams.

Input (``np.savez``): ``index`` = JSON {"sets": {set: [scenario, ...]}, "ert": int, "windows": [int, ...],
"n_bootstraps": int}; ``{set}/ref`` = (n_ref, d) calibration vectors; ``{scenario}/{rep}`` = (n, d) stream
vectors and ``{scenario}/change`` = change indices (-1: no change).
Output (JSON): {detector name: {"rows": {scenario: {...}}, "state_bytes": int, "configure_s": float}}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch
from alibi_detect.cd import LSDDDriftOnline, MMDDriftOnline


def _state_bytes(cd: Any) -> int:
    """Arrays the detector keeps between updates (reference set, kernel terms, test window)."""
    total = 0
    for obj in (cd, getattr(cd, "_detector", None)):
        for value in vars(obj).values() if obj is not None else ():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, torch.Tensor):
                total += value.element_size() * value.nelement()
    return total


def run(cd: Any, streams: dict[str, list[tuple[np.ndarray, int]]]) -> dict[str, dict[str, Any]]:
    """Delays, misses and false alarms of one detector over every scenario's replicates."""
    rows: dict[str, dict[str, Any]] = {}
    for name, reps in streams.items():
        row = rows.setdefault(name, {"delays": [], "missed": 0, "false_alarms": 0, "in_tiles": 0})
        for x, change in reps:
            cd.reset_state()
            end = len(x) if change < 0 else change
            detected = None
            for t in range(len(x)):
                alarm = bool(cd.predict(x[t], return_test_stat=False)["data"]["is_drift"])
                if t < end:
                    row["in_tiles"] += 1
                    if alarm:
                        row["false_alarms"] += 1
                        cd.reset_state()
                elif alarm:
                    detected = t - end
                    break
            if change >= 0:
                if detected is None:
                    row["missed"] += 1
                else:
                    row["delays"].append(detected)
    return rows


def main(src: str, dst: str) -> None:
    torch.set_num_threads(1)
    data = np.load(src)
    index = json.loads(str(data["index"]))
    out: dict[str, Any] = {}
    for window in index["windows"]:
        for cls in (MMDDriftOnline, LSDDDriftOnline):
            name = f"alibi {cls.__name__} (window {window})"
            result: dict[str, Any] = {"rows": {}, "state_bytes": 0, "configure_s": 0.0}
            for set_name, scenarios in index["sets"].items():
                ref = data[f"{set_name}/ref"].astype(np.float32)
                t0 = time.perf_counter()
                torch.manual_seed(0)
                np.random.seed(0)
                cd = cls(
                    ref,
                    ert=index["ert"],
                    window_size=window,
                    backend="pytorch",
                    n_bootstraps=index["n_bootstraps"],
                    device="cpu",
                    verbose=False,
                )
                result["configure_s"] += time.perf_counter() - t0
                result["state_bytes"] = max(result["state_bytes"], _state_bytes(cd))
                streams: dict[str, list[tuple[np.ndarray, int]]] = {}
                for scenario in scenarios:
                    changes = data[f"{scenario}/change"]
                    streams[scenario] = [
                        (data[f"{scenario}/{i}"].astype(np.float32), int(c)) for i, c in enumerate(changes)
                    ]
                result["rows"] |= run(cd, streams)
            out[name] = result
            print(f"{name}: configured in {result['configure_s']:.0f} s", flush=True)
    with open(dst, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
