"""A run folder's files: atomic writes, a lock, and exactly-resumable training checkpoints.

A leaf of promot (it imports only torch, safetensors, the standard library and
support/errors.py): copy it with errors.py into another codebase.

- `atomic_write(path)`: the one way promot writes a file. A reader (or a rerun
  after a kill, a full disk, a Ctrl-C) sees the old file or the new one, never
  a half-written one that looks complete.
- `lock_run_folder(folder)`: one process per run folder; a second one is
  refused with the PID and host that hold it, a dead holder's lock is taken over, and so is
  one left empty by a write that failed (a full disk).
- `check_run_folder`: what a run folder holds is input too. A link in it is refused (an
  append or an export would go through it); the settings recorded there must match, paths
  inside the folder by their place in it (a moved or copied run folder resumes).
- `StopRequest`: SIGTERM (a scheduler's preemption notice) turned into a
  request the training loop reads after a step, agreed by every rank, so the
  run saves a checkpoint before it exits.
- `save_checkpoint` / `latest_checkpoint` / `load_checkpoint`: a directory per
  step holding every rank's shard of the training state and its RNG state in
  safetensors (no pickle: a shared or downloaded run folder cannot run code on
  --resume), the non-tensor state and the trainer's bookkeeping (step, data
  position, best score) in JSON, and a SHA-256 per file, checked on load, so a
  resumed run continues bit for bit or is refused; trainer.json and best.json carry the
  SHA-256 of their own JSON (`seal`) and are read back against a schema. A checkpoint counts
  only when complete (`incomplete`: every file there, of the size and step its record says,
  trainer.json sealed): pruning keeps the newest complete ones, and --resume names each
  incomplete one it skips.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from support.errors import BadInput, DamagedFile

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # open() flag: a link is an error, not followed
# The bookkeeping that --resume trusts carries a SHA-256 of its JSON (seal), like the rank files:
# a hand edit of a best score or a data position (a checkpoint's trainer.json, sealed by
# save_checkpoint; best.json, by write_best) is a DamagedFile, not a run on other data.


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path`; write the file there. On success it is
    flushed to disk and renamed over `path`; on any failure it is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_partial_writes(folder):
    """Delete what an interrupted write left anywhere under `folder`: atomic_write's
    NAME.tmp.PID files, checkpoint step_N.tmp folders, and NAME.tmp-XXXX folders of a
    model export (support/hf_files.py's temporary folder, as large as the model)."""
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if d.endswith(".tmp") or ".tmp-" in d]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
        for name in files:
            if ".tmp." in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))


def log(out, record=None, line=None):
    """Appends `record` (a dict) to RUN/log.jsonl and prints `line`; either may be None. The file
    is opened without following a link (check_run_folder refuses links in a run folder)."""
    if record:
        path = os.path.join(out, "log.jsonl")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
        except OSError as e:
            raise BadInput(f"cannot write {path} ({e.strerror}); is it a link?") from None
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if line:
        print(line, flush=True)


def record_settings(out, stage, settings):
    """RUN/config.json with `settings` recorded under `stage` (the other stages' kept)."""
    path = os.path.join(out, "config.json")
    saved = read_json(path, "a promot run's settings") if os.path.isfile(path) else {}
    write_json(path, {**saved, stage: settings})


@contextlib.contextmanager
def stage_folder(out, stage, settings, main=True):
    """RUN/<stage>/ of one training run, yielded once the run holds RUN's lock (one run per
    folder), RUN/config.json records `settings` under `stage` (so a kill leaves a run that
    --resume knows) and a killed run's partial writes are gone. Call it on every rank; only
    `main` (rank 0) writes."""
    lock = lock_run_folder(out)
    try:
        stage_dir = os.path.join(out, stage)
        if main:
            record_settings(out, stage, settings)
            os.makedirs(stage_dir, exist_ok=True)
            remove_partial_writes(stage_dir)
        yield stage_dir
    finally:
        if lock:
            unlock_run_folder(lock)


def resume_stage(stage_dir, state, device, best, say=print):
    """--resume: fills `state` from the newest complete checkpoint in RUN/<stage>/checkpoints/
    (load_latest), and `best` (a dict) from RUN/<stage>/best.json. Returns (checkpoint path,
    trainer record), or (None, None) when there is no checkpoint yet."""
    ckpt, trainer = load_latest(os.path.join(stage_dir, "checkpoints"), state, device, say)
    best_path = os.path.join(stage_dir, "best.json")
    if ckpt and os.path.isfile(best_path):
        best.update(read_best(best_path, keys=best))
    return ckpt, trainer


