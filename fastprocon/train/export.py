"""Export the trained model as a Hugging Face directory (safetensors) with its directions file.

No process ever holds the full model. Every process writes the weights of its own FSDP shards
(``torch.distributed.checkpoint`` with ``HuggingFaceStorageWriter``) into a scratch folder, in
groups of tensors of which each process holds about :data:`PIECE_BYTES`; the processes then
consolidate those pieces into the usual ``model-0000i-of-0000n.safetensors`` files of at most
:data:`FILE_BYTES` (each process builds whole files, one tensor at a time, from that file's pieces
only) plus ``model.safetensors.index.json``. Memory per process: a group's share (twice, while
DCP serialises it) or the largest tensor (twice, while consolidating), whichever is more.
Rank 0 adds the config, the tokenizer and the directions file. The weights are written in the
parameters' dtype (the trainer's fp32 master weights) under the model's own key names (no FSDP,
PEFT, compile or checkpoint prefixes); a tied output embedding is written once, as
``save_pretrained`` does.

LoRA runs export merged weights (W + scaling * B @ A, as PEFT's ``merge_and_unload``): each
process merges its rows of W with the full (small) adapter matrices. With
``checkpoint.export_adapter`` the adapter alone is also written, in PEFT's format
(``adapter/``: ``adapter_model.safetensors`` + ``adapter_config.json``), which
``PeftModel.from_pretrained(base, dir)`` loads.

The result loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and ``fastprocon``'s
``load_model(dir)``. Every process must see the same file system (as for checkpoints).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint._consolidate_hf_safetensors import _consolidate_safetensors_files
from torch.distributed.checkpoint._hf_utils import _gen_file_name
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from fastprocon.distributed.collectives import barrier, on_main
from fastprocon.models.layers import unwrap_model
from fastprocon.models.loading import LORA_PARAM, checkpoint_name, local_slice, shard_offset

DIRECTIONS_FILE = "directions.safetensors"
ADAPTER_DIR = "adapter"
FILE_BYTES = 5 * 2**30          # consolidated files of at most ~5 GiB each (one tensor may exceed it)
# each process writes its pieces in groups of tensors whose share on one process is at most about this
# much: DCP's safetensors writer holds a group's bytes twice while it writes it, so this bounds the memory
PIECE_BYTES = 128 * 2**20
_SCRATCH = ".sharded"           # the per-process pieces, inside the staging directory


def clean_export_staging(out_dir: Path) -> list[str]:
    """Remove the staging directories (``.<name>.*`` beside ``out_dir``) that an export killed
    before its rename left behind; returns their names. Run under the run's lock (no export runs)."""
    out_dir = Path(out_dir)
    removed = []
    for staging in sorted(out_dir.parent.glob(f".{out_dir.name}.*")):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    return removed


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under its Hugging Face names, still sharded (DTensors on FSDP2): LoRA
    adapters merged into their base weights, a tied output embedding left out. Collective (the
    adapters are gathered whole: r x (in + out) values each)."""
    sharded = get_model_state_dict(model)
    tied = _tied_duplicates(model)
    lora = {name: module for name, module in model.named_modules() if _is_lora_layer(module)}
    # (scaling, fan_in_fan_out) per adapted layer: PEFT's merge is W + scaling * (B @ A), transposed for Conv1D
    how = {checkpoint_name(name): (module.scaling[_adapter(module)], bool(getattr(module, "fan_in_fan_out", False)))
           for name, module in lora.items()}
    out, adapters = {}, {}
    for key, value in sharded.items():
        if LORA_PARAM.search(key):
            layer, _, _ = checkpoint_name(key).partition(".lora_")
            adapters.setdefault(layer, {})["A" if ".lora_A." in key else "B"] = value
            continue
        name = checkpoint_name(key)
        if name not in tied:
            out[name] = value
    for layer, pair in adapters.items():   # every process in the same (state-dict) order: full_tensor is collective
        a, b = (_full(pair["A"]), _full(pair["B"]))
        out[f"{layer}.weight"] = _merged(out[f"{layer}.weight"], a, b, *how[layer])
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights, whole, under PEFT's saved names (``base_model.model.<...>.lora_A.weight``).
    Collective; small (r x (in + out) values per adapted layer)."""
    out = {}
    for key, value in get_model_state_dict(model).items():
        if LORA_PARAM.search(key):
            name = checkpoint_name(key)
            layer, _, rest = name.partition(".lora_")
            which, _, _ = rest.partition(".")
            out[f"base_model.model.{layer}.lora_{which}.weight"] = _full(value).detach().cpu().contiguous()
    return out


