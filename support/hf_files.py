"""support/hf_files.py: the weight files of a Hugging Face checkpoint directory.

Finds the weights of a directory (model.safetensors, sharded safetensors with
model.safetensors.index.json, pytorch_model.bin or its sharded index), reads
them one tensor at a time or just a few named tensors, and writes a directory
(config.json + safetensors, sharded with an index above a size) that replaces
an existing one only once it is complete. Tensor names are the files' own
(transformers'); translating them to a model's names is the caller's job.

.bin files are read with `torch.load(weights_only=True)`: a file that needs
pickled code to load is refused, never executed. Imports only torch,
safetensors and the standard library.
"""

import json
import os
import re
import shutil
import tempfile

import torch


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is not what the loader expects."""


WEIGHT_FILES = re.compile(r"config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?")


def _locate(path):
    """(files, {name: file} or None) of a checkpoint directory, safetensors preferred.
    The map comes from a sharded checkpoint's index; a single file has none."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)], None
        index_path = os.path.join(path, index)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                weight_map = {name: os.path.join(path, file) for name, file in weight_map.items()}
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError, TypeError) as e:
                raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' ({e!r})") from None
            outside = [f for f in weight_map.values() if os.path.dirname(os.path.relpath(f, path)) or f == path]
            if outside:  # a shard is a file name in this folder; '../x' or '/abs' would read elsewhere
                raise CheckpointError(f"{index_path}: weight_map names {os.path.relpath(outside[0], path)!r}, "
                                      "not a file of this folder")
            return list(dict.fromkeys(weight_map.values())), weight_map
    raise CheckpointError(f"{path}: found no weights; expected model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json")


def weight_files(path):
    """The weight files of a checkpoint directory, in reading order."""
    return _locate(path)[0]


def read_file(file, names=None):
    """Yields (name, tensor) from one weights file, one tensor at a time (only `names` if given)."""
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: listed in the checkpoint index but missing")
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if names is None or name in names:
                        yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read as safetensors ({e}); the file may be truncated or "
                                  "corrupted, download it again") from None
        return
    try:  # weights_only: never run code stored in the pickle
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{file}: cannot read ({e})") from None
        state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{file}: refused to load; it is not a plain tensor file that loads without "
                              f"executing pickled code ({type(e).__name__}: {str(e)[:200]})") from None
    for name, tensor in state.items():
        if names is None or name in names:
            yield name, tensor


def stream_tensors(path):
    """Yields (name, tensor, file) for every tensor of a checkpoint directory, one at a time."""
    for file in weight_files(path):
        for name, tensor in read_file(file):
            yield name, tensor, file


def read_tensors(path, names):
    """{name: tensor} for those of `names` the checkpoint holds; reads nothing else.

    A sharded checkpoint's index says which file holds each name, so only those
    files are opened; safetensors reads just the named tensors."""
    files, weight_map = _locate(path)
    wanted = {}
    for name in names:
        file = files[0] if weight_map is None else weight_map.get(name)
        if file is not None:
            wanted.setdefault(file, set()).add(name)
    return {name: tensor for file, these in wanted.items() for name, tensor in read_file(file, these)}


def _shards(tensors, max_shard_bytes):
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def write_checkpoint(path, config_dict, tensors, max_shard_bytes=5 * 10**9):
    """Writes config.json + safetensors (sharded with an index above max_shard_bytes) at `path`.

    The directory is written under a temporary name and swapped in at the end,
    so a failed write leaves the previous checkpoint untouched. Files in an
    existing directory that are not weights (spiece.model, a prompt) are kept.
    `tensors` maps the file's names to tensors (any device).
    """
    from safetensors.torch import save_file
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_dict, f, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp and safetensors create private (0700/0600) files; use the usual modes
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if not WEIGHT_FILES.fullmatch(name):
                    src = os.path.join(path, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