def write_best(path, best):
    """RUN/<stage>/best.json: `best`, sealed (seal) so that read_best knows an edited one."""
    write_json(path, seal(best))


def read_best(path, keys):
    """RUN/<stage>/best.json, the best step so far (`keys`: step, score, scores, evaluated),
    checked: its SHA-256 (seal) and its schema, else one DamagedFile naming it."""
    record = read_json(path, "the best step's record", keys=keys)
    problem = seal_problem(record) or _best_problem(
        *(record[k] for k in ("step", "score", "scores", "evaluated"))
    )
    if problem:
        raise DamagedFile(
            f"{path}: {problem}; expected the best step's record as promot wrote it (delete it, "
            "and best/, to choose the best checkpoint afresh)"
        )
    return {k: v for k, v in record.items() if k != "sha256"}


def _best_problem(step, score, scores, evaluated):
    """What is wrong with best.json's values, or ""."""
    if not (step is None and score is None or _is_count(step) and _is_score(score)):
        return (
            f"step {_short(step)}, score {_short(score)}: expected an integer step and a "
            "finite score, or both null"
        )
    if not (scores is None or isinstance(scores, dict) and all(map(_is_score, scores.values()))):
        return f"scores {_short(scores)}: expected {{task: a finite score}}"
    if not (isinstance(evaluated, list) and all(map(_is_count, evaluated))):
        return f"evaluated {_short(evaluated)}: expected a list of steps"
    return ""


def _short(value):
    return repr(value)[:40]


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_score(value):
    """A finite number (a bool is not one)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def seal(record):
    """`record` (a JSON object) with "sha256": the SHA-256 of its canonical JSON (sorted keys),
    so re-indenting the file keeps it valid and an edit of any value does not."""
    record = {k: v for k, v in record.items() if k != "sha256"}
    canonical = json.dumps(record, sort_keys=True, allow_nan=True).encode()
    return {**record, "sha256": hashlib.sha256(canonical).hexdigest()}


def seal_problem(record):
    """Why `record` (read back) is not what seal() wrote, or ""."""
    if not isinstance(record, dict) or "sha256" not in record:
        return "no SHA-256 (written by an older promot, or edited)"
    if seal(record)["sha256"] != record["sha256"]:
        return "SHA-256 mismatch, the file was changed after it was written"
    return ""


def write_training_record(folder, stage, task, shots, step, chosen_at_shots=None):
    """training.json in an export folder: what evaluate.py's table says of it (the stage, the
    fine-tuned task, the training shots, and how the checkpoint was chosen: by its validation
    score at `chosen_at_shots` shots, or None: the last step)."""
    chosen = "the last step" if chosen_at_shots is None else ""
    chosen = chosen or f"validation score at {chosen_at_shots}-shot"
    record = dict(stage=stage, task=task, shots=shots, step=step, chosen_by=chosen)
    write_json(
        os.path.join(folder, "training.json"), {**record, "chosen_at_shots": chosen_at_shots}
    )


def inputs_record(tasks, splits, fingerprint, model_dir, weight_files, contents=False):
    """What RUN/config.json records of a run's inputs for --resume to compare: {"data": each
    split's `fingerprint` and each task's template and label words, "model_files":
    model_fingerprint}. `splits`: {split: [examples of each of `tasks`]}."""
    data = {f"{t.name} {s}": fingerprint(x) for s in splits for t, x in zip(tasks, splits[s])}
    for t in tasks:
        data[f"{t.name} task"] = f"template {t.template!r}, label words {list(t.label_words or ())}"
    return {"data": data, "model_files": model_fingerprint(model_dir, weight_files, contents)}


def model_fingerprint(path, files, contents=False):
    """{file: fingerprint} of a checkpoint folder for --resume: config.json and its tokenizer
    file by their SHA-256, the weight `files` by size and modification time (by SHA-256 with
    `contents`: reads every byte)."""
    found = {}
    names = ("config.json", "spiece.model", "tokenizer.model", "tokenizer.json")
    small = [os.path.join(path, n) for n in names]
    for file in [f for f in small if os.path.isfile(f)] + list(files):
        stat = os.stat(file)
        by_size = not contents and file in files
        found[os.path.basename(file)] = (
            f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"
            if by_size
            else f"sha256 {_sha256(file)[:16]}"
        )
    return found


def read_json(path, what, kind=dict, keys=()):
    """The JSON object (or `kind`) in `path`, holding `keys`, else one DamagedFile naming it and
    `what` it is."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise DamagedFile(f"{path}: unreadable, expected {what} ({type(e).__name__})") from None
    if not isinstance(value, kind) or any(k not in value for k in keys):
        raise DamagedFile(f"{path}: expected {what}, a JSON {kind.__name__} of {list(keys)}")
    return value


