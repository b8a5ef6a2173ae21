"""The one settings object: every knob of the service, each also read from a `REWARD_*` environment variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DType = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    """Model knobs first, then batching, then limits, then the HTTP server."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_",
        extra="ignore",
        protected_namespaces=(),
        allow_inf_nan=False,  # NaN/inf: refused
    )

    # --- model -------------------------------------------------------------------------------------
    models_file: Path | None = Field(
        None,
        description="A TOML (or YAML) file naming several models and ensembles to serve (see the README's Several "
        "models); unset: the one model at model_path.",
    )
    model_path: Path = Field(Path("models/default"), description="Checkpoint directory to serve.")
    served_model_name: str | None = Field(
        None, description="The model id `/v1/models` and `/classify` report (vLLM's --served-model-name); default: path"
    )
    device: str = Field("auto", description="`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`...")
    device_map: str | None = Field(
        None,
        description="A transformers device map (`auto`, `balanced`) that spreads a model too large for one GPU over "
        "several; unset: the whole model on `device`.",
    )
    dtype: DType = Field(
        "auto",
        description="`auto` picks bfloat16 on GPUs and on CPUs with AMX/AVX512-BF16, else float32. "
        "bfloat16 moves rewards by about 1% and is ~4x faster where the CPU has AMX.",
    )
    max_length: int | None = Field(
        None, ge=8, description="Override the recipe's max tokens per item; longer items lose the left of the prompt."
    )
    head_index: int | None = Field(
        None,
        ge=0,
        description="Which output of a multi-output head is the reward (a head with several is refused without "
        "this or attribute_weights).",
    )
    attribute_weights: dict[str, float] | None = Field(
        None,
        description="A multi-attribute head's reward as a weighted sum, JSON label -> weight (labels from id2label "
        'or the manifest), e.g. `{"helpfulness": 0.65, "correctness": 0.8}`; default: the manifest\'s weights.',
    )
    steps: dict[str, Any] | None = Field(
        None,
        description="A process reward model's step rule, JSON, over its manifest's (README: Process reward "
        'models), e.g. math-shepherd\'s `{"tag": " ки", "joiner": "\\n", "split": "\\n", "read": "softmax", '
        '"logits": ["+", "-"]}`.',
    )
    trust_remote_code: bool = Field(
        False, description="Allow checkpoint code to run (off: only built-in architectures)."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where packaged backbones are converted once and kernel measurements are kept, so a second start "
        "skips both (default ~/.cache/reward-server).",
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores.")

    normalize: bool = Field(
        False,
        description="Report (reward - mean) / std on /score, /rank and /get_reward (/compare stays raw). mean/std "
        "come from REWARD_REWARD_MEAN/STD, else from the checkpoint (OpenRLHF's config.json, our manifest).",
    )
    reward_mean: float | None = Field(
        None, ge=-1e6, le=1e6, description="Normalization mean (overrides the checkpoint's)."
    )
    reward_std: float | None = Field(
        None,
        ge=1e-6,
        le=1e6,
        description="Normalization std (overrides the checkpoint's); below 1e-6 it would blow rounding noise up to "
        "rewards (and overflow /rank).",
    )

    # --- batching ----------------------------------------------------------------------------------
    max_batch_tokens: int = Field(
        16384,
        ge=64,
        description="Tokens per forward: packed (decoders), the items' own tokens with each shared prompt once; "
        "padded (encoders), items x longest. Bounds activation memory.",
    )
    max_batch_size: int = Field(64, ge=1, description="Items per forward pass, whatever their length.")
    batch_invariant: bool = Field(
        True,
        description="Decoder models read at the last token: each item's reward is a function of the item alone, "
        "bitwise, whatever its batch, order or neighbours (attention per item; each linear's rows in calls whose "
        "shape is measured at start-up not to move them). Off: stock linears, and in bf16 a reward moves with its "
        "batch.",
    )
    block_rows: int = Field(
        0,
        ge=0,
        description="Batch-invariant mode: 0 measures each linear shape at start-up and runs one call per linear "
        "where the kernel allows it (else 512-row blocks on CPU, 1024 on GPUs); N forces fixed N-row blocks. Part of "
        "the fingerprint.",
    )

    # --- limits ------------------------------------------------------------------------------------
    max_items_per_request: int = Field(1024, ge=1, description="Larger requests get 413; clients split them.")
    max_queue_items: int = Field(
        8192, ge=1, description="Items waiting for the model; past it new requests get 429 at once (backpressure)."
    )
    retry_after_seconds: int = Field(1, ge=0, description="`Retry-After` sent with 429 and 503.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Larger request bodies get 413 unread.")
    max_text_chars: int = Field(
        200_000, ge=1, description="Per prompt, response or message; longer gets 422 (truncation handles tokens)."
    )
    max_messages: int = Field(
        256, ge=1, description="Messages per conversation (or turns of an HH transcript prompt); more gets 422."
    )
    max_probability_group: int = Field(
        64,
        ge=1,
        description="/rank's `probabilities` matrix only for groups up to this size (it grows with the square of a "
        "group); larger gets 422.",
    )
    tokenize_chunk_chars: int = Field(
        1_000_000,
        ge=1000,
        description="Characters tokenized at once (a request is tokenized in chunks of this size): bounds the "
        "tokenizer's memory per request, about 25 bytes per character.",
    )
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Deadline per request (504 after it); a request may ask for another with the "
        "`X-Request-Timeout` header (seconds), up to max_request_timeout_s.",
    )
    max_request_timeout_s: float = Field(900.0, gt=0, description="Upper bound for `X-Request-Timeout`.")

    # --- security ----------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Bearer keys; when set, every route but /health and /ready needs one (401).",
    )
    protect_metrics: bool = Field(True, description="With api_keys, /metrics needs a key too.")
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Bearer keys for /admin (load, unload, aliases); unset: the admin API is off.",
    )

    # --- server ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address; the container sets 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request headers have not all arrived after this is closed."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body not fully arrived after this gets 408 (and the connection closes)."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Request line and headers, in bytes; more gets 431 and the connection closes."
    )
    max_headers: int = Field(100, ge=8, description="Headers per request; more gets 431 and the connection closes.")
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open connections; past it a new one gets 503 and is closed at once (keep it under the "
        "process's file-descriptor limit).",
    )
    graceful_shutdown_s: float = Field(
        120.0,
        gt=0,
        description="On SIGTERM: how long admitted requests may take to finish before they are cancelled "
        "(orchestrators' grace period must be longer).",
    )
    keep_alive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="Idle keep-alive connections close after this; longer than clients' pool expiry "
        "(httpx: 5 s) so a client never sends on a connection the server is closing.",
    )
    log_level: str = Field("info", description="Python log level name.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: one object per line, with request ids (for log collectors); text: plain lines; auto: text "
        "on a terminal, json otherwise (a container, a pipe).",
    )

    # --- reward-hacking monitor (README: Watching for reward hacking) -----------------------------------
    monitor: bool = Field(True, description="Keep per-run signals of the scored traffic (/monitor, warnings).")
    monitor_window: int = Field(
        256, ge=8, description="Items per monitor window: each closes with its signals; smaller reacts sooner, noisier."
    )
    monitor_runs: int = Field(
        64, ge=1, description="Runs tracked at once; the least recently scored is dropped (bounds memory and metrics)."
    )
    monitor_baseline: int = Field(
        2, ge=1, description="A run's first windows that are its baseline: warnings fire on change from them."
    )

    # --- ray serve (`reward-server serve --ray`) -------------------------------------------------------
    ray_address: str | None = Field(
        None, description="Ray cluster to join (`auto`, `ray://head:10001`); unset: start a local one."
    )
    ray_replicas: int = Field(1, ge=1, description="Replicas, each a whole server (model, batcher) on its own.")
    ray_max_replicas: int | None = Field(
        None, ge=1, description="Set to autoscale between ray_replicas and this on requests in flight per replica."
    )
    ray_target_ongoing_requests: float = Field(
        32.0, gt=0, description="Autoscaling target: requests in flight per replica (trainers send many small ones)."
    )
    ray_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica; its torch threads follow it.")
    ray_num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share one GPU).")
    ray_max_ongoing_requests: int = Field(
        1024,
        ge=1,
        description="Requests one replica takes at once: high, so its batcher sees whole GRPO storms; the replica's "
        "own max_queue_items still answers 429 past its capacity.",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        if self.ray_max_replicas is not None and self.ray_max_replicas < self.ray_replicas:
            raise ValueError(f"ray_max_replicas ({self.ray_max_replicas}) is below ray_replicas ({self.ray_replicas})")
        return self


@lru_cache
def get_settings() -> Settings:
    """Read once per process; tests build their own `Settings` instead."""
    return Settings()


def settings_table() -> str:
    """The README's settings table, generated here so the two cannot drift (`python -m app.settings` prints it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        shown = (
            "unset"
            if default is None or default == []
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `REWARD_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
