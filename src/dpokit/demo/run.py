"""``dpokit demo``: SFT a transformer into π_ref, train it towards π* offline and on-policy, and
measure the distance to π* exactly, on the model's whole output space.

    dpokit demo                                # defaults: ~3 minutes on 2 CPU cores
    dpokit demo --quick                        # smaller, under a minute
    dpokit demo --methods rpo,dpop,online-hard # more methods beside offline DPO and online-soft
    dpokit demo --betas 0.5,1,2,4              # offline DPO per β and the exact frontier

Steps: (1) sample SFT data from the documented reference distribution and train π_ref with
``dpokit sft``; (2) score every completion through π_ref; (3) sample preference pairs from π_ref and
label them with the Bradley–Terry model of the true reward; (4) train each method with
``dpokit train`` (offline DPO on those pairs; on-policy DPO generating its own pairs and scoring
them with the task's reward, :mod:`dpokit.demo.reward`), measuring the distance to π* exactly every
few steps; (5) measure each final policy on the whole output space (:mod:`dpokit.demo.measure`);
(6) compare with the training-free routes to π* (rejection sampling, best-of-n at matched KL);
(7) write ``report.json``, plots, ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dpokit.atomic import write_jsonl, write_text
from dpokit.demo.config import FULL, QUICK, DemoConfig  # noqa: F401 (re-export)
from dpokit.demo.measure import (
    build_space,
    full_space_measure,
    matched_best_of_n,
    measure,
    renormalise,
    score_space,
)
from dpokit.demo.methods import DEFAULT, METHODS, Method
from dpokit.demo.reward import TaskReward, write_reward_file
from dpokit.demo.task import DemoTask, build_word_tokenizer
from dpokit.errors import DpokitError
from dpokit.theory import (
    constant_outside_log_partition,
    expected_reward,
    full_space_kl,
    kl_divergence,
    optimal_policy,
    rejection_sample,
)

log = logging.getLogger("dpokit.demo")

MAX_LENGTH = 32
"""Tokens of prompt + completion in the demo's SFT and DPO runs."""

MAX_POSITIONS = 64
"""Positions of the demo's transformer: prompt + ``max_new_tokens`` must fit."""


class DemoStopped(Exception):
    """SIGINT/SIGTERM stopped one of the demo's trainings: the demo stops too (its numbers would
    be a partly trained model's); ``dpokit demo`` exits with 128 + ``signum``."""

    def __init__(self, signum: int, output_dir: str):
        super().__init__(f"stopped by signal {signum} while training {output_dir}; the demo "
                         f"reports nothing (run it again: it starts afresh)")
        self.signum = signum


def _quiet_train(config, probe=None) -> Path:
    from dpokit.train import loop

    final = loop.train(config, progress=False, probe=probe)
    if loop.last_stop_signal is not None:  # a checkpoint, not the trained model
        raise DemoStopped(int(loop.last_stop_signal), config.output_dir)
    return final


DEMO_MARKER = ".dpokit-demo"
"""Marks a directory the demo writes into (its runs, data and report are replaced there)."""


def _check_demo_directory(out: Path) -> None:
    """``--out`` must be new, empty, or the demo's own (its marker, or an earlier version's
    ``sft/`` run): the demo replaces ``sft/``, ``dpo/``, ``prefs.jsonl``, ``report.md``, … there,
    and a user's directory must not lose files of those names."""
    from dpokit.train.rundir import LOCK_NAME, is_run_directory

    present = [entry.name for entry in out.iterdir() if entry.name != LOCK_NAME]
    if (not present or (out / DEMO_MARKER).exists()
            or ((out / "sft").is_dir() and is_run_directory(out / "sft"))):
        return
    shown = ", ".join(sorted(present)[:3]) + (", …" if len(present) > 3 else "")
    raise DpokitError(f"--out {out} already holds files that are not the demo's ({shown}); the "
                      f"demo replaces its runs, data and report there — choose a new or empty "
                      f"directory")


def run_demo(config: DemoConfig, *, task: DemoTask | None = None,
             report=print) -> dict[str, Any]:
    """Run every step and return the report (also written to ``out_dir/report.json``). The
    output directory is locked while the demo runs (it removes and rewrites its own runs
    there: a second demo on it is refused)."""
    from dpokit.train.rundir import RunLock

    lock = RunLock.acquire(config.out_dir)
    try:
        return _run_demo(config, task=task, report=report)
    finally:
        lock.release()