class StopRequest:
    """Within `with StopRequest() as stop:`, SIGTERM sets `stop.signalled` instead of killing the
    process; `stop.agreed(device)` is True on every rank when any rank was signalled."""

    def __enter__(self):
        self.signalled = False
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        self.signalled = True  # acted on at the end of the current step

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)

    def agreed(self, device):
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def write_json(path, obj, indent=2):
    """`obj` as JSON at `path`, atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


def check_run_folder(
    out, stage, resume, settings, may_change=(), paths=(), recorded=None, allowed=()
):
    """Refuse (BadInput, one line) an `out` folder the run for `stage` must not use.

    `out` may be new (its nearest existing parent writable), or a run folder (with a
    config.json) that holds no `stage` yet, or, with `resume`, one whose recorded
    settings for `stage` equal `settings` except `may_change` (`paths` compare as
    resolved paths) and whose recorded fingerprints equal `recorded` ({"data": {what:
    fingerprint}, "model_files": ...}; a changed file would continue the run on other examples
    or weights), except the groups in `allowed` (--allow-change data, model)."""
    stage_dir, run_config = os.path.join(out, stage), os.path.join(out, "config.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out {out} exists and is not a directory")
    check_no_links(out)
    parent = next(p for p in _ancestors(os.path.abspath(out)) if os.path.exists(p))
    if not os.path.isdir(parent):
        raise BadInput(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {parent} is not writable; choose a folder you can write to")
    if os.path.isdir(out) and set(os.listdir(out)) - {".lock"} and not os.path.isfile(run_config):
        raise BadInput(
            f"--out {out} is not empty and holds no promot run (no config.json); "
            "choose a new folder"
        )
    if os.path.exists(stage_dir) and not os.path.isdir(stage_dir):
        raise BadInput(f"--out {out}: {stage_dir} is a file, not the stage's folder")
    if os.path.isdir(stage_dir) and os.listdir(stage_dir) and not resume:
        raise BadInput(
            f"--out {out} already holds a {stage} run ({stage_dir}); pass --resume to "
            "continue it, or choose a new --out (nothing was overwritten)"
        )
    if not (resume and os.path.isfile(run_config)):
        return
    saved = read_json(run_config, "a promot run's settings").get(stage)
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise DamagedFile(f"{run_config}: {stage} is not an object of settings")
    diffs = settings_changes(saved, settings, may_change, paths, (saved.get("out"), out))
    if diffs:
        raise BadInput(
            f"--resume: {run_config} was written by another configuration: " + "; ".join(diffs)
        )
    for group, now in (recorded or {}).items():
        then = saved.get(group) if isinstance(saved.get(group), dict) else {}
        # what the run recorded (a run of an older promot recorded less)
        changed = [f"{k}: {v} then, {now.get(k)} now" for k, v in then.items() if now.get(k) != v]
        if group in saved and changed and group not in allowed:
            what, flag = group.replace("_", " "), f"--allow-change {group.split('_')[0]}"
            raise BadInput(
                f"--resume: the {what} changed since {stage} started ({'; '.join(changed)}); "
                f"restore them, or pass {flag} to continue with the new {what}"
            )


def check_no_links(out):
    """A run folder holds its own files: a symbolic link anywhere in it (log.jsonl to a system
    file, final/ to a folder elsewhere) is refused in one line, since an append would write
    through it and an export would copy what it leads to."""
    for folder, dirs, files in os.walk(out):  # links to folders are listed, not entered
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            if os.path.islink(path):
                raise BadInput(
                    f"--out {out}: {path} is a link (to {os.readlink(path)}); promot reads and "
                    "writes a run folder's own files only: replace the link with a copy"
                )


def _ancestors(path):
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def lock_run_folder(folder):
    """Take `folder`'s lock file (.lock, holding the PID and host); returns its path (None on
    ranks > 0).

    Call it on every rank: rank 0 creates the folder and takes the lock, the
    others learn whether it could. A lock held by a live process, or by any
    process on another host, is refused; one left by a process that died on
    this host is taken over."""
    error, path = None, None
    if _rank() == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            path = _take_lock(folder)
        except (BadInput, OSError) as e:
            error = e if isinstance(e, BadInput) else BadInput(f"{folder}: cannot lock ({e})")
    if dist.is_initialized() and dist.get_world_size() > 1:
        taken = [error is None]
        dist.broadcast_object_list(taken, src=0)
        if not taken[0] and error is None:
            error = BadInput(f"{folder}: rank 0 could not lock the run folder")
    if error is not None:
        raise error
    return path


LOCK_WRITE_S = 2.0  # a live run writes its lock at once; one empty for this long is left over


def _take_lock(folder):
    path = os.path.join(folder, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | NO_FOLLOW, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:
                continue  # released this instant: try again
            if holder and (holder["host"] != me["host"] or _alive(holder["pid"])):
                raise BadInput(
                    f"{folder} is in use by process {holder['pid']} on {holder['host']} "
                    f"(lock {path}); "
                    "wait for it to finish, or delete the lock file if that process is gone"
                ) from None
            gone = f"process {holder['pid']} is gone" if holder else "it is empty or unreadable"
            print(f"warning: {path}: {gone} and no run holds it; taken over", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
        except OSError as e:  # a full disk: leave no empty lock behind to block the next run
            with contextlib.suppress(OSError):
                os.remove(path)
            raise BadInput(f"{folder}: cannot write its lock {path} ({e.strerror})") from None
        return path
    raise BadInput(
        f"{path}: cannot take the run folder's lock; delete the file if no run uses {folder}"
    )


def _lock_holder(path):
    """{"pid", "host"} of the lock at `path`; None when it is gone; {} when it is empty or
    unreadable and has stayed so for LOCK_WRITE_S since it was last written (a write that
    failed, e.g. on a full disk), which no live run is doing."""
    for _ in range(2):
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
            pid = holder.get("pid") if isinstance(holder, dict) else None
            if type(pid) is int and 0 < pid < 2**31:  # a bool, 0 or -1 would name others
                return {"pid": pid, "host": str(holder.get("host"))}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            pass  # being written this instant, or left empty: look at its age
        try:
            age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None
        if age >= LOCK_WRITE_S:
            return {}
        time.sleep(LOCK_WRITE_S - age)
    return {}


def unlock_run_folder(path):
    """Remove a lock taken by this process."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)


