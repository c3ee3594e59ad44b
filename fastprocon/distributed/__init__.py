"""Infrastructure at the bottom of the trainer and the tools (torchtitan keeps it there too):
process group (process.py), collectives (collectives.py), FSDP2 sharding (sharding.py), the device
mesh of plain FSDP or HSDP (mesh.py)."""
from fastprocon.distributed.collectives import all_reduce_sum, barrier, broadcast_object, first_error, on_main
from fastprocon.distributed.mesh import mesh_shape, training_mesh
from fastprocon.distributed.process import DistContext, elastic_note, init_distributed, shutdown, tool_processes
from fastprocon.distributed.sharding import (
                                            apply_activation_checkpointing,
                                            compile_decoder_layers,
                                            mixed_precision_dtype,
                                            shard_for_inference,
                                            shard_model,
                                            use_compile,
)

__all__ = ["DistContext", "elastic_note", "init_distributed", "shutdown", "tool_processes", "barrier",
           "all_reduce_sum", "broadcast_object", "on_main", "first_error", "apply_activation_checkpointing",
           "compile_decoder_layers", "use_compile", "mixed_precision_dtype", "shard_model", "shard_for_inference",
           "mesh_shape", "training_mesh"]