def export_model(model: nn.Module, tokenizer, out_dir: Path, directions_path: Path | None, *,
                 adapter: bool = False) -> Path:
    """Write ``out_dir`` (replacing it atomically): config, consolidated safetensors weights and
    index, tokenizer and, when given, a copy of the directions file; with ``adapter`` (a LoRA
    model) also ``adapter/``. Collective: call on every process; returns ``out_dir``."""
    out_dir = Path(out_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # a failure leaves the staging directory behind: the next start removes it (clean_export_staging)
    staging = Path(on_main(lambda: _make_staging(out_dir)))
    state = export_state_dict(model)
    files = file_index(state, FILE_BYTES)
    groups = file_index(state, PIECE_BYTES * world, within=files)   # each process's share: ~PIECE_BYTES
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in state.items()}
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)   # for config.json
    pieces = staging / _SCRATCH
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(pieces), fqn_to_index_mapping=groups,
                                                            save_distributed=True))
    del state
    file_of_group = {groups[name]: files[name] for name in groups}
    on_main(lambda: _sort_pieces(pieces, file_of_group))
    # each process builds whole output files (file i: process (i - 1) % world) from the pieces of that
    # file only, one tensor at a time (so no process opens more than that file's pieces)
    n_files = max(files.values())
    for index in range(1 + rank, n_files + 1, world):
        mapping = {name: _gen_file_name(index, n_files) for name, i in files.items() if i == index}
        _consolidate_safetensors_files(str(pieces / str(index)), str(staging), mapping, 1)
    barrier()
    adapter_weights = adapter_state_dict(model) if adapter else None
    weight_map = {name: _gen_file_name(index, n_files) for name, index in files.items()}
    on_main(lambda: _finish(model, tokenizer, staging, out_dir, directions_path, adapter_weights,
                            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, dtype))
    return out_dir


def file_index(state: dict[str, torch.Tensor], limit: int, within: dict[str, int] | None = None) -> dict[str, int]:
    """{name: group number from 1}: tensors in state-dict order, a new group once ``limit`` bytes
    are reached (a larger tensor alone) or, with ``within`` (another grouping), where it starts a new one."""
    mapping, index, used, previous = {}, 1, 0, None
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        outer = within[name] if within is not None else None
        if mapping and ((used and used + size > limit) or outer != previous):
            index, used = index + 1, 0
        mapping[name] = index
        used += size
        previous = outer
    return mapping


def _sort_pieces(pieces: Path, file_of_group: dict[int, int]) -> None:
    """Move every process's piece of group g (``shard-R-model-G-of-N.safetensors``) into
    ``pieces/<output file of g>/``."""
    for piece in pieces.glob("shard-*.safetensors"):
        group = int(re.search(r"-model-(\d+)-of-", piece.name).group(1))
        target = pieces / str(file_of_group[group])
        target.mkdir(exist_ok=True)
        piece.rename(target / piece.name)


def _make_staging(out_dir: Path) -> str:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)   # mkdtemp makes it private
    return str(staging)


def _finish(model: nn.Module, tokenizer, staging: Path, out_dir: Path, directions_path: Path | None,
            adapter_weights: dict | None, index: dict, dtype: torch.dtype) -> None:
    """Rank 0, after the weights: index, config, tokenizer, directions, adapter; then the rename."""
    shutil.rmtree(staging / _SCRATCH)
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    base = unwrap_model(model)
    config = base.config.__class__.from_dict(base.config.to_dict())   # a copy: the training model keeps its own
    if hasattr(config, "quantization_config"):   # a GGUF-converted config: the export is plain weights
        del config.quantization_config
    config.dtype = dtype   # what the files hold (the trainer's: fp32)
    config.save_pretrained(staging)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if directions_path is not None:
        shutil.copyfile(directions_path, staging / DIRECTIONS_FILE)
    if adapter_weights is not None:
        from safetensors.torch import save_file

        (staging / ADAPTER_DIR).mkdir()
        save_file(adapter_weights, str(staging / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config = next(iter(model.peft_config.values()))
        peft_config.save_pretrained(str(staging / ADAPTER_DIR))
    for file in staging.rglob("*"):   # some writers create private temp files
        file.chmod(0o755 if file.is_dir() else 0o644)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _tied_duplicates(model: nn.Module) -> set[str]:
    """HF names of parameters that are another parameter (a tied output embedding): not written."""
    seen, duplicates = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(checkpoint_name(name))
        seen.add(id(param))
    return duplicates


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "scaling") and hasattr(module, "base_layer")


def _adapter(module: nn.Module) -> str:
    (name,) = module.lora_A.keys()
    return name


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """``weight + scaling * b @ a`` (its transpose when ``transposed``: GPT-2's Conv1D) for this
    process's part of ``weight`` (a DTensor shard or a plain tensor), as a tensor of ``weight``'s
    kind. ``a`` [r, in], ``b`` [out, r]: whole."""
    (rows, cols), (r0, c0) = shard_offset(weight)
    local = local_slice(weight)
    if transposed:   # weight [in, out]
        delta = (b[c0:c0 + cols].to(local.dtype) @ a[:, r0:r0 + rows].to(local.dtype)).T * scaling
    else:
        delta = (b[r0:r0 + rows].to(local.dtype) @ a[:, c0:c0 + cols].to(local.dtype)) * scaling
    merged = local + delta
    if not hasattr(weight, "device_mesh"):
        return merged
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(merged, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape,
                              stride=weight.stride())
