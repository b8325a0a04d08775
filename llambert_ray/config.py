"""One typed config tree for every stage (loaded from YAML and overridden from the CLI by llambert_ray.config_load).

Each stage function takes only its own sub-config (`CorpusConfig`, `AnnotateConfig`, ...); the CLI and the
`jobs/` entrypoints build the same tree, so a laptop run and a cluster job run the same code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the input and the fix."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("lables:"); refuse them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SQL_SCHEMES = ("sqlite", "postgresql", "postgres")


class SqlConfig(_Strict):
    """A table or query of a SQL database (corpus), or the table labels go to (label sink)."""

    url: str = Field(..., description="sqlite:///path/to/file.db (the standard library's sqlite3) or "
                                      "postgresql://USER@HOST:PORT/DBNAME (psycopg); never a password: see "
                                      "password_env")
    password_env: str | None = Field(None, description="name of the environment variable that holds the "
                                                       "password (read where the job starts; never written out)")
    table: str | None = Field(None, description="corpus: read this whole table; label sink: the labels table "
                                                "(created when missing, rows keyed by id)")
    query: str | None = Field(None, description="corpus: a SELECT whose columns include the id and text "
                                                "columns (instead of table)")
    rows_per_shard: int = Field(200_000, gt=0, description="corpus: rows per parallel read task (each task "
                                                           "selects its shard by a hash of the id column)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme.split("+")[0] not in SQL_SCHEMES:
            raise ValueError(f"a database URL starts with sqlite:/// or postgresql://, got scheme "
                             f"{parts.scheme!r}")
        if parts.password is not None:  # the message must not repeat the URL: it holds the password
            raise ValueError("the database URL holds a password; fix: remove it from the URL and put it in an "
                             "environment variable named by password_env (e.g. password_env: "
                             "LLAMBERT_DB_PASSWORD)")
        if parts.scheme == "sqlite" and not parts.path.strip("/"):
            raise ValueError("a SQLite URL names its file: sqlite:///relative/file.db or "
                             "sqlite:////absolute/file.db")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SqlConfig:
        if self.table and self.query:
            raise ValueError("give either table or query, not both")
        return self

    @property
    def dialect(self) -> str:
        return "sqlite" if self.url.startswith("sqlite") else "postgresql"

    def describe(self) -> str:
        """Where, for messages and reports: the URL (it holds no password) and the table or query."""
        what = f"table {self.table}" if self.table else f"query {self.query!r}" if self.query else ""
        return f"{self.url} {what}".strip()


class CorpusConfig(_Strict):
    """Where the corpus is and which columns hold what."""

    path: str | None = Field(None, description="parquet/jsonl/csv file or folder, aclImdb folder or .tar.gz; "
                                               "local path or pyarrow URI (s3://, gs://)")
    sql: SqlConfig | None = Field(None, description="a SQL table or query as the corpus (instead of path)")
    format: Literal["auto", "parquet", "jsonl", "csv", "aclimdb"] = "auto"
    id_column: str | None = Field("id", description="column with unique row ids; null = number the rows")
    text_column: str = "text"
    label_column: str | None = Field("label", description="gold labels, used when present; null = ignore")
    filters: dict[str, list[Any]] = Field(default_factory=dict,
                                          description="keep rows whose column value is in the list, "
                                                      "e.g. {split: [test]}")
    empty_text: Literal["error", "drop"] = Field(
        "error", description="rows whose text is empty or null (a database NULL): error = the read fails naming "
                             "them; drop = they are left out, and counted (label_summary.json: dropped)")
    sample: int | None = Field(None, description="seeded sample of this many rows")
    fraction: float | None = Field(None, description="seeded sample of this fraction of rows")
    seed: int = 0

    @field_validator("sample")
    @classmethod
    def _positive_sample(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"sample must be a positive number of rows, got {v}")
        return v

    @field_validator("fraction")
    @classmethod
    def _fraction_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _one_sampling(self) -> CorpusConfig:
        if self.sample is not None and self.fraction is not None:
            raise ValueError("give either sample (rows) or fraction, not both")
        if self.sql is not None and self.path:
            raise ValueError("give either path (files) or sql (a database), not both")
        if self.sql is not None and not (self.sql.table or self.sql.query):
            raise ValueError("corpus.sql needs a table or a query to read")
        return self

    def describe(self) -> str:
        """The corpus's source for messages: its path, or its database and table / query."""
        return self.sql.describe() if self.sql is not None else repr(self.path)


