#!/usr/bin/env bash
# OpenRLHF PPO/GRPO with this service as its remote reward model.
# OpenRLHF sends one HTTP request per rollout sample; the server batches them across requests.
set -euo pipefail

# 1. Serve the reward model (any supported checkpoint; the default is models/default).
reward-server serve --model models/default --host 127.0.0.1 --port 5000 &
until curl -sf http://127.0.0.1:5000/ready >/dev/null; do sleep 1; done

# 2. Point OpenRLHF at it: --remote_rm_url replaces --reward_pretrain. With --apply_chat_template the query arrives
#    templated; the server splits the prompt off when it is plain text, else scores the query as the raw sequence.
python -m openrlhf.cli.train_ppo_ray \
  --pretrain "${POLICY:-/path/to/policy}" \
  --remote_rm_url http://127.0.0.1:5000/get_reward \
  --prompt_data "${PROMPTS:-/path/to/prompts.jsonl}" \
  --input_key prompt \
  --apply_chat_template \
  --micro_rollout_batch_size 8 \
  --rollout_batch_size 64 \
  --n_samples_per_prompt 8 \
  --max_epochs 1 \
  --save_path ./checkpoints/ppo
