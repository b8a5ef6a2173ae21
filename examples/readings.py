"""How the default model reads what each trainer sends: OpenRLHF queries rendered by other policies' chat templates
(`/get_reward`), and verl's discriminative request (`/classify`), each beside `/score` of the same conversation.

    python examples/readings.py        # in-process, the default model; prints one line per case
"""

from __future__ import annotations

import asyncio
import copy

import httpx
from asgi_lifespan import LifespanManager

from app.model.export import recipe_template
from app.server.main import create_app
from app.settings import Settings

USER, REPLY = "What is the capital of France?", "The capital of France is Paris."
QWEN = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ASK = [{"role": "user", "content": USER}]
QUERIES = {  # as OpenRLHF 0.11 sends them: the policy's rendering, its EOS, special tokens kept
    "Qwen policy (ChatML, its system prompt)": (
        f"<|im_start|>system\n{QWEN}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
        f"{REPLY}<|im_end|>",
        [{"role": "system", "content": QWEN}, *ASK],
    ),
    "Llama-3 policy": (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{USER}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{REPLY}<|eot_id|>",
        ASK,
    ),
    "Gemma policy": (
        f"<bos><start_of_turn>user\n{USER}<end_of_turn>\n<start_of_turn>model\n{REPLY}<end_of_turn>\n",
        ASK,
    ),
}


async def main() -> None:
    app = create_app(Settings(model_path="models/default"))
    async with LifespanManager(app, startup_timeout=600) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local", timeout=120) as client:

            async def score(messages: list[dict[str, str]]) -> float:
                item = {"messages": [*messages, {"role": "assistant", "content": REPLY}]}
                return float((await client.post("/score", json={"items": [item]})).json()["rewards"][0])

            async def classify(text: str, **options: object) -> float:
                body = {"model": "rm", "input": text, "use_activation": False, **options}
                return float((await client.post("/classify", json=body)).json()["data"][-1]["probs"][-1])

            for name, (query, messages) in QUERIES.items():
                read = (await client.post("/get_reward", json={"query": [query]})).json()
                raw = await classify(query, add_special_tokens=False)
                print(
                    f"{name}: /get_reward {read['rewards'][0]:+.4f} (read as {read['read_as'][0]}), "
                    f"/score of the conversation {await score(messages):+.4f}, the query scored raw {raw:+.4f}"
                )
            encoder = app.state.worker.model.encoder
            tokenizer = copy.deepcopy(encoder.tokenizer)  # the tokenizer `reward-server export` writes, verl loads
            tokenizer.chat_template = recipe_template(tokenizer.chat_template, encoder.recipe)
            text = tokenizer.apply_chat_template([*ASK, {"role": "assistant", "content": REPLY}], tokenize=False)
            text = text.removeprefix(tokenizer.bos_token or "")  # verl strips the BOS
            print(
                f"verl's discriminative request: /classify {await classify(text):+.4f}, /score {await score(ASK):+.4f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