class EndpointConfig(_Strict):
    """An LLM reached over HTTP at an OpenAI-compatible endpoint (a hosted API, or a vLLM / TGI server or gateway the
    user runs) instead of vLLM engines this product starts: annotate.model is then the model's name there."""

    base_url: str = Field(..., description="the API's root, with /v1: https://api.openai.com/v1, "
                                           "http://my-vllm:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable that holds the API key "
                                                      "(sent as a Bearer token; read where the job runs; never "
                                                      "written out); null: no key (a server of your own)")
    tokenizer: str | None = Field(
        None, description="score mode on a vLLM server: the served model's tokenizer (packaged name, local folder or "
                          "hub id); each label's first answer token is then asked for by id (vLLM's "
                          "logprob_token_ids: exact). null: the answer's top_logprobs are matched to the label words "
                          "by text (any server with logprobs, e.g. OpenAI's chat API)")
    top_logprobs: int = Field(20, gt=0, le=20, description="score mode without tokenizer: alternatives asked per "
                                                           "answer (OpenAI: at most 20 on chat, 5 on completions)")
    concurrency: int = Field(8, gt=0, description="requests in flight at once")
    requests_per_s: float | None = Field(None, gt=0, description="at most this many requests a second (null: no "
                                                                 "limit but concurrency)")
    tokens_per_min: float | None = Field(None, gt=0, description="at most this many tokens a minute (prompt + "
                                                                 "answer, estimated at 4 characters a token before "
                                                                 "the server counts them)")
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one answer")
    retries: int = Field(5, ge=0, description="retries of a request that timed out or got 429 / 5xx / a malformed "
                                              "answer, with exponential backoff (a 429's or 503's Retry-After wins)")
    backoff_s: float = Field(1.0, gt=0, description="the first retry's wait; doubled each retry, capped at 60 s")
    max_failures: int = Field(20, gt=0, description="stop after this many requests in a row fail with every retry "
                                                    "spent (the endpoint is down): the answers so far stay cached")
    usd_per_1k_prompt_tokens: float | None = Field(None, ge=0, description="the endpoint's price (plan, report)")
    usd_per_1k_completion_tokens: float | None = Field(None, ge=0, description="the endpoint's price per 1,000 "
                                                                               "answer tokens")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an endpoint URL starts with http:// or https:// and names a host, got {v!r}")
        if parts.password is not None or parts.username is not None:
            raise ValueError("the endpoint URL holds credentials; fix: remove them and put the API key in an "
                             "environment variable named by api_key_env")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):  # a key pasted here: not repeated
            raise ValueError("api_key_env is the NAME of the environment variable holding the key (e.g. "
                             "OPENAI_API_KEY), not the key itself; fix: export the key under that name")
        return v


