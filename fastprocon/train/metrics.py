"""Training metrics: the JSONL log, throughput, MFU, peak memory, optional TensorBoard.

Values reach the host only at logging intervals; in between the trainer keeps device tensors.
One line of ``metrics.jsonl`` covers the steps since the previous line:

- ``step``: optimizer steps done; ``alpha``, ``lr``: at the interval's last step
- ``ce``: cross-entropy per response-token prediction, over the interval
- ``procon``: the paper's L_ProCon, sum over constrained layers and response tokens of
  psi(z - z0) per sample, over the interval's steps with alpha > 0 (null when none had)
- ``grad_norm``: global gradient norm before clipping, mean over the interval's steps
- ``tokens_per_s``: non-padding tokens per second, all processes together
- ``mfu``: model FLOPs utilisation per device (CUDA devices with a known bf16 peak, else null)
- ``peak_mem_alloc_gib``/``peak_mem_reserved_gib`` (CUDA, since the previous line) or
  ``peak_rss_gib`` (CPU, the process's peak resident memory)
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from fastprocon.models.layers import unwrap_model
from fastprocon.utils.io import atomic_path

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def count_params(model: nn.Module) -> int:
    """Parameters of the (possibly sharded) model, each shared tensor once, at full size."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()    # DTensor.numel() is the global size
    return total


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a token's matmuls: all but an untied input embedding (a lookup);
    of a mixture of experts' expert weights, the share a token uses (experts per token / experts)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    config = unwrap_model(model).config
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(config, k, None)), None)
    active = getattr(config, "num_experts_per_tok", None) / experts if experts else 1.0
    seen, total = set(), 0.0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * (active if ".experts." in name else 1.0)   # DTensor.numel(): the global size
    return round(total) if tied else round(total) - emb.numel()


def attention_width(config) -> int:
    """heads x head dim of the attention (torchtitan's h * q); the hidden size for most models."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def training_flops(n_matmul_params: int, n_layers: int, attn_width: int, lengths) -> float:
    """Training FLOPs (forward + backward) of a batch of samples of ``lengths`` real tokens,
    torchtitan's count (PaLM appendix B): 6 N per token for the weight matmuls plus, per token,
    12 L (h q) t for the attention scores and values over the t tokens of its own sample
    (padding and other packed samples excluded; no causal halving, as torchtitan)."""
    lengths = list(lengths)
    return 6 * n_matmul_params * sum(lengths) + 12 * n_layers * attn_width * sum(t * t for t in lengths)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` when known (CUDA only), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> dict:
    """Peak memory since the last reset: CUDA allocated/reserved, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class MetricsLog:
    """Appends one JSON object per line to ``<run dir>/metrics.jsonl`` (main process only),
    mirrored to TensorBoard when asked and installed."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard_note = None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.tensorboard_note = "train.tensorboard = true but tensorboard is not installed " \
                                        "(pip install tensorboard); logging to metrics.jsonl only"

    def truncate_after(self, step: int) -> str | None:
        """Drop lines with step > ``step`` (written after the checkpoint a run resumes from).

        A half-written last line (a crash mid-append) is dropped too, and a warning returned; a
        line elsewhere that is not JSON is a ValueError naming the file and line."""
        if not (self.enabled and self.path.is_file()):
            return None
        lines = self.path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        kept, note = [], None
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                if i == last:
                    note = f"dropped the incomplete last line of {self.path} (line {i + 1}, an interrupted write)"
                    continue
                raise ValueError(f"{self.path} line {i + 1} is not valid JSON ({err}); fix or remove that line, "
                                 "then resume again") from None
            if record.get("step", 0) <= step:
                kept.append(line)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in kept))
        return note

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self._tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list):   # per-layer values (the safety probe): key/layer_NN
                    for layer, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/layer_{layer:02d}", v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run dir>/metrics.jsonl``. An incomplete last line (a run writing it now,
    or a crash mid-append) is left out, as a resume drops it; a line elsewhere that is not a JSON
    object is a ValueError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text()
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if i == last and not text.endswith("\n"):   # still being written
                continue
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {i + 1} is not a JSON object: {line[:60]!r}")
        records.append(record)
    return records
