"""The ``dpokit`` command line: parse, call the library, print.

    dpokit optimal                      # the lecture's worked example at β = 1
    dpokit optimal --beta 0.5,1,2,5     # a β sweep
    dpokit partition                    # V^T growth, exact log Z vs Monte Carlo
    dpokit figures --out out/figures    # the lecture's figures as PNGs

User errors (:class:`~dpokit.errors.DpokitError` and bad flags) print one line on stderr and exit
with status 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from dpokit import __version__
from dpokit.errors import DpokitError
from dpokit.format import format_count, format_duration
from dpokit.outcomes import (
    WORKED_EXAMPLE,
    WORKED_EXAMPLE_PROMPT,
    OptimalSolution,
    apply_overrides,
    parse_assignment,
    parse_outcome,
    read_outcomes_csv,
    solve,
    validate_outcomes,
)
from dpokit.train.config import DPOConfig, SFTConfig

# Piped output gets a fixed, roomy width; columns fold rather than truncate a number.
console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 120)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpokit")
def app() -> None:
    """KL-regularised preference optimisation: the exact optimal policy π* and DPO."""


def _numbers(values: tuple[str, ...] | list[str], flag: str) -> list[float]:
    """Floats from repeated and/or comma-separated flag values (``--beta 0.5,1 --beta 2``)."""
    numbers = []
    for value in values:
        for part in value.split(","):
            try:
                numbers.append(float(part))
            except ValueError:
                raise DpokitError(f"{flag}: {part.strip()!r} is not a number") from None
    return numbers


def _positive(values: list[float], flag: str) -> list[float]:
    for value in values:
        if not (value > 0 and math.isfinite(value)):
            raise DpokitError(f"{flag} must be a finite number > 0, got {value:g}")
    return values


def _exp_text(x: float) -> str:
    return f"{math.exp(x):.4g}" if x < 700 else f"e^{x:.4g}"


# ----------------------------------------------------------------------------------- optimal


@app.command()
@click.option("--beta", "-b", multiple=True, default=["1"], show_default=True,
              help="β > 0; repeat or comma-separate several for a sweep.")
@click.option("--outcome", "-o", multiple=True, metavar="NAME:REF_PROB:REWARD",
              help="An outcome of the prompt; repeat for each (replaces the worked example).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="CSV with header name,ref_prob,reward (replaces the worked example).")
@click.option("--reward", multiple=True, metavar="NAME=VALUE",
              help="Override the reward of an outcome.")
@click.option("--ref-prob", multiple=True, metavar="NAME=VALUE",
              help="Override π_ref of an outcome.")
@click.option("--normalize", is_flag=True,
              help="Rescale π_ref to sum to 1 instead of requiring it.")
@click.option("--prompt", default=None, help="Prompt text shown in the title.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def optimal(beta: tuple[str, ...], outcome: tuple[str, ...], csv_path: Path | None,
            reward: tuple[str, ...], ref_prob: tuple[str, ...], normalize: bool,
            prompt: str | None, as_json: bool) -> None:
    """π* = π_ref·exp(r/β)/Z for a table of outcomes (default: the lecture's worked example).

    Prints each outcome's π_ref, r and π*, with Z, J(π*) = β log Z and KL(π* ‖ π_ref).
    """
    betas = _positive(_numbers(beta, "--beta"), "--beta")
    if outcome and csv_path:
        raise DpokitError("give outcomes with --outcome or --csv, not both")
    if csv_path:
        table, source = read_outcomes_csv(csv_path), str(csv_path)
    elif outcome:
        table, source = [parse_outcome(spec) for spec in outcome], "--outcome"
    else:
        table, source = list(WORKED_EXAMPLE), "worked example"
        prompt = WORKED_EXAMPLE_PROMPT if prompt is None else prompt
    table = apply_overrides(
        table,
        rewards=dict(parse_assignment(s, "--reward") for s in reward or []),
        ref_probs=dict(parse_assignment(s, "--ref-prob") for s in ref_prob or []))
    outcomes = validate_outcomes(table, source=source, normalize=normalize)
    solutions = [solve(outcomes, b) for b in betas]
    if as_json:
        payload = [s.to_json() for s in solutions]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return
    title = f"prompt: {prompt!r}" if prompt else "outcomes"
    if len(solutions) == 1:
        _print_solution(solutions[0], title)
    else:
        _print_sweep(solutions, title)


def _print_solution(s: OptimalSolution, title: str) -> None:
    table = Table(title=f"Optimal policy π* at β = {s.beta:g} — {title}")
    for name in ("outcome y", "π_ref(y|x)", "r(x,y)", "exp(r/β)", "π*(y|x)"):
        table.add_column(name, justify="left" if name == "outcome y" else "right",
                         overflow="fold")
    for o, p in zip(s.outcomes, s.optimal_probs, strict=True):
        table.add_row(o.name, f"{o.ref_prob:.4g}", f"{o.reward:.4g}",
                      _exp_text(o.reward / s.beta), f"{p:.6g}")
    console.print(table)
    console.print(f"Z = Σ π_ref·exp(r/β) = {_exp_text(s.log_partition)}   "
                  f"log Z = {s.log_partition:.6g}")
    console.print(f"KL(π* ‖ π_ref) = {s.kl_optimal_ref:.6g} nats")
    console.print(f"J(π*) = E_π*[r] − β KL(π* ‖ π_ref) = {s.expected_reward:.6g} − "
                  f"{s.beta:g}·{s.kl_optimal_ref:.6g} = {s.objective:.6g}")
    console.print(f"β log Z = {s.beta * s.log_partition:.6g}  (the maximum of J, reached at π*)")


def _print_sweep(solutions: list[OptimalSolution], title: str) -> None:
    """One row per outcome (π_ref, r, then π* at each β), then the per-β summaries."""
    table = Table(title=f"β sweep of π*(y|x) = π_ref·exp(r/β)/Z — {title}")
    table.add_column("outcome y", overflow="fold")
    table.add_column("π_ref", justify="right", overflow="fold")
    table.add_column("r", justify="right", overflow="fold")
    for s in solutions:
        table.add_column(f"π* β={s.beta:g}", justify="right", overflow="fold")
    for i, o in enumerate(solutions[0].outcomes):
        table.add_row(o.name, f"{o.ref_prob:.4g}", f"{o.reward:.4g}",
                      *(f"{s.optimal_probs[i]:.4g}" for s in solutions),
                      end_section=i == len(solutions[0].outcomes) - 1)
    for label, value in (("log Z", lambda s: s.log_partition),
                         ("J(π*) = β log Z", lambda s: s.objective),
                         ("E_π*[r]", lambda s: s.expected_reward),
                         ("KL(π* ‖ π_ref)", lambda s: s.kl_optimal_ref)):
        table.add_row(label, "", "", *(f"{value(s):.4g}" for s in solutions))
    console.print(table)


# --------------------------------------------------------------------------------- partition


@app.command()
@click.option("--vocab-size", type=int, default=50257, show_default=True,
              help="V for the growth table (GPT-2's).")
@click.option("--max-length", type=int, default=8, show_default=True,
              help="Largest T in the growth table.")
@click.option("--rate", type=float, default=None,
              help="Sequences/s to time enumeration at (default: measured here).")
@click.option("--space-vocab", type=int, default=6, show_default=True,
              help="V of the small built-in space.")
@click.option("--space-length", type=int, default=5, show_default=True,
              help="T of the small built-in space.")
@click.option("--beta", "-b", multiple=True, default=["5,1,0.3,0.1"], show_default=True,
              help="β values for the Monte-Carlo study.")
@click.option("--samples", multiple=True, default=["10,100,1000,10000"], show_default=True,
              help="Monte-Carlo sample sizes.")
@click.option("--repeats", type=int, default=20, show_default=True,
              help="Independent estimates per (β, n).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed of the built-in space and samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def partition(vocab_size: int, max_length: int, rate: float | None, space_vocab: int,
              space_length: int, beta: tuple[str, ...], samples: tuple[str, ...], repeats: int,
              seed: int, as_json: bool) -> None:
    """Why Z is intractable: V^T growth, and exact log Z beside Monte-Carlo estimates."""
    from dpokit.partition_study import (
        builtin_space,
        exact_partitions,
        growth_table,
        measure_scoring_rate,
        monte_carlo_study,
    )

    betas = _positive(_numbers(beta, "--beta"), "--beta")
    sizes = [int(n) for n in _positive(_numbers(samples, "--samples"), "--samples")]
    for flag, value, low in (("--vocab-size", vocab_size, 1), ("--max-length", max_length, 1),
                             ("--space-vocab", space_vocab, 1), ("--space-length", space_length, 1),
                             ("--repeats", repeats, 1)):
        if value < low:
            raise DpokitError(f"{flag} must be ≥ {low}, got {value}")
    if any(n < 2 for n in sizes):
        raise DpokitError("--samples must all be ≥ 2")
    if rate is not None:
        _positive([rate], "--rate")
    measured = rate is None
    rate = measure_scoring_rate() if rate is None else rate
    growth = growth_table(vocab_size, max_length, rate)
    space = builtin_space(space_vocab, space_length, seed=seed)
    exact = exact_partitions(space, betas)
    study = monte_carlo_study(space, betas, sizes, repeats=repeats, seed=seed)
    if as_json:
        print(json.dumps({
            "rate": rate, "rate_measured": measured, "vocab_size": vocab_size,
            "growth": [vars(row) for row in growth],
            "space": {"vocab_size": space_vocab, "length": space_length,
                      "num_sequences": space.num_sequences},
            "exact": [vars(e) for e in exact],
            "monte_carlo": [row.to_json() for row in study],
        }, indent=2))
        return
    how = ("measured here with a bigram scorer; a neural π_ref is far slower" if measured
           else "given")
    console.print(f"Time to enumerate at {rate:.3g} sequences/s ({how}).")
    table = Table(title=f"Terms in Z(x) for V = {vocab_size:,}")
    for name in ("T", "V^T", "time", "Σ_{t≤T} V^t", "time "):
        table.add_column(name, justify="right", overflow="fold")
    for row in growth:
        table.add_row(str(row.length), format_count(row.exactly),
                      format_duration(row.seconds_exactly), format_count(row.up_to),
                      format_duration(row.seconds_up_to))
    console.print(table)
    console.print(f"Built-in space: bigram π_ref over V = {space_vocab}, T = {space_length} "
                  f"({space.num_sequences:,} sequences), reward = Σ_t r(y_t) with r(v) ~ N(0, 1).")
    ex = Table(title="Exact log Z: enumeration vs O(T·V²) recursion")
    for name in ("β", "enumerated", "recursion", "|difference|"):
        ex.add_column(name, justify="right", overflow="fold")
    for e in exact:
        ex.add_row(f"{e.beta:g}", f"{e.enumerated:.10g}", f"{e.recursion:.10g}",
                   f"{abs(e.enumerated - e.recursion):.1e}")
    console.print(ex)
    mc = Table(title=f"Monte-Carlo log Ẑ from π_ref samples ({repeats} repeats each)")
    for name in ("β", "n", "exact log Z", "mean log Ẑ", "RMSE log Ẑ", "mean |Ẑ/Z−1|",
                 "95% CI coverage", "mean ESS"):
        mc.add_column(name, justify="right", overflow="fold")
    for row in study:
        mc.add_row(f"{row.beta:g}", f"{row.num_samples:,}", f"{row.exact_log_partition:.5g}",
                   f"{row.mean_log_estimate:.5g}", f"{row.rmse_log:.3g}",
                   f"{row.mean_abs_relative_error:.3g}", f"{row.coverage:.0%}",
                   f"{row.mean_ess:.4g}")
    console.print(mc)
    console.print("Smaller β puts the weight exp(r/β) on rarer sequences: the effective sample "
                  "size collapses and the error of Ẑ grows.")


# ----------------------------------------------------------------------------------- figures


@app.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/figures"),
              show_default=True, help="Directory to write the PNGs into.")
@click.option("--rate", type=float, default=None,
              help="Sequences/s for the enumeration-time axis (default: measured here).")
def figures(out: Path, rate: float | None) -> None:
    """Compute and draw the lecture's figures as PNGs."""
    from dpokit.plots.figures import FIGURES, write_figures

    if rate is not None:
        _positive([rate], "--rate")
    def report(path: Path) -> None:
        console.print(f"wrote {path}: {FIGURES[path.name]}", soft_wrap=True)

    write_figures(out, rate=rate, on_written=report)


# -------------------------------------------------------------------------------------- eval


def _loss_choices() -> list[str]:
    from dpokit.losses import loss_names

    return list(loss_names())


@app.command(name="eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Local Hugging Face causal LM directory (the policy).")
@click.option("--ref-model", "ref_dir", type=click.Path(path_type=Path), default=None,
              help="Reference model directory; without it only log-probs are reported.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Preference data: JSONL/JSON/CSV/Parquet file, saved dataset or directory.")
@click.option("--split", default=None, help="Split of a saved DatasetDict or sharded directory.")
@click.option("--beta", type=float, default=0.1, show_default=True, help="β > 0.")
@click.option("--loss-type", default="sigmoid", show_default=True,
              help="Loss to report (any name of `dpokit.losses.loss_names()`).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Pairs per batch.")
@click.option("--max-length", type=int, default=1024, show_default=True,
              help="Longest prompt + completion in tokens.")
@click.option("--max-prompt-length", type=int, default=None, help="Longest prompt in tokens.")
@click.option("--text-mode", type=click.Choice(["auto", "chat", "plain"]), default="auto",
              show_default=True, help="Chat template for conversational rows, or plain text.")
@click.option("--padding-free", is_flag=True, help="Pack sequences instead of padding them.")
@click.option("--shared-prompt", is_flag=True,
              help="One row per pair [prompt, chosen, rejected]: the prompt computed once.")
@click.option("--dtype", default="float32", show_default=True,
              help="float32, bfloat16, float16 or float64.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, …")
@click.option("--per-example", "per_example", type=click.Path(path_type=Path), default=None,
              help="Write one JSON line per pair to this file.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow model code shipped in the directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_command(model_dir: Path, ref_dir: Path | None, data_path: Path, split: str | None,
                 beta: float, loss_type: str, batch_size: int, max_length: int,
                 max_prompt_length: int | None, text_mode: str, padding_free: bool,
                 shared_prompt: bool, dtype: str,
                 device: str, per_example: Path | None, trust_remote_code: bool,
                 as_json: bool) -> None:
    """Log-probs, implicit rewards, loss and preference accuracy of a model on preference data."""
    import torch

    from dpokit.data import TokenizeSettings, load_preference_pairs
    from dpokit.evaluate import evaluate_pairs, write_jsonl_atomic
    from dpokit.losses import get_loss
    from dpokit.models import load_causal_lm, load_tokenizer, resolve_dtype

    _positive([beta], "--beta")
    get_loss(loss_type)
    resolve_dtype(dtype)
    if batch_size < 1:
        raise DpokitError(f"--batch-size must be ≥ 1, got {batch_size}")
    if padding_free and shared_prompt:
        raise DpokitError("--padding-free and --shared-prompt are two layouts; choose one")
    if not data_path.exists():
        raise DpokitError(f"data not found: {data_path}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_causal_lm(model_dir, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    ref_model = None if ref_dir is None else load_causal_lm(
        ref_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
        what="reference model")
    settings = TokenizeSettings(max_length=max_length, max_prompt_length=max_prompt_length,
                                text_mode=text_mode)
    pairs = load_preference_pairs(data_path, tokenizer, settings=settings, split=split,
                                  progress=True)
    result = evaluate_pairs(model, pairs, ref_model=ref_model, beta=beta, loss_type=loss_type,
                            batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                            layout="shared" if shared_prompt else
                            ("packed" if padding_free else "padded"),
                            device=device, progress=True)
    if per_example is not None:
        write_jsonl_atomic(per_example, result.per_example)
    if as_json:
        print(json.dumps({"num_pairs": result.num_pairs, **result.metrics}, indent=2))
        return
    table = Table(title=f"{model_dir} on {data_path} ({result.num_pairs} pairs, β = {beta:g}, "
                        f"{loss_type})")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    if ref_model is None and "loss" not in result.metrics:
        console.print("No --ref-model: log-probs only (rewards and loss need a reference).")
    if per_example is not None:
        console.print(f"wrote {result.num_pairs} rows to {per_example}")


# -------------------------------------------------------------------------------------- demo


@app.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True,
              help="Directory for the run, report.json, report.md and the plots.")