class AnnotateConfig(_Strict):
    """The LLM annotation stage (vLLM through ray.data.llm)."""

    model: str = Field("smollm2-135m-instruct",
                       description="packaged name, local HF folder, .gguf file or hub id")
    mode: Literal["generate", "choice", "score"] = Field(
        "score", description="generate: free text then the paper's parse; choice: output constrained to the "
                             "verbalizers; score: compare the verbalizers' first-token log-probabilities")
    prompt_style: Literal["chat", "completion"] | None = Field(
        None, description="chat: system+user via the chat template (the paper's); completion: plain few-shot "
                          "text. null = the task's default for this model")
    shots: int | None = Field(None, ge=0, description="few-shot examples from the task's list; null = the "
                                                       "task's default for this model")
    max_new_tokens: int = Field(10, gt=0, description="generate mode: new tokens per answer (paper: 10)")
    temperature: float = Field(0.0, ge=0)
    shots_from: Literal["fixed", "gold-knn"] = Field(
        "fixed", description="where a row's few-shot examples come from: fixed = the task's first `shots` "
                             "examples; gold-knn = the `shots` gold-labelled corpus rows nearest the row in encoder "
                             "embedding space (balanced across labels where possible, never the row itself)")
    gold_rows: int = Field(100, gt=0, description="gold-knn / calibration gold: gold-labelled rows available (a "
                                                  "seeded sample of the corpus rows with a label; test rows are "
                                                  "never among them)")
    calibration: Literal["none", "content-free", "prior", "gold"] = Field(
        "none", description="score mode: content-free = subtract the label bias the LLM shows on content-free "
                            "inputs ('N/A', '[MASK]', ...) from every row's label log-probabilities; prior = "
                            "shift them so each label's mean probability over the rows matches label_prior (no "
                            "extra LLM calls); gold = per-label offsets fitted to the LLM's scores on the gold rows "
                            "(gold_rows of them, also sent to the LLM)")
    calibration_temperature: bool = Field(False, description="calibration gold: fit a temperature as well as the "
                                                             "offsets (changes confidences, not labels)")
    label_prior: dict[str, float] | None = Field(
        None, description="calibration: prior: expected share of each label in the corpus; null = equal shares")
    max_text_chars: int = Field(6000, gt=0, description="texts are cut to this many characters (fewer prompt "
                                                       "tokens: faster and cheaper annotation)")
    truncate: Literal["head", "head_tail"] = Field(
        "head", description="how a text longer than max_text_chars is cut: head = keep its start; head_tail = "
                            "keep its start and its end, joined by ' ... ' (reviews often end on their verdict)")
    max_model_len: int = Field(2048, gt=0, description="tokens per sequence in the engine")
    batch_size: int = Field(16, gt=0, description="rows per engine call")
    concurrency: int = Field(1, gt=0, description="engine replicas (actors)")
    tensor_parallel_size: int = Field(1, gt=0)
    pipeline_parallel_size: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = gpu when the cluster has GPU nodes up (or another stage asks for GPUs); on an "
                            "autoscaling cluster whose GPU groups start at 0, say gpu")
    accelerator_type: str | None = Field(None, description="GPU engines only: Ray accelerator type the engine's "
                                                           "nodes must have, e.g. A100-80G, H100")
    dtype: str = Field("auto", description="auto = float32 on CPU, bfloat16 on GPU")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPU per engine actor on CPU clusters")
    enable_prefix_caching: bool = True
    block_size: int | None = Field(
        None, gt=0, description="KV cache block (tokens); prefix caching reuses whole blocks only. null = 32 on "
                                "CPU (vLLM's CPU default of 128 is longer than a typical few-shot prefix, so "
                                "nothing would be reused), vLLM's default on GPU")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vLLM as is")
    local_weights_dir: str | None = Field(
        None, description="a model in object storage (model: s3://... / gs://...): the folder on each engine node's "
                          "own disk (its NVMe) it is copied into once per node before vLLM loads it from there; "
                          "null = the HF cache ($HF_HOME), on the cluster manifests the shared volume, where every "
                          "engine node then writes the same files (Ray's download lock is per node) and loads them "
                          "at the volume's throughput (cluster/README.md, Weights)")
    engine_lifetime: Literal["call", "run"] = Field(
        "call", description="run: one engine (a Ray Serve LLM deployment) answers every annotation call of a "
                            "pipeline run (sample, extra rows, test rows, each active round), so the model loads "
                            "once; call: each call starts its own engine actors (Ray Data LLM)")
    endpoint: EndpointConfig | None = Field(
        None, description="the LLM at an OpenAI-compatible endpoint instead of vLLM engines started here (model: "
                          "its name there; the engine settings above do not apply)")
    tokenize_in_engine: bool = Field(
        True, description="the engine tokenizes prompts and detokenizes answers itself (vLLM does either way); "
                          "false = Ray Data does it in two actor pools of their own, which each start a process "
                          "and load the tokenizer per call (bench/fixed_cost.py measures the difference)")


