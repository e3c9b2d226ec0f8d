"""Data at scale (issue 14): preparing and starting on 10^4–10^6 preference rows.

    python benchmarks/data_scale.py build --root out/scale --rows 1000 60000 1000000
    python benchmarks/data_scale.py prepare --root out/scale --rows 60000              # no cache
    python benchmarks/data_scale.py prepare --root out/scale --rows 60000 --num-proc 2
    python benchmarks/data_scale.py prepare --root out/scale --rows 60000 --cache --clear  # cold
    python benchmarks/data_scale.py prepare --root out/scale --rows 60000 --cache      # warm
    python benchmarks/data_scale.py start --root out/scale --rows 1000 1000000 --repeats 3
    python benchmarks/data_scale.py ranks --root out/scale --rows 60000 --nproc 2  # torchrun
    python benchmarks/data_scale.py all --root out/scale --rows 60000 1000000

Rows are built as :func:`dpokit.bench.build_fixtures` builds its own (prompts of 30–50 words,
completions of 40–66 words from :data:`dpokit.fixtures.WORDS`, seed 0), tokenised with the
fixture's 2,048-token BPE tokenizer (``tiny``'s model directory). Every measurement runs in a
fresh process (``python benchmarks/data_scale.py one …``) and reports its wall time and peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``prepare``: :func:`dpokit.data.load_preference_pairs` of the file with the tokenisation
  settings of ``start``'s run, with its tokenised-data cache (``--cache``: the first run of a
  key writes the entry the training runs read, later ones read it; ``--clear`` empties it first)
  or without (the whole preparation every time); ``--num-proc N`` tokenises in N processes.
- ``start``: ``dpokit.train.loop.train`` of the tiny model on the file, ``max_steps=1``, timed to
  the end of step 1 with a :class:`~dpokit.train.loop.Probe`; the runs of one file share a
  parent directory, so they read the tokenised data (and, after the first, the reference
  table) from its cache.

``PYTHONPATH=DIR`` runs another checkout's ``dpokit`` (``DIR/dpokit``) for a before/after table.

Results, 2026-12-01, the 2-core machine shared with another engineer's job (load average
1.2–4.8, so times vary by up to ±30% between runs; pairs were interleaved). 304 MB is the RSS
after the imports and the tokenizer. "before": the list path and its ``.npz`` cache.

| 60,000 rows (44 MiB) | before | after |
|---|---|---|
| no cache | 32.3 s, 1,044 MB (47.1 s under load) | 34.2 s, 475 MB (48.3 s under load) |
| first run, writing the cache | 28.0, 28.1 s; 1,122 MB | 31.2, 31.4 s; 450 MB |
| cache hit | 2.64, 2.94 s; 707 MB | 0.06 s; 309 MB |

| 1,000,000 rows (741 MiB) | after |
|---|---|
| first run, writing the cache (652 MiB) | 867 s (950 s under more load), **458 MB** |
| no cache (unnamed temporary files) | 831 s, 457 MB (in-memory arrays instead: 1,708 MB) |
| cache hit | 0.73 s (1.6 s when the file is not in the page cache), 338 MB |

Start to the end of step 1 (tiny model, cache hits, alternating): 1,000 rows 8.62, 8.73,
9.34 s (461–464 MB); 1,000,000 rows 7.72, 10.46, 10.70, 10.72 s (563–566 MB): **+1.9 s** at the
median. What still grows with the rows there: ``epoch_batches`` (0.6 s a call, called twice),
the SHA-256 of the data file for the key (0.8 s) and a ``gc.collect`` (0.3 s).

``dataset_num_proc=2`` does not pay here: 60,000 plain-text rows 28.97, 28.65 s against 28.78,
31.55 s in one process (the Rust backend already tokenises each batch on both cores); 5,000
chat-template rows 17.6 s against 7.2–8.0 s (~9 s of worker start-up under load, then two
workers sharing the one core the other job left).

The first preparation is ~10% slower than the list path: ``tokenize_examples`` checks its
tokenizer's Rust backend against the tokenizer on the first batch of every call (3 calls of 1,024
texts, ~0.38 s), once per chunk of 8,192 rows now instead of once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def data_file(root: Path, rows: int) -> Path:
    return root / f"prefs-{rows}.jsonl"


def build(root: Path, rows_list: list[int], seed: int = 0) -> None:
    """The tokenizer and model (``build_fixtures``) and one JSON Lines file per row count."""
    from dpokit.bench import build_fixtures
    from dpokit.fixtures import WORDS

    build_fixtures(root / "fixture", ["tiny"])
    for rows in rows_list:
        path = data_file(root, rows)
        if path.is_file():
            continue
        rng = random.Random(seed)
        words = list(WORDS)

        def text(n: int, rng: random.Random = rng, words: list[str] = words) -> str:
            return " ".join(rng.choices(words, k=n))

        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for _ in range(rows):
                handle.write(json.dumps({"prompt": text(rng.randint(30, 50)) + "?",
                                         "chosen": " " + text(rng.randint(40, 66)) + ".",
                                         "rejected": " " + text(rng.randint(40, 66)) + "!"})
                             + "\n")
        tmp.replace(path)
        print(f"{path}: {rows} rows, {path.stat().st_size / 2**20:.0f} MiB", flush=True)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(root: Path, rows: int, run: str):
    """The training run of ``start`` (its tokenisation settings are ``prepare``'s too)."""
    from dpokit.train.config import DPOConfig

    return DPOConfig(model=str(root / "fixture" / "tiny"), data=str(data_file(root, rows)),
                     output_dir=str(root / f"runs-{rows}" / run), max_steps=1, batch_size=8,
                     max_length=256, save_steps=None, logging_steps=10**9,
                     lr_scheduler="constant")


def one_prepare(root: Path, rows: int, cache: bool, num_proc: int | None) -> dict:
    """One ``load_preference_pairs`` in this process, with the settings of ``start``'s runs
    and their cache directory (so a ``prepare --cache`` fills the entry they read)."""
    import inspect

    from dpokit.data import load_preference_pairs
    from dpokit.models import load_tokenizer

    config = run_config(root, rows, "prepare")
    tokenizer = load_tokenizer(config.model)
    start_mb = _peak_mb()
    kwargs = {"cache_dir": config.cache_dir} if cache else {}
    if num_proc is not None:
        if "dataset_num_proc" not in inspect.signature(load_preference_pairs).parameters:
            raise SystemExit("this dpokit has no dataset_num_proc")
        kwargs["dataset_num_proc"] = num_proc
    started = time.perf_counter()
    pairs = load_preference_pairs(config.data, tokenizer, settings=config.tokenize_settings,
                                  progress=False, **kwargs)
    seconds = time.perf_counter() - started
    return {"mode": "prepare", "rows": rows, "cache": cache, "num_proc": num_proc,
            "pairs": len(pairs), "seconds": round(seconds, 2), "type": type(pairs).__name__,
            "peak_rss_mb": round(_peak_mb()), "start_rss_mb": round(start_mb),
            "worker_peak_rss_mb": round(  # the largest worker's (0: none started)
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def one_start(root: Path, rows: int, run: str) -> dict:
    """``train`` of the tiny model, one step, timed to its end (a Probe after step 1)."""
    import torch

    from dpokit.train.loop import Probe, train

    torch.set_num_threads(2)
    config = run_config(root, rows, run)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    stamps: list[float] = []
    started = time.perf_counter()
    train(config, progress=False,
          probe=Probe(1, lambda m, s: stamps.append(time.perf_counter()) or {}))
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"mode": "start", "rows": rows, "run": run,
            "seconds_to_step_1": round(stamps[0] - started, 2),
            "peak_rss_mb": round(_peak_mb())}


def one_rank(root: Path, rows: int) -> dict:
    """One rank's ``load_preference_pairs`` with the cache, in a process group of
    ``torchrun`` (``ranks``): how long it took and whether this rank tokenised."""
    import dpokit.data.prepare as prepare_module
    from dpokit.data import load_preference_pairs
    from dpokit.models import load_tokenizer
    from dpokit.runtime import setup_runtime, shutdown_runtime

    runtime = setup_runtime("cpu")
    config = run_config(root, rows, "ranks")
    tokenizer = load_tokenizer(config.model)
    built = []
    original = prepare_module.prepare_items

    def counted(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    prepare_module.prepare_items = counted
    runtime.barrier()
    started = time.perf_counter()
    pairs = load_preference_pairs(config.data, tokenizer, settings=config.tokenize_settings,
                                  progress=False, cache_dir=config.cache_dir)
    seconds = time.perf_counter() - started
    result = {"mode": "rank", "rank": runtime.rank, "rows": rows, "pairs": len(pairs),
              "tokenised": bool(built), "seconds": round(seconds, 2),
              "peak_rss_mb": round(_peak_mb())}
    shutdown_runtime(runtime)
    return result


def ranks(root: Path, rows_list: list[int], nproc: int) -> list[dict]:
    """A cold cache, ``nproc`` ranks of one ``torchrun`` job each loading the file: every
    rank's time and whether it tokenised, and the whole job's wall time."""
    results = []
    for rows in rows_list:
        clear_cache(root, rows)
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                   "--nproc-per-node", str(nproc), __file__, "one", "rank", str(root),
                   str(rows)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            results.append({"error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            per_rank = [json.loads(line) for line in done.stdout.splitlines()
                        if line.startswith("{")]
            results.append({"mode": "ranks", "rows": rows, "nproc": nproc,
                            "job_seconds": round(wall, 2), "ranks": per_rank})
        print(json.dumps(results[-1]), flush=True)
    return results


def _fresh(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, __file__, "one", *args], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "args": args}
    return json.loads(done.stdout.strip().splitlines()[-1])


def clear_cache(root: Path, rows: int) -> None:
    shutil.rmtree(root / f"runs-{rows}", ignore_errors=True)


def prepare(root: Path, rows_list: list[int], cache: bool, num_proc: int | None,
            repeats: int, clear: bool) -> list[dict]:
    results = []
    for rows in rows_list:
        for i in range(repeats):
            if clear and i == 0:
                clear_cache(root, rows)
            args = ["prepare", str(root), str(rows), "1" if cache else "0", str(num_proc or 0)]
            results.append(_fresh(args))
            print(json.dumps(results[-1]), flush=True)
    return results


def start(root: Path, rows_list: list[int], repeats: int) -> list[dict]:
    """``repeats`` starts of each file's run (the first one of a fresh cache tokenises and
    computes the reference; the others read both from the cache)."""
    results = []
    for rows in rows_list:
        for i in range(repeats):
            results.append(_fresh(["start", str(root), str(rows), f"run{i}"]))
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str]) -> None:
    if argv[:1] == ["one"]:
        mode, root, rows = argv[1], Path(argv[2]), int(argv[3])
        if mode == "prepare":
            result = one_prepare(root, rows, argv[4] == "1", int(argv[5]) or None)
        elif mode == "rank":
            result = one_rank(root, rows)
        else:
            result = one_start(root, rows, argv[4])
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "prepare", "start", "ranks", "all"])
    parser.add_argument("--root", type=Path, default=Path("out/scale"))
    parser.add_argument("--rows", type=int, nargs="+", default=[60_000])
    parser.add_argument("--cache", action="store_true", help="prepare with the cache")
    parser.add_argument("--clear", action="store_true",
                        help="empty the file's cache before the first run")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (the ranks command)")
    args = parser.parse_args(argv)
    build(args.root, args.rows)
    if args.command == "prepare":
        prepare(args.root, args.rows, args.cache, args.num_proc, args.repeats, args.clear)
    elif args.command == "ranks":
        for _ in range(args.repeats):
            ranks(args.root, args.rows, args.nproc)
    elif args.command == "start":
        if args.clear:
            for rows in args.rows:
                clear_cache(args.root, rows)
        start(args.root, args.rows, args.repeats)
    elif args.command == "all":
        for rows in [1000, *args.rows]:
            prepare(args.root, [rows], False, None, 1, False)  # no cache
            prepare(args.root, [rows], True, None, 1, True)  # cold: writes the cache
            prepare(args.root, [rows], True, None, args.repeats, False)  # warm
            start(args.root, [rows], args.repeats + 1)  # the first computes the reference


if __name__ == "__main__":
    main(sys.argv[1:])