def _run_demo(config: DemoConfig, *, task: DemoTask | None,
              report) -> dict[str, Any]:
    from dpokit.fixtures import tiny_causal_lm
    from dpokit.models import load_causal_lm
    from dpokit.train.config import SFTConfig

    started = time.perf_counter()
    config.validate()  # as the command line does: a library caller gets the same refusals
    torch.manual_seed(config.seed)
    task = task or DemoTask(reward=config.reward, seed=config.seed)
    # Everything that can be refused is refused before any training (SFT takes minutes).
    tokenizer = build_word_tokenizer(task)
    space = build_space(task, tokenizer)
    r_invalid = (float(space.rewards.min()) - 1.0 if config.r_invalid is None
                 else config.r_invalid)
    task_reward = TaskReward(task, eos_token_id=tokenizer.eos_token_id, r_invalid=r_invalid)
    task_reward.settings()  # a custom reward that on-policy training could not load: refused
    _check_task(config, task, space)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_demo_directory(out)
    (out / DEMO_MARKER).touch()
    import shutil

    for old in [out / "sft", *(out / name for name in METHODS),
                *out.glob("dpo-beta*")]:  # the demo's own runs: start afresh
        shutil.rmtree(old, ignore_errors=True)
    generator = torch.Generator().manual_seed(config.seed + 1)

    # 1. π_ref: a real transformer, trained by dpokit's SFT on the reference distribution.
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                          num_layers=config.num_layers, num_heads=4, max_positions=MAX_POSITIONS,
                          seed=config.seed)
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    sft_rows = []
    for i, prompt in enumerate(task.prompts):
        words = task.sample_reference(i, config.sft_samples_per_prompt, generator)
        sft_rows += [{"prompt": prompt, "completion": text} for text in task.text(words)]
    write_jsonl(out / "sft.jsonl", sft_rows)
    report(f"[1/5] SFT: π_ref from {len(sft_rows)} samples of the reference distribution")
    sft_final = _quiet_train(SFTConfig(
        model=str(out / "base"), data=str(out / "sft.jsonl"), output_dir=str(out / "sft"),
        batch_size=config.batch_size, learning_rate=3e-3, num_epochs=config.sft_epochs,
        lr_scheduler="cosine", warmup_ratio=0.05, save_steps=None, logging_steps=20,
        seed=config.seed, max_length=MAX_LENGTH))

    # 2. Score every completion of every prompt through π_ref.
    ref_model = load_causal_lm(sft_final)  # kept: it scores the samples outside the space
    ref_scores = score_space(ref_model, space)
    ref_logps, ref_mass = renormalise(ref_scores)

    # 3. Preference pairs from π_ref, labelled by Bradley–Terry on the true reward.
    pair_rows, covered = [], torch.zeros_like(ref_logps, dtype=torch.bool)
    same_pairs = 0
    for i, prompt in enumerate(task.prompts):
        n = config.pairs_per_prompt
        draws = torch.multinomial(ref_logps[i].exp(), 2 * n, replacement=True,
                                  generator=generator).view(n, 2)
        covered[i, draws.flatten()] = True
        margin = space.rewards[i][draws[:, 0]] - space.rewards[i][draws[:, 1]]
        first_wins = torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(margin)
        texts = task.text(space.completions)
        for (a, b), win in zip(draws.tolist(), first_wins.tolist(), strict=True):
            if a == b:  # the same completion twice: no preference to learn from
                same_pairs += 1
                continue
            chosen, rejected = (a, b) if win else (b, a)
            pair_rows.append({"prompt": prompt, "chosen": texts[chosen],
                              "rejected": texts[rejected]})
    write_jsonl(out / "prefs.jsonl", pair_rows)
    coverage_ref = float((ref_logps.exp() * covered).sum(-1).mean())
    report(f"[2/5] preference data: {len(pair_rows)} Bradley–Terry pairs sampled from π_ref "
           f"(they cover {covered.float().mean():.0%} of the outcomes, "
           f"{coverage_ref:.1%} of π_ref's mass; {same_pairs} draws of the same completion "
           f"twice left out)")

    # 4. Every method, with exact measurements along the way.
    trainer = _Trainer(config, out, sft_final, space, ref_model, ref_scores, tokenizer,
                       r_invalid, report)
    reward_spec = write_reward_file(out, task_reward)
    write_jsonl(out / "prompts.jsonl", [{"prompt": prompt} for prompt in task.prompts
                                        for _ in range(config.pairs_per_prompt)])
    names = config.method_names
    methods = []
    for number, name in enumerate(names, 1):
        report(f"[3/5] method {number}/{len(names)}: {name} — {METHODS[name].description}")
        methods.append(trainer.run(METHODS[name], config.betas[0], len(pair_rows), reward_spec))
    runs = [trainer.offline_run(methods[0])]  # offline DPO per β, for the frontier
    for beta in config.betas[1:]:
        report(f"[3/5] offline DPO at β = {beta:g}, for the frontier")
        runs.append(trainer.offline_run(trainer.run(METHODS["dpo"], beta, len(pair_rows),
                                                    reward_spec)))

    # 5. The training-free routes to π* for the first β, and the exact frontier.
    beta = config.betas[0]
    optimal = optimal_policy(ref_logps, space.rewards, beta)
    kl_optimal = float(kl_divergence(optimal, ref_logps).mean())
    n, best_of = matched_best_of_n(ref_logps, space.rewards, kl_optimal)
    rejection = _rejection(ref_logps, space.rewards, beta, generator)
    frontier = _frontier(ref_logps, space.rewards)
    report("[4/5] training-free comparison: rejection sampling and best-of-n at matched KL")

    default = next(m for m in methods if m["name"] == DEFAULT)
    main = default["final"]
    summary = {key: main[key] for key in (
        "kl_ref_to_optimal", "kl_policy_to_optimal", "kl_policy_to_ref", "kl_optimal_to_ref",
        "reward_ref",
        "reward_policy", "reward_optimal", "objective_policy", "max_objective",
        "closed_fraction", "implicit_reward_correlation", "implicit_reward_correlation_weighted",
        "implicit_offset")}
    summary["mass_in_space_ref"] = float(ref_mass.mean())
    summary["mass_in_space_policy"] = default["mass_in_space"]
    full = default["full_space"]
    result = {
        **summary,
        "beta": beta,
        "default_method": DEFAULT,
        "target_closed_fraction": config.target_closed_fraction,
        "target_sampled_in_space": config.target_sampled_in_space,
        "passed": (full["closed_fraction_at_least"] >= config.target_closed_fraction
                   and full["sampled_in_space"] >= config.target_sampled_in_space),
        "task": {"prompts": list(task.prompts), "words": list(task.words),
                 "length": task.length, "reward": task.reward_name,
                 "outcomes_per_prompt": task.num_outcomes, "ref_spread": task.ref_spread,
                 "r_invalid": r_invalid, "reward_function": reward_spec},
        "data": {"sft_rows": len(sft_rows), "pairs": len(pair_rows),
                 "identical_draws_dropped": same_pairs,
                 "outcomes_covered": float(covered.float().mean()),
                 "ref_mass_covered": coverage_ref, "ref_mass_in_space": float(ref_mass.mean()),
                 "ref_mass_in_space_per_prompt": ref_mass.tolist()},
        "per_prompt": main["per_prompt"],
        "ref_model_dir": str(sft_final),
        "policy_model_dir": default["model_dir"],
        "full_space": full,
        "methods": [{k: v for k, v in m.items() if k != "policy_logps"} for m in methods],
        "runs": [{k: v for k, v in run.items() if k != "policy_logps"} for run in runs],
        "best_of_n": best_of,
        "rejection_sampling": rejection,
        "frontier": frontier,
        "config": asdict(config),
        "seconds": time.perf_counter() - started,
    }
    _write_report(out, result, task, space, ref_logps, methods, runs)
    report(f"[5/5] report written to {out}")
    return result


