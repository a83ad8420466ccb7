"""The published layout (OUT/model: DeepseekV3ForCausalLM safetensors, loadable by `from_pretrained` and
`transformers`) written by the ranks together, each writing the tensors it holds to files of its own, so that no rank
ever holds the whole model: an expert-parallel rank writes its own experts, a pipeline rank its own stages, the
replicas of a tensor share the writing out (one writes it), and an FSDP2 shard is gathered one tensor at a time and
kept only by the rank that writes it. Rank 0 then writes the index, config.json and the tokenizer and renames the
temporary directory into place (atomic: a run killed half-way leaves no OUT/model, or the old one)."""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from nanoseek.checkpoint import (_parse_size, atomic_dir, dtype_name, export_tensors, hf_tensors, shard_files,
                                 shard_names, write_model_meta)
from nanoseek.parallel.distributed import all_gather_object, barrier, broadcast_object


def _primary_rows(m) -> tuple[list[int], list[int]]:
    """The local rows of an expert shard whose slot is its expert's first replica, and their expert ids."""
    S = m.gate_up_proj.shape[0]
    phy2log, log2phy, _ = m.placement_cpu
    rows = [j for j in range(S) if int(log2phy[phy2log[m.first + j], 0]) == m.first + j]
    return rows, [int(phy2log[m.first + j]) for j in rows]


def mine(plan) -> dict[str, torch.Tensor]:
    """The HF-named tensors this rank writes (collective under FSDP2: every rank gathers each shard in turn)."""
    d, model = plan.d, plan.model
    dp = d.world // plan.layout.pp  # the ranks holding the same stages
    dp_rank = d.rank % dp
    ep = plan.ep.size if plan.ep is not None else 1
    out = {}
    for i, (name, t) in enumerate(model.state_dict(keep_vars=True).items()):
        if isinstance(t, DTensor):
            t = t.full_tensor()  # every rank of the mesh together; kept by the writer only
        if t.is_meta or (plan.pp is not None and plan.pp.owner(name) != plan.pp.pp_rank):
            continue
        m, experts = getattr(t, "ep_module", None), None
        if m is not None:  # the rows of the layer's experts this rank holds first, by one of the shard's replicas
            if i % (dp // ep) != dp_rank // ep:
                continue
            rows, experts = _primary_rows(m)
            t = t[rows]
        elif i % dp != dp_rank:
            continue
        out.update(hf_tensors(model.args, len(model.mtp), name, t.detach(), experts))
    return out


def save_published(plan, out: Path, tokenizer=None, fp8: bool = False, max_shard_size: int | str = "5GB") -> None:
    """OUT/model from every rank's part (call on every rank)."""
    out = Path(out)
    tensors = export_tensors(mine(plan), fp8)
    shards = shard_names(tensors, _parse_size(max_shard_size))
    ranks = all_gather_object((shards, sum(t.numel() * t.element_size() for t in tensors.values()), dtype_name(tensors)))
    files = shard_files([len(s) for s, _, _ in ranks])

    def write(tmp):  # every rank its files; rank 0 then the rest
        tmp = Path(broadcast_object(str(tmp) if tmp is not None else None))
        for fname, shard in zip(files[plan.d.rank], shards):
            save_file({n: tensors[n] for n in shard}, tmp / fname, metadata={"format": "pt"})
            with open(tmp / fname, "rb") as f:
                os.fsync(f.fileno())
        barrier()
        if plan.d.main:
            weight_map = {n: f for (s, _, _), fs in zip(ranks, files) for f, shard in zip(fs, s) for n in shard}
            dtype = next((dt for _, _, dt in ranks if dt), None)
            write_model_meta(plan.model.args, tmp, tokenizer, dtype, fp8, weight_map, sum(b for _, b, _ in ranks))

    if plan.d.main:
        atomic_dir(out, write)
    else:
        write(None)
    barrier()  # OUT/model in place before any rank goes on
