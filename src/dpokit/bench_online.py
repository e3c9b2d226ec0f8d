"""On-policy DPO speed, dpokit against TRL 1.16's experimental ``OnlineDPOTrainer``.

The ``online`` setting of ``dpokit bench``: the same model, prompts (the fixture's, ~41 tokens),
reward callable (:func:`length_reward`, text in), batch of prompts, 2 generations each of up to
:data:`MAX_NEW_TOKENS` tokens at temperature 1, β, learning rate and hard labels (the higher
reward wins, TRL's rule, so both run the same algorithm), each framework in its own process.
A step is generate + reward + reference and policy log-probs + backward + AdamW.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0


def length_reward(prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """−|words − 12|: completions of about twelve words are best."""
    return [-abs(len(c.split()) - 12.0) for c in completions]


def prompts_file(fixture) -> Path:
    """The fixture's prompts alone (``prompt`` column), written once."""
    path = fixture.root / "prompts.jsonl"
    if not path.is_file():
        rows = [json.loads(line) for line in fixture.data.read_text().splitlines()]
        path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return path


def run_dpokit(fixture, model: str, steps: int, *, batch: int, lr: float, beta: float,
               max_length: int, device: str, precision: dict,
               overrides: dict[str, Any]) -> list[float]:
    """Step-end timestamps of ``dpokit train --online`` (hard labels, sigmoid)."""
    from dpokit.bench import timed_dpokit_run

    return timed_dpokit_run(
        fixture, model=str(fixture.model(model)), data=str(prompts_file(fixture)),
        device=device, **precision, online=True, reward="dpokit.bench_online:length_reward",
        label="hard", loss_type=["sigmoid"], num_generations=2, max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE, batch_size=batch, learning_rate=lr, beta=beta,
        max_length=max_length, max_steps=steps, **overrides)


def run_trl(fixture, model: str, steps: int, *, batch: int, lr: float, beta: float,
            max_length: int, device: str, precision: dict,
            overrides: dict[str, Any]) -> list[float]:
    """Step-end timestamps of TRL's ``OnlineDPOTrainer`` with the same settings."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpokit.bench import trl_inputs

    tokenizer, policy, dataset, stamp, stamps = trl_inputs(fixture, model, prompts_file(fixture),
                                                           precision["dtype"], device)
    args = OnlineDPOConfig(
        output_dir=str(fixture.root / "runs" / f"trl-online-{model}"),
        per_device_train_batch_size=batch, learning_rate=lr, beta=beta, max_length=max_length,
        max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
        max_steps=steps, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        logging_steps=10**9, use_cpu=device == "cpu", bf16=precision["bf16"],
        fp16=precision["fp16"], dataloader_num_workers=0, **overrides)
    OnlineDPOTrainer(model=policy, reward_funcs=length_reward, args=args,
                     train_dataset=dataset, processing_class=tokenizer,
                     callbacks=[stamp]).train()
    return stamps