def _check_task(config: DemoConfig, task: DemoTask, space) -> None:
    """Refuse a task the demo cannot measure, naming the setting (before anything trains)."""
    longest_prompt = max(sequences[0][1] for sequences in space.sequences)  # prompt tokens
    if longest_prompt + task.length + 1 > MAX_LENGTH:
        raise DpokitError(f"a prompt of {longest_prompt} tokens and a completion of "
                          f"{task.length} words + EOS pass the demo's max_length of "
                          f"{MAX_LENGTH} tokens (training would truncate them)")
    if config.max_new_tokens < task.length + 1:
        raise DpokitError(f"max_new_tokens = {config.max_new_tokens} cannot generate any of the "
                          f"task's completions ({task.length} words + EOS = {task.length + 1} "
                          f"tokens); give max_new_tokens ≥ {task.length + 1}")
    if longest_prompt + config.max_new_tokens > MAX_POSITIONS:
        raise DpokitError(f"max_new_tokens = {config.max_new_tokens} after a prompt of "
                          f"{longest_prompt} tokens passes the model's {MAX_POSITIONS} "
                          f"positions; give max_new_tokens ≤ {MAX_POSITIONS - longest_prompt}")
    constant = space.rewards.amax(dim=-1) == space.rewards.amin(dim=-1)
    if bool(constant.all()):
        raise DpokitError(f"the reward {task.reward_name} is constant on every prompt's "
                          f"completions, so π* = π_ref on the task's space and there is no "
                          f"distance to close; use a reward that tells completions apart")