@click.option("--quick", is_flag=True, help="A smaller run (under a minute), looser bar (75%).")
@click.option("--beta", "--betas", "betas", multiple=True, default=["1"], show_default=True,
              help="β; several (comma-separated or repeated) give one DPO run per β.")
@click.option("--loss-type", default="sigmoid", show_default=True,
              help="Any loss of dpokit.losses that uses a reference.")
@click.option("--reward", default="token_score", show_default=True,
              help="Built-in reward: token_score, match or sorted.")
@click.option("--pairs-per-prompt", type=int, default=None, help="Preference pairs per prompt.")
@click.option("--dpo-epochs", type=float, default=None, help="Passes over the pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything.")
def demo(out_dir: str, quick: bool, betas: tuple[str, ...], loss_type: str, reward: str,
         pairs_per_prompt: int | None, dpo_epochs: float | None, seed: int) -> None:
    """Train a transformer with DPO and measure, exactly, how close it gets to π*."""
    from dpokit.demo.run import DemoConfig, check_demo_config, run_demo
    from dpokit.demo.task import REWARDS
    from dpokit.losses import get_loss

    if not get_loss(loss_type).needs_reference:
        raise DpokitError(f"--loss-type {loss_type} is reference-free; the demo compares "
                          f"with π* = π_ref·exp(r/β)/Z and needs a loss with a reference")
    if reward not in REWARDS:
        raise DpokitError(f"--reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    overrides = {"out_dir": out_dir, "betas": _positive(_numbers(betas, "--beta"), "--beta"),
                 "loss_type": loss_type, "reward": reward, "seed": seed}
    if pairs_per_prompt is not None:
        overrides["pairs_per_prompt"] = pairs_per_prompt
    if dpo_epochs is not None:
        overrides["dpo_epochs"] = dpo_epochs
    config = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
    check_demo_config(config)
    r = run_demo(config, report=lambda line: console.print(line))
    table = Table(title=f"DPO against the exact optimum (β = {r['beta']:g}, mean over prompts)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for label, value in (
            ("KL(π_ref ‖ π*)  before DPO", f"{r['kl_ref_to_optimal']:.4f}"),
            ("KL(π_θ ‖ π*)  after DPO", f"{r['kl_policy_to_optimal']:.4f}"),
            ("distance closed", f"{r['closed_fraction']:.1%} (bar "
                                f"{r['target_closed_fraction']:.0%}: "
                                f"{'met' if r['passed'] else 'NOT met'})"),
            ("KL(π_θ ‖ π_ref)", f"{r['kl_policy_to_ref']:.4f}"),
            ("E[r]: π_ref / π_θ / π*", f"{r['reward_ref']:.3f} / {r['reward_policy']:.3f} / "
                                       f"{r['reward_optimal']:.3f}"),
            ("J(π_θ) ≤ β log Z", f"{r['objective_policy']:.4f} ≤ {r['max_objective']:.4f}"),
            ("implicit reward vs r (corr.)", f"{r['implicit_reward_correlation']:.3f}"),
            ("mass on the space: π_ref / π_θ", f"{r['mass_in_space_ref']:.1%} / "
                                               f"{r['mass_in_space_policy']:.1%}")):
        table.add_row(label, value)
    console.print(table)
    console.print(f"report: {Path(out_dir) / 'report.md'}, numbers: "
                  f"{Path(out_dir) / 'report.json'}, plots: {', '.join(r['plots'])} "
                  f"({r['seconds']:.0f} s)", soft_wrap=True)


