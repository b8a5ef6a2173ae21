"""TRL GRPO with this service as the reward function: the one-line switch is `reward_funcs=[RewardFunction(url)]`.
Run it beside the server:

    reward-server serve --model models/default &      # on 127.0.0.1:8000
    python examples/trl_grpo.py /path/to/policy        # any local causal LM (no hub access needed)
"""

from __future__ import annotations

import sys

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from app.clients import RewardFunction

policy = sys.argv[1] if len(sys.argv) > 1 else "/path/to/policy"
prompts = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?"] * 8
dataset = Dataset.from_dict({"prompt": prompts})

trainer = GRPOTrainer(
    model=policy,
    reward_funcs=[RewardFunction(base_url="http://127.0.0.1:8000")],
    args=GRPOConfig(
        output_dir="grpo-out",
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=64,
        max_steps=10,
        logging_steps=1,
        report_to=[],
    ),
    train_dataset=dataset,
)
trainer.train()
