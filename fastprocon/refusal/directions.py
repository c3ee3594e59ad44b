"""Refusal directions: the difference in means of harmful vs harmless prompts at every layer input.

For each decoder layer l (input = HF ``hidden_states[l]``, "resid_pre") we take the hidden state
at the last token of the chat-formatted prompt (with the generation prompt), average it over the
harmful and the harmless prompts in float64, and keep r_l = normalize(mu_harmful - mu_harmless)
and |mu_harmful - mu_harmless| (Arditi et al. 2024, arXiv 2406.11717).

Files are safetensors with two tensors (``directions`` [L, D] fp32, ``norms`` [L] fp32) and the
metadata (model name and fingerprint, sizes, prompt sets and their counts, template) as JSON in
the header; :func:`load_directions` checks a file against the model it is used with.
``fastprocon directions`` also writes a per-layer separation report (AUROC, Cohen's d) on a
held-out split.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import torch
from tqdm.auto import tqdm

from fastprocon.data.prompts import context_length, encode_prompts, pad_batch
from fastprocon.data.tokenize import format_prompt
from fastprocon.models.fingerprint import FINGERPRINT_VERSION, check_fingerprint_version
from fastprocon.models.layers import hidden_size, num_layers
from fastprocon.models.load import LoadedModel
from fastprocon.penalty.ops import unit_direction
from fastprocon.refusal.steering import on_layer_inputs
from fastprocon.utils.io import read_safetensors, save_safetensors
from fastprocon.utils.plots import line_plot

FORMAT = "fastprocon.directions"
_UNDEFINED_RTOL = 1e-6   # mean-difference norm below this fraction of the largest one: no direction
POSITION = "last token of the chat-formatted prompt (generation prompt added), input of each decoder layer"


@dataclass
class DirectionSet:
    """One refusal direction per decoder layer.

    A layer whose mean difference is zero has an all-zero row and norm 0 ("undefined"): layer 0
    always, since its input at the last prompt token is the embedding of the template's fixed
    last token. Constrain and steer only :attr:`defined_layers`.
    """
    directions: torch.Tensor                      # [L, D] fp32, unit rows (zero rows where undefined)
    norms: torch.Tensor                           # [L] fp32, |mu_harmful - mu_harmless| per layer
    metadata: dict = field(default_factory=dict)  # JSON-serialisable

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[1]

    @property
    def defined_layers(self) -> list[int]:
        """Layers that have a direction (non-zero row), ascending."""
        return (self.norms > 0).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------
# Activations at the last prompt token
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def prompt_forward(loaded: LoadedModel, prompts: list[str], batch_size: int = 16, desc: str | None = None,
                   *, logits: bool = False) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yield (indices into ``prompts``, layer inputs at their last tokens [B, L, D] fp32, next-token
    logits there [B, V] fp32 or None), on the model's device.

    Prompts are batched by length and right-padded, so under causal attention the real tokens
    never see the padding; the last real token of row i sits at index len_i - 1. With ``logits``
    the LM head runs only at the batch's distinct last positions (``logits_to_keep`` as indices).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts given")
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts, context_length(model))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    rows: list[torch.Tensor] = []   # filled by the hook: one [B, D] per layer, in layer order
    last: torch.Tensor | None = None

    def grab(layer: int, x: torch.Tensor) -> None:
        rows.append(x[torch.arange(x.shape[0], device=x.device), last].float())

    with on_layer_inputs(model, grab), tqdm(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [encoded[i] for i in chunk]
            ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "right", device)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            rows.clear()
            keep, where = (last.unique(return_inverse=True)) if logits else (1, None)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)
            last_logits = None
            if logits:   # out.logits [B, K, V]: row i's last token is column where[i]
                last_logits = out.logits[torch.arange(len(chunk), device=device), where].float()
            yield chunk, torch.stack(rows, dim=1), last_logits
            bar.update(len(chunk))


def prompt_states(loaded: LoadedModel, prompts: list[str], batch_size: int = 16,
                  desc: str | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices into ``prompts``, layer inputs at their last tokens [B, L, D] fp32, model device);
    see :func:`prompt_forward`."""
    for chunk, states, _ in prompt_forward(loaded, prompts, batch_size, desc):
        yield chunk, states


