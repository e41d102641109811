"""A trained soft prompt in its files: promot's prompt.safetensors, a PEFT prompt-tuning
adapter and T5X's .npy.

promot keeps a prompt as a (p, d_model) tensor in its prompt.safetensors, written by
`save_prompts` and read by `read_prompts` (the one prompt-file reader of promot: training,
evaluation and the diagnostics all read through it). This leaf also writes such a tensor as
  * a PEFT prompt-tuning adapter folder that `PeftModel.from_pretrained(base, folder)`
    loads: adapter_config.json (peft_type PROMPT_TUNING, task_type SEQ_2_SEQ_LM,
    num_virtual_tokens, token_dim, ...) and adapter_model.safetensors with the
    prompt under PEFT's key `prompt_embeddings`;
  * the `.npy` array that T5X prompt tuning reads and writes (its
    extract_variable script saves target/encoder/prompt/prompt/prompt as float32);
and reads both back (`write_peft_adapter`, `read_peft_adapter`, `write_t5x_npy`,
`read_t5x_npy`).

Why the two tools agree with promot: for a SEQ_2_SEQ_LM model PEFT's prompt
tuning puts the first num_virtual_tokens rows of its table before the encoder's
input embeddings and extends the attention mask with ones, which is exactly
promot's [P; embed(x)] (model.T5.prepend_prompt); the decoder gets nothing. PEFT
makes that table num_transformer_submodules * p rows (2 by default for seq2seq,
the second half unused by prompt tuning), so we write num_transformer_submodules
= 1 and the table is the prompt itself. T5X prompt tuning prepends its prompt
to the encoder input the same way.

Writes are atomic: a folder is written under a temporary name and renamed into
place, a file is written beside its destination and renamed; when anything
fails, nothing is left at the destination. Bad input (another peft_type, a
width that is not the model's) is refused with one BadInput line, an unreadable file
with one DamagedFile line (support/errors.py).

The command line converts files:
    python -m support.prompt_formats export PROMPT --peft DIR --base MODEL [--task T]
    python -m support.prompt_formats export PROMPT --npy FILE [--task T]
    python -m support.prompt_formats import SOURCE --to prompt.safetensors --task T [--base MODEL]
where PROMPT is a promot prompt.safetensors or a .npy and SOURCE a PEFT adapter
folder or a .npy. It imports torch, safetensors and numpy, and of the project only
support/errors.py (without it, copied alone, its errors are ValueErrors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

try:
    from support.errors import BadInput, DamagedFile
except ImportError:  # copied alone
    BadInput = DamagedFile = ValueError

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_KEY = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "prompt_embeddings",
)
ADAPTER_FILES = (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    "adapter_model.bin",
    "README.md",
)  # what PEFT's save_pretrained writes


def _as_prompt(prompt, where) -> torch.Tensor:
    """`prompt` as a (p, d_model) fp32 tensor on the CPU; at least one row, finite values."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        shape = tuple(prompt.shape) if hasattr(prompt, "shape") else type(prompt).__name__
        raise BadInput(f"{where}: a prompt is a (p, d_model) tensor, got {shape}")
    if 0 in prompt.shape:  # scored "+prompt" with nothing prepended: the model alone
        raise BadInput(f"{where}: the prompt is {tuple(prompt.shape)}; expected p, d_model >= 1")
    if not prompt.dtype.is_floating_point or not torch.isfinite(prompt).all():
        raise DamagedFile(f"{where}: the prompt holds NaN or inf values, or is not a float array")
    return prompt.detach().to("cpu", torch.float32).contiguous()


def _check_width(prompt, d_model, where):
    if d_model is not None and prompt.shape[1] != d_model:
        raise BadInput(
            f"{where}: the prompt is {prompt.shape[1]} wide, but the model's d_model is {d_model}"
        )


def base_model_config(base_model_name_or_path) -> dict:
    """The config.json of a local model folder, {} for a Hub id (nothing to check offline)."""
    path = Path(str(base_model_name_or_path)) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedFile(f"{path}: cannot read the model's config ({err})") from None


# ---------------------------------------------------------------------------
# promot's prompt file: the prompt is model state, saved next to the checkpoint
# ---------------------------------------------------------------------------


