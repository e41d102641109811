"""support/hf_files.py: a pytorch_model.bin read without running the code a pickle may hold.

Older Hugging Face checkpoints store their weights as a pickled state dict
(pytorch_model.bin, or shards named by pytorch_model.bin.index.json; model.py finds
the files). `torch.load(weights_only=True)` unpickles only tensors and plain
containers: a file that needs pickled code to load is refused, never executed.
model.py reads safetensors itself and calls `read_bin` for these files.
Imports only torch and the standard library.
"""

import torch

try:
    from support.errors import DamagedFile
except ImportError:  # copied alone
    DamagedFile = ValueError


def read_bin(file, names=None):
    """Yields (name, tensor) from one pytorch_model*.bin file (only `names` if given)."""
    try:  # weights_only: never run code stored in the pickle
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise DamagedFile(f"{file}: cannot read ({e})") from None
        state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise DamagedFile(
            f"{file}: refused to load; it is not a plain tensor file that loads without "
            f"executing pickled code ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    for name, tensor in state.items():
        if names is None or name in names:
            yield name, tensor