def settings_changes(saved, now, may_change=(), paths=(), runs=(None, None)):
    """["--name: saved X, now Y"] for every setting of `now` that differs from `saved` (a run's
    recorded settings), except those in `may_change`; the settings in `paths` compare as resolved
    paths, so a trailing slash or a relative path is the same place, and a path inside the run
    folder (`runs`: the saved run's --out and this one's) by its place in it, so a moved or
    copied run folder resumes (stage 2 reads RUN/stage1/best/)."""

    def norm(key, value, out):
        if key not in paths or not isinstance(value, str) or not value:
            return value
        return _place_in_run(value, out) or os.path.realpath(value)

    return [
        f"{_setting_name(k)}: saved {saved.get(k)!r}, now {v!r}"
        for k, v in now.items()
        if k not in may_change and norm(k, saved.get(k), runs[0]) != norm(k, v, runs[1])
    ]


def _place_in_run(path, out):
    """ "RUN/<path relative to out>" when `path` is inside the run folder `out`, else None. A saved
    path is compared with the saved --out as written (both relative to the same old folder)."""
    if not isinstance(out, str) or not out:
        return None
    for resolve in (os.path.abspath, os.path.realpath):
        inside = os.path.relpath(resolve(path), resolve(out))
        if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
            return os.path.join("RUN", inside)
    return None