def read_prompts(path, d_model=None, tasks=None, length=None):
    """{task: (p, d_model) fp32 prompt} from a prompt file.

    Reads what save_prompts writes (prompt.safetensors: `prompt.<task>` per task,
    plus `prompt` when it holds one task) or a T5X `.npy` array, which counts as
    the key `prompt`. `tasks` defaults to the tasks the `prompt.<task>` keys
    name; a requested task without its own key gets `prompt`. `d_model` and
    `length`, when given, are checked against each prompt's shape.
    """
    tensors = _prompt_tensors(path)
    if tasks is None:
        tasks = [key[len("prompt.") :] for key in tensors if key.startswith("prompt.")]
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise BadInput(
            f"{path}: the file does not say which task its prompt was trained on "
            "(no 'prompt.<task>' key); pass --task"
        )
    return {task: _prompt_of(tensors, task, path, d_model, length) for task in tasks}


def save_prompts(prompts, path):
    """Writes {task: prompt} as `prompt.<task>` (plus `prompt` for a single task) at `path`;
    the metadata lists the tasks. The caller makes the write atomic."""
    from safetensors.torch import save_file

    tensors = {f"prompt.{t}": p.detach().float().cpu().contiguous() for t, p in prompts.items()}
    if len(prompts) == 1:
        tensors["prompt"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(path), metadata={"tasks": ",".join(prompts)})


def export_prompts(folder, prompts, base_model_name_or_path):
    """promot.py's export of {task: prompt} into `folder`: prompt.safetensors, and each task's
    prompt as a PEFT prompt-tuning adapter, peft_<task>/, for `base_model_name_or_path`."""
    _write_file(Path(folder) / "prompt.safetensors", lambda tmp: save_prompts(prompts, tmp))
    for task, prompt in prompts.items():
        write_peft_adapter(Path(folder) / f"peft_{task}", prompt.detach(), base_model_name_or_path)


def _prompt_tensors(path):
    """The tensors of a prompt.safetensors, or {"prompt": array} of a T5X .npy."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such prompt file")
    try:
        if str(path).endswith(".npy"):
            import numpy

            return {"prompt": torch.from_numpy(numpy.load(path, allow_pickle=False))}
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # safetensors and numpy raise several types for a bad file
        raise DamagedFile(f"{path}: cannot read a prompt ({e})") from None


def _prompt_of(tensors, task, path, d_model=None, length=None):
    """The fp32 prompt of `task`: its `prompt.<task>` tensor, else the file's `prompt`."""
    key = f"prompt.{task}" if f"prompt.{task}" in tensors else "prompt"
    if key not in tensors:
        raise BadInput(f"{path}: no tensor 'prompt.{task}' or 'prompt'; found {sorted(tensors)}")
    prompt = tensors[key].float()
    if prompt.dim() != 2 or (d_model is not None and prompt.shape[1] != d_model):
        need = "a 2-D (p, d_model) array"
        if d_model is not None:
            need = f"(p, {d_model}) (d_model = {d_model})"
        raise BadInput(
            f"{path}: prompt {key!r} has shape {tuple(prompt.shape)}; the model needs {need}"
        )
    if prompt.shape[0] == 0:  # scored "+prompt" with nothing prepended: the model alone
        raise BadInput(f"{path}: prompt {key!r} has 0 rows; a prompt has at least one")
    if not torch.isfinite(prompt).all():
        raise DamagedFile(f"{path}: prompt {key!r} holds NaN or inf values")
    if length is not None and prompt.shape[0] != length:
        raise BadInput(
            f"{path}: prompt {key!r} has length {prompt.shape[0]}; --prompt-length is {length}"
        )
    return prompt


# ---------------------------------------------------------------------------
# PEFT prompt-tuning adapter
# ---------------------------------------------------------------------------


