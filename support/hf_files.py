"""support/hf_files.py: the plumbing of Hugging Face checkpoint files that model.py leaves out.

* `read_bin`: a pytorch_model.bin read without running the code a pickle may hold. Older
  Hugging Face checkpoints store their weights as a pickled state dict (pytorch_model.bin,
  or shards named by pytorch_model.bin.index.json; model.py finds the files).
  `torch.load(weights_only=True)` unpickles only tensors and plain containers: a file that
  needs pickled code to load is refused, never executed. model.py reads safetensors itself
  and calls `read_bin` for these files.
* `replace_folder`: how model.save_pretrained replaces a checkpoint folder, whole or not at
  all, keeping the files beside the weights (spiece.model, a prompt).

Imports only torch and the standard library.
"""

import os
import re
import shutil
import tempfile
import warnings

import torch

try:
    from support.errors import DamagedFile
except ImportError:  # copied alone
    DamagedFile = ValueError


def read_bin(file, names=None):
    """Yields (name, tensor) from one pytorch_model*.bin file (only `names` if given); a file
    that is not a plain {name: tensor} pickle (empty, truncated, another object, pickled code)
    is one DamagedFile naming it."""
    state = _load(file)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DamagedFile(f"{file}: expected a state dict of named tensors, got {type(state)}")
    for name, tensor in state.items():
        if names is None or name in names:
            yield name, tensor


def _load(file):
    for mmap in (True, False):  # the zip format maps its tensors; the legacy format loads whole
        try:  # weights_only: never run code stored in the pickle
            with warnings.catch_warnings():  # one line for the user, not the unpickler's notes
                warnings.simplefilter("ignore")
                return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):
                continue
            why = e
        except Exception as e:  # noqa: BLE001  EOFError, UnpicklingError, ...: all one answer
            why = e
        raise DamagedFile(
            f"{file}: refused to load; it is not a plain tensor file that loads without "
            f"executing pickled code ({type(why).__name__}: {str(why)[:200]})"
        ) from None


_OLD_WEIGHTS = re.compile(
    r"config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
)


def replace_folder(path, write):
    """Runs write(folder) on a new folder beside `path`, then swaps it in for `path`, carrying
    over the files of an old `path` that are not weights. A failed write leaves `path` as it was."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        write(tmp)
        # mkdtemp and safetensors make private (0700/0600) files; give them the usual modes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.isdir(path):  # carry over spiece.model, a prompt, ...: all but the weights

            def old_weights(folder, names):
                return [n for n in names if folder == path and _OLD_WEIGHTS.fullmatch(n)]

            shutil.copytree(path, tmp, ignore=old_weights, dirs_exist_ok=True)
            os.rename(path, tmp + ".old")
            os.rename(tmp, path)
            shutil.rmtree(tmp + ".old")
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TOKENIZER_FILES = (
    "spiece.model",  # T5, mT5
    "tokenizer.model",  # SentencePiece: Llama 2, Mistral, TinyLlama
    "tokenizer.json",  # Llama 3, Qwen, SmolLM
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def copy_tokenizer(source, folder):
    """Copies a checkpoint folder's tokenizer files (those of TOKENIZER_FILES it has) into
    `folder`, so a model saved there is read with its own tokenizer."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), folder)
