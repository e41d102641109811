"""support/: the plumbing of promot, one leaf module per job.

The four main files at the top level (model.py, data.py, evaluate.py,
promot.py) hold the ideas; what they need but a reader of the method does not
lives here. Every module in this folder imports only the standard library,
torch and the runtime packages (safetensors, sentencepiece, numpy, ...),
never a main file, and of this folder at most errors.py, the two error types
(BadInput, DamagedFile). So each one can be copied into another codebase,
either alone or with that one file (tests/test_layout.py copies each as said):

Copied alone (nothing of promot beside it):
  errors.py           BadInput and DamagedFile, the two errors a user can cause
  adafactor.py        T5X's Adafactor rule, also on FSDP2-sharded parameters
  fsdp.py             process group + device mesh, FSDP2 sharding, per-rank loading, gathering
  t5x_loss.py         T5X's token cross-entropy with label smoothing and z-loss, gradient by hand
  hf_files.py         pytorch_model.bin read without running pickled code (model.py reads
                      safetensors), a checkpoint folder replaced atomically; without errors.py
                      its errors are ValueErrors
  prompt_formats.py   the prompt file (prompt.safetensors), PEFT prompt-tuning adapters, T5X's
                      .npy; without errors.py its errors are ValueErrors
  causal_tokenizer.py a decoder-only checkpoint's tokenizer.json (through `tokenizers`) or
                      tokenizer.model, as transformers' AutoTokenizer reads them; without
                      errors.py its errors are ValueErrors

Copied with support/errors.py beside it (as support/errors.py, an importable folder):
  run_checkpoints.py  a run folder: atomic writes, its lock, exactly-resumable checkpoints
                      (no pickle)
  lora.py             LoRA adapters attached to any nn.Linear by forward hooks
  dataset_files.py    readers of each data set's published file layout; names and links refused
  cli.py              command-line plumbing: settings dataclasses as flags, one-line errors,
                      progress
  mixture.py          several tasks' examples as one endless, resumable stream (T5's mixing)
"""