# ------------------------------------------------------------------------------------- bench


@app.command()
@click.option("--workdir", default="out/bench", show_default=True,
              help="Where the fixtures (tokenizer, rows, models) and runs go.")
@click.option("--models", default="tiny,small", show_default=True,
              help="tiny, small (CPU) and/or 0.5b (for a GPU).")
@click.option("--settings", default="default,no_ckpt_precompute", show_default=True,
              help="default, no_ckpt, no_ckpt_precompute, padding_free, shared_prompt, "
                   "shared_prompt_precompute; dpokit-only ablations default_padded, "
                   "default_no_recompute, default_recompute.")
@click.option("--steps", type=int, default=20, show_default=True, help="Steps per run.")
@click.option("--repeats", type=int, default=2, show_default=True, help="Runs per framework.")
@click.option("--frameworks", default="dpokit,trl", show_default=True,
              help="dpokit and/or trl (TRL needs `pip install '.[bench]'`).")
@click.option("--no-end-to-end", is_flag=True, help="Skip the 320-pair cold-start epoch.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the GPU benchmark (e.g. --models 0.5b --dtype bfloat16).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Compute precision of both.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON here.")
def bench(workdir: str, models: str, settings: str, steps: int, repeats: int, frameworks: str,
          no_end_to_end: bool, device: str, dtype: str, json_path: Path | None) -> None:
    """DPO speed and memory of dpokit against TRL's DPOTrainer on identical fixtures."""
    import importlib.util

    from dpokit.bench import MODELS, SETTINGS, benchmark

    chosen = {"models": models.split(","), "settings": settings.split(","),
              "frameworks": frameworks.split(",")}
    for key, known in (("models", MODELS), ("settings", SETTINGS),
                       ("frameworks", ("dpokit", "trl"))):
        unknown = [v for v in chosen[key] if v not in known]
        if unknown:
            raise DpokitError(f"--{key}: unknown {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")
    if "trl" in chosen["frameworks"] and importlib.util.find_spec("trl") is None:
        raise DpokitError("TRL is not installed; `pip install '.[bench]'` or --frameworks dpokit")
    if steps < 4 or repeats < 1:
        raise DpokitError("--steps must be ≥ 4 and --repeats ≥ 1")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DpokitError("--device cuda: no CUDA device is available")
    rows = benchmark(workdir, steps=steps, repeats=repeats, end_to_end=not no_end_to_end,
                     device=device, dtype=dtype,
                     report=lambda line: console.print(line, soft_wrap=True), **chosen)
    for model in chosen["models"]:
        for setting in chosen["settings"]:
            pair = {r["framework"]: r for r in rows if r["model"] == model
                    and r["setting"] == setting and "error" not in r}
            if len(pair) == 2:
                ratio = pair["dpokit"]["pairs_per_second"] / pair["trl"]["pairs_per_second"]
                console.print(f"{model}/{setting}: dpokit/TRL pairs/s = {ratio:.2f}×")
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------- sft / train