def peft_adapter_config(
    num_virtual_tokens,
    token_dim,
    base_model_name_or_path,
    num_layers=None,
    num_attention_heads=None,
    task_type="SEQ_2_SEQ_LM",
) -> dict:
    """adapter_config.json of a PEFT PromptTuningConfig for a seq2seq model, with the
    fields PEFT itself writes; the prompt was trained, so `prompt_tuning_init` is
    RANDOM (no init text or tokenizer to record) and `inference_mode` true."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path),
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": task_type,  # CAUSAL_LM: the prompt goes before a decoder's input (App. C.6)
        "token_dim": token_dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def write_peft_adapter(
    folder, prompt, base_model_name_or_path, num_layers=None, num_attention_heads=None
):
    """Write a (p, d_model) prompt as a PEFT prompt-tuning adapter folder.

    `base_model_name_or_path` is recorded in adapter_config.json (a Hub id or the
    HF-layout model folder). When it is a local folder, its config.json gives
    num_layers and num_heads and must have d_model equal to the prompt's width.
    The folder is written whole or not at all; an existing adapter folder is
    replaced, a folder holding anything else is refused (so that an export into,
    say, a run's best/ cannot wipe the model there)."""
    from safetensors.torch import save_file

    prompt = _as_prompt(prompt, folder)
    folder = Path(folder)
    others = (
        sorted(p.name for p in folder.iterdir() if p.name not in ADAPTER_FILES)
        if folder.is_dir()
        else []
    )
    if others:
        raise BadInput(
            f"{folder}: holds {', '.join(others[:3])}, not only a PEFT adapter; "
            "write the adapter to a folder of its own"
        )
    config = base_model_config(base_model_name_or_path)
    causal = "hidden_size" in config and "d_model" not in config  # a Llama-family decoder
    width = config.get("hidden_size" if causal else "d_model")
    _check_width(prompt, width, Path(str(base_model_name_or_path)) / "config.json")
    layers, heads = (
        ("num_hidden_layers", "num_attention_heads") if causal else ("num_layers", "num_heads")
    )
    adapter = peft_adapter_config(
        prompt.shape[0],
        prompt.shape[1],
        base_model_name_or_path,
        num_layers if num_layers is not None else config.get(layers),
        num_attention_heads if num_attention_heads is not None else config.get(heads),
        "CAUSAL_LM" if causal else "SEQ_2_SEQ_LM",
    )

    def write(tmp):
        with open(tmp / PEFT_CONFIG, "w", encoding="utf-8") as f:
            json.dump(adapter, f, indent=2, sort_keys=True)
        save_file({PEFT_KEY: prompt}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})

    _write_folder(folder, write)


