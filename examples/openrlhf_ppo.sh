#!/usr/bin/env bash
# OpenRLHF PPO/GRPO with this service as its remote reward model.
# OpenRLHF sends one HTTP request per rollout sample; the server batches them across requests. Each query arrives as
# the policy's chat template rendered it; /get_reward reads it back into the conversation (ChatML, Llama-3, Gemma,
# Mistral or the reward model's own template) and scores that with the reward model's recipe, so a policy from
# another family is read correctly. `extra_logs.reward_read_as_*` (logged by OpenRLHF) says how queries were read.
set -euo pipefail

# 1. Serve the reward model (any supported checkpoint; the default is models/default).
reward-server serve --model models/default --host 127.0.0.1 --port 5000 &
until curl -sf http://127.0.0.1:5000/ready >/dev/null; do sleep 1; done
RM_URL=http://127.0.0.1:5000/get_reward  # several servers: a comma-separated list, round-robined by OpenRLHF

# 2. Point OpenRLHF at it, in the flag spelling of the installed version: 0.11 (2026) renamed every flag
#    (`--remote_rm_url` became `--reward.remote_url`, `--pretrain` became `--actor.model_name_or_path`, ...).
if python -m openrlhf.cli.train_ppo_ray --help 2>/dev/null | grep -q -- "--reward.remote_url"; then
  python -m openrlhf.cli.train_ppo_ray \
    --actor.model_name_or_path "${POLICY:-/path/to/policy}" \
    --reward.remote_url "$RM_URL" \
    --data.prompt_dataset "${PROMPTS:-/path/to/prompts.jsonl}" \
    --data.input_key prompt \
    --data.apply_chat_template \
    --rollout.micro_batch_size 8 \
    --rollout.batch_size 64 \
    --rollout.n_samples_per_prompt 8 \
    --algo.advantage.estimator group_norm \
    --train.max_epochs 1 \
    --ckpt.output_dir ./checkpoints/ppo
else
  python -m openrlhf.cli.train_ppo_ray \
    --pretrain "${POLICY:-/path/to/policy}" \
    --remote_rm_url "$RM_URL" \
    --prompt_data "${PROMPTS:-/path/to/prompts.jsonl}" \
    --input_key prompt \
    --apply_chat_template \
    --micro_rollout_batch_size 8 \
    --rollout_batch_size 64 \
    --n_samples_per_prompt 8 \
    --advantage_estimator group_norm \
    --max_epochs 1 \
    --save_path ./checkpoints/ppo
fi
