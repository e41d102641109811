"""Adafactor with T5X's update rule, written out by hand (a leaf of promot: torch only).

Copy this file alone into another codebase: it imports nothing but torch.
It is the optimizer of both ProMoT stages (paper App. B.4) and is correct on
FSDP2-sharded parameters (DTensors), where every mean and RMS is reduced
across the ranks so N ranks take exactly the step one process takes.

The rule is `Adafactor.update`, T5X's maths one line at a time, with the
factored second moment in `factored_second_moment`; `Adafactor.update_in_place`
is the same operations in scratch buffers, the faster path that `step` takes.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


class Adafactor(torch.optim.Optimizer):
    """Adafactor with the update rule of T5X (`t5x/adafactor.py`), by hand.

    For a parameter X with gradient G at step t (counted from 1, minus
    `step_offset`):
        decay   = 1 - t^(-decay_rate)                  (0 at t = 1)
        G2      = G*G + epsilon1
        V       = decay*V + (1-decay)*G2                (or its factored form)
        U       = G / sqrt(V)
        U       = U / max(1, RMS(U) / clipping_threshold)
        step    = lr * max(epsilon2, RMS(X))  if multiply_by_parameter_scale
                  lr                          otherwise
        M       = beta1*M + (1-beta1)*step*U            (only when beta1 is set)
        X       = (1 - weight_decay_rate)*X - step*U    (or - M)
    Weight decay is *not* multiplied by the learning rate, as in T5X
    (transformers' Adafactor multiplies it).

    Factoring (Shazeer & Stern 2018): when the second-largest dimension of X
    is at least `min_dim_size_to_factor`, V is kept as two vectors, a "row"
    statistic (mean of G2 over the largest dimension) and a "column" statistic
    (mean over the second largest), and V ~ row * col / mean(row). Dimensions
    are ranked with a stable sort, so for a square matrix the last dimension
    counts as the largest, like numpy.argsort in T5X. T5X's default rule
    refuses parameters of more than 2 dimensions; here they factor over their
    two largest dimensions (T5X's `_factored_dims`), and every RMS is over the
    whole tensor. Smaller tensors keep a full V.

    Learning rate: T5X's Adafactor has no schedule of its own; the trainer
    passes `learning_rate_fn(step)` (the paper uses a constant). Set
    `group["lr"]` between steps to schedule it.

    FSDP2: a parameter may be a DTensor sharded on one dimension of a 1-D
    device mesh (or replicated). Every mean and RMS above is then computed
    over the whole tensor (local sums + all_reduce), so N ranks take exactly
    the steps one process takes, and the state is a DTensor sharded like the
    parameter (row/column statistics that lose the sharded dimension are
    replicated).

    Two paths, one rule. `update` is the rule above, one tensor expression
    per line: read that one. `update_in_place` (the default, `in_place=True`)
    runs the same operations in the same order, every full-size result
    written into two scratch buffers shared by all parameters, so it gives the
    same bits (tests/test_speed_paths.py) with no full-size temporaries. On
    one CPU thread a step over t5-small's 60M parameters took ~130 ms in place
    and ~540 ms plain (a fresh block that large comes from the kernel page by
    page; transformers' Adafactor: ~320 ms); tensors of a few thousand
    elements cost ~0.1 ms either way. On a GPU the in-place path is kept for
    its memory (two buffers, freed after each step); its speed there was not
    measured against the plain one. What bounds the in-place step is its ~23
    passes over each tensor's memory. Fewer passes would change the rounding:
    G*G + epsilon1 as one multiply-add, a squared norm summed in another
    order. `torch._foreach_*` batches the launches over tensors, but needs
    every tensor's U alive at once, a second copy of the model.

    To reuse it elsewhere, copy this file; it needs only torch.
    """

    def __init__(
        self,
        params,
        lr,
        decay_rate=0.8,
        clipping_threshold=1.0,
        multiply_by_parameter_scale=True,
        beta1=None,
        weight_decay_rate=None,
        min_dim_size_to_factor=128,
        epsilon1=1e-30,
        epsilon2=1e-3,
        step_offset=0,
        in_place=True,
    ):
        if lr is None or lr < 0:
            raise ValueError(f"Adafactor needs a learning rate >= 0, got {lr!r}")
        if clipping_threshold is not None and clipping_threshold <= 0:
            raise ValueError(f"clipping_threshold must be > 0 or None, got {clipping_threshold!r}")
        defaults = dict(
            lr=lr,
            decay_rate=decay_rate,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            beta1=beta1,
            weight_decay_rate=weight_decay_rate,
            min_dim_size_to_factor=min_dim_size_to_factor,
            epsilon1=epsilon1,
            epsilon2=epsilon2,
            step_offset=step_offset,
        )
        super().__init__(params, defaults)
        self.in_place = in_place  # update_in_place, else update; not a group option, not state
        self._scratch_buffers = {}  # device -> two flat fp32 buffers (see _scratch); not state

    @staticmethod
    def factored_dims(shape, min_dim_size_to_factor=128):
        """(row_dim, col_dim) to factor over, or None: T5X's `_factored_dims`.

        row_dim is the second-largest dimension, col_dim the largest; the row
        statistic averages over col_dim and the column statistic over row_dim.
        """
        if len(shape) < 2:
            return None
        order = sorted(range(len(shape)), key=lambda d: shape[d])  # stable, like argsort
        if shape[order[-2]] < min_dim_size_to_factor:
            return None
        return order[-2], order[-1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [
            (p, group) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        for p, group in live:
            if _local(p.grad).is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            if self.in_place:
                self.update_in_place(p, group, *self._scratch(live, _local(p)))
            else:
                self.update(p, group)
        if live and _local(live[0][0]).device.type != "cpu":
            self._scratch_buffers.clear()  # see _scratch
        return loss

    def update(self, p, group):
        """The rule of the class docstring for one parameter, one tensor expression per line
        (T5X's `apply_param_gradient`). On a DTensor it works on this rank's shard, and `mean`
        sums across the ranks wherever a statistic spans the sharded dimension."""
        state = self._state_of(p, group)
        dims = self.factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
        mean = _global_mean(p)
        x, g = _local(p).float(), _local(p.grad).float()  # the tensors themselves when fp32

        def rms(t):  # over the whole tensor
            return mean(t * t, tuple(range(t.dim()))).sqrt().reshape(())

        # T5X counts steps from 0; step_offset < 0 continues a count from earlier training.
        t = int(state["step"]) - group["step_offset"] + 1
        decay = 1.0 - t ** (-group["decay_rate"])  # 0 at t = 1: the first V is G2 itself

        # The parameter-scale multiplier: each tensor moves by lr times its own RMS.
        step_size = group["lr"]
        if group["multiply_by_parameter_scale"]:
            step_size = step_size * torch.clamp(rms(x), min=group["epsilon2"])

        # The second moment V, factored for large matrices; U = G / sqrt(V).
        g2 = g * g + group["epsilon1"]
        if dims is not None:
            row_factor, col_factor = factored_second_moment(state, g2, dims, decay, mean)
            u = g * row_factor * col_factor
        else:
            v = _local(state["v"])
            v.mul_(decay).add_((1.0 - decay) * g2)
            u = g * v.rsqrt()

        # Update clipping: U shrinks until its RMS is at most clipping_threshold.
        if group["clipping_threshold"] is not None:
            u = u / torch.clamp(rms(u) / group["clipping_threshold"], min=1.0)

        subtrahend = step_size * u
        if group["beta1"] is not None:  # momentum over the scaled updates
            m = _local(state["m"])
            m.mul_(group["beta1"]).add_((1.0 - group["beta1"]) * subtrahend)
            subtrahend = m
        if group["weight_decay_rate"] is not None:  # not multiplied by lr, as in T5X
            new_x = (1.0 - group["weight_decay_rate"]) * x - subtrahend
        else:
            new_x = x - subtrahend
        _local(p).copy_(new_x)
        state["step"] += 1

    def update_in_place(self, p, group, work, square):
        """`update`'s operations in the same order, so the same bits, with every full-size
        result written into two scratch tensors shaped like p's local tensor: `square` holds
        X*X, then G2, then U*U; `work` holds U, which becomes step_size*U."""
        state = self._state_of(p, group)
        dims = self.factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
        mean = _global_mean(p)
        x, g = _local(p), _local(p.grad)
        x32, g32 = x.float(), g.float()

        def rms(t):
            return mean(torch.mul(t, t, out=square), tuple(range(t.dim()))).sqrt().reshape(())

        t = int(state["step"]) - group["step_offset"] + 1
        decay = 1.0 - t ** (-group["decay_rate"])
        step_size = group["lr"]
        if group["multiply_by_parameter_scale"]:
            step_size = step_size * torch.clamp(rms(x32), min=group["epsilon2"])
        g2 = torch.mul(g32, g32, out=square).add_(group["epsilon1"])
        if dims is not None:
            row_factor, col_factor = factored_second_moment(state, g2, dims, decay, mean)
            u = torch.mul(g32, row_factor, out=work).mul_(col_factor)
        else:
            v = _local(state["v"])
            v.mul_(decay).add_(g2.mul_(1.0 - decay))
            u = torch.rsqrt(v, out=work).mul_(g32)
        if group["clipping_threshold"] is not None:
            u.div_(torch.clamp(rms(u) / group["clipping_threshold"], min=1.0))
        subtrahend = u.mul_(step_size)
        if group["beta1"] is not None:
            m = _local(state["m"])
            m.mul_(group["beta1"]).add_(subtrahend.mul_(1.0 - group["beta1"]))
            subtrahend = m
        if group["weight_decay_rate"] is not None:
            x32.mul_(1.0 - group["weight_decay_rate"])
        x32.sub_(subtrahend)
        if x32 is not x:
            x.copy_(x32)
        state["step"] += 1

    def _scratch(self, live, x):
        """Two fp32 scratch tensors shaped like the local tensor `x`: views into two flat buffers
        as large as the largest local parameter, shared by every parameter of the step.

        Every full-size temporary of `update_in_place` lives in one of them. On CPU they are
        kept between steps (a fresh block that large comes from the kernel, page by page); on
        a GPU they go after each step, and the caching allocator lends them to activations."""
        buffers = self._scratch_buffers
        if x.device not in buffers or buffers[x.device][0].numel() < x.numel():
            size = max(_local(p).numel() for p, _ in live if _local(p).device == x.device)
            buffers[x.device] = [
                torch.empty(size, dtype=torch.float32, device=x.device) for _ in range(2)
            ]
        return [b[: x.numel()].view(x.shape) for b in buffers[x.device]]

    def init_state(self):
        """Create the (zero) state of every parameter now rather than at its first step,
        e.g. as the template a checkpoint is loaded into."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group)

    def _state_of(self, p, group):
        state = self.state[p]
        if len(state) == 0:
            x = p.to_local() if _is_dtensor(p) else p
            dims = self.factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
            state["step"] = torch.tensor(0, dtype=torch.int64)
            if dims is not None:
                row_dim, col_dim = dims
                state["v_row"] = _zeros_state(p, x, drop=col_dim)  # mean over the largest dim
                state["v_col"] = _zeros_state(p, x, drop=row_dim)
            else:
                state["v"] = _zeros_state(p, x, drop=None)
            if group["beta1"] is not None:
                state["m"] = _zeros_state(p, x, drop=None)
        return state


def factored_second_moment(state, g2, dims, decay, mean):
    """Shazeer & Stern's factored 1/sqrt(V) of a tensor of 2+ dims, from G2 = G*G + epsilon1.

    V itself is never kept: its "row" statistic (G2 averaged over the largest dim, col_dim)
    and "column" statistic (averaged over the second largest, row_dim) are exponential
    averages in `state`, and V ~ row * col / mean(row). Returns (row_factor, col_factor),
    each broadcastable against G, whose product is 1/sqrt(V); T5X multiplies G by them in
    that order."""
    row_dim, col_dim = dims
    v_row, v_col = _local(state["v_row"]), _local(state["v_col"])
    v_row.mul_(decay).add_((1.0 - decay) * mean(g2, (col_dim,)).squeeze(col_dim))
    v_col.mul_(decay).add_((1.0 - decay) * mean(g2, (row_dim,)).squeeze(row_dim))
    row = v_row.unsqueeze(col_dim)  # shaped like G with col_dim of size 1
    return (row / mean(row, (row_dim,))).rsqrt(), v_col.unsqueeze(row_dim).rsqrt()


def _global_mean(p):
    """mean(t, dims): the mean (keepdim) over `dims` of a tensor laid out like parameter p,
    over its whole global tensor. On a DTensor sharded along one of `dims`, this rank's sums
    are all_reduced with the other ranks' before dividing by the global size."""
    shape = tuple(p.shape)  # the global shape, also for a DTensor
    shard_dim, group = _shard_info(p)

    def mean(t, dims):
        s = t.sum(dim=dims, keepdim=True)
        if shard_dim is not None and shard_dim in dims:
            dist.all_reduce(s, group=group)
        return s / math.prod(shape[d] for d in dims)

    return mean


def _is_dtensor(t):
    return isinstance(t, DTensor)


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _shard_info(p):
    """(sharded dim or None, process group or None) of a parameter."""
    if not _is_dtensor(p):
        return None, None
    if p.device_mesh.ndim != 1:
        raise NotImplementedError(
            "Adafactor handles DTensors on a 1-D device mesh (FSDP2 data parallel); "
            f"got a {p.device_mesh.ndim}-D mesh"
        )
    placement = p.placements[0]
    if placement.is_replicate():
        return None, None
    if not placement.is_shard():
        raise NotImplementedError(f"Adafactor cannot update a parameter with placement {placement}")
    return placement.dim, p.device_mesh.get_group()


def _zeros_state(p, x_local, drop):
    """fp32 zeros shaped like parameter `p` without dimension `drop`, placed like `p`.

    On a DTensor the state is a DTensor too, so distributed checkpointing
    saves and restores it shard by shard with the parameter."""
    local_shape = list(x_local.shape)
    if drop is not None:
        del local_shape[drop]
    local = torch.zeros(local_shape, dtype=torch.float32, device=x_local.device)
    if not _is_dtensor(p):
        return local
    shard_dim, _ = _shard_info(p)
    global_shape = list(p.shape)
    if drop is not None:
        del global_shape[drop]
    if shard_dim is None or shard_dim == drop:
        # The statistic averaged over the sharded dimension: every rank holds all of it.
        return DTensor.from_local(
            torch.zeros(global_shape, dtype=torch.float32, device=x_local.device),
            p.device_mesh,
            [Replicate()],
            run_check=False,
        )
    new_dim = shard_dim - (1 if drop is not None and drop < shard_dim else 0)
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(
        local,
        p.device_mesh,
        [Shard(new_dim)],
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )
