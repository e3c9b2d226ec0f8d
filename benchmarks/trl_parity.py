"""Step-1 metrics of TRL 1.16's SFTTrainer and DPOTrainer against ``dpokit sft``/``dpokit train``
reading the same settings as a TRL config file — the switch a TRL user makes, checked against
TRL itself (needs ``pip install '.[bench]'``; not part of ``make test``, which has no TRL).

    python benchmarks/trl_parity.py [--workdir out/trl-parity]

One step over all 8 rows (batch 8), so both frameworks see the same batch whatever their data
order; the learning rate is ~0 and the step's metrics are the initial model's. Prints every
metric both log and exits 1 if any differs by more than 1e-5 (relative, or absolute near 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

WORDS = "yes good answer the cat sat on a mat under red sea moon".split()
COMMON = {"per_device_train_batch_size": 8, "max_steps": 1, "learning_rate": 1e-9,
          "logging_steps": 1, "report_to": "none", "bf16": False, "use_cpu": True,
          "gradient_checkpointing": False, "save_strategy": "no",
          "lr_scheduler_type": "constant"}


def fixtures(root: Path) -> None:
    from dpokit.fixtures import build_tokenizer, tiny_causal_lm

    tokenizer = build_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    completion = [" " + " ".join(WORDS[:1 + (i * 5) % len(WORDS)]) for i in range(8)]
    (root / "sft.jsonl").write_text("".join(json.dumps(
        {"prompt": f"question {i}:", "completion": c}) + "\n" for i, c in enumerate(completion)))
    (root / "prefs.jsonl").write_text("".join(json.dumps(
        {"prompt": f"question {i}:", "chosen": c, "rejected": " no " + WORDS[i % 5]}) + "\n"
        for i, c in enumerate(completion)))


def trl_step(root: Path, kind: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    config, trainer = (SFTConfig, SFTTrainer) if kind == "sft" else (DPOConfig, DPOTrainer)
    data = root / ("sft.jsonl" if kind == "sft" else "prefs.jsonl")
    run = trainer(model=AutoModelForCausalLM.from_pretrained(root / "model"),
                  processing_class=AutoTokenizer.from_pretrained(root / "model"),
                  args=config(output_dir=str(root / f"trl-{kind}"), **COMMON),
                  train_dataset=datasets.load_dataset("json", data_files=str(data),
                                                      split="train"))
    run.train()
    return next(h for h in run.state.log_history if "loss" in h)


def dpokit_step(root: Path, kind: str) -> dict:
    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig, SFTConfig
    from dpokit.train.loop import train

    path = root / f"trl-{kind}.yaml"
    path.write_text(yaml.safe_dump({
        **COMMON, "model_name_or_path": str(root / "model"),
        "dataset_name": str(root / ("sft.jsonl" if kind == "sft" else "prefs.jsonl")),
        "output_dir": str(root / f"dpokit-{kind}"), "overwrite_output_dir": True}))
    config = load_config(SFTConfig if kind == "sft" else DPOConfig, path)
    final = train(config, progress=False)
    return json.loads((final.parent / "metrics.jsonl").read_text().splitlines()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/trl-parity")
    root = Path(parser.parse_args().workdir)
    root.mkdir(parents=True, exist_ok=True)
    fixtures(root)
    bad = 0
    for kind in ("sft", "dpo"):
        theirs, ours = trl_step(root, kind), dpokit_step(root, kind)
        print(f"{kind}: {'metric':22} {'TRL 1.16':>14} {'dpokit':>14}")
        for key in sorted(set(theirs) & set(ours) - {"epoch", "step", "learning_rate"}):
            a, b = float(theirs[key]), float(ours[key])
            same = math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            bad += not same
            print(f"{kind}: {key:22} {a:14.8g} {b:14.8g}{'' if same else '  DIFFERS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
