"""The demo's ``report.md``: what the numbers show, in plain words."""

from __future__ import annotations


def report_markdown(r: dict) -> str:
    task, data = r["task"], r["data"]
    verdict = (f"**The bar is met**: DPO closed {r['closed_fraction']:.1%} of the distance "
               f"(target {r['target_closed_fraction']:.0%})."
               if r["passed"] else
               f"**The bar is not met**: DPO closed {r['closed_fraction']:.1%} of the distance, "
               f"short of the {r['target_closed_fraction']:.0%} target.")
    why = ""
    if not r["passed"]:
        why = (f"\n\nWhy: the preference pairs cover {data['outcomes_covered']:.0%} of the "
               f"outcomes ({data['ref_mass_covered']:.1%} of π_ref's mass). DPO only learns the "
               f"reward where pairs compare completions; where π* puts mass on completions π_ref "
               f"rarely samples, the finite data cannot pin the policy down, and more pairs or "
               f"steps are needed.")
        if r["kl_policy_to_ref"] > r["kl_optimal_to_ref"]:
            why += (f" The policy also moved further from π_ref than π* does "
                    f"(KL {r['kl_policy_to_ref']:.3f} against {r['kl_optimal_to_ref']:.3f}): it "
                    f"over-fitted the few pairs it saw, pushing the winners of those comparisons "
                    f"beyond what the Bradley–Terry probabilities justify.")
    runs = "\n".join(
        f"| {run['beta']:g} | {run['final']['kl_ref_to_optimal']:.4f} | "
        f"{run['final']['kl_policy_to_optimal']:.4f} | {run['final']['closed_fraction']:.1%} | "
        f"{run['final']['reward_policy']:.3f} | {run['final']['reward_optimal']:.3f} |"
        for run in r["runs"])
    best, rej = r["best_of_n"], r["rejection_sampling"]
    full = r["full_space"]
    low, high = full["kl_policy_to_optimal_ci"]
    full_space = f"""## On the model's whole output space

The numbers below the table of this section are measured on the enumerated space, each model
renormalised there. A user who samples the trained model (`generate`, temperature 1, up to
{full['max_new_tokens']} new tokens) gets something else: of {full['num_samples']} samples per
prompt, **{full['sampled_in_space']:.1%}** were completions of the task (π_ref keeps
{r['mass_in_space_ref']:.1%} of its mass there). With every other completion given the reward
r_invalid = {full['r_invalid']:.3g}, π* is defined on the whole space and the distance is:

| quantity (mean over prompts, β = {r['beta']:g}) | value |
|---|---|
| KL(π_ref ‖ π*) on the whole space — before DPO (exact) | {full['kl_ref_to_optimal']:.4f} |
| KL(π_θ ‖ π*) on the whole space ≥ (exact lower bound, outside lumped) | {full['kl_policy_to_optimal_lower_bound']:.4f} |
| KL(π_θ ‖ π*) on the whole space, Monte-Carlo estimate [95% interval] | {full['kl_policy_to_optimal_estimate']:.4f} [{low:.4f}, {high:.4f}] |
| distance closed on the whole space (lower bound / estimate) | {full['closed_fraction_lower_bound']:.1%} / {full['closed_fraction_estimate']:.1%} |
| mass on the task's space: π_θ / π* | {full['mass_in_space_policy']:.1%} / {full['mass_in_space_optimal']:.1%} |

{'Offline DPO fitted the relative probabilities of the completions its pairs compare, and moved the rest of the mass to completions no pair contains: on the distribution a user samples, π_θ is farther from π* than π_ref was (docs/theory.md §6).' if full['closed_fraction_lower_bound'] < 0 else 'On the distribution a user samples, DPO moved π_θ towards π* as well.'}
The bar below is still the renormalised one; on-policy pairs, which follow π_θ's mass wherever it
goes, are the remedy (planned: issue 11).
"""
    return f"""# dpokit demo: DPO reaches the exact optimal policy

Task: {len(task['prompts'])} prompts, completions of {task['length']} words from
{len(task['words'])} ({task['outcomes_per_prompt']} per prompt), reward `{task['reward']}`.
π_ref is a small transformer trained by `dpokit sft` on {data['sft_rows']} samples; DPO
(`dpokit train`) learned from {data['pairs']} preference pairs sampled from π_ref and labelled by
the Bradley–Terry model of the true reward. Because every completion can be scored, the optimal
policy π* = π_ref·exp(r/β)/Z is known exactly, and so is the distance to it.

{verdict}{why}

{full_space}
## On the enumerated space, renormalised

| quantity (mean over prompts, β = {r['beta']:g}) | value |
|---|---|
| KL(π_ref ‖ π*) — distance before DPO | {r['kl_ref_to_optimal']:.4f} |
| KL(π_θ ‖ π*) — distance after DPO | {r['kl_policy_to_optimal']:.4f} |
| KL(π_θ ‖ π_ref) — how far DPO moved | {r['kl_policy_to_ref']:.4f} |
| E[r] under π_ref / π_θ / π* | {r['reward_ref']:.3f} / {r['reward_policy']:.3f} / {r['reward_optimal']:.3f} |
| J(π_θ) against its maximum β log Z | {r['objective_policy']:.4f} ≤ {r['max_objective']:.4f} |
| implicit reward vs r: correlation (uniform / π*-weighted) | {r['implicit_reward_correlation']:.3f} / {r['implicit_reward_correlation_weighted']:.3f} |
| fitted offset E_π*[r − r̂] against β log Z | {r['implicit_offset']:.4f} vs {r['max_objective']:.4f} |

Distances are measured on the enumerated space (the {task['outcomes_per_prompt']} completions
of {task['length']} words then EOS), with each model renormalised there. π_ref keeps
{r['mass_in_space_ref']:.1%} of its probability on that space; after DPO, π_θ keeps
{r['mass_in_space_policy']:.1%}. DPO's loss only compares completions with each other, so it
fixes the *relative* probabilities — which is what converges to π* — but not how much mass stays
on the completions the data contains{' (here most of it moved elsewhere, the "likelihood displacement" seen with DPO; an RPO term, `rpo_alpha`, counters it)' if r['mass_in_space_policy'] < 0.5 else ''}.

The gap between J(π_θ) and β log Z is exactly β·KL(π_θ‖π*) — the identity of docs/theory.md §2.
The implicit reward β·log(π_θ/π_ref) equals the true reward up to a per-prompt constant, and that
constant is β log Z(x): DPO recovered the reward without ever computing Z.

| β | KL(π_ref‖π*) | KL(π_θ‖π*) | closed | E_πθ[r] | E_π*[r] |
|---|---|---|---|---|---|
{runs}

Training-free routes to π*: rejection sampling from π_ref accepted
{rej['acceptance_rate']:.3%} of proposals (theory: {rej['expected_acceptance_rate']:.3%}); its
samples' mean reward {rej['sample_mean_reward']:.3f} matches E_π*[r] = {rej['exact_reward_optimal']:.3f}
(prompt 0). Best-of-{best['n']} at matched KL ({best['kl_to_ref']:.3f} nats) reaches
E[r] = {best['reward']:.3f}, against π*'s {r['reward_optimal']:.3f}: at a given KL, π* has the best
reward of all, and best-of-n spends its KL less efficiently.

Plots: `kl_to_optimal.png` (distance to π* over training), `distribution.png` (π_ref, π_θ, π* for
one prompt), `implicit_reward.png` (recovered vs true reward), `frontier.png` (reward against KL).
Numbers: `report.json`. Finished in {r['seconds']:.0f} s.
"""
