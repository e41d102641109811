"""Input checks of promot's commands, kept out of the reading path of the main files.

Each command calls its checks once, before any work or any write, and every failure is one
`BadInput` or `DamagedFile` (support/errors.py) whose message names the file, line, key or flag
and what was expected. This module imports only the standard library, torch and support/: it
receives the objects it checks (tasks, configs, settings) and never imports a main file, so
every main file may import it.
"""

from support.errors import BadInput, DamagedFile  # noqa: F401

# ---- data: tasks, templates, splits, demonstration pools (data.py) ----


def check_task_name(name):
    """A task name is a folder under --data-dir, never a path."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(name)):
        raise BadInput(
            f"task name {name!r}: expected letters, digits, '_', '-' and '.' (a folder under "
            "--data-dir), not a path"
        )


def no_field(task, example, field):
    """The BadInput for an example that lacks a field its task's template names."""
    return BadInput(
        f"task {task.name}: example has no field {field!r} for template "
        f"{task.template!r} (fields: {', '.join(example.fields)})"
    )


def check_template(task, examples, split, sample=100_000):
    """Fill the template with every example (`sample` evenly spaced ones of a larger, streamed
    set): a field it names that an example lacks is a BadInput before any work, not mid-run."""
    for i in range(0, len(examples), max(1, len(examples) // sample)):
        try:
            task.template.format(**examples[i].fields)
        except KeyError as err:
            problem = no_field(task, examples[i], err.args[0])
            raise BadInput(f"{problem}: {split} example {i + 1}") from None


def check_pool(task, pool, shots):
    """A BadInput unless `pool` holds the `shots` demonstrations a k-shot input needs."""
    if shots and len(pool) < shots:
        raise BadInput(
            f"task {task.name}: {shots}-shot inputs need {shots} demonstrations but the "
            f"demonstration pool has {len(pool)} examples (fewer --shots, or more --train-examples)"
        )


def check_mixture(datasets, rates):
    """A data.Mixture's {task: examples} and {task: rate}."""
    if not datasets or any(len(items) == 0 for items in datasets.values()):
        raise BadInput("a mixture needs at least one task, and every task at least one example")
    names = sorted(datasets)
    if sorted(rates) != names or any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
        raise BadInput(f"mixture rates {rates} must give a non-negative rate to each of {names}")


def check_mixture_state(state, seed, names):
    """A data.Mixture state_dict to load into a mixture of `seed` over the tasks `names`."""
    if state.get("seed") != seed or sorted(state.get("positions", {})) != names:
        raise BadInput(
            f"mixture state is for seed {state.get('seed')} and tasks "
            f"{sorted(state.get('positions', {}))}, not seed {seed} and {names}"
        )


def check_tokenizer_fits(tokenizer, model_vocab_size):
    """A BadInput unless every id the data.Tokenizer can produce has an embedding row.
    Checkpoints pad their vocabulary (mT5: 250100 ids used, 250112 rows), so <= is the test."""
    if tokenizer.vocab_size > model_vocab_size:
        raise BadInput(
            f"tokenizer {tokenizer.path} has {tokenizer.piece_count} pieces + "
            f"{tokenizer.vocab_size - tokenizer.piece_count} sentinels = {tokenizer.vocab_size} "
            f"ids, but the model's vocab_size is {model_vocab_size}; "
            "is the spiece.model from the same checkpoint?"
        )


def spiece_in(model_dir):
    """The spiece.model of a checkpoint folder."""
    import os

    path = os.path.join(model_dir, "spiece.model")
    if not os.path.isfile(path):
        raise BadInput(f"{model_dir}: no spiece.model in this checkpoint folder")
    return path


def check_data_folder(data_dir):
    """`data_dir` as a Path, if it is a folder."""
    from pathlib import Path

    if not Path(data_dir).is_dir():
        raise BadInput(f"{data_dir}: data folder not found")
    return Path(data_dir)


def check_some_task_folder(root, tasks, known):
    """`data.py check` needs at least one task folder in the data folder."""
    if not tasks:
        known = ", ".join(sorted(known))
        raise BadInput(f"{root}: no task folders found; expected some of: {known}")


def check_task(task, root, splits, read_split):
    """`data.py check` of one task folder: print its split sizes beside Table 8 and return how
    many problems it has (a split that fails to read, files in a format nothing reads, or no
    split at all). Sizes that differ from Table 8 (`Task.paper_sizes`) are warnings.
    `read_split(task, root, split)` gives the examples, or a NoSplitFile."""
    import sys

    from support import dataset_files

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
    readable = ", ".join(dataset_files.READABLE_SUFFIXES)
    problems += [
        f"{path}: unknown format; promot reads {readable} files and the official releases "
        "(README, 'Data sets')"
        for path in dataset_files.unreadable_files(folder)
    ]
    if missing == len(splits):
        problems.append(f"{folder}: no split in a layout promot reads (README, 'Data sets')")
    print(f"{task.name:15s} " + ", ".join(cells))
    for message in [f"error: {p}" for p in problems] + warnings:
        print(message, file=sys.stderr)
    return len(problems)


# ---- model folders and checkpoints (model.py) ----
# model.py checks its own config.json and weight files as it reads them (it works copied
# alone, so those checks stay with it); the commands' --model flag checks are below.

# ---- training runs (promot.py) ----


def check_training_settings(cfg, prompt_source):
    """promot.py's flags on their own (a promot.Config), before anything is read. `prompt_source`
    is the stage's ("new", "stage1" or "")."""
    import torch

    from support import cli, lora

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
    if cfg.stage1_module == "lora" and cfg.stage == "1":
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        lora.check_settings(cfg.lora_rank, targets, "--lora-rank", "--lora-targets")
    if prompt_source == "new" and cfg.prompt_init == "file" and not cfg.prompt_init_file:
        raise BadInput("--prompt-init file needs --prompt-init-file FILE")


def check_batch_split(batch_size, micro_batch_size, world):
    """--batch-size splits evenly over the ranks, and each rank's share into micro-batches."""
    per_rank, rest = divmod(batch_size, world)
    if rest or per_rank % (micro_batch_size or per_rank):
        micro = micro_batch_size or per_rank
        raise BadInput(
            f"--batch-size {batch_size} must split evenly over {world} rank(s) and then into "
            f"micro-batches of --micro-batch-size {micro} examples"
        )


def check_model_and_data_dir(model, data_dir):
    """--model is a checkpoint folder with config.json and spiece.model; --data-dir a folder."""
    import os

    if not os.path.isdir(model):
        raise BadInput(f"--model {model}: no such checkpoint directory")
    for name in ("config.json", "spiece.model"):
        if not os.path.isfile(os.path.join(model, name)):
            raise BadInput(
                f"--model {model}: no {name}; expected a Hugging Face T5/mT5 checkpoint "
                "directory with its SentencePiece vocabulary (spiece.model)"
            )
    if not os.path.isdir(data_dir):
        raise BadInput(f"--data-dir {data_dir}: no such directory")


def stage1_file(cfg, prompt_source):
    """The file a promot.py run reads besides the model: stage 1's adapters or prompt (stage 2:
    --lora / --prompt, else RUN/stage1/best/), --prompt-init-file, or None."""
    import os

    if cfg.stage1_module == "lora" and cfg.stage == "2":
        given, name, what, flag = cfg.lora, "lora.safetensors", "adapters", "--lora"
    elif prompt_source == "stage1":
        given, name, what, flag = cfg.prompt, "prompt.safetensors", "prompt", "--prompt"
    elif prompt_source == "new" and cfg.prompt_init == "file":
        return cfg.prompt_init_file
    else:
        return None
    path = given or os.path.join(cfg.out, "stage1", "best", name)
    if not os.path.isfile(path):
        raise BadInput(
            f"--stage {cfg.stage} --stage1-module {cfg.stage1_module} needs stage-1 "
            f"{what}: none at {path}; run --stage 1 with the same --out first, or pass "
            f"{flag} FILE"
        )
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


def check_evaluation(settings, tasks):
    """evaluate.py's flags (an evaluate.Settings) before any work, `tasks` the evaluation tasks
    they name: ranges, paths, --device, and that there is something to score."""
    import os

    import torch

    from support import cli

    if problem := cli.out_of_range(settings):  # each flag's `valid` range
        raise BadInput(problem)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: this machine has no CUDA GPU; use --device cpu")
    if settings.lora and not settings.task:
        raise BadInput("--lora needs --task (the adapters are routed from it, --route)")
    if not os.path.isdir(settings.model):
        raise BadInput(
            f"--model {settings.model}: not a checkpoint directory (config.json, "
            "weights, spiece.model)"
        )
    spiece_in(settings.model)  # the tokenizer, before the weights are read
    out_dir = os.path.dirname(os.path.abspath(settings.out))
    if os.path.isdir(settings.out) or os.path.isdir(out_dir) and not os.access(out_dir, os.W_OK):
        raise BadInput(f"--out {settings.out}: expected a results file in a writable folder")
    if settings.baseline and not os.path.isfile(settings.baseline):
        raise BadInput(f"--baseline {settings.baseline}: no such results file")
    if not tasks and not settings.task and not settings.prompt:
        raise BadInput(
            f"--eval-tasks {settings.eval_tasks!r} names no task and there is no "
            "--task: nothing to score"
        )


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


# ---- diagnostics during training (diagnostics.py) ----


def check_training_flags(flags, stage, num_tasks):
    """promot.py's --probe-* / --align-* flags (a diagnostics.TrainingFlags): their ranges, their
    number lists, and that gradient alignment has a model gradient and one task to shuffle."""
    from support import cli

    if problem := cli.out_of_range(flags):
        raise BadInput(problem)
    for name, may_be_empty in (("probe_shots", False), ("align_steps", True)):
        parts = [part.strip() for part in getattr(flags, name).split(",") if part.strip()]
        if not all(part.isdigit() for part in parts) or not (parts or may_be_empty):
            text = getattr(flags, name)
            raise BadInput(
                f"--{name.replace('_', '-')} {text!r}: expected comma-separated integers"
            )
    probe_tasks = [part for part in flags.probe_tasks.split(",") if part.strip()]
    if flags.probe_every and not probe_tasks:
        raise BadInput("--probe-every needs --probe-tasks (comma-separated unseen tasks)")
    if flags.align_every or any(part.strip() for part in flags.align_steps.split(",")):
        if stage == "1":
            raise BadInput(
                "--align-steps/--align-every measure the model's gradient; "
                "stage 1 trains only the prompt"
            )
        if num_tasks > 1:
            raise BadInput(
                "--align-steps/--align-every need a single --task (its labels are shuffled)"
            )
