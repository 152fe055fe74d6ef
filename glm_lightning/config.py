"""Typed experiment configuration: the schema every YAML file and command-line override is checked against.

The sections mirror the parts of a run (model, tokenizer, data, optimizer, trainer, logging). Defaults
follow the official GLM pretraining setup (GLM-Base/Large scripts) so a config only states what differs.
This module imports nothing but the standard library, OmegaConf and ``glm_lightning.errors``, so the
library and the command line can both use it without pulling in Lightning. ``ConfigError`` lives in
``glm_lightning.errors`` (and is importable from here) so that the model can raise it without OmegaConf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from glm_lightning.errors import ConfigError

# Presets understood by glm_lightning.model.GLMConfig.from_name.
MODEL_NAMES = (
    "glm-base",
    "glm-large",
    "glm-roberta-large",
    "glm-410m",
    "glm-515m",
    "glm-2b",
    "glm-10b",
    "tiny",
)

# Every string field with a fixed set of values, by dotted key. The YAML files keep plain strings;
# `validate` reports anything else together with the valid choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": MODEL_NAMES,
    "tokenizer.kind": ("sentencepiece", "wordpiece", "gpt2", "roberta"),
    "tokenizer.model_type": ("unigram", "bpe"),
    "optim.lr_decay_style": ("cosine", "linear", "constant"),
    "trainer.strategy": ("auto", "ddp", "fsdp", "fsdp1"),
    "trainer.checkpoint_format": ("full", "sharded"),
    "trainer.precision": ("32-true", "bf16-mixed", "16-mixed", "bf16-true"),
    "model.attention": ("auto", "sdpa", "flex"),
    "generation.strategy": ("greedy", "sample", "beam"),
    "lm_eval.protocol": ("wikitext", "language_model", "lambada"),
    "lm_eval.documents": ("auto", "stream", "lines"),
    "harness.dtype": ("float32", "bfloat16", "float16"),
}

# generation.compile is a bool or "auto" (the command line reads true/false as bools).
GENERATION_COMPILE = ("auto", "true", "false")

# SuperGLUE tasks in Table-1 order, by their official folder names; config keys use lower case.
SUPERGLUE_TASKS = ("ReCoRD", "COPA", "WSC", "RTE", "BoolQ", "WiC", "CB", "MultiRC")
CHOICES["superglue.head"] = ("cloze", "classifier")
CHOICES["superglue.tasks.wsc.mode"] = ("auto", "generative", "candidates")
for _task in SUPERGLUE_TASKS:
    CHOICES[f"superglue.tasks.{_task.lower()}.loss_func"] = ("cross_entropy", "mix", "generative")

# Fields of ModelConfig that are passed to GLMConfig.from_name as overrides of the preset.
MODEL_OVERRIDE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "max_sequence_length",
    "embedding_dropout_prob",
    "attention_dropout_prob",
    "output_dropout_prob",
    "block_position_encoding",
    "attention",
    "compile",
)


@dataclass
class ModelConfig:
    name: str = "tiny"  # GLMConfig preset
    # Overrides of the preset; None keeps the preset's value.
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None  # FFN inner size (4 x hidden in all released models)
    max_sequence_length: int | None = None  # rows of each position table (plus one)
    embedding_dropout_prob: float | None = None
    attention_dropout_prob: float | None = None
    output_dropout_prob: float | None = None
    block_position_encoding: bool = True  # second (intra-span) position table; off for the ablation
    attention: str = "auto"  # sdpa, flex (FlexAttention; training needs CUDA) or auto (flex on CUDA)
    compile: bool = False  # torch.compile every transformer layer (dynamic shapes)
    # Recompute each layer's activations in the backward pass: memory for one layer's activations
    # instead of all of them, for about a third more compute (every strategy, fsdp included)
    activation_checkpointing: bool = False
    checkpoint_activations: bool | None = None  # former name of activation_checkpointing; wins when set
    init_from: str | None = None  # checkpoint to start from (official GLM, Hugging Face or ours)


@dataclass
class TokenizerConfig:
    # sentencepiece (ours or the GLM Chinese model), wordpiece (BERT vocab.txt: GLM-Base/Large/
    # 410M/515M), gpt2 or roberta (vocab.json + merges.txt: GLM-2B/10B, GLM-RoBERTa)
    kind: str = "sentencepiece"
    path: str | None = None  # .model / vocab.txt / vocab.json; None trains a sentencepiece model
    merges: str | None = None  # merges.txt of the gpt2 and roberta vocabularies
    vocab_size: int = 8000  # number of pieces when training a sentencepiece model
    # the algorithm of a trained sentencepiece model: unigram (the GLM Chinese model's) or bpe, which
    # on a small corpus reaches vocab_size with whole words where unigram stops short in subwords
    model_type: str = "unigram"


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # files, globs, folders; empty = built-in corpus
    # one weight per train_files entry: each entry is a source, sampled in these proportions
    train_weights: list[float] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)  # empty = split off val_fraction of the documents
    val_fraction: float = 0.01  # fraction of documents held out when val_files is empty
    # held-out infilling probes scored after pretraining (jsonl of relation, text with one [MASK],
    # answer); None = the built-in world's probes when training on the built-in corpus, else none
    probe_file: str | None = None
    cache_dir: str = ".cache/glm-lightning"  # tokenized shards and trained tokenizers
    num_proc: int | None = None  # processes tokenizing the corpus; None = the number of cores
    rehash: bool = False  # hash every corpus file again (else trusted while size and mtime match)
    seq_length: int = 512  # tokens per packed pretraining sample
    batch_size: int = 16  # micro-batch per device
    num_workers: int = 2  # DataLoader worker processes
    # Blank infilling: each micro-batch draws one objective with these probabilities (they sum to 1).
    span_prob: float = 1.0  # token-level spans (the GLM objective)
    sentence_prob: float = 0.0  # whole sentences (GLM_Sent)
    document_prob: float = 0.0  # one long span at the end of the document (GLM_Doc)
    mask_ratio: float = 0.15  # fraction of tokens masked by the span/sentence objectives
    poisson_lambda: float = 3.0  # mean span length
    max_span_length: int = 40  # span lengths are drawn from 1 .. max_span_length - 1
    shuffle_spans: bool = True  # random Part-B span order (ablation: off)
    block_positions: bool = True  # emit intra-span positions (ablation: 2D positions off)
    sentinel_tokens: bool = False  # distinct T5-style sentinels instead of one [MASK] (ablation)
    masked_lm: bool = False  # BERT-style masked LM baseline: no Part B
    task_masks: bool = False  # [sMASK] / [gMASK] for the sentence / document objectives
    whole_word_spans: bool = False  # spans cover whole words; lengths and mask_ratio count words
    single_span_prob: float = 0.0  # micro-batches with one span per sample (official --single-span-prob)
    gpt_infill_prob: float = 0.5  # document objective: probability that the span is the suffix
    gpt_min_ratio: float = 0.5  # document objective: minimum fraction of the text to generate
    dir: str | None = None  # seq2seq: a folder with train/val(/test).jsonl of {"source", "target"}
    superglue_dir: str | None = None  # SuperGLUE: <dir>/<Task>/{train,val,test}.jsonl; None = download
    wsc_negatives: str | None = None  # WSC files with negative candidates: <dir>/WSC/{train,val,test}.jsonl
    fewglue_dir: str | None = None  # few-shot SuperGLUE: train on <dir>/<Task>/train.jsonl (FewGLUE)


@dataclass
class GenerationConfig:
    """Decoding for exp=generate, seq2seq validation and test predictions (paper §3.3)."""

    strategy: str = "greedy"
    max_new_tokens: int = 32
    num_beams: int = 1  # beam search width (strategy=beam)
    length_penalty: float = 1.0  # hypothesis score = sum log p / length ** length_penalty
    min_length: int = 0  # no [eop] before this many tokens
    no_repeat_ngram_size: int = 0  # 0 = allow repeats
    temperature: float = 1.0  # strategy=sample
    top_k: int = 0  # strategy=sample; 0 = no top-k filter
    top_p: float = 1.0  # strategy=sample; 1 = no nucleus filter
    # torch.compile the one-token step (CUDA graphs on GPUs): auto = on CUDA only, true, false
    compile: Any = "auto"


@dataclass
class Seq2SeqConfig:
    """Seq2seq finetuning (paper §3.3): [CLS] [MASK] " Content:" source | [sop] target [eop]."""

    src_length: int = 464  # source tokens incl. [CLS], mask and prompt (official CNN/DM: 608)
    tgt_length: int = 48  # target tokens incl. [eop] (official CNN/DM: 160)
    label_smoothing: float = 0.1
    task_mask: bool = False  # [sMASK] instead of [MASK] (models pretrained with task masks)
    prompt: str = " Content:"  # text between the mask and the source


@dataclass
class LMEvalConfig:
    """Zero-shot language modelling (paper §3.3; official `tasks/language_model/`) on ``file``."""

    # The released script whose conventions are followed (glm_lightning.lm_eval.PROTOCOLS):
    # wikitext (perplexity, zero_wikitext.sh), language_model (perplexity, zero_lm.sh),
    # lambada (last-word accuracy of jsonl {"text"}, zero_lambada.sh).
    protocol: str = "wikitext"
    file: str | None = None  # text, or jsonl whose "text" fields are read
    documents: str = "auto"  # stream: the file is one document; lines: each line is one; auto: the protocol's
    unidirectional: bool = False  # only the first token in Part A (else bidirectional context)
    max_length: int | None = None  # text tokens per window; None = the released 511, or the model's limit
    stride: int = 256  # tokens predicted per window after the first (official --overlapping-eval)


@dataclass
class HarnessConfig:
    """exp=harness: lm-evaluation-harness tasks on a checkpoint (``glm_lightning.harness``); the
    rolling perplexity follows ``lm_eval.max_length`` / ``lm_eval.stride``, the blank ``data.task_masks``."""

    # tasks of experiments/harness_tasks (glm_copa, glm_perplexity, glm_lambada), of include_path, or
    # with builtin_tasks the harness's own
    tasks: list[str] = field(default_factory=lambda: ["glm_copa", "glm_perplexity", "glm_lambada"])
    data_files: dict[str, str] = field(default_factory=dict)  # task -> the file it reads, not its YAML's
    include_path: list[str] = field(default_factory=list)  # more folders of task YAMLs
    builtin_tasks: bool = False  # also index the harness's own tasks (slower start; they may download data)
    limit: int | None = None  # examples per task; None = all
    num_fewshot: int | None = None  # None = each task's own
    max_gen_toks: int = 256  # generate_until: tokens per answer unless the task says otherwise
    bootstrap_iters: int = 1000  # resamples for the stderr of non-mean metrics; 0 = none
    dtype: str = "float32"  # precision the model runs in


@dataclass
class SuperGLUETaskConfig:
    """Finetuning settings of one SuperGLUE task; superglue.yaml sets the released ones (official
    `config_tasks/task_*.sh`)."""

    max_seq_length: int = 256  # tokens per candidate row
    batch_size: int = 16  # global batch (micro-batches x devices x accumulation)
    epochs: int = 50  # validation on the dev set after each; the best epoch is kept
    pattern_id: int = 0  # cloze pattern (glm_lightning.cloze.patterns)
    loss_func: str = "cross_entropy"  # cross_entropy, mix (WSC), generative
    length_penalty: float = 0.0  # multi-token score / #targets ** length_penalty (WSC: 1)


@dataclass
class WSCTaskConfig(SuperGLUETaskConfig):
    """WSC also chooses its formulation: ``candidates`` scores span1_text against negative
    candidates (needs files that carry them, the official ``--wsc-negative``); ``generative``
    trains the LM on span1_text and predicts True iff greedy decoding reproduces it (the official
    path without negatives); ``auto`` picks candidates iff the training file has any. A null
    ``pattern_id`` is the released pattern of the mode (``WSC_PATTERNS``)."""

    pattern_id: int | None = None
    mode: str = "auto"


# Released WSC patterns by mode: config_tasks/task_wsc.sh passes --pattern-id 2;
# config_tasks/task_wsc_generative.sh passes none, so the argparse default 0 applies.
WSC_PATTERNS = {"candidates": 2, "generative": 0}


def task_pattern_id(task_config: SuperGLUETaskConfig | DictConfig, wsc_mode: str = "candidates") -> int:
    """The cloze pattern of a task: ``pattern_id``, or for WSC left null the released one of ``wsc_mode``."""
    if task_config.pattern_id is None:
        return WSC_PATTERNS[wsc_mode]
    return task_config.pattern_id


@dataclass
class SuperGLUETasksConfig:
    """Per-task settings, keyed by the lower-cased official task name (superglue.tasks.rte.epochs=3)."""

    record: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    copa: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    wsc: WSCTaskConfig = field(default_factory=WSCTaskConfig)
    rte: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    boolq: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    wic: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    cb: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)
    multirc: SuperGLUETaskConfig = field(default_factory=SuperGLUETaskConfig)


@dataclass
class SuperGLUEConfig:
    """SuperGLUE finetuning (paper §2.3, §3.2): data source, head and the per-task settings."""

    head: str = "cloze"  # cloze (GLM) or classifier ([CLS] head, the ablation baseline)
    micro_batch_size: int | None = None  # per device; None = the whole global batch at once
    eval_batch_size: int = 16
    # The official archive, fetched into data.cache_dir when data.superglue_dir is unset.
    url: str = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/combined.zip"
    sha256: str | None = None  # expected digest of the archive; None = not checked
    test_predictions: bool = True  # write the leaderboard files (<Task>.jsonl) from the test splits
    # COPA, WSC, ReCoRD: run each example's Part A once and every candidate's Part B against it
    # (false: one full row per candidate, the official layout; the scores are the same)
    shared_context: bool = True
    # Every task's epochs are multiplied by this (at least one epoch): 0.1 gives a quick run
    epochs_scale: float = 1.0
    tasks: SuperGLUETasksConfig = field(default_factory=SuperGLUETasksConfig)


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled (AdamW); none on biases and LayerNorm
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup: float = 0.05  # warmup steps as a fraction of lr_decay_iters
    lr_decay_style: str = "cosine"  # shape after warmup
    lr_decay_iters: int | None = None  # steps over which the lr decays; None = trainer.max_steps
    lr_decay_ratio: float = 0.05  # final lr as a fraction of the peak
    clip_grad: float = 1.0  # gradient-norm clipping; 0 disables


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    accelerator: str = "auto"  # Lightning accelerator (auto, cpu, gpu, ...)
    devices: Any = "auto"  # Lightning devices: "auto", a count or a list of indices
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp, fsdp (FSDP2, CPU or GPU), fsdp1 (FSDPStrategy, GPU only)
    checkpoint_format: str = "full"  # full: one file gathered on rank 0; sharded: a folder of per-rank shards
    # ddp/fsdp: a collective that waits this long for a rank fails (a lost node; see docs/slurm.md)
    collective_timeout_s: int = 600
    # Lightning precision: 32-true, bf16-mixed or 16-mixed (fp32 weights, autocast), bf16-true (bf16
    # weights and optimizer state); losses and log-softmax are computed in fp32 under all of them
    precision: str = "32-true"
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    val_check_interval: int = 200  # validate every this many training batches
    limit_val_batches: int = 20  # validation batches per check
    log_every_n_steps: int = 10
    # torch threads of each process; null = the cores free when the run starts (experiments.threads)
    threads: int | None = None


@dataclass
class LoggingConfig:
    tracking_uri: str | None = None  # MLflow store; None = a sqlite database under output_dir
    experiment_name: str | None = None  # MLflow experiment; None = the exp name
    enabled: bool = True  # log to MLflow at all
    parent_run_id: str | None = None  # nest this run's MLflow run under that run (sweeps)
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags of the run


@dataclass
class AblationVariantConfig:
    """One row of an ablation table (paper Table 6): what it changes, as command-line overrides."""

    description: str = ""
    pretrain: list[str] = field(default_factory=list)  # key=value overrides of its pretraining run
    finetune: list[str] = field(default_factory=list)  # key=value overrides of its SuperGLUE run
    lm_eval: list[str] = field(default_factory=list)  # e.g. data.task_masks=true for task-mask models


@dataclass
class AblationScaleConfig:
    """Sizes and budgets every variant shares: overrides of exp=pretrain, exp=superglue, exp=lm_eval."""

    # the stages run at this scale: pretrain and any of lm_eval, finetune (left out: a model whose
    # vocabulary and context are too small for SuperGLUE)
    stages: list[str] = field(default_factory=lambda: ["pretrain", "lm_eval", "finetune"])
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    lm_eval: list[str] = field(default_factory=list)


@dataclass
class AblationsConfig:
    """exp=ablations: variants x seeds, each pretrained, finetuned on SuperGLUE and LM-evaluated."""

    # names from `catalogue`, in table order; None = every variant the scale's stages tell apart
    variants: list[str] | None = None
    baseline: str = "glm"  # the variant the comparison's deltas are taken against
    seeds: list[int] = field(default_factory=lambda: [1234])
    catalogue: dict[str, AblationVariantConfig] = field(default_factory=dict)
    scales: dict[str, AblationScaleConfig] = field(default_factory=dict)  # chosen by the top-level `scale`
    # Overrides for every variant, applied after the scale's and the variant's own.
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    lm_eval: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    exp: str = MISSING  # experiment name (the YAML file it came from)
    description: str = ""  # one line shown by --help
    job: str = MISSING  # what to run (see experiments.jobs)
    seed: int = 1234  # drives seed_everything and every data RNG
    output_dir: str = "outputs"  # runs go to <output_dir>/<exp>/<run_name>/
    run_name: str | None = None  # None = derived when the run starts
    print_config: bool = False  # print the resolved config and exit
    resume: str | None = None  # "auto" (latest checkpoint of run_name) or a checkpoint path
    # keys a resumed run may change although that changes its results (recorded as MLflow tags)
    resume_overrides: list[str] = field(default_factory=list)
    overwrite: bool = False  # replace the outputs of an existing run_name instead of refusing to start
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    prompts: list[str] = field(default_factory=list)  # exp=generate: texts whose blanks are filled
    superglue: SuperGLUEConfig = field(default_factory=SuperGLUEConfig)
    task: Any = None  # exp=superglue: a task name or a list of them (any case); None = all eight
    scale: str = "mini"  # exp=ablations: which of ablations.scales sizes the sweep
    ablations: AblationsConfig = field(default_factory=AblationsConfig)


# Range checks by dotted key; None values (unset overrides) are skipped.
UNIT_INTERVAL = (
    "generation.top_p",
    "seq2seq.label_smoothing",
    "data.val_fraction",
    "data.span_prob",
    "data.sentence_prob",
    "data.document_prob",
    "data.mask_ratio",
    "data.gpt_infill_prob",
    "data.single_span_prob",
    "data.gpt_min_ratio",
    "optim.warmup",
    "optim.lr_decay_ratio",
    "model.embedding_dropout_prob",
    "model.attention_dropout_prob",
    "model.output_dropout_prob",
)
POSITIVE = (
    "trainer.threads",
    "superglue.epochs_scale",
    "generation.max_new_tokens",
    "generation.num_beams",
    "generation.temperature",
    "seq2seq.src_length",
    "seq2seq.tgt_length",
    "lm_eval.max_length",
    "lm_eval.stride",
    "harness.limit",
    "harness.max_gen_toks",
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.intermediate_size",
    "model.max_sequence_length",
    "tokenizer.vocab_size",
    "data.seq_length",
    "data.num_proc",
    "data.batch_size",
    "data.poisson_lambda",
    "data.max_span_length",
    "optim.lr",
    "optim.eps",
    "optim.lr_decay_iters",
    "trainer.max_steps",
    "trainer.num_nodes",
    "trainer.accumulate_grad_batches",
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "superglue.micro_batch_size",
    "superglue.eval_batch_size",
    *(f"superglue.tasks.{t.lower()}.{k}" for t in SUPERGLUE_TASKS
      for k in ("max_seq_length", "batch_size", "epochs")),
)
NON_NEGATIVE = (
    "seed",
    "data.num_workers",
    "optim.weight_decay",
    "optim.clip_grad",
    "trainer.limit_val_batches",
    "generation.min_length",
    "generation.no_repeat_ngram_size",
    "generation.top_k",
    "harness.num_fewshot",
    "harness.bootstrap_iters",
    *(f"superglue.tasks.{t.lower()}.{k}" for t in SUPERGLUE_TASKS for k in ("pattern_id", "length_penalty")),
)

# Values inside a key's range that leave training (or sampling) nothing to work on, and why.
MEANINGLESS: dict[str, tuple[float, str]] = {
    "data.mask_ratio": (0.0, "0 masks no token, so there is nothing to predict (the loss is 0)"),
    "data.val_fraction": (1.0, "1 holds out every document, so none is left to train on (0 = no validation)"),
    "seq2seq.label_smoothing": (1.0, "1 makes every target the uniform distribution, whatever the text"),
    "model.embedding_dropout_prob": (1.0, "1 drops every activation"),
    "model.attention_dropout_prob": (1.0, "1 drops every attention weight"),
    "model.output_dropout_prob": (1.0, "1 drops every activation"),
    "generation.top_p": (0.0, "0 leaves no token to sample from"),
}


def model_overrides(model_section: ModelConfig | DictConfig) -> dict[str, Any]:
    """The GLMConfig overrides a model section asks for (unset ones left out, so the preset applies)."""
    values = {name: getattr(model_section, name) for name in MODEL_OVERRIDE_FIELDS}
    overrides = {name: value for name, value in values.items() if value is not None}
    return {**overrides, "checkpoint_activations": activation_checkpointing(model_section)}


def activation_checkpointing(model_section: ModelConfig | DictConfig) -> bool:
    """``model.activation_checkpointing``, or its former name ``model.checkpoint_activations`` when set."""
    old = model_section.checkpoint_activations
    return model_section.activation_checkpointing if old is None else old


def optimizer_settings(optim: OptimConfig | DictConfig) -> dict[str, Any]:
    """The optimiser and schedule keyword arguments every training module takes, from ``optim``."""
    return dict(lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas), eps=optim.eps,
                warmup=optim.warmup, lr_decay_style=optim.lr_decay_style, lr_decay_iters=optim.lr_decay_iters,
                lr_decay_ratio=optim.lr_decay_ratio)


def superglue_tasks(value: Any) -> list[str]:
    """The official names of the tasks that ``task`` selects (a name or a list, any case; None =
    all eight in Table-1 order); an unknown name is a ConfigError listing the valid ones."""
    if value is None:
        return list(SUPERGLUE_TASKS)
    names = [value] if isinstance(value, str) else list(value)
    by_key = {task.lower(): task for task in SUPERGLUE_TASKS}
    tasks = []
    for name in names:
        task = by_key.get(str(name).lower())
        if task is None:
            valid = ", ".join(SUPERGLUE_TASKS)
            raise ConfigError(f"invalid value {name!r} for 'task'; valid choices: {valid}")
        if task not in tasks:
            tasks.append(task)
    if not tasks:
        raise ConfigError(f"'task' selects no task; valid choices: {', '.join(SUPERGLUE_TASKS)}")
    return tasks


def check_run_name(name: str | None) -> None:
    """A run name is one folder name inside ``<output_dir>/<exp>/``: a path (``/``), a parent (``..``)
    or an empty name would place the run's files elsewhere, or over another run's."""
    if name is None:
        return
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise ConfigError(f"invalid value {name!r} for 'run_name': must be one folder name (not '.' or "
                          "'..', without '/' or '\\'); the run is written to <output_dir>/<exp>/<run_name>")


def _get(cfg: DictConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_value(key: str, value: Any, choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Check one value by its dotted key against the choice and range tables; raise ConfigError if bad."""
    valid = (CHOICES if choices is None else choices).get(key)
    if valid is not None and value not in valid:
        raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: {', '.join(valid)}")
    if key == "generation.compile" and str(value).lower() not in GENERATION_COMPILE:
        raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: "
                          f"{', '.join(GENERATION_COMPILE)}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key in UNIT_INTERVAL and not 0.0 <= value <= 1.0:
        raise ConfigError(f"invalid value {value!r} for '{key}': must be between 0 and 1")
    if key in POSITIVE and not value > 0:
        raise ConfigError(f"invalid value {value!r} for '{key}': must be positive")
    if key in NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"invalid value {value!r} for '{key}': must not be negative")
    if key in MEANINGLESS and value == MEANINGLESS[key][0]:
        raise ConfigError(f"invalid value {value!r} for '{key}': {MEANINGLESS[key][1]}")


