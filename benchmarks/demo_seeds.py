"""The demo's safety-head numbers over seeds, for each vision tower, side by side (docs/mini_benchmark.md).

    python -m benchmarks.demo_seeds                       # seeds 0-4, both towers, smollm2, the demo's 2 threads
    python -m benchmarks.demo_seeds --seeds 0 --towers efficientnet-lite0

Each run is `safe-llava demo --seed S --vision-tower T` in its own process (as a user runs it); its
`demo_results.json` is collected into `benchmarks/results/demo-seeds.json` and a Markdown table `demo-seeds.md`.
The numbers are deterministic for a seed and thread count on one machine; the wall time depends on the load.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("level_accuracy", "type_accuracy", "risk_auroc", "shifted_level_accuracy", "shifted_type_accuracy",
           "shifted_risk_auroc")  # fmt: skip


def run_one(tower: str, seed: int, language_model: str, work_dir: Path) -> dict:
    """One demo run in a fresh process; its results without the judged rows."""
    output_dir = work_dir / f"{tower}-seed{seed}"
    command = [sys.executable, "-m", "modeling_safe_llava", "demo", "--vision-tower", tower, "--seed", str(seed),
               "--language-model", language_model, "--output-dir", str(output_dir)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((output_dir / "demo_results.json").read_text())
    return {"tower": tower, "seed": seed, "seconds": results["seconds"], **{key: results[key] for key in METRICS}}


def markdown(rows: list[dict]) -> str:
    header = ("| tower | seed | level acc. | type acc. | AUROC | shifted level acc. | shifted type acc. | shifted AUROC "
              "| seconds |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(f"| {row['tower']} | {row['seed']} | " + " | ".join(f"{row[key]:.3f}" for key in METRICS)
                     + f" | {row['seconds']:.0f} |")  # fmt: skip
    for tower in dict.fromkeys(row["tower"] for row in rows):
        mine = [row for row in rows if row["tower"] == tower]
        spread = " | ".join(f"{min(r[k] for r in mine):.3f}-{max(r[k] for r in mine):.3f}" for k in METRICS)
        lines.append(f"| {tower} | min-max | {spread} | |")
        lines.append(f"| {tower} | mean | " + " | ".join(f"{statistics.mean(r[k] for r in mine):.3f}" for k in METRICS) + " | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--towers", nargs="+", default=["efficientnet-lite0", "random"],
                        choices=("efficientnet-lite0", "random"))  # fmt: skip
    parser.add_argument("--language-model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--output", default=str(RESULTS / "demo-seeds"), help="path without extension (.json, .md)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as work_dir:
        for tower in args.towers:
            for seed in args.seeds:
                rows.append(run_one(tower, seed, args.language_model, Path(work_dir)))
                print(json.dumps(rows[-1]), flush=True)
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
