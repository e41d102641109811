"""support/: the plumbing of promot, one leaf module per job.

The four main files at the top level (model.py, data.py, evaluate.py,
promot.py) hold the ideas; what they need but a reader of the method does not
lives here. Every module in this folder imports only the standard library,
torch and the runtime packages (safetensors, sentencepiece, numpy, ...),
never a main file and never another module of this folder, so each one can
be copied alone into another codebase:

  adafactor.py        T5X's Adafactor rule, also on FSDP2-sharded parameters
  fsdp.py             process group + device mesh, FSDP2 sharding, per-rank loading, gathering
  run_checkpoints.py  a run folder: atomic writes, its lock, exactly-resumable checkpoints (no pickle)
  lora.py             LoRA adapters attached to any nn.Linear by forward hooks
  hf_files.py         Hugging Face checkpoint files: find, stream, write (safetensors / .bin / sharded)
  dataset_files.py    readers of each data set's published file layout
  prompt_formats.py   a trained prompt as a PEFT prompt-tuning adapter or T5X's .npy, and back
  cli.py              command-line plumbing: renamed flags that still work, a progress line
"""