def validate(cfg: DictConfig, choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Check what a type cannot express; raise ConfigError naming the first bad key.

    `choices` defaults to CHOICES; callers add the keys whose choices live elsewhere (the job registry).
    """
    choices = CHOICES if choices is None else choices
    for key in ("exp", "job"):
        if OmegaConf.is_missing(cfg, key):
            valid = choices.get(key)
            hint = f"; valid choices: {', '.join(valid)}" if valid else ""
            raise ConfigError(f"'{key}' is not set{hint}")
    for key in (*choices, *UNIT_INTERVAL, *POSITIVE, *NON_NEGATIVE):
        check_value(key, _get(cfg, key), choices)
    superglue_tasks(cfg.task)
    check_run_name(cfg.run_name)
    check_value("generation.compile", cfg.generation.compile)
    devices = cfg.trainer.devices
    if devices == 0 or devices == "0" or (OmegaConf.is_list(devices) and len(devices) == 0):
        raise ConfigError(f"invalid value {devices!r} for 'trainer.devices': a run needs at least one device "
                          "(a count, a list of indices, -1 for all, or auto)")
    kind = cfg.tokenizer.kind
    if kind != "sentencepiece" and not cfg.tokenizer.path:
        raise ConfigError(f"'tokenizer.path' must name the vocabulary file of tokenizer.kind={kind}")
    if kind in ("gpt2", "roberta") and not cfg.tokenizer.merges:
        raise ConfigError(f"'tokenizer.merges' must name the merges.txt of tokenizer.kind={kind}")
    data = cfg.data
    total = data.span_prob + data.sentence_prob + data.document_prob
    if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-6):
        raise ConfigError(
            "'data.span_prob' + 'data.sentence_prob' + 'data.document_prob' must sum to 1 "
            f"(got {data.span_prob} + {data.sentence_prob} + {data.document_prob} = {total:g})"
        )
    weights = list(data.train_weights)
    if weights and len(weights) != len(data.train_files):
        raise ConfigError(f"'data.train_weights' needs one weight per 'data.train_files' entry "
                          f"(got {len(weights)} weights for {len(data.train_files)} entries)")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"invalid value {weights!r} for 'data.train_weights': weights must be positive")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"invalid value {betas!r} for 'optim.betas': expected two numbers in [0, 1)")
