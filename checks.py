"""Input checks of promot's commands, kept out of the reading path of the main files.

Each command calls its checks once, before any work or any write, and every failure is one
`BadInput` or `DamagedFile` (support/errors.py) whose message names the file, line, key or flag
and what was expected. This module imports only the standard library, torch and support/: it
receives the objects it checks (tasks, configs, settings) and never imports a main file, so
every main file may import it.
"""

import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from support import cli, dataset_files, hf_files
from support.errors import BadInput, DamagedFile

# ---- data: templates, demonstration pools, data folders (data.py) ----
# What reading a split refuses as it reads (a task or split name that is a path, a link out of
# --data-dir, a malformed task.json) support/dataset_files.py raises itself; the checks below
# run once a command has read its data.


def check_template(task, examples, split, sample=100_000):
    """Fill the template of `task` (a data.Task, `Task.fill`) with every example (`sample`
    evenly spaced ones of a larger, streamed set): a field it names that an example lacks is a
    BadInput naming the example before any work, not mid-run."""
    for i in range(0, len(examples), max(1, len(examples) // sample)):
        try:
            task.fill(examples[i])
        except BadInput as err:
            raise BadInput(f"{err}: {split} example {i + 1}") from None


def check_pool(task, pool, shots):
    """A BadInput unless `pool` holds the `shots` demonstrations a k-shot input needs."""
    if shots and len(pool) < shots:
        raise BadInput(
            f"task {task.name}, split {task.demo_split}: {shots}-shot inputs need "
            f"{cli.count(shots, 'demonstration')} but the demonstration pool has "
            f"{cli.count(len(pool), 'example')} (fewer --shots, or more --train-examples)"
        )


def check_tokenizer_fits(tokenizer, model_vocab_size):
    """A BadInput unless every id the data.Tokenizer can produce has an embedding row, and a
    warning when it reaches fewer than 90% of the rows. Checkpoints pad their vocabulary (mT5:
    250100 ids used, 250112 rows), so <= is the test."""
    if tokenizer.vocab_size > model_vocab_size:
        pieces = getattr(tokenizer, "piece_count", tokenizer.vocab_size)  # T5's: + sentinels
        raise BadInput(
            f"tokenizer {tokenizer.path} has {pieces} pieces + "
            f"{tokenizer.vocab_size - pieces} sentinels = {tokenizer.vocab_size} "
            f"ids, but the model's vocab_size is {model_vocab_size}; "
            "is the tokenizer from the same checkpoint?"
        )
    if tokenizer.vocab_size < 0.9 * model_vocab_size:  # T5: 32,100 ids, 32,128 rows (padding)
        print(
            f"warning: tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids for the "
            f"model's {model_vocab_size} embedding rows, so "
            f"{model_vocab_size - tokenizer.vocab_size} rows are never used; is the spiece.model "
            "from the same checkpoint?",
            file=sys.stderr,
        )


def tokenizer_file(model_dir):
    """The tokenizer file of a checkpoint folder: T5's spiece.model, or a decoder-only model's
    tokenizer.json or tokenizer.model."""
    for name in ("spiece.model", "tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    raise BadInput(
        f"{model_dir}: no spiece.model in this checkpoint folder (nor a decoder-only model's "
        "tokenizer.json or tokenizer.model)"
    )


def check_data_folder(data_dir, tasks, splits, read_split, known):
    """`data.py check`: `data_dir` is a folder with task folders (`tasks`, {name: data.Task};
    none is a BadInput naming what the folder holds, what a task of your own needs and the
    `known` tasks), each checked by `check_task`. Returns the number of problems found."""
    root = Path(data_dir)
    if not root.is_dir():
        raise BadInput(f"{data_dir}: data folder not found")
    if not tasks:
        raise BadInput(
            f"{root}: no task folders found; it holds {dataset_files.folder_listing(root, known)}; "
            f"{dataset_files.TASK_FOLDER_NEEDS.format(data_dir=root)}; or a folder named after "
            f"one of the known tasks: {', '.join(sorted(known))}"
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name[:1] != "."):
        if folder.name not in tasks:
            print(f"warning: {folder}/: no task.json, so not a task", file=sys.stderr)
    return sum(check_task(tasks[name], root, splits, read_split) for name in sorted(tasks))


def check_task(task, root, splits, read_split):
    """`data.py check` of one task folder: print its split sizes beside Table 8 and return how
    many problems it has (a split that fails to read, files in a format nothing reads, or no
    split at all). Sizes that differ from Table 8 (`Task.paper_sizes`) are warnings.
    `read_split(task, root, split)` gives the examples, or a NoSplitFile."""
    cells, problems, warnings, missing = [], [], [], 0
    for split in splits:
        paper = (task.paper_sizes or {}).get(split)
        note, count = f" (paper {paper})" if paper else "", None
        try:
            examples = read_split(task, root, split)
            if isinstance(examples, dataset_files.NoSplitFile):
                cells.append(f"{split} -{note}")
                missing += 1
            elif not any(e.targets for e in examples):
                count = len(examples)
                cells.append(f"{split} {count} unlabeled{note}")
            else:
                check_template(task, examples, split)
                count = len(examples)
                cells.append(f"{split} {count}{note}")
        except (BadInput, DamagedFile) as err:
            problems.append(str(err))
            cells.append(f"{split} ERROR")
            continue
        if paper and count != paper:
            found = "no file" if count is None else f"{count} examples"
            where = f"{task.name} {split}"
            warnings.append(f"warning: {where}: {found}, the paper's Table 8 has {paper}")
    folder = root / task.name
    own = task.source == dataset_files.GENERIC_SOURCE  # a task of your own reads CSV and TSV too
    problems += [
        unknown_format(path, own) for path in dataset_files.unreadable_files(folder, tables=own)
    ]
    if missing == len(splits):
        problems.append(
            f"{folder}: no split in a layout promot reads (docs/data.md); "
            f"it holds {dataset_files.folder_listing(folder)}"
        )
    print(f"{task.name:15s} " + ", ".join(cells))
    for message in [f"error: {p}" for p in problems] + warnings:
        print(message, file=sys.stderr)
    return len(problems)


def unknown_format(path, own):
    """What `data.py check` says of a file no reader of its task folder reads."""
    readable = dataset_files.READABLE_SUFFIXES + (dataset_files.TABLE_SUFFIXES if own else ())
    tables = path.suffix in dataset_files.TABLE_SUFFIXES and not own
    return (
        f"{path}: unknown format; promot reads {', '.join(readable)} files and the official "
        "releases (docs/data.md)"
        + ("; .csv and .tsv only in a task folder of your own, with a task.json" if tables else "")
    )


# ---- model folders and checkpoints (model.py) ----
# model.py checks its own config.json and weight files as it reads them (it works copied
# alone, so those checks stay with it); the commands' --model flag checks are below.

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def holds_checkpoint(folder):
    """Whether `folder` holds a checkpoint: a config.json beside weights (model.py's layout)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return "config.json" in names and bool(names & set(WEIGHT_FILES))


def check_model_folder(model, flag="--model"):
    """The files of a checkpoint folder that model.py reads (config.json, spiece.model, weights,
    a sharded index's shards: all directly in the folder) are inside it, links included."""
    dataset_files.check_links_inside(model, model, flag)


def decoder_only(config):
    """Whether a config is causal_lm.py's (App. C.6: Llama, Mistral, Qwen), not model.py's T5:
    only the decoder-only configs name their width `hidden_size`."""
    return hasattr(config, "hidden_size")


def model_parameters(config):
    """The parameter count a T5Config implies (model.T5's tensors), from its numbers alone:
    what building the model would allocate, known before anything is built."""
    c = config
    if decoder_only(c):  # causal_lm.CausalLMConfig: attention, SwiGLU, norms
        q, kv, d = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.d_model
        layer = d * (2 * q + 2 * kv) + 3 * d * c.intermediate_size + 2 * d
        head = 0 if c.tie_word_embeddings else c.vocab_size * d
        return c.vocab_size * d + head + c.num_hidden_layers * layer + d
    attention = 4 * c.d_model * c.num_heads * c.d_kv  # q, k, v, o
    ff = (3 if c.feed_forward_proj == "gated-gelu" else 2) * c.d_model * c.d_ff
    bias = c.num_heads * c.relative_attention_num_buckets  # one table per stack, or per layer
    enc = c.num_layers * (attention + ff + 2 * c.d_model)
    dec = c.num_decoder_layers * (2 * attention + ff + 3 * c.d_model)
    if c.model_type == "umt5":
        enc, dec = enc + c.num_layers * bias, dec + c.num_decoder_layers * bias
    else:
        enc, dec = enc + bias, dec + bias
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.d_model
    return c.vocab_size * c.d_model + head + enc + dec + 2 * c.d_model  # + the final norms


def device_memory(device):
    """Bytes of memory on `device` (a torch.device or its name): the GPU's, else the machine's
    RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needs, device):
    """`needs` is {what: bytes}, each a lower bound of what a run holds at once (weights, what
    trains, one decoding step), `what` naming the file or flags that ask for it: a BadInput
    naming the largest when the sum is beyond the memory of `device`, before anything is
    allocated. No flag raises this limit: a run beyond its device's memory cannot finish."""
    total, have = sum(needs.values()), device_memory(device)
    if total > have:
        what, size = max(needs.items(), key=lambda item: item[1])
        raise BadInput(
            f"{what}: needs at least {size / 2**30:,.1f} GiB of memory ({total / 2**30:,.1f} GiB "
            f"in all), more than the {have / 2**30:,.1f} GiB of this machine's {device}"
        )


def decoding_needs(config, batch_size, num_beams, max_new_tokens):
    """The memory one beam-search step holds at least: batch x beams x vocabulary float32
    scores, about four times (logits, log-probabilities, their sums with the beams' scores, the
    top-k's copy), and the finished hypotheses' ids (batch x beams x max_new_tokens, int64).
    A beam wider than the vocabulary is refused: its step scores grow as beams x vocabulary and
    its first step has fewer continuations than beams."""
    if num_beams > config.vocab_size:
        raise BadInput(
            f"--num-beams {num_beams}: expected at most the vocabulary size, {config.vocab_size}"
        )
    what = f"--num-beams {num_beams} x --eval-batch-size {batch_size}"
    step = 4 * 4 * batch_size * num_beams * config.vocab_size
    return {f"{what} x {config.vocab_size} ids": step + 8 * batch_size * num_beams * max_new_tokens}


MAX_LAYERS = 1000  # per stack; T5-XXL and mT5-XXL have 24


def check_memory_and_layers(needs, device, config, path):
    """check_memory, then the layer count: 20,000 one-wide layers fit in memory but take
    minutes to build (each layer is modules), so the estimate bounds them too."""
    check_memory(needs, device)
    for key in ("num_layers", "num_decoder_layers", "num_hidden_layers"):  # T5's, a decoder's
        if getattr(config, key, 0) > MAX_LAYERS:
            raise BadInput(
                f"{path}: {key} is {getattr(config, key)}; expected at most {MAX_LAYERS} (T5-XXL "
                "has 24; more would take minutes to build)"
            )


def check_model_numbers(config, path):
    """The sizes in config.json that the network divides or indexes by are >= 1 (num_heads 0
    would build empty attention; 1 bucket would halve to none). causal_lm's reader checks its
    own."""
    if decoder_only(config):
        return
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers"):
        if getattr(config, key) < 1:
            raise BadInput(f"{path}: {key} is {getattr(config, key)}; expected an integer >= 1")
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):  # rows of the table
        if not 0 <= getattr(config, key) < config.vocab_size:
            raise BadInput(
                f"{path}: {key} is {getattr(config, key)}; expected an id below vocab_size "
                f"{config.vocab_size}"
            )
    if not config.layer_norm_epsilon < 1:
        raise BadInput(f"{path}: layer_norm_epsilon is {config.layer_norm_epsilon}; expected < 1")
    buckets = config.relative_attention_num_buckets
    distance = config.relative_attention_max_distance
    if buckets < 2 or distance <= buckets // 2:
        raise BadInput(
            f"{path}: relative_attention_num_buckets {buckets} and _max_distance {distance}: "
            "expected at least 2 buckets and a max distance above half of them"
        )


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}
SAFETENSORS_BYTES |= {"I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
SAFETENSORS_BYTES |= {"F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_shapes(file):
    """{name: shape} from a safetensors file's header alone (8 bytes of length, then JSON), with
    a DamagedFile when the header is malformed or the file is shorter or longer than the
    tensors it describes (a truncated download), without reading a tensor."""
    size, damaged = os.path.getsize(file), f"{file}: not a complete safetensors file"
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= length <= min(size - 8, 100 * 2**20):
            raise DamagedFile(f"{damaged} ({size} bytes; truncated?), download it again")
        try:
            header = json.loads(f.read(length))
            end = 0
            shapes = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, stop = info["data_offsets"]
                shape = [int(n) for n in info["shape"]]
                if stop - begin != math.prod(shape) * SAFETENSORS_BYTES[info["dtype"]]:
                    raise ValueError(f"tensor {name!r} does not fill its bytes")
                shapes[name], end = tuple(shape), max(end, stop)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise DamagedFile(f"{damaged}: bad header ({type(e).__name__}: {e})") from None
    if 8 + length + end != size:
        raise DamagedFile(
            f"{damaged}: its header describes {8 + length + end} bytes, the file has {size} "
            "(truncated?); download it again"
        )
    return shapes


def check_weight_files(path, expected, files, weight_map=None):
    """Every tensor in the weight `files` of checkpoint folder `path` (and, sharded, its index's
    `weight_map`; both as model.checkpoint_files gives them) is one of `expected`, {Hugging Face
    name: shape} of the model its config.json builds, with its shape, and none is missing; read
    from the safetensors headers alone (pytorch_model.bin: loaded by support/hf_files.py without
    running pickled code). Called before a command writes anything. A T5 (`shared.weight`) may
    store its embedding again per stack; a tied model may store an output head all the same."""
    expected = {name: tuple(shape) for name, shape in expected.items()}
    embedding = "shared.weight" if "shared.weight" in expected else "model.embed_tokens.weight"
    shared = expected[embedding]  # T5's, or a decoder-only model's (causal_lm.py)
    aliases = {}
    if embedding == "shared.weight":
        aliases = {f"{s}.embed_tokens.weight": shared for s in ("encoder", "decoder")}
    if "lm_head.weight" not in expected:
        aliases["lm_head.weight"] = shared  # tied: read_config found it equal to the embedding
    found, holders = set(), {}
    for file in files:
        if not os.path.isfile(file) and weight_map is None and len(files) == 1:
            raise DamagedFile(f"{file}: no such file; {path} holds config.json without weights")
        if not os.path.isfile(file):
            raise DamagedFile(f"{file}: listed in the checkpoint index but missing")
        if file.endswith(".safetensors"):
            shapes = safetensors_shapes(file)
        else:
            shapes = {n: tuple(t.shape) for n, t in hf_files.read_bin(file)}
        check_one_copy(path, file, shapes, holders, weight_map)
        for name, shape in shapes.items():
            want = expected.get(name, aliases.get(name))
            if want is None:
                raise DamagedFile(
                    f"{file}: unexpected tensor {name!r}; not a weight {path} implies"
                )
            if shape != want:
                raise DamagedFile(
                    f"{file}: tensor {name!r} has shape {shape}; {path}/config.json implies {want}"
                )
        listed = {n for n, f in (weight_map or {}).items() if f == file}
        if listed - set(shapes):
            raise DamagedFile(f"{file}: lacks {sorted(listed - set(shapes))[:3]} (index)")
        found |= set(shapes)
    if found & set(aliases) - {"lm_head.weight"}:
        found.add(embedding)
    missing = [n for n in expected if n not in found]
    if missing:
        raise DamagedFile(
            f"{path}: the weight files lack {len(missing)} tensor(s) config.json implies, "
            f"e.g. {missing[:3]}"
        )


def check_one_copy(path, file, names, found, weight_map):
    """Each tensor of a sharded checkpoint is in one shard, the one its index names for it: a
    loader that meets a second copy keeps one of the two, and a zeroed copy scores 0.00 without
    a word. `found`: {name: file} of the files read so far (filled here)."""
    kind = "model.safetensors" if file.endswith(".safetensors") else "pytorch_model.bin"
    index = os.path.join(path, f"{kind}.index.json")
    for name in names:
        if name in found:
            raise DamagedFile(
                f"{found[name]} and {file} both hold tensor {name!r}; a checkpoint holds each "
                "tensor once (which copy is meant?)"
            )
        named = (weight_map or {}).get(name, file if weight_map is None else None)
        if named != file:
            where = f"maps it to {named}" if named else "does not name it"
            raise DamagedFile(
                f"{file}: holds tensor {name!r}, but {index} {where}; a shard holds the "
                "tensors its index names for it"
            )
        found[name] = file


# ---- training runs (promot.py) ----


def check_training_settings(cfg, prompt_source):
    """promot.py's flags on their own (a promot.Config), before anything is read. `prompt_source`
    is the stage's ("new", "stage1" or "")."""
    if problem := cli.out_of_range(cfg):  # each flag's `valid` range
        raise BadInput(problem)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: this machine has no CUDA GPU; use --device cpu")
    if len(cfg.shots) != 1:
        shots = ",".join(map(str, cfg.shots))
        raise BadInput(f"--shots {shots}: promot.py trains with one number of demonstrations")
    tasks = [t.strip() for t in cfg.task.split(",") if t.strip()]
    if not tasks or len(set(tasks)) != len(tasks):
        raise BadInput(
            f"--task {cfg.task!r}: expected one task name or distinct comma-separated names"
        )
    if cfg.stage1_module == "lora" and cfg.stage not in ("1", "2"):
        raise BadInput(
            f"--stage1-module lora belongs to ProMoT's two stages (--stage 1 or 2), "
            f"not --stage {cfg.stage}"
        )
    kind, colon, value = cfg.prompt_init.partition(":")
    if kind not in ("uniform", "vocab", "text", "file") or (kind in ("uniform", "vocab") and colon):
        raise BadInput(
            f"--prompt-init {cfg.prompt_init!r}: expected uniform, vocab, text, text:WORDS or "
            "file:PATH"
        )
    if prompt_source == "new" and kind == "file" and not value:
        raise BadInput("--prompt-init file needs the prompt file: --prompt-init file:PATH")
    unknown = set(names(cfg.allow_change)) - {"data", "model"}
    if unknown:
        raise BadInput(f"--allow-change {cfg.allow_change}: expected data, model or data,model")


def check_training_memory(cfg, config, trains, world, device):
    """promot.py's run fits its device: the checkpoint's weights (float32, a 1/world share under
    torchrun) and their gradients when the model trains, the prompts (--prompt-length x d_model,
    one per task) and one layer's attention scores over the prompt, LoRA's adapters
    (--lora-rank x their width, per target of every attention module), and one decoding step
    when checkpoints are scored. All from config.json's numbers and the flags, before any
    tensor exists, once those numbers are sizes (check_model_numbers). `trains`:
    promot.what_trains(cfg)."""
    check_model_numbers(config, os.path.join(cfg.model, "config.json"))
    c, tasks = config, len([t for t in cfg.task.split(",") if t.strip()])
    weights, (prompt_source, _, model_trains) = 4 * model_parameters(c) // world, trains
    needs = {f"{cfg.model}/config.json's weights": weights * (2 if model_trains else 1)}
    if prompt_source:
        micro = cfg.micro_batch_size or cfg.batch_size // world
        prompt = f"--prompt-length {cfg.prompt_length}"
        needs[f"{prompt} x d_model {c.d_model}"] = 4 * 3 * tasks * cfg.prompt_length * c.d_model
        heads = getattr(c, "num_heads", None) or c.num_attention_heads  # T5's, or a decoder's
        needs[f"{prompt}'s attention scores"] = 4 * micro * heads * cfg.prompt_length**2
    if cfg.stage1_module == "lora" and cfg.stage == "1" and decoder_only(c):
        width, modules = c.d_model + c.num_attention_heads * c.head_dim, c.num_hidden_layers
        needs[f"--lora-rank {cfg.lora_rank}"] = 4 * 3 * cfg.lora_rank * width * 2 * modules
    elif cfg.stage1_module == "lora" and cfg.stage == "1":  # on q and v
        width = c.d_model + c.num_heads * c.d_kv
        modules = c.num_layers + 2 * c.num_decoder_layers
        needs[f"--lora-rank {cfg.lora_rank}"] = 4 * 3 * cfg.lora_rank * width * 2 * modules
    beams = decoding_needs(c, cfg.micro_batch_size or 16, cfg.num_beams, cfg.max_new_tokens or 0)
    needs = {**needs, **(beams if cfg.eval else {})}
    if str(device).startswith("cpu"):  # the ranks of one machine share its memory
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        needs = {what: size * ranks for what, size in needs.items()}
    check_memory_and_layers(needs, device, c, os.path.join(cfg.model, "config.json"))


def check_batch_split(batch_size, micro_batch_size, world):
    """--batch-size splits evenly over the ranks, and each rank's share into micro-batches."""
    per_rank, rest = divmod(batch_size, world)
    if rest or per_rank % (micro_batch_size or per_rank):
        micro = micro_batch_size or per_rank
        raise BadInput(
            f"--batch-size {batch_size} must split evenly over {cli.count(world, 'rank')} and then "
            f"into micro-batches of --micro-batch-size {micro} examples"
        )


def check_model_and_data_dir(model, data_dir, out):
    """--model is a checkpoint folder with config.json and spiece.model, every file inside it
    (check_model_folder); --data-dir a folder; --out a run folder of its own (check_run_out)."""
    if not os.path.isdir(model):
        raise BadInput(f"--model {model}: no such checkpoint directory")
    tokenizers = ("spiece.model", "tokenizer.json", "tokenizer.model")  # T5's, a decoder's
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise BadInput(
            f"--model {model}: no config.json; expected a Hugging Face T5/mT5 checkpoint "
            "directory with its SentencePiece vocabulary (spiece.model)"
        )
    if not any(os.path.isfile(os.path.join(model, name)) for name in tokenizers):
        raise BadInput(
            f"--model {model}: no spiece.model; expected a Hugging Face T5/mT5 checkpoint "
            "directory with its SentencePiece vocabulary (spiece.model), or a decoder-only one "
            "with tokenizer.json or tokenizer.model"
        )
    if not os.path.isdir(data_dir):
        raise BadInput(f"--data-dir {data_dir}: no such directory")
    check_model_folder(model)
    check_run_out(out, model, data_dir)


def check_run_out(out, model, data_dir):
    """promot.py writes RUN/config.json, RUN/log.jsonl and RUN/<stage>/ into --out: never the
    model or data folder or a folder inside them, nor a folder that holds a checkpoint, whose
    config.json it would change."""
    where = os.path.realpath(out)
    for flag, folder in (("--model", model), ("--data-dir", data_dir)):
        if os.path.commonpath([where, os.path.realpath(folder)]) == os.path.realpath(folder):
            raise BadInput(
                f"--out {out}: is {flag} {folder} or inside it; a run writes config.json, "
                "log.jsonl and its stage folders into --out: name a folder of its own"
            )
    if holds_checkpoint(out):
        raise BadInput(
            f"--out {out}: holds a checkpoint (config.json and weights), which a run's "
            "config.json would replace; name a folder of its own"
        )


def stage1_file(cfg, prompt_source):
    """The file a promot.py run reads besides the model: stage 1's adapters or prompt (stage 2:
    --prompt, else RUN/stage1/best/, then set as cfg.prompt), --prompt-init file:PATH's, or
    None."""
    if cfg.stage1_module == "lora" and cfg.stage == "2":
        given, name, what, flag = cfg.prompt, "lora.safetensors", "adapters", "--prompt"
    elif prompt_source == "stage1":
        given, name, what, flag = cfg.prompt, "prompt.safetensors", "prompt", "--prompt"
    elif prompt_source == "new" and cfg.prompt_init.startswith("file:"):
        return cfg.prompt_init.partition(":")[2]
    else:
        return None
    path = given or os.path.join(cfg.out, "stage1", "best", name)
    if not os.path.isfile(path):
        raise BadInput(
            f"--stage {cfg.stage} --stage1-module {cfg.stage1_module} needs stage-1 "
            f"{what}: none at {path}; run --stage 1 with the same --out first, or pass "
            f"{flag} FILE"
        )
    setattr(cfg, flag[2:], path)  # so that RUN/config.json names the file this stage reads
    return path


def check_prompt_words(words, task_name, prompt_length):
    """The words --prompt-init text puts in the prompt: some, and no more than its rows."""
    if not words:
        raise BadInput(
            f"--prompt-init text: task {task_name!r} has no label words; pass --prompt-init-text"
        )
    if len(words) > prompt_length:
        raise BadInput(
            f"--prompt-init-text has {len(words)} words, more than --prompt-length {prompt_length}"
        )


# ---- evaluation (evaluate.py) ----


def check_evaluation(settings, tasks, results_format):
    """evaluate.py's flags (an evaluate.Settings) before any work, `tasks` the evaluation tasks
    they name: ranges, paths, --device, and that there is something to score; --out may be
    written as a file of `results_format` (check_results_out)."""
    if problem := cli.out_of_range(settings):  # each flag's `valid` range
        raise BadInput(problem)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: this machine has no CUDA GPU; use --device cpu")
    if not os.path.isdir(settings.model):
        raise BadInput(
            f"--model {settings.model}: not a checkpoint directory (config.json, "
            "weights, spiece.model)"
        )
    tokenizer_file(settings.model)  # the tokenizer, before the weights are read
    check_model_folder(settings.model)
    check_results_out(settings.out, results_format)
    for flag in ("baseline", "prompt", "lora"):  # read first, then replaced by the results
        given = getattr(settings, flag)
        if given and os.path.realpath(given) == os.path.realpath(settings.out):
            raise BadInput(
                f"--out {settings.out}: is --{flag} {given}, an input of this evaluation; "
                "name a new results file"
            )
    if settings.baseline and not os.path.isfile(settings.baseline):
        raise BadInput(f"--baseline {settings.baseline}: no such results file")
    if not tasks and not settings.task and not settings.prompt:
        raise BadInput(
            f"--eval-tasks {settings.eval_tasks!r} names no task and there is no "
            "--task: nothing to score"
        )


def check_results_out(out, results_format):
    """--out is a new file, or a results file of `results_format` (evaluate.RESULTS_FORMAT,
    the first key evaluate.py writes, recognized from the file's first bytes), in a folder that
    is, or can be made, writable: never a model's weights, a data file or a folder."""
    if os.path.isdir(out):
        raise BadInput(f"--out {out}: is a folder; expected a results file (e.g. {out}/eval.json)")
    if os.path.exists(out):
        with open(out, "rb") as f:
            head = f.read(200).decode("utf-8", "replace")
        if not re.match(r'\{\s*"format":\s*"' + re.escape(results_format) + '"', head):
            raise BadInput(
                f"--out {out}: exists and is not an evaluate.py results file (format "
                f"{results_format!r}); evaluate.py replaces only its own results: name a new file"
            )
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the folders evaluate.py would make
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        kind = "a file, not a folder" if not os.path.isdir(folder) else "not writable"
        raise BadInput(f"--out {out}: {folder} is {kind}; expected a results file's folder")


def check_evaluation_memory(settings, config, device):
    """evaluate.py's run fits its device: the weights in --dtype and one decoding step
    (decoding_needs), from config.json's numbers (first checked: check_model_numbers) and the
    flags before anything is read."""
    check_model_numbers(config, os.path.join(settings.model, "config.json"))
    weights = (2 if settings.dtype == "bfloat16" else 4) * model_parameters(config)
    needs = {f"{settings.model}/config.json's weights": weights}
    beams = decoding_needs(
        config, settings.eval_batch_size, settings.num_beams, settings.max_new_tokens or 0
    )
    config_json = os.path.join(settings.model, "config.json")
    check_memory_and_layers({**needs, **beams}, device, config, config_json)


def check_task_folders(settings, known=()):
    """(the tasks of evaluate.py's --eval-tasks to score, those skipped), checked at once before
    any is read: each a plain name named once (a second mention would be scored and averaged
    twice), each one of the `known` tasks (data.TASKS) or a folder of --data-dir with a
    task.json, each with its folder unless --skip-missing-tasks. Every unknown name and missing
    folder goes in one BadInput that says which --eval-tasks would run the rest."""
    asked, data_dir = names(settings.eval_tasks), settings.data_dir
    if not os.path.isdir(data_dir):
        raise BadInput(f"--data-dir {data_dir}: no such directory")
    for name in asked:
        dataset_files.check_task_name(name)
    twice = sorted({n for n in asked if asked.count(n) > 1})
    if twice:
        raise BadInput(
            f"--eval-tasks {','.join(asked)}: names {', '.join(twice)} more than once; each task "
            "is scored once and counts once in the Norm. Avg.: name it once"
        )
    unknown = [n for n in asked if n not in known and not dataset_files.has_task_json(data_dir, n)]
    missing = [n for n in asked if n in known and not os.path.isdir(os.path.join(data_dir, n))]
    present = [n for n in asked if n not in unknown + missing]
    skip = settings.skip_missing_tasks
    if not unknown and (skip or not missing):
        return present, missing
    missing = [] if skip else missing  # skipped, not wrong: only the unknown names are named
    raise BadInput(unknown_or_missing(asked, unknown, missing, present, data_dir, known))


def unknown_or_missing(names, unknown, missing, present, data_dir, known):
    """The one message of check_task_folders: what is unknown, what has no folder, what runs."""
    parts = [dataset_files.unknown_tasks(unknown, data_dir, known)] if unknown else []
    if missing:
        parts.append(
            f"--data-dir {data_dir} has no folder for {cli.count(len(missing), 'evaluation task')} "
            f"of {len(names)}: {', '.join(missing)}. Put their files there (docs/data.md)"
        )
    ways = [f"score the others with --eval-tasks {','.join(present)}"] if present else []
    ways += ["or pass --skip-missing-tasks"] if missing else []
    return (", " if missing else "; ").join(["; ".join(parts), *ways])


def check_stage1_files(settings):
    """evaluate.py's prompt and LoRA files once settled (evaluate.stage1_files): --bare-model
    scores the model alone, and LoRA adapters are routed from the fine-tuned task."""
    if settings.bare_model and (settings.prompt or settings.lora):
        raise BadInput("--bare-model scores the model alone: drop --prompt and --lora")
    if settings.lora and not settings.task:
        raise BadInput(f"--lora {settings.lora} needs --task (the adapters are routed from it)")


def check_training_record(path, record):
    """promot.py's training.json beside a checkpoint, prompt or LoRA file (None: there is none):
    an object whose "shots", if present, is a number >= 0."""
    shots = record.get("shots", 0) if isinstance(record, dict) else None
    if not isinstance(shots, int) or shots < 0:
        raise DamagedFile(
            f'{path}: expected promot.py\'s training.json, an object with "shots" a '
            "number >= 0 (delete it to evaluate without it)"
        )


def check_results_file(path, results, results_format):
    """A --baseline file, read as JSON: a results file that evaluate.py wrote."""
    if not isinstance(results, dict) or results.get("format") != results_format:
        found = results.get("format") if isinstance(results, dict) else type(results).__name__
        raise BadInput(
            f"{path}: not an evaluate.py results file (format {found!r}, expected "
            f"{results_format!r})"
        )


# ---- several --data-dir folders, and what the scored inputs hold (evaluate.py) ----


def data_folders(data_dir):
    """The folders of evaluate.py's --data-dir: one, or several comma-separated, in order."""
    return [d.strip() for d in data_dir.split(",") if d.strip()] or [data_dir]


def task_folder(data_dir, name):
    """The --data-dir folder that holds task `name`'s folder, the first when none does (its
    messages name it). A name in two folders is refused: what is scored would hang on order."""
    dataset_files.check_task_name(name)
    folders = data_folders(data_dir)
    holders = [d for d in folders if os.path.isdir(os.path.join(d, name))]
    if len(holders) > 1:
        raise BadInput(
            f"--data-dir {data_dir}: task {name!r} has a folder in {holders[0]} and in "
            f"{holders[1]}; rename or remove one"
        )
    return holders[0] if holders else folders[0]


def folder_tasks(data_dir):
    """The task folders (with a task.json) of --data-dir's folders, in order, each sorted."""
    found = [
        name
        for folder in data_folders(data_dir)
        if os.path.isdir(folder)
        for name in sorted(os.listdir(folder))
        if dataset_files.has_task_json(folder, name)
    ]
    return list(dict.fromkeys(found))  # a name in two folders: task_folder refuses it


def check_tasks_in_folders(settings, known=()):
    """check_task_folders over each of --data-dir's folders, each task in the folder that
    holds it (`task_folder`): (the tasks to score, those skipped), in --eval-tasks' order."""
    for folder in data_folders(settings.data_dir):
        if not os.path.isdir(folder):
            raise BadInput(f"--data-dir {folder}: no such directory")
    asked, groups = names(settings.eval_tasks), {}
    for name in asked:
        groups.setdefault(task_folder(settings.data_dir, name), []).append(name)
    found = set()
    for folder, group in groups.items():
        one = dict(vars(settings), data_dir=folder, eval_tasks=",".join(group))
        present, skipped = check_task_folders(type(settings)(**one), known)
        found |= set(present)
    return [n for n in asked if n in found], [n for n in asked if n not in found]


def default_eval_tasks(data_dir, tuned, paper):
    """(evaluate.py's --eval-tasks when not given, the line that says why): the `paper`'s tasks;
    in --data-dir folders that hold none of them, their task folders but the fine-tuned
    (`tuned`)."""
    present = folder_tasks(data_dir)
    folders = data_folders(data_dir)
    if not present or any(os.path.isdir(os.path.join(d, t)) for d in folders for t in paper):
        return ",".join(paper), ""
    tasks = ",".join(n for n in present if n not in tuned)
    return tasks, f"--eval-tasks: --data-dir holds none of the paper's tasks; its own: {tasks}"


def input_warnings(scored, tokenizer, limit=0.05):
    """A warning per (task, split, examples) of `scored` whose inputs are more than `limit`
    <unk> tokens: text the model's tokenizer cannot spell (the lab model's 215 pieces spell
    little but the lab's words) scores as noise."""
    warnings = {}
    for task, split, examples in scored:
        found = unknown_share(tokenizer, [task.fill(x) for x in examples])
        if found and found[0] > limit:
            warnings[task.name] = (
                f"warning: {found[0]:.0%} of the tokens of {task.name}'s {split} inputs are <unk> "
                f"({found[1]}): the model's tokenizer cannot spell them; their scores say little"
            )
    return list(warnings.values())


def score_warnings(runs, training, model):
    """A warning when a checkpoint promot.py trained (it wrote `training`, training.json) scores
    0 on its fine-tuned task (`runs`, evaluate.py's results): the training did not take."""
    return [
        f"warning: {model} scores 0 on its fine-tuned task {r['task']} ({r['shots']}-shot, "
        f"{r['split']}): the training did not learn it; see its log, try more steps or another lr"
        for r in runs
        if training and r["role"] == "fine-tuned" and r["score"] == 0
    ]


def results_match(path, settings, results_format):
    """Whether `path` holds evaluate.py's results for `settings` (each one set, neither None nor
    "", as recorded): the flagless run's baseline is scored once, then reused."""
    try:
        recorded = read_results(path, results_format).get("settings", {})
    except (OSError, BadInput, DamagedFile):
        return False
    return all(recorded.get(k) == v for k, v in vars(settings).items() if v not in (None, ""))


def unknown_share(tokenizer, texts):
    """(share of `texts`' tokens that are <unk>, count): text the tokenizer cannot spell. None
    for a tokenizer with no <unk> (byte-level BPE spells everything)."""
    special = getattr(tokenizer, "special", None)  # data.Tokenizer: {"<unk>": 2, ...}
    sp = getattr(getattr(tokenizer, "backend", None), "sp", None)  # a decoder's SentencePiece
    unk = special.get("<unk>") if isinstance(special, dict) else sp.unk_id() if sp else None
    if unk is None:
        return None
    ids = [i for text in texts for i in tokenizer.encode(text)]
    count = sum(i == unk for i in ids)
    return count / max(len(ids), 1), count


# ---- diagnostics during training (diagnostics.py) ----

_TEXT = (lambda v: isinstance(v, str), "a string")
_STEP = (lambda v: type(v) is int and v >= 0, "an integer >= 0")
_NUMBER = (lambda v: type(v) in (int, float), "a number")
_SCORE = (lambda v: v is None or type(v) in (int, float), "a number or null")
_WORDS = (lambda v: v is None or isinstance(v, list) and all(map(_TEXT[0], v)), "a list of words")
_COSINES = (lambda v: isinstance(v, dict) and all(map(_NUMBER[0], v.values())), "{group: cosine}")
# What `diagnostics.py plot` reads of each record: diagnostics.jsonl's kinds (diagnostics.py's
# docstring) and log.jsonl's checkpoint scores ("event": "eval"); other keys may be absent.
RECORD_FIELDS = {
    "probe": dict(stage=_TEXT, step=_STEP, task=_TEXT, shots=_STEP, score=_SCORE),
    "alignment": dict(stage=_TEXT, step=_STEP, cosines=_COSINES),
    "error": {},
    "eval": dict(stage=_TEXT, step=_STEP, score=_NUMBER),
}
OPTIONAL_FIELDS = {  # read when present (records written before them lack them)
    "probe": dict(metric=_TEXT, format_ratio=_SCORE, format_words=_WORDS, shared_words=_WORDS)
}


def check_diagnostics_record(path, lineno, record, kind_key="kind"):
    """A record of RUN/diagnostics.jsonl (`kind_key` "kind") or RUN/log.jsonl ("event", of
    which only "eval" is read) holds the fields the figures read, of their types: else one
    DamagedFile naming the file, line and field, as a results file is checked."""
    kind = record.get(kind_key)
    if kind_key == "event" and kind != "eval":
        return
    kinds = [k for k in RECORD_FIELDS if (k == "eval") == (kind_key == "event")]
    if not isinstance(kind, str) or kind not in kinds:
        raise DamagedFile(
            f'{path}:{lineno}: "{kind_key}" is {str(kind)[:40]!r}; expected one of '
            f"{', '.join(kinds)}"
        )
    required = RECORD_FIELDS[kind]
    for name, (ok, expected) in {**OPTIONAL_FIELDS.get(kind, {}), **required}.items():
        if (name in record and not ok(record[name])) or (name in required and name not in record):
            raise DamagedFile(
                f"{path}:{lineno}: a {kind} record's {name!r} is "
                f"{str(record.get(name, 'missing'))[:40]}; expected {expected}"
            )


def check_training_flags(flags, stage, num_tasks):
    """promot.py's --probe-* / --align-* flags (a diagnostics.TrainingFlags): their ranges, their
    number lists, and that gradient alignment has a model gradient and one task to shuffle."""
    if problem := cli.out_of_range(flags):
        raise BadInput(problem)
    for name, may_be_empty in (("probe_shots", False), ("align_steps", True)):
        parts = [part.strip() for part in getattr(flags, name).split(",") if part.strip()]
        every = [p[6:] for p in parts if p.startswith("every:") and name == "align_steps"]
        steps = [p for p in parts if not p.startswith("every:")] + every
        if not all(p.isdigit() for p in steps) or not (parts or may_be_empty) or "0" in every:
            text, also = getattr(flags, name), " (steps), or every:N" if every else ""
            raise BadInput(
                f"--{name.replace('_', '-')} {text!r}: expected comma-separated integers{also}"
            )
    probe_tasks = [part for part in flags.probe_tasks.split(",") if part.strip()]
    if flags.probe_every and not probe_tasks:
        raise BadInput("--probe-every needs --probe-tasks (comma-separated unseen tasks)")
    if any(part.strip() for part in flags.align_steps.split(",")):
        if stage == "1":
            raise BadInput(
                "--align-steps measures the model's gradient; stage 1 trains only the prompt"
            )
        if num_tasks > 1:
            raise BadInput("--align-steps needs a single --task (its labels are shuffled)")


def names(text):
    """The comma-separated names in `text`, stripped, empty ones dropped."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def read_results(path, results_format):
    """A results file written by evaluate.py (for --baseline), checked for its format."""
    results = dataset_files.read_json(path)
    check_results_file(path, results, results_format)
    return results


def read_training_record(model, prompt="", lora=""):
    """training.json (promot.py's export: stage, task, shots, how best/ was chosen) beside the
    checkpoint, the prompt or the LoRA file; {} for a checkpoint promot did not write."""
    folders = [f for f in (model, os.path.dirname(prompt), os.path.dirname(lora)) if f]
    paths = [os.path.join(f, "training.json") for f in folders]
    path = next((p for p in paths if os.path.isfile(p)), None)
    record = dataset_files.read_json(path) if path else {}
    check_training_record(path, record)
    return record