def read_peft_adapter(folder, d_model=None) -> torch.Tensor:
    """The (p, d_model) fp32 prompt of a PEFT prompt-tuning adapter folder: the first
    num_virtual_tokens rows of `prompt_embeddings` (what PEFT prepends to a seq2seq
    encoder). Refuses another peft_type or task_type, and a width other than `d_model`."""
    folder = Path(folder)
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        raise BadInput(f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedFile(f"{config_path}: cannot read the adapter config ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise BadInput(
            f"{config_path}: peft_type is {found!r}; only a PROMPT_TUNING adapter holds "
            "a soft prompt promot can use"
        )
    if config.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        raise BadInput(
            f"{config_path}: task_type is {config['task_type']!r}; promot's prompts are "
            "SEQ_2_SEQ_LM prompts, prepended to T5's encoder"
        )
    for key in ("num_virtual_tokens", "token_dim", "num_transformer_submodules"):
        value = config.get(key)  # "5", 2.5 or -1 would fail later, or take other rows
        if value is not None and (type(value) is not int or value < 1):
            raise BadInput(f"{config_path}: {key} is {value!r}; expected an integer >= 1")
    embeddings = _peft_embeddings(folder)
    rows = config.get("num_virtual_tokens") or embeddings.shape[0]
    if embeddings.dim() != 2 or embeddings.shape[0] < rows:
        raise DamagedFile(
            f"{folder}: {PEFT_KEY} has shape {tuple(embeddings.shape)}; "
            f"num_virtual_tokens is {rows}"
        )
    token_dim = config.get("token_dim")
    if token_dim is not None and embeddings.shape[1] != token_dim:
        raise DamagedFile(
            f"{folder}: {PEFT_KEY} is {embeddings.shape[1]} wide but token_dim is {token_dim}"
        )
    prompt = _as_prompt(embeddings[:rows], folder)
    _check_width(prompt, d_model, folder)
    return prompt


def _peft_embeddings(folder: Path) -> torch.Tensor:
    """`prompt_embeddings` from adapter_model.safetensors (or an older PEFT's .bin)."""
    for name in (PEFT_WEIGHTS, "adapter_model.bin"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors = load_file(str(path))
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors and torch raise several types for a bad file
            raise DamagedFile(f"{path}: cannot read the adapter weights ({err})") from None
        if PEFT_KEY not in tensors:
            raise DamagedFile(f"{path}: no tensor {PEFT_KEY!r}; found {sorted(tensors)}")
        return tensors[PEFT_KEY]
    raise DamagedFile(f"{folder}: no {PEFT_WEIGHTS}")


# ---------------------------------------------------------------------------
# T5X prompt tuning's .npy
# ---------------------------------------------------------------------------


def write_t5x_npy(path, prompt) -> None:
    """Write a (p, d_model) prompt as T5X prompt tuning's float32 .npy, atomically."""
    import numpy

    prompt = _as_prompt(prompt, path)

    def write(tmp):
        with open(tmp, "wb") as f:
            numpy.save(f, prompt.numpy())

    _write_file(Path(path), write)


def read_t5x_npy(path, d_model=None) -> torch.Tensor:
    """The (p, d_model) fp32 prompt of a T5X .npy; a width other than `d_model` is refused."""
    import numpy

    try:
        array = numpy.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DamagedFile(f"{path}: cannot read a .npy prompt ({err})") from None
    if array.dtype.kind != "f":  # a string or object array has no prompt in it
        raise BadInput(f"{path}: a .npy prompt holds floats, got dtype {array.dtype}")
    prompt = _as_prompt(torch.from_numpy(numpy.asarray(array, dtype=numpy.float32)), path)
    _check_width(prompt, d_model, path)
    return prompt


# ---------------------------------------------------------------------------
# Atomic writes (a folder or a file appears whole, or not at all)
# ---------------------------------------------------------------------------


def _write_folder(folder: Path, write) -> None:
    folder = folder.absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp makes a private (0700) folder; use the usual modes
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if folder.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, write) -> None:
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _read_any(path, task, d_model) -> torch.Tensor:
    """A promot prompt.safetensors (the `prompt.<task>` or `prompt` tensor), a T5X .npy,
    or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        return read_peft_adapter(path, d_model)
    if path.suffix == ".npy":
        return read_t5x_npy(path, d_model)
    tensors = _prompt_tensors(path)
    tasks = sorted(k[len("prompt.") :] for k in tensors if k.startswith("prompt."))
    if not task and len(tasks) > 1:
        raise BadInput(f"{path}: holds the prompts of {', '.join(tasks)}; pass --task")
    return _prompt_of(tensors, task or (tasks[0] if tasks else None), path, d_model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m support.prompt_formats", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="write a promot prompt as a PEFT adapter or a T5X .npy"
    )
    export.add_argument("prompt", help="promot's prompt.safetensors (or a .npy)")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--peft", metavar="DIR", help="write a PEFT prompt-tuning adapter folder here"
    )
    target.add_argument("--npy", metavar="FILE", help="write T5X's (p, d_model) float32 .npy here")
    export.add_argument(
        "--base", help="the base model (Hub id or HF-layout folder); needed for --peft"
    )
    export.add_argument("--task", help="which prompt of a multi-task prompt file")
    imp = commands.add_parser(
        "import", help="write a PEFT adapter or a .npy as promot's prompt.safetensors"
    )
    imp.add_argument("source", help="a PEFT adapter folder or a .npy")
    imp.add_argument("--to", required=True, help="the prompt.safetensors to write")
    imp.add_argument(
        "--task", required=True, help="the task the prompt was trained on (its key prompt.<task>)"
    )
    imp.add_argument(
        "--base", help="a model folder whose config.json d_model the prompt must match"
    )
    args = parser.parse_args(argv)
    try:
        d_model = base_model_config(args.base).get("d_model") if args.base else None
        if args.command == "export":
            prompt = _read_any(args.prompt, args.task, d_model)
            if args.npy:
                write_t5x_npy(args.npy, prompt)
            elif not args.base:
                raise BadInput("--peft needs --base, the model the prompt was trained with")
            else:
                write_peft_adapter(args.peft, prompt, args.base)
        else:
            prompt = _read_any(args.source, None, d_model)
            _write_file(Path(args.to), lambda tmp: save_prompts({args.task: prompt}, tmp))
    except (BadInput, DamagedFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