class TrainConfig(_Strict):
    """Fine-tuning the encoder with Ray Train + DeepSpeed."""

    model: str = "minilm-l6"
    variants: list[Literal["gold", "llm", "llm+extra", "combined"]] = Field(
        default_factory=lambda: ["llm"], min_length=1,
        description="the paper's variants to train; the first one labels the corpus")
    epochs: int = Field(2, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, gt=0, description="per-worker micro batch (rows)")
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="after warmup: linear decay to 0 (HF Trainer's default) or constant")
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(256, gt=0, description="tokens per text (paper: 512)")
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(0.9, gt=0)
    use_gpu: bool = False
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool | None = Field(None, description="null = bf16 on GPU, fp32 on CPU")
    seed: int = 0
    min_confidence: float = Field(0.0, ge=0, le=1, description="drop LLM labels below this confidence")
    # soft + weighted: the defaults bench.distill chose (bench/README.md "Distillation"); the stop rule measured even
    targets: Literal["hard", "soft"] = Field(
        "soft", description="what the encoder learns from LLM-labelled rows: hard = the LLM's label; soft = its "
                            "per-label probabilities (score mode; the calibrated confidence on its label), gold "
                            "rows and rows without scores one-hot (llambert_ray/targets.py)")
    soft_temperature: float = Field(1.0, gt=0, description="targets: soft: p ** (1 / T), renormalised (< 1 "
                                                           "sharpens toward the LLM's label)")
    class_balance: Literal["none", "weighted"] = Field(
        "weighted", description="weighted: each label's loss weighted n / (labels x its rows), so a skewed label set "
                            "does not collapse the encoder onto its majority label")
    stop_rule: Literal["none", "agreement"] = Field(
        "none", description="agreement: a seeded slice of the training rows (stop_holdout of them) is kept apart; "
                            "after each epoch the encoder's macro F1 against those rows' labels (the LLM's, for LLM "
                            "labels: no gold needed) is measured, and the epoch that agrees best is the model kept "
                            "(the curve is in the training history); none: the last epoch")
    stop_holdout: float = Field(0.1, gt=0, lt=0.5, description="stop_rule agreement: share of the training rows "
                                                               "kept apart to choose the epoch")
    label_issues: Literal["keep", "drop", "relabel"] = Field(
        "keep", description="LLM labels flagged as likely wrong (cleanlab on cross-validated probe probabilities "
                            "over frozen encoder embeddings): keep them, drop them (those rows still train the "
                            "gold-label variants), or relabel them with the probe's label before training")
    label_issue_folds: int = Field(5, ge=2, description="cross-validation folds for the label-issue probe")
    max_failures: int = Field(2, ge=-1, description="worker failures to recover from (from the last checkpoint)")
    keep_checkpoints: bool = Field(False, description="keep Ray Train's per-epoch checkpoints once the model folder "
                                                      "is written (they are deleted by default: ~5x the model's size)")


class LabelConfig(_Strict):
    """Labelling the whole corpus with the trained encoder."""

    batch_size: int = Field(64, gt=0)
    max_length: int = Field(256, gt=0)
    concurrency: int = Field(1, gt=0, description="classifier actors (the pool's minimum with max_concurrency)")
    max_concurrency: int | None = Field(None, gt=0, description="autoscale the actor pool from concurrency up to "
                                                                "this many actors while rows wait; null = fixed")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    sub_batch_size: int = Field(32, gt=0, description="rows per forward pass, length-sorted within a batch "
                                "(CPU: 32; GPU: 128-256)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    sql: SqlConfig | None = Field(None, description="`llambert label`: write the labels to this database table "
                                                    "(rows keyed by id: a rerun replaces them) instead of parquet")
    via: Literal["actors", "serve"] = Field(
        "actors", description="actors: a classifier actor pool of this job; serve: through the running Ray Serve "
                              "application label.serve_app (`llambert serve`): one deployed model for online "
                              "requests and the backlog, scaled by Serve's autoscaler")
    serve_app: str = Field("llambert", description="via serve: the Serve application's name")
    incremental: bool = Field(False, description="with a labels table (label.sql / --output DB_URL): label only the "
                              "rows it has no label for from this model (the model folder's fingerprint), whose "
                              "text changed since (a hash of it), or that failed; keep the rest")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: the encoder's Linear layers dynamically quantized on CPU actors (~1.8-2x rows/s, "
                            "accuracy within half a point on IMDb; bench/quantize.py); GPU actors keep dtype")


