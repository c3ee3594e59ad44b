"""FSDP2 sharding, activation checkpointing and compiled decoder layers (torchtitan's layout)."""
from __future__ import annotations

import torch
from torch import nn

from fastprocon.models.layers import decoder_layers, unwrap_model


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Wrap each decoder layer in a (non-reentrant) checkpoint wrapper, in place.

    Forward pre-hooks installed on the wrappers afterwards run outside the recomputed region.
    State-dict keys are unchanged (the wrapper strips its prefix).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])


def compile_decoder_layers(layers: nn.ModuleList, *, backend: str = "inductor") -> None:
    """``torch.compile(fullgraph=True)`` each decoder layer, in place (torchtitan's way): apply
    after activation checkpointing and before :func:`shard_model`, so FSDP's hooks stay outside
    the compiled regions. Hooks installed afterwards on ``layer._orig_mod`` (steering.on_layer_inputs
    puts them there), the ProCon hooks among them, are compiled too (fullgraph), as a graph of
    their own that runs before the layer's: torch.compile runs a module's hooks ahead of the
    frame it captures. (``torch._dynamo.config.wrap_top_frame`` would put them in the layer's
    graph, but under FSDP2 their side effects, the logged penalty, were then lost: torch 2.13.)
    State-dict keys are unchanged for DCP (``torch.distributed.checkpoint.state_dict`` strips
    ``_orig_mod``)."""
    for i in range(len(layers)):
        layers[i] = torch.compile(layers[i], backend=backend, fullgraph=True)


def use_compile(setting: str, device: torch.device) -> bool:
    """config model.compile: "auto" compiles on CUDA only (on CPU it did not pay, see the README)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def mixed_precision_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype for FSDP's MixedPrecisionPolicy: bf16 ("auto" on CUDA, or asked), else None (fp32)."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def shard_model(model: nn.Module, layers: nn.ModuleList, param_dtype: torch.dtype | None, mesh=None) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, the untied embeddings, then the root (torchtitan's layout).

    With ``param_dtype`` (bf16) parameters are gathered and computed in it while gradients
    are reduced in fp32 and the sharded master weights stay fp32. ``mesh``: None (all processes,
    plain FSDP) or a 2-D DeviceMesh (HSDP, see mesh.training_mesh).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {} if mesh is None else {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # untied input and output embeddings as units of their own (torchtitan's layout): each is
    # gathered only around its own use, not for the whole forward with the root (tied ones stay in
    # the root: one parameter belongs to one unit)
    base = unwrap_model(model)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embed is not None and head is not None and embed.weight is not head.weight:
        fully_shard(embed, **kwargs)
        fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)


def shard_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (the training layout, no mixed precision)."""
    shard_model(model, decoder_layers(model), None)
    return model