def _config_command(name: str, config_cls: type, summary: str) -> click.Command:
    """A command whose flags are the fields of ``config_cls`` (``--output-dir``/``--output_dir``),
    on top of an optional ``--config`` YAML file."""
    import dataclasses
    import typing

    from dpokit.config import field_help

    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}

    def callback(config_path: Path | None, **flags: object) -> None:
        from dpokit.config import load_config
        from dpokit.train.loop import train

        overrides = {key: ("true" if value else "false") if isinstance(value, bool) else value
                     for key, value in flags.items() if value is not None}
        config = load_config(config_cls, config_path, overrides)
        final = train(config)
        console.print(f"done: {final}")

    params: list[click.Parameter] = [click.Option(
        ["--config", "config_path"], type=click.Path(path_type=Path), default=None,
        help="YAML file of the fields below; flags override it.")]
    for flag, kind, default, text in field_help(config_cls):
        key = flag[2:].replace("-", "_")
        assert key in fields
        shown = "required" if default == "(required)" else f"default: {default!r}"
        if hints[key] in (bool, bool | None):  # flags; an unset optional one stays null
            decls = [f"{flag}/--no-{flag[2:]}", key]
            if "_" in key:
                decls.insert(1, f"--{key}/--no_{key}")
            params.append(click.Option(decls, default=None, help=f"{text} [{shown}]"))
        else:
            decls = [flag, f"--{key}", key] if "_" in key else [flag, key]
            params.append(click.Option(decls, default=None, metavar=kind.upper()
                                       if " " not in kind else "VALUE",
                                       help=f"{text} ({kind}) [{shown}]"))
    return click.Command(name, callback=callback, params=params, help=summary,
                         context_settings={"max_content_width": 100})