class SelectConfig(_Strict):
    """Which rows the LLM labels: the seeded random sample (the paper) or active selection in rounds."""

    strategy: Literal["random", "active"] = Field(
        "random", description="active: rounds of uncertainty + diversity selection by a probe on encoder "
                              "embeddings; the budget is corpus.sample either way")
    rounds: int = Field(4, ge=1, description="active: LLM rounds (each pays an engine start-up, unless "
                                             "annotate.engine_lifetime is run)")
    seed_rows: int | None = Field(None, gt=0, description="active: rows of the random first round; "
                                                           "null = budget / rounds")
    diversity: bool = Field(False, description="spread each round over embedding space (farthest-point among the 4x "
                                               "most uncertain); on IMDb plain uncertainty did better")
    confidence_weighted: bool = Field(True, description="weight the probe's rows by the LLM's confidence")
    pool_rows: int | None = Field(None, gt=0, description="candidate pool: a seeded sample of the corpus of "
                                                          "this many rows; null = the whole corpus")
    model: str | None = Field(None, description="encoder for the embeddings; null = train.model")
    max_length: int = Field(128, gt=0, description="tokens per text for the embeddings")
    embed_batch_size: int = Field(256, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)


class EvaluateConfig(_Strict):
    """The paper's comparison on the gold test split, and the aims the report checks (met / not met)."""

    llm_test_sample: int | None = Field(
        None, gt=0, description="the LLM also labels a seeded sample of this many test rows, in the same engine "
                                "call as the annotated rows, so it is scored on the same rows as the encoders; "
                                "null = the LLM is scored on its annotated rows only")
    aim_llm_gap_points: float = Field(2.0, ge=0, description="aim: the encoder trained on LLM labels is at most "
                                                             "this many points below the LLM on the same test rows")
    aim_speedup: float = Field(20.0, gt=0, description="aim: the encoder labels this many times the LLM's rows/s")
    aim_wall_minutes: float | None = Field(None, gt=0, description="aim: the whole run takes at most this long")


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    max_batch_size: int = Field(32, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0)
    max_texts_per_request: int = Field(256, gt=0)
    max_chars_per_text: int = Field(20000, gt=0)
    max_length: int = Field(256, gt=0, description="tokens per text")
    cpus_per_replica: float = Field(1.0, gt=0)
    threads_per_replica: int | None = Field(None, gt=0, description="torch threads; null = torch's default")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica (a fraction shares one); 0 = CPU")
    quantize: Literal["none", "int8"] = Field("none", description="int8: quantized Linear layers on CPU replicas "
                                                                  "(as label.quantize); GPU replicas keep bf16")


class ClusterConfig(_Strict):
    address: str | None = Field(None, description="Ray address; null = start a local Ray")
    num_cpus: int | None = Field(None, description="local Ray only: CPUs to give it")
    manifest: str | None = Field(None, description="the RayCluster manifest (KubeRay) or cluster-launcher YAML the "
                                 "cluster was made from: preflight checks the stages against its node groups where "
                                 "the autoscaler's own config cannot be read (KubeRay runs it in a sidecar)")


class RunConfig(_Strict):
    """The whole tree: one YAML file."""

    name: str = "run"
    output_dir: str = "runs"
    task: str = Field("imdb-sentiment", description="task preset name or path to a task YAML")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    test: CorpusConfig | None = Field(None, description="gold-labelled evaluation split")
    extra: CorpusConfig | None = Field(None, description="unlabelled extra rows for the llm+extra variant")
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _replicas(self) -> RunConfig:
        if self.serve.max_replicas < self.serve.min_replicas:
            raise ValueError("serve.max_replicas must be >= serve.min_replicas")
        if self.select.strategy == "active" and self.corpus.sample is None:
            raise ValueError("select.strategy active spends corpus.sample LLM calls, but corpus.sample is not set; "
                             "fix: set corpus.sample (the LLM budget in rows)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def config_hash(section: BaseModel | dict[str, Any], *extra: Any) -> str:
    """A short stable hash of a (sub-)config plus anything else the output depends on."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    blob = json.dumps([data, *extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
