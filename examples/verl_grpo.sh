#!/usr/bin/env bash
# verl GRPO with this service as the reward model. verl has no setting for an external reward model (its reward loop
# starts its own vLLM/SGLang replicas); it reaches a running server through one of these, both in app/clients/verl.py,
# both sending the conversation (prompt messages + decoded reply) so the reward model's own template is used:
#   MODE=manager  (default) a reward-loop manager reading each sample's raw_prompt messages;
#   MODE=function a custom reward function; the prompt comes from extra_info (`raw_prompt`, or `question`).
# The verl host needs this package's client installed: `pip install --no-deps -e /path/to/reward-server` (httpx).
set -euo pipefail

reward-server serve --model models/default --host 127.0.0.1 --port 8000 &
until curl -sf http://127.0.0.1:8000/ready >/dev/null; do sleep 1; done
RM_URL=http://127.0.0.1:8000

if [ "${MODE:-manager}" = manager ]; then
  REWARD=(
    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://app.clients.verl
    reward.reward_manager.name=ServerRewardManager
    "+reward.reward_kwargs.url=$RM_URL"
    +reward.reward_kwargs.timeout_s=180
    data.return_raw_chat=True
  )
else
  REWARD=(
    reward.custom_reward_function.path=pkg://app.clients.verl
    reward.custom_reward_function.name=compute_score
    "+reward.custom_reward_function.reward_kwargs.url=$RM_URL"
    +reward.custom_reward_function.reward_kwargs.prompt_key=question
  )
fi

python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  data.train_files="${TRAIN:-$HOME/data/gsm8k/train.parquet}" \
  data.val_files="${VAL:-$HOME/data/gsm8k/test.parquet}" \
  data.train_batch_size=64 \
  data.max_prompt_length=512 \
  data.max_response_length=512 \
  actor_rollout_ref.model.path="${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}" \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=8 \
  reward.reward_model.enable=False \
  "${REWARD[@]}" \
  trainer.n_gpus_per_node=1 \
  trainer.nnodes=1 \
  trainer.total_epochs=1 \
  trainer.logger=console
