"""k scored completions per prompt, computed once, against the same pairs one by one.

    python benchmarks/k_completions.py [--workdir out/bench] [--model small] [--prompts 48]
        [--k 4] [--selection all] [--prompts-per-step 2] [--steps 8] [--repeats 2]

UltraFeedback-shaped rows (a prompt of 30–50 words and k completions of 40–66 words with
distinct scores, from the benchmark's vocabulary) are written twice: as one row per prompt
(``completions`` + ``scores``) and as the pairs ``pairs_from_scores`` chooses, one row each. The
same dpokit training (default settings: shared-prompt layout, cached reference) runs on both,
each in a fresh process, alternating, with the same pairs per step (a step of P prompts is
P · pairs-per-prompt pairs one by one). Reported: s/step (median of the steady steps), the
speed-up, peak RSS, and the wall time of the whole run (reference pass included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path


def write_data(root: Path, prompts: int, k: int, selection: str, seed: int = 0) -> int:
    """``groups.jsonl`` and ``pairs.jsonl`` under ``root``; returns the pairs per prompt."""
    from dpokit.data.groups import score_pairs
    from dpokit.fixtures import WORDS

    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    groups, pairs = [], []
    for _ in range(prompts):
        prompt = text(rng.randint(30, 50)) + "?"
        completions = [" " + text(rng.randint(40, 66)) + "." for _ in range(k)]
        scores = rng.sample(range(1, 10 * k), k)
        groups.append({"prompt": prompt, "completions": completions, "scores": scores})
        pairs += [{"prompt": prompt, "chosen": completions[i], "rejected": completions[j]}
                  for i, j in score_pairs([float(s) for s in scores], selection)]
    (root / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs) // prompts


def run(model: str, data: str, batch_size: int, steps: int, selection: str) -> dict:
    """One timed training run in this process (called in a fresh subprocess)."""
    import resource
    import time

    import torch

    from dpokit.bench import THREADS, timed_dpokit_run

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    stamps = timed_dpokit_run(_Fixture(Path(data).parent), model=model, data=data,
                              batch_size=batch_size, max_steps=steps, learning_rate=1e-6,
                              beta=0.1, max_length=256, pairs_from_scores=selection)
    gaps = [b - a for a, b in itertools.pairwise(stamps)][2:]
    return {"seconds_per_step": statistics.median(gaps),
            "wall_seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Fixture:
    def __init__(self, root: Path):
        self.root = root


def main(argv: list[str]) -> None:
    if argv[:1] == ["run"]:
        model, data, batch_size, steps, selection = argv[1:6]
        print(json.dumps(run(model, data, int(batch_size), int(steps), selection)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/bench")
    parser.add_argument("--model", default="small")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--selection", default="all")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from dpokit.bench import build_fixtures

    fixture = build_fixtures(args.workdir, [args.model])
    root = Path(args.workdir) / f"k{args.k}-{args.selection}"
    root.mkdir(parents=True, exist_ok=True)
    per_prompt = write_data(root, args.prompts, args.k, args.selection)
    model = str(fixture.model(args.model))
    runs: dict[str, list[dict]] = {"groups": [], "pairs": []}
    for _ in range(args.repeats):
        for name, batch in (("groups", args.prompts_per_step),
                            ("pairs", args.prompts_per_step * per_prompt)):
            done = subprocess.run(
                [sys.executable, __file__, "run", model, str(root / f"{name}.jsonl"), str(batch),
                 str(args.steps), args.selection], capture_output=True, text=True, check=True,
                env={"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
                     "PATH": "/usr/bin:/bin"})
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {name: {key: statistics.median(r[key] for r in rs) if key != "peak_rss_mb"
                      else max(r[key] for r in rs) for key in rs[0]}
               for name, rs in runs.items()}
    print(f"k={args.k}, {args.selection}: {per_prompt} pairs per prompt, "
          f"{args.prompts_per_step} prompts ({args.prompts_per_step * per_prompt} pairs) a step")
    for name, row in summary.items():
        print(f"  {name:6}: {row['seconds_per_step']:.3f} s/step, {row['peak_rss_mb']:.0f} MB, "
              f"{row['wall_seconds']:.1f} s in all")
    speedup = summary["pairs"]["seconds_per_step"] / summary["groups"]["seconds_per_step"]
    print(f"  speed-up per step: {speedup:.2f}×")


if __name__ == "__main__":
    main(sys.argv[1:])
