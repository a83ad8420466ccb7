"""A run's training state (weights, router biases, AdamW's moments) as torch.distributed.checkpoint (DCP) writes and
reads it: each rank writes only what it holds, and a run resumes under another layout (world size, EP degree, PP
degree, DDP or FSDP2), each rank reading only its part.

Every tensor is given to DCP under its nanoseek name in the form that tells DCP which part of the whole this rank
holds, so that the files on disk are the same whatever the layout:

    model.{name}         a weight or persistent buffer          optim.{name}.{k}   AdamW's state k of weight `name`
    plain tensor         replicated (DDP, a pipeline stage's dp replicas): written once, by one of its holders
    DTensor              an FSDP2 shard, as FSDP2 holds it
    DTensor Shard(0)     an expert shard: the rows of the layer's logical experts [E, ...] this rank holds, over the
                         EP group (with redundant experts, the logical tensor is rebuilt over the group first)
    (absent)             a pipeline stage held elsewhere (on the meta device)

The last pipeline stage's copy of the embedding is saved and loaded as `embed_tokens.weight` (it equals it).
"""

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from nanoseek.errors import NanoseekError
from nanoseek.parallel.distributed import initialized

MODEL, OPTIM = "model.", "optim."


def _rows(plan, p: torch.Tensor, t: torch.Tensor, load: bool):
    """t (p, or an optimizer tensor of p) in the form DCP is given (see the module's doc); for a redundant expert
    shard being loaded, a whole logical tensor to read into (its slots taken from it afterwards: `load`)."""
    m = getattr(p, "ep_module", None)
    if m is None or t.dim() == 0:
        return t
    mesh = plan.mesh["ep"]
    shape = (m.n_logical, *t.shape[1:])
    if not m.redundant:  # slot = expert: this rank's rows are experts first .. first + S - 1, one chunk of Shard(0)
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    if load:
        return torch.empty(shape, dtype=t.dtype, device=t.device)
    return distribute_tensor(m.to_logical(plan.ep.gather(t)), mesh, [Shard(0)], src_data_rank=None)


def _targets(plan, opt, load: bool = False) -> tuple[dict, list]:
    """{DCP key: tensor} of this rank and, for loading, the copies to make afterwards [(key, destination)]."""
    own = plan.model.state_dict(keep_vars=True)
    copy = plan.pp.embed_copy if plan.pp is not None else None
    after = []
    if copy is not None:
        if own["embed_tokens.weight"].is_meta:
            own["embed_tokens.weight"] = copy.weight
        else:  # this rank holds the first and the last stage: one tensor read, copied into the other
            after.append((MODEL + "embed_tokens.weight", copy.weight))
    sd = {}
    for name, t in own.items():
        if not t.is_meta:
            sd[MODEL + name] = _rows(plan, t, t.detach(), load)
    for g in opt.param_groups:
        for name, p in zip(g["names"], g["params"]):
            for k, v in opt.state.get(p, {}).items():
                key = f"{OPTIM}{name}.{k}"
                if copy is not None and p is copy.weight and key in sd:  # the copy's state: as the embedding's
                    after.append((key, v))
                    continue
                sd[key] = _rows(plan, p, v, load)
    return sd, after


def state_dict(plan, opt) -> dict:
    """This rank's part of the training state, for dcp.save / dcp.async_save."""
    with torch.no_grad():
        return _targets(plan, opt)[0]


# one process is a world of its own (no_dist below); DCP warns about it all the same
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def save(plan, opt, path: Path, background: bool = False, group=None):
    """Every rank writes its part into the directory `path` (all ranks together). background: DCP's async_save, the
    state copied first and written by a thread -> a future to wait on (None when written already)."""
    sd = state_dict(plan, opt)
    if background:
        return dcp.async_save(sd, checkpoint_id=str(path), process_group=group, no_dist=not initialized())
    dcp.save(sd, checkpoint_id=str(path), process_group=group, no_dist=not initialized())
    return None


@torch.no_grad()
def load(plan, opt, path: Path) -> None:
    """Read a DCP checkpoint into this rank's part of the model and into the optimizer (its state made first, by a
    step at learning rate 0 over zero gradients, so that DCP has tensors to read into), whatever layout wrote it."""
    prime(opt)
    sd, after = _targets(plan, opt, load=True)
    try:
        dcp.load(sd, checkpoint_id=str(path), no_dist=not initialized())
    except Exception as e:  # DCP raises CheckpointException / RuntimeError naming the key
        first = str(e).strip().splitlines()
        raise NanoseekError(f"cannot resume from {path}: {first[-1] if first else type(e).__name__}") from None
    own = plan.model.state_dict(keep_vars=True)
    for g in opt.param_groups:  # redundant expert shards: their slots from the whole logical tensors read
        for name, p in zip(g["names"], g["params"]):
            m = getattr(p, "ep_module", None)
            if m is None or not m.redundant:
                continue
            for k, v in opt.state.get(p, {}).items():
                if v.dim() > 0:
                    v.copy_(m.local(sd[f"{OPTIM}{name}.{k}"]))
    for name, t in own.items():
        m = getattr(t, "ep_module", None)
        if m is not None and m.redundant:
            t.detach().copy_(m.local(sd[MODEL + name]))
    for key, dest in after:
        dest.copy_(sd[key].to_local() if isinstance(sd[key], DTensor) else sd[key])


@torch.no_grad()
def prime(opt: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (zeros, step 1): one step at learning rate 0 over zero gradients,
    which leaves the weights as they are (weight decay is multiplied by the learning rate)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if all(opt.state.get(p) for p in params):
        return
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def read(path: Path, prefix: str = MODEL) -> dict[str, torch.Tensor]:
    """The whole tensors of a DCP checkpoint whose keys start with `prefix` (prefix removed), in one process (for
    tests and tools: every tensor is read whole)."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


def checkpoint_group():
    """A gloo process group for DCP's own collectives (its metadata exchange; for async_save, from a background
    thread, which must not share a communicator with the training step's collectives)."""
    return dist.new_group(backend="gloo") if initialized() else None