def _setting_name(key):  # the saved world size is how many ranks (processes) ran
    return (
        "ranks (torchrun --nproc-per-node)" if key == "world_size" else f"--{key.replace('_', '-')}"
    )


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _leaves(tree, prefix=""):
    """(path, value) of every leaf of nested dicts and lists; paths join keys with '/'."""
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list)
        else None
    )
    if items is None:
        yield prefix, tree
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}/{key}" if prefix else str(key))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state(device):
    state = {"rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(folder, step, state, trainer, device, keep=1):
    """Write folder/step_N.tmp, then rename it: a checkpoint exists whole or not at all.

    `state` is nested dicts/lists of tensors (DTensors: this rank's shard) and
    JSON values. Rank r writes rank{r}.safetensors (its tensors and RNG state, the step in
    its metadata) and rank{r}.json (that file's step, size and SHA-256); rank 0 adds
    trainer.json (`trainer`, plus the non-tensor values of `state`). Then only the newest
    `keep` complete checkpoints are kept (a damaged newer one never outlives a good older
    one). A failed write is one BadInput naming the file; the previous checkpoint is kept.
    Returns the checkpoint's path."""
    from safetensors.torch import save_file

    final = os.path.join(folder, f"step_{step:07d}")
    tmp, rank = final + ".tmp", _rank()
    tensors, values = {}, {}
    for path, value in _leaves(state):
        if isinstance(value, torch.Tensor):
            tensors[path] = _local(value).detach().contiguous().cpu()
        else:
            values[path] = value
    tensors.update(_rng_state(device))
    file = os.path.join(tmp, f"rank{rank}.safetensors")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        save_file(tensors, file, metadata={"step": str(step)})
        record = {"step": step, "bytes": os.path.getsize(file), "sha256": _sha256(file)}
        with open(os.path.join(tmp, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
        if rank == 0:
            with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
                json.dump(seal({**trainer, "step": step, "values": values}), f, indent=1)
    except Exception as e:  # OSError (a full disk), SafetensorError, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(file, e, latest_checkpoint(folder)) from None
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune(folder, final, keep)
    _barrier()
    return final


@contextlib.contextmanager
def write_or_say(what, checkpoints):
    """Inside, a failed write (a full disk's OSError, a SafetensorError, ...) becomes one
    BadInput naming `what` and the newest complete checkpoint in `checkpoints`, intact."""
    try:
        yield
    except (BadInput, DamagedFile):
        raise
    except Exception as e:
        raise write_failed(what, e, latest_checkpoint(checkpoints)) from None


def write_failed(file, error, last):
    """The BadInput of a write that failed: the file, why, and the checkpoint that is intact."""
    why = "no space left on the device" if getattr(error, "errno", None) == errno.ENOSPC else error
    kept = f"the previous checkpoint {last} is intact" if last else "no checkpoint was saved yet"
    return BadInput(f"cannot write {file} ({why}); {kept}")


def prune(folder, newest, keep):
    """Delete all but the `keep` newest complete checkpoints up to `newest` (just written), and
    the incomplete ones older than it; an incomplete newer one is left for --resume to name."""
    complete = [p for p in checkpoints(folder) if p <= newest and not incomplete(p)]
    for path in checkpoints(folder):
        if path < newest and (path not in complete or path in complete[:-keep]):
            shutil.rmtree(path, ignore_errors=True)


def checkpoints(folder):
    """Every checkpoint folder (step_N) in `folder`, complete or not, oldest first."""
    if not os.path.isdir(folder):
        return []
    names = [d for d in os.listdir(folder) if d.startswith("step_") and d[5:].isdigit()]
    return [os.path.join(folder, d) for d in sorted(names)]


def incomplete(path):
    """Why checkpoint `path` is not complete (a missing or unreadable file, a file of another
    size or step than its record says), or "" when complete. Cheap: sizes, not checksums
    (load_checkpoint checks those)."""
    step = int(os.path.basename(path)[5:])
    try:
        with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
            trainer = json.load(f)
        if seal_problem(trainer):
            return f"trainer.json: {seal_problem(trainer)}"
        world = trainer.get("world_size", 1)
        if trainer.get("step") != step or not _is_count(world) or world < 1:
            return f"trainer.json is for step {trainer.get('step')!r}, not {step}"
        if not isinstance(trainer.get("values", {}), dict):
            return "trainer.json's values are not a JSON object"
        for rank in range(world):
            with open(os.path.join(path, f"rank{rank}.json"), encoding="utf-8") as f:
                record = json.load(f)
            size = os.path.getsize(os.path.join(path, f"rank{rank}.safetensors"))
            if record.get("step", step) != step or record.get("bytes", size) != size:
                return f"rank{rank}.safetensors is not the one rank{rank}.json records"
    except FileNotFoundError as e:
        if os.path.isfile(os.path.join(path, ".metadata")):
            return (
                "written by an older promot (torch.distributed.checkpoint, whose metadata is a "
                "pickle); it is not read, since unpickling can run code: start the stage again"
            )
        return f"no {os.path.basename(e.filename)}"
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    return ""


def load_latest(folder, state, device, warn=print):
    """(path, trainer) of the newest complete checkpoint in `folder` that loads, filled into
    `state` as load_checkpoint does, or (None, None) when there is no checkpoint. Each newer
    incomplete or damaged (SHA-256) checkpoint is named in a warning as it is skipped; when
    none is left to fall back on, the last problem is one DamagedFile."""
    found = checkpoints(folder)
    for i, path in enumerate(reversed(found)):
        why = incomplete(path)
        try:
            if why:
                raise DamagedFile(f"{path}: incomplete checkpoint ({why})")
            return path, load_checkpoint(path, state, device)
        except DamagedFile as e:
            if not (why or "SHA-256" in str(e) or "step" in str(e)):
                raise  # another configuration's checkpoint: no older one would fit either
            if i == len(found) - 1:
                raise DamagedFile(
                    f"{e}; no complete checkpoint is left to resume from (move it away to "
                    "start the stage over)"
                ) from None
            warn(f"warning: {e}; skipped, resuming from an older checkpoint")
    return None, None


def latest_checkpoint(folder):
    """The newest complete checkpoint in `folder`, or None."""
    found = [p for p in checkpoints(folder) if not incomplete(p)]
    return found[-1] if found else None


def load_checkpoint(path, state, device):
    """Fill `state` (the live tensors, in place, and its non-tensor values) and this rank's RNG
    from checkpoint `path`; returns the trainer's bookkeeping (trainer.json).

    Raises DamagedFile when a file is missing, damaged (SHA-256) or
    does not fit `state` (shapes, names), before anything is changed."""
    from safetensors import safe_open

    rank, step = _rank(), int(os.path.basename(path)[5:])
    file = os.path.join(path, f"rank{rank}.safetensors")
    why = incomplete(path)
    if why:
        raise DamagedFile(f"{path}: incomplete checkpoint ({why})")
    with open(os.path.join(path, f"rank{rank}.json"), encoding="utf-8") as f:
        expected = json.load(f).get("sha256")
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        trainer = json.load(f)
    if _sha256(file) != expected:
        raise DamagedFile(f"{file}: SHA-256 mismatch, the file was damaged after it was written")
    with safe_open(file, framework="pt") as f:
        saved_step = (f.metadata() or {}).get("step", str(step))
    if saved_step != str(step):  # the files of another step, swapped in together
        raise DamagedFile(f"{file}: holds step {saved_step}'s state, not step {step}'s")
    live = [
        (name, _local(value)) for name, value in _leaves(state) if isinstance(value, torch.Tensor)
    ]
    with safe_open(file, framework="pt") as f, torch.no_grad():  # one tensor in memory at a time
        stored = set(f.keys())
        for name, value in live:
            if name not in stored or list(f.get_slice(name).get_shape()) != list(value.shape):
                raise DamagedFile(
                    f"{file}: tensor {name!r} is missing or has another shape; the "
                    "checkpoint was written by another configuration"
                )
        for name, value in live:
            value.copy_(f.get_tensor(name))
        torch.set_rng_state(f.get_tensor("rng/cpu"))
        if "rng/cuda" in stored:
            torch.cuda.set_rng_state(f.get_tensor("rng/cuda"), device)
    _set_values(state, trainer.pop("values", {}))
    return {k: v for k, v in trainer.items() if k != "sha256"}


def _set_values(tree, values, prefix=""):
    """Put the saved non-tensor values back into nested dicts/lists, in place."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for key, value in items:
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            _set_values(value, values, path)
        elif not isinstance(value, torch.Tensor) and path in values:
            tree[key] = values[path]