app.add_command(_config_command(
    "train", DPOConfig,
    "DPO (or any loss of the family) on preference data: `dpokit train --config dpo.yaml`."))
app.add_command(_config_command(
    "sft", SFTConfig,
    "Supervised fine-tuning (NLL of completion tokens): `dpokit sft --config sft.yaml`."))


# -------------------------------------------------------------------------------------- main


def _configure_logging() -> None:
    """dpokit's warnings as ``dpokit: warning: …`` lines on stderr; quiet library progress."""
    import logging
    import os

    logger = logging.getLogger("dpokit")
    if not any(getattr(h, "_dpokit", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dpokit: %(levelname)s: %(message)s"))
        handler._dpokit = True
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dpokit`` script and ``python -m dpokit``."""
    _configure_logging()
    try:
        app.main(args=argv, prog_name="dpokit", standalone_mode=False)
    except DpokitError as error:
        print(f"dpokit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as error:
        print(error.format_message())
        sys.exit(0)
    except click.UsageError as error:
        hint = f" (see 'dpokit {error.ctx.info_name} --help')" if error.ctx else ""
        if error.ctx and error.ctx.info_name == "dpokit":
            hint = " (see 'dpokit --help')"
        print(f"dpokit: error: {error.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.Abort:
        print("dpokit: aborted", file=sys.stderr)
        sys.exit(130)