def difference_in_means(mu_harmful: torch.Tensor, mu_harmless: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit directions [L, D] fp32, norms [L] fp32) from the mean layer inputs [L, D] (float64) of the
    two prompt sets; a layer whose difference is (relatively) zero gets a zero row and norm 0."""
    diff = mu_harmful.double() - mu_harmless.double()
    norms = diff.norm(dim=-1)
    if not torch.isfinite(diff).all():
        raise ValueError("the mean difference is non-finite at some layer (overflow in the model's activations?)")
    # A layer whose input at the last prompt token does not depend on the prompt has no direction:
    # layer 0 (the embedding of the template's fixed last token) always, so its row stays zero.
    undefined = norms <= _UNDEFINED_RTOL * norms.max()
    if undefined.all():
        raise ValueError("the mean difference is zero at every layer: are the two prompt sets identical?")
    norms = norms.masked_fill(undefined, 0.0)
    unit = unit_direction(diff, torch.float64).masked_fill(undefined[:, None], 0.0)
    return unit.float(), norms.float()


def extract_directions(loaded: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int = 16,
                       *, sources: dict | None = None, progress: bool = False) -> DirectionSet:
    """Difference-in-means directions at every decoder-layer input.

    ``sources`` (e.g. the data files and sampling seed) is stored in the metadata next to the
    prompts themselves, so ``fastprocon drift`` can re-extract with exactly the same prompts.
    """
    mu = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        total = 0.0
        for _, states in prompt_states(loaded, prompts, batch_size, desc=f"{name} prompts" if progress else None):
            total = total + states.double().sum(dim=0)          # [L, D] float64
        mu[name] = total.cpu() / len(prompts)
    unit, norms = difference_in_means(mu["harmful"], mu["harmless"])
    return DirectionSet(unit, norms, direction_metadata(loaded, harmful, harmless, norms, sources))


def direction_metadata(loaded: LoadedModel, harmful: list[str], harmless: list[str], norms: torch.Tensor,
                       sources: dict | None) -> dict:
    """The metadata stored with directions extracted from ``loaded`` on these prompts."""
    return {"model": loaded.name, "fingerprint": loaded.fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
            "hidden_size": hidden_size(loaded.model),
            "num_layers": len(norms), "n_harmful": len(harmful), "n_harmless": len(harmless),
            "undefined_layers": (norms == 0).nonzero().flatten().tolist(), "position": POSITION,
            "template_example": format_prompt(loaded.tokenizer, "{prompt}"),
            "model_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sources": sources or {},
            "harmful_prompts": list(harmful), "harmless_prompts": list(harmless)}


def sham_directions(ds: DirectionSet, seed: int) -> DirectionSet:
    """A control for ``ds``: at each defined layer a seeded random unit vector orthogonal to that
    layer's refusal direction (Gaussian, projected out in float64, normalised; zero rows stay zero).
    Training with it in place of ``ds`` (z0 recorded for it) separates what anchoring the refusal
    direction does from what anchoring any direction does. ``norms`` and the model fields of the
    metadata are kept (the file loads for the same model); ``metadata["sham"]`` names the seed and
    the directions it was made from."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(ds.directions.shape), generator=generator, dtype=torch.float64)
    r = ds.directions.double()
    noise -= (noise * r).sum(-1, keepdim=True) * r
    unit = noise / noise.norm(dim=-1, keepdim=True)
    unit[ds.norms <= 0] = 0
    return DirectionSet(unit.float(), ds.norms.clone(),
                        {**ds.metadata, "sham": {"seed": seed, "of_directions": directions_hash(ds)}})


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def save_directions(ds: DirectionSet, path: str | os.PathLike) -> int:
    """Write ``ds`` to ``path`` (safetensors, atomic); returns the bytes written."""
    _check_direction_set(ds, str(path))
    return save_safetensors(path, {"directions": ds.directions.float(), "norms": ds.norms.float()}, FORMAT,
                            ds.metadata)


def load_directions(path: str | os.PathLike, *, expect_fingerprint: str | None = None,
                    expect_hidden: int | None = None, expect_layers: int | None = None) -> DirectionSet:
    """Read a directions file, checking it against the model it will be used with.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt file, a file from
    another model (fingerprint mismatch), a shape mismatch, or a zero/non-finite row.
    """
    tensors, meta = read_safetensors(path, FORMAT)
    for name in ("directions", "norms"):
        if name not in tensors:
            raise ValueError(f"{path}: no '{name}' tensor in the directions file (found {sorted(tensors)})")
    ds = DirectionSet(tensors["directions"].float(), tensors["norms"].float(), meta)
    _check_direction_set(ds, str(path))
    # Shapes first: "4 layers x 64, the model has 2 x 32" says more than two fingerprints.
    if expect_layers is not None and ds.num_layers != expect_layers:
        raise ValueError(f"{path}: {ds.num_layers} directions (layers) but the model has {expect_layers} layers "
                         f"(file made from model {meta.get('model')!r})")
    if expect_hidden is not None and ds.hidden_size != expect_hidden:
        raise ValueError(f"{path}: directions have length {ds.hidden_size} but the model's hidden size is "
                         f"{expect_hidden} (file made from model {meta.get('model')!r})")
    if expect_fingerprint is not None:
        check_fingerprint_version(meta, path, "`fastprocon directions`")
    if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
        raise ValueError(
            f"{path}: directions were extracted from another model: file has model {meta.get('model')!r} "
            f"fingerprint {meta.get('fingerprint')}, the loaded model has fingerprint {expect_fingerprint}")
    return ds