class _Trainer:
    """Trains one method and measures it: exact probes during training, the whole output space
    at the end."""

    def __init__(self, config, out, sft_final, space, ref_model, ref_scores, tokenizer,
                 r_invalid, report):
        self.config, self.out, self.sft_final, self.space = config, out, sft_final, space
        self.ref_model, self.ref_scores, self.tokenizer = ref_model, ref_scores, tokenizer
        self.ref_logps, _ = renormalise(ref_scores)
        self.r_invalid, self.report = r_invalid, report

    def _distances(self, scores: torch.Tensor, beta: float) -> dict:
        """The exact numbers a probe logs: renormalised measure and whole-space lower bound."""
        policy_logps, mass = renormalise(scores)
        values = measure(policy_logps, self.ref_logps, self.space.rewards, beta)
        log_z_out = constant_outside_log_partition(self.ref_scores, self.r_invalid, beta)
        full = full_space_kl(scores, self.ref_scores, self.space.rewards, beta,
                             outside_log_partition=log_z_out)
        ref_full = full_space_kl(self.ref_scores, self.ref_scores, self.space.rewards, beta,
                                 outside_log_partition=log_z_out)
        return {"mass_in_space": float(mass.mean()),
                "kl_policy_to_optimal_full_lower_bound": float(full.lower_bound.mean()),
                "kl_ref_to_optimal_full": float(ref_full.lower_bound.mean()),
                **{k: v for k, v in values.items() if k != "per_prompt"}}

    def run(self, method: Method, beta: float, pairs: int, reward_spec: str) -> dict:
        """Train ``method`` at ``beta`` on the shared budget of ``pairs`` labelled pairs."""
        from dpokit.models import load_causal_lm
        from dpokit.train.config import DPOConfig
        from dpokit.train.loop import Probe

        c, started = self.config, time.perf_counter()
        history = [{"step": 0, **self._distances(self.ref_scores, beta)}]

        def probe_fn(model, step):
            history.append({"step": step, **self._distances(score_space(model, self.space),
                                                             beta)})
            return {"kl_policy_to_optimal": history[-1]["kl_policy_to_optimal"],
                    "kl_policy_to_optimal_full_lower_bound":
                        history[-1]["kl_policy_to_optimal_full_lower_bound"]}

        if method.online:  # one pass, each step's pairs generated by the current policy
            data, steps = self.out / "prompts.jsonl", math.ceil(pairs / c.batch_size)
            online = {"online": True, "reward": reward_spec, "num_generations": 2,
                      "max_new_tokens": c.max_new_tokens, "temperature": 1.0}
        else:
            data = self.out / "prefs.jsonl"
            steps = math.ceil(c.dpo_epochs * math.ceil(pairs / c.batch_size))
            online = {}
        settings = {"loss_type": [c.loss_type], **method.settings, **online}
        name = method.name if beta == c.betas[0] else f"{method.name}-beta{beta:g}"
        final = _quiet_train(DPOConfig(
            model=str(self.sft_final), data=str(data), output_dir=str(self.out / name),
            beta=beta, batch_size=c.batch_size, learning_rate=c.dpo_learning_rate,
            max_steps=steps, lr_scheduler="cosine", warmup_ratio=0.05, save_steps=None,
            logging_steps=20, seed=c.seed, max_length=MAX_LENGTH, **settings),
            probe=Probe(max(1, steps // c.probes), probe_fn))
        model = load_causal_lm(final)
        scores = score_space(model, self.space)
        policy_logps, mass = renormalise(scores)
        final_measure = measure(policy_logps, self.ref_logps, self.space.rewards, beta)
        full = full_space_measure(model, self.ref_model, self.space, self.tokenizer, beta,
                                  policy_space_logps=scores, ref_space_logps=self.ref_scores,
                                  r_invalid=self.r_invalid, num_samples=c.full_space_samples,
                                  max_new_tokens=c.max_new_tokens, seed=c.seed + 2)
        self.report(f"      whole output space: at least {full['closed_fraction_at_least']:.1%} "
                    f"of KL(π_ref‖π*) closed (95%), {full['sampled_in_space']:.1%} of "
                    f"samples in the task's space; renormalised: "
                    f"{final_measure['closed_fraction']:.1%} closed")
        return {"name": method.name, "description": method.description, "beta": beta,
                "online": method.online, "model_dir": str(final), "steps": steps,
                "pairs": steps * c.batch_size if method.online else pairs,
                "settings": settings, "history": history,
                "final": final_measure,
                "mass_in_space": float(mass.mean()), "full_space": full,
                "seconds": time.perf_counter() - started, "policy_logps": policy_logps}

    @staticmethod
    def offline_run(method_result: dict) -> dict:
        """The fields of an offline DPO run in ``runs`` (one per β)."""
        keys = ("beta", "model_dir", "history", "final", "mass_in_space", "full_space",
                "policy_logps")
        run = {k: method_result[k] for k in keys}
        run["model"] = run.pop("model_dir")
        return run


def _rejection(ref_logps, rewards, beta, generator) -> dict:
    """Exact π* samples by rejection from π_ref (first prompt), and their mean reward."""
    probs = ref_logps[0].exp()
    result = rejection_sample(
        lambda n: torch.multinomial(probs, n, replacement=True, generator=generator),
        lambda y: rewards[0][y], beta=beta, max_reward=float(rewards[0].max()),
        num_samples=2000, batch_size=4096, generator=generator)
    optimal = optimal_policy(ref_logps[0], rewards[0], beta)
    return {"prompt_index": 0, "num_samples": len(result.samples),
            "acceptance_rate": result.acceptance_rate,
            "expected_acceptance_rate": math.exp(
                float(torch.logsumexp(ref_logps[0] + rewards[0] / beta, 0))
                - float(rewards[0].max()) / beta),
            "sample_mean_reward": float(result.rewards.mean()),
            "exact_reward_optimal": float(expected_reward(optimal, rewards[0]))}


def _frontier(ref_logps, rewards) -> list[dict]:
    """(KL(π*_β‖π_ref), E_π*_β[r]) over a grid of β, averaged over prompts — the best reward
    any policy can reach at that KL."""
    points = []
    for beta in torch.logspace(-1.3, 1.5, 40).tolist():
        optimal = optimal_policy(ref_logps, rewards, beta)
        points.append({"beta": beta, "kl_to_ref": float(kl_divergence(optimal, ref_logps).mean()),
                       "reward": float(expected_reward(optimal, rewards).mean())})
    return points


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as null (an undefined quantity, e.g. the implicit
    reward's correlation at step 0, where π_θ = π_ref and it is constant): valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_report(out, result, task, space, ref_logps, methods, runs) -> None:
    from dpokit.demo.plots import write_demo_plots
    from dpokit.demo.text import report_markdown

    result["plots"] = write_demo_plots(out, result, task, space, ref_logps, methods, runs)
    write_text(out / "report.json", json.dumps(_json_safe(result), indent=2, allow_nan=False))
    write_text(out / "report.md", report_markdown(result))