def load_directions_for(loaded: LoadedModel, path: str | os.PathLike) -> DirectionSet:
    """:func:`load_directions` checked against ``loaded`` (fingerprint, layer count, hidden size)."""
    return load_directions(path, expect_fingerprint=loaded.fingerprint, expect_hidden=hidden_size(loaded.model),
                           expect_layers=num_layers(loaded.model))


def directions_hash(source: DirectionSet | str | os.PathLike) -> str:
    """sha256 hex of the direction values (fp32 bytes and shape): same directions, same hash."""
    ds = source if isinstance(source, DirectionSet) else load_directions(source)
    r = ds.directions.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(r.shape)}".encode())
    digest.update(r.numpy().tobytes())
    return digest.hexdigest()


def _check_direction_set(ds: DirectionSet, where: str) -> None:
    """Rows must be unit vectors with a positive norm, or all zero with norm 0 (undefined layer)."""
    r, n = ds.directions, ds.norms
    if r.dim() != 2 or n.dim() != 1 or n.shape[0] != r.shape[0]:
        raise ValueError(f"{where}: directions must be [L, D] with norms [L], got {tuple(r.shape)} and "
                         f"{tuple(n.shape)}")
    finite = torch.isfinite(r).all(dim=-1) & torch.isfinite(n)
    row_norms = r.float().norm(dim=-1)
    unit = finite & ((row_norms - 1).abs() <= 1e-3) & (n > 0)
    undefined = finite & (row_norms == 0) & (n == 0)
    bad = ~(unit | undefined)
    if bad.any():
        raise ValueError(f"{where}: direction at layer(s) {bad.nonzero().flatten().tolist()} is non-finite, zero "
                         "with a non-zero norm, or not unit length")
    if undefined.all():
        raise ValueError(f"{where}: every direction is zero")


# ---------------------------------------------------------------------------------------------
# Quality: separation of held-out harmful vs harmless prompts along r_l
# ---------------------------------------------------------------------------------------------

def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of scores ``positive`` [P] vs ``negative`` [N] (ties count 1/2)."""
    scores = torch.cat([positive, negative]).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    mid_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2     # 1-based average rank of each value
    rank_sum = mid_rank[inverse[: len(positive)]].sum().item()
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """(mean_pos - mean_neg) / pooled standard deviation."""
    p, q = positive.double(), negative.double()
    pooled = ((len(p) - 1) * p.var() + (len(q) - 1) * q.var()) / (len(p) + len(q) - 2)
    return ((p.mean() - q.mean()) / pooled.sqrt()).item()


def separation_report(ds: DirectionSet, loaded: LoadedModel, harmful: list[str], harmless: list[str],
                      batch_size: int = 16, progress: bool = False) -> dict:
    """Per defined layer: AUROC and Cohen's d of x_l . r_l, harmful (positive) vs harmless prompts."""
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"separation needs at least 2 prompts per set, got {len(harmful)} harmful, "
                         f"{len(harmless)} harmless")
    r = ds.directions.double().to(next(loaded.model.parameters()).device)
    proj = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        proj[name] = torch.empty(ds.num_layers, len(prompts), dtype=torch.float64)     # [L, N]
        for chunk, states in prompt_states(loaded, prompts, batch_size, desc=f"{name} val" if progress else None):
            proj[name][:, chunk] = torch.einsum("bld,ld->lb", states.double(), r).cpu()
    layers = [{"layer": l, "auroc": auroc(proj["harmful"][l], proj["harmless"][l]),
               "cohens_d": cohens_d(proj["harmful"][l], proj["harmless"][l]),
               "mean_diff_norm": ds.norms[l].item(),
               "mean_proj_harmful": proj["harmful"][l].mean().item(),
               "mean_proj_harmless": proj["harmless"][l].mean().item()} for l in ds.defined_layers]
    best = max(layers, key=lambda row: (row["auroc"], row["cohens_d"]))
    return {"n_harmful": len(harmful), "n_harmless": len(harmless), "best_layer": best["layer"],
            "best_auroc": best["auroc"], "best_cohens_d": best["cohens_d"],
            "undefined_layers": sorted(set(range(ds.num_layers)) - set(ds.defined_layers)), "layers": layers}


def plot_separation(report: dict, path: str | os.PathLike, title: str) -> None:
    """PNG of AUROC, Cohen's d and the mean-difference norm against the layer."""
    xs = [row["layer"] for row in report["layers"]]

    def panel(key: str, ylabel: str, **options) -> dict:
        return {"series": {key: (xs, [row[key] for row in report["layers"]])}, "ylabel": ylabel, **options}

    line_plot(path, [panel("auroc", "AUROC (held-out)", hline=0.5, ylim=(0.0, 1.02)),
                     panel("cohens_d", "Cohen's d", hline=0.0),
                     panel("mean_diff_norm", "|mu_harmful - mu_harmless|")], title=title)
