"""Live safety probe: refusal score, refusal-direction drift and projection deviation while training.

At step 0, every ``train.safety_probe_every`` steps and at the last step, the trainer calls
:meth:`SafetyProbe.measure` on the sharded (FSDP2) model: eval mode, no_grad, no generation, no
full-model gather, the RNG state saved and restored (a run with probes has the same losses as one
without). Each process takes an equal share of the probe inputs (padded with a repeat so every
process runs the same forward passes, as FSDP's collectives need) and the sums are all-reduced,
so every process gets the same values.

- refusal score: the refusal-token log-odds at the last prompt token (:func:`evaluate.refusal_score`,
  the score ``fastprocon eval-refusal`` reports for the first generated position), mean over the
  harmful and over the harmless probe prompts, and the share of harmful prompts with score > 0
  (a refusal token more likely than any other);
- drift: the difference-in-means directions of the current weights on the probe prompts
  (:func:`directions.difference_in_means`, float64) and their per-layer cosine with those of
  step 0 (:func:`drift.direction_cosines`): what ``fastprocon drift --directions
  <run>/probe_directions.safetensors --checkpoints <export>`` computes;
- projection deviation: mean |z - z0| over response tokens, per layer, on the first
  ``train.probe_samples`` training examples; z = h . r by :func:`reference.compute_projections`
  (as the reference cache z0 is made), with ProCon's directions and layers (the probe's own step-0
  directions when ProCon is off), z0 the
  same at step 0. Measured whatever alpha is.

Step 0's directions and z0 are saved in the run directory (:data:`DIRECTIONS_FILE`,
:data:`Z0_FILE`), so a resumed run continues the same series.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Callable

import torch

import fastprocon.distributed as D
from fastprocon.data.examples import IGNORE_INDEX, resolve_data_path
from fastprocon.data.prompts import read_prompts
from fastprocon.data.tokenize import TokenizedExample
from fastprocon.models.layers import hidden_size, num_layers
from fastprocon.models.load import LoadedModel
from fastprocon.procon.reference import compute_projections
from fastprocon.refusal.directions import (
    DirectionSet,
    difference_in_means,
    direction_metadata,
    directions_hash,
    load_directions,
    prompt_forward,
    save_directions,
)
from fastprocon.refusal.drift import direction_cosines
from fastprocon.refusal.evaluate import refusal_score, refusal_token_ids
from fastprocon.train.config import Config
from fastprocon.train.prepare import ProConInputs
from fastprocon.utils.io import read_safetensors, save_safetensors

DIRECTIONS_FILE = "probe_directions.safetensors"
Z0_FILE = "probe_z0.safetensors"
Z0_FORMAT = "fastprocon.probe_z0"
SHARE_KEY = "probe_refusal_share"


def probe_due(step: int, every: int, max_steps: int) -> bool:
    """Whether the probe runs after ``step`` optimizer steps (step 0 = before the first)."""
    return every > 0 and (step % every == 0 or step == max_steps)


def equal_shard(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """(indices this process handles, how many of them are real): ceil(n / world) on every
    process, the last ones padded with index 0 (computed, then discarded)."""
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return mine + [0] * (per - len(mine)), len(mine)


class SafetyProbe:
    """The probe of one run (see the module docstring); built by the trainer after sharding.

    Args:
        loaded: the sharded training model with its tokenizer, and the initial model's name and
            fingerprint (for the directions file's metadata and checks).
        examples: the training examples; the first ``train.probe_samples`` are the fixed slice.
        procon: ProCon's directions and layers, or None when ProCon is off.
    """

    def __init__(self, cfg: Config, ctx: D.DistContext, loaded: LoadedModel, examples: list[TokenizedExample],
                 procon: ProConInputs | None, run_dir: Path, say: Callable[[str], None]):
        t = cfg.train
        self.cfg, self.ctx, self.loaded, self.run_dir, self.say = cfg, ctx, loaded, Path(run_dir), say
        self.every, self.batch_size = t.safety_probe_every, t.probe_batch_size
        self.harmful, _ = read_prompts(str(resolve_data_path(t.probe_harmful)), "", t.probe_max_prompts, t.seed)
        self.harmless, _ = read_prompts(str(resolve_data_path(t.probe_harmless)), "", t.probe_max_prompts,
                                            t.seed)
        self.sources = {"harmful": t.probe_harmful, "harmless": t.probe_harmless, "max_prompts": t.probe_max_prompts,
                        "seed": t.seed}
        self.token_ids = refusal_token_ids(loaded.tokenizer)
        self.slice = examples[:t.probe_samples]
        self.procon = procon
        self.initial: DirectionSet | None = None   # step 0's probe directions
        self.z0: torch.Tensor | None = None         # [n_layers, n_tokens] step 0's projections of the slice
        self.layers: list[int] | None = None        # layers of the projection deviation (set on first use)
        self.enabled, self.warned, self.seconds = True, False, 0.0
        self.min_share, self.stop_below = t.min_refusal_share, t.stop_below_min_refusal

    # -- one measurement -------------------------------------------------------------------------

    def measure(self, step: int) -> dict | None:
        """The probe's metrics record for ``step`` (every process gets the same one), or None when
        the probe is off for this run (resumed without its step-0 state)."""
        if not self.enabled or (self.initial is None and not self._load_initial(step)):
            return None
        model, dev = self.loaded.model, self.ctx.device
        t0 = time.perf_counter()
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                mu, scores = self._prompt_pass()
                if not all(torch.isfinite(t).all() for t in (mu["harmful"], mu["harmless"], scores)):
                    self.say(f"safety probe skipped at step {step}: non-finite activations")
                    return None   # the trainer's non-finite check stops the run at its next metrics line
                unit, norms = difference_in_means(mu["harmful"], mu["harmless"])
                current = DirectionSet(unit, norms)
                if self.initial is None:
                    self._set_initial(current)
                z = self._slice_projections()
        finally:
            model.train(training)
        if self.z0 is None:
            self._set_z0(z)
        deviation = (z - self.z0).abs().double().mean(dim=1).tolist()   # [n_layers]
        cos = direction_cosines(self.initial, current)
        defined = [c for c in cos if c is not None]
        harmful, harmless = scores[:len(self.harmful)], scores[len(self.harmful):]
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        per_layer = [None] * num_layers(model)
        for row, layer in enumerate(self.layers):
            per_layer[layer] = deviation[row]
        return {"step": step, SHARE_KEY: (harmful > 0).double().mean().item(),
                "probe_refusal_score_harmful": harmful.mean().item(),
                "probe_refusal_score_harmless": harmless.mean().item(),
                "probe_drift_cos_mean": sum(defined) / len(defined), "probe_drift_cos_min": min(defined),
                "probe_drift_cos": cos,
                "probe_projection_deviation_mean": sum(deviation) / len(deviation),
                "probe_projection_deviation": per_layer, "probe_seconds": seconds}

    def guard(self, record: dict) -> tuple[str | None, bool]:
        """(warning line or None, stop now?) for train.min_refusal_share; warns once per run
        invocation; never stops at step 0 (the initial model, nothing trained yet)."""
        share = record[SHARE_KEY]
        if not share < self.min_share:
            return None, False
        stop = self.stop_below and record["step"] > 0
        note = None
        if not self.warned or stop:
            self.warned = True
            note = (f"warning: step {record['step']}: harmful refusal share {share:.3f} is below "
                    f"train.min_refusal_share = {self.min_share:g}"
                    + ("; stopping (train.stop_below_min_refusal = true)" if stop else ""))
        return note, stop

    # -- the two passes --------------------------------------------------------------------------

    def _prompt_pass(self) -> tuple[dict, torch.Tensor]:
        """Mean layer inputs at the last prompt token per set ({name: [L, D] float64, CPU}) and the
        refusal scores of all probe prompts ([n_harmful + n_harmless] float64, CPU)."""
        dev, rank, world = self.ctx.device, self.ctx.rank, self.ctx.world_size
        L, Dh = num_layers(self.loaded.model), hidden_size(self.loaded.model)
        sums = torch.zeros(2, L, Dh, dtype=torch.float64, device=dev)
        n_all = len(self.harmful) + len(self.harmless)
        scores = torch.zeros(n_all, dtype=torch.float64, device=dev)
        offset = 0
        for k, prompts in enumerate((self.harmful, self.harmless)):
            index, n_real = equal_shard(len(prompts), rank, world)
            for chunk, states, logits in prompt_forward(self.loaded, [prompts[i] for i in index], self.batch_size,
                                                        logits=True):
                real = [j for j, pos in enumerate(chunk) if pos < n_real]
                if not real:
                    continue
                keep = torch.tensor(real, device=dev)
                sums[k] += states[keep].double().sum(dim=0)
                rows = torch.tensor([offset + index[chunk[j]] for j in real], device=dev)
                scores[rows] = refusal_score(logits[keep], self.token_ids).double()
            offset += len(prompts)
        D.all_reduce_sum(sums)
        D.all_reduce_sum(scores)
        sums = sums.cpu()
        return {"harmful": sums[0] / len(self.harmful), "harmless": sums[1] / len(self.harmless)}, scores.cpu()

    def _slice_projections(self) -> torch.Tensor:
        """z = h . r of the slice's response tokens, [n_layers, n_tokens] fp32 in slice order, on the
        device of every process (reference.compute_projections on this process's share, summed)."""
        if self.layers is None:
            self._choose_layers()
        per = math.ceil(len(self.slice) / self.ctx.world_size)
        first = min(self.ctx.rank * per, len(self.slice))
        shard = self.slice[first:first + per]
        ids, pieces = compute_projections(self.loaded, self._slice_directions, shard, self.layers, self.batch_size,
                                          min_batches=math.ceil(per / self.batch_size))
        z = torch.zeros(len(self.layers), self._offsets[-1], dtype=torch.float32)
        for sample_id, piece in zip(ids, pieces):
            k = self._position[sample_id]
            z[:, self._offsets[k]:self._offsets[k + 1]] = piece
        return D.all_reduce_sum(z.to(self.ctx.device))

    def _choose_layers(self) -> None:
        """ProCon's directions and layers, or the probe's step-0 directions on their defined layers."""
        self._slice_directions = self.procon.directions if self.procon is not None else self.initial
        self.layers = self.procon.layers if self.procon is not None else self.initial.defined_layers
        counts = [sum(1 for y in ex.labels if y != IGNORE_INDEX) for ex in self.slice]
        self._offsets = [0, *itertools.accumulate(counts)]
        self._position = {ex.id: k for k, ex in enumerate(self.slice)}

    # -- step 0's state: made at step 0, saved, loaded on resume ---------------------------------

    def _set_initial(self, ds: DirectionSet) -> None:
        meta = direction_metadata(self.loaded, self.harmful, self.harmless, ds.norms, self.sources)
        self.initial = DirectionSet(ds.directions, ds.norms, {**meta, "probe": True})
        D.on_main(lambda: save_directions(self.initial, self.run_dir / DIRECTIONS_FILE))

    def _set_z0(self, z: torch.Tensor) -> None:
        self.z0 = z
        D.on_main(lambda: save_safetensors(self.run_dir / Z0_FILE, {"z0": z.cpu()}, Z0_FORMAT, self._z0_identity()))

    def _z0_identity(self) -> dict:
        return {"layers": self.layers, "samples": [ex.id for ex in self.slice],
                "directions": directions_hash(self._slice_directions)}

    def _load_initial(self, step: int) -> bool:
        """Step 0's state from the run directory (a resumed run); False (probe off, said once) when
        absent. A probe set that differs from the one the run started with is an error."""
        paths = [self.run_dir / DIRECTIONS_FILE, self.run_dir / Z0_FILE]
        if step == 0:
            return True
        if not D.on_main(lambda: all(p.is_file() for p in paths)):
            self.enabled = False
            self.say(f"warning: safety probe off for this run: no {DIRECTIONS_FILE} / {Z0_FILE} from its step 0 in "
                     f"{self.run_dir} (the run started without train.safety_probe_every)")
            return False
        initial = load_directions(paths[0], expect_fingerprint=self.loaded.fingerprint,
                                  expect_layers=num_layers(self.loaded.model))
        if (initial.metadata.get("harmful_prompts"), initial.metadata.get("harmless_prompts")) != (self.harmful,
                                                                                                  self.harmless):
            raise ValueError(f"{paths[0]}: the probe prompts differ from those this run started with; keep "
                             "train.probe_harmful / probe_harmless / probe_max_prompts / seed as they were")
        self.initial = initial
        self._choose_layers()
        tensors, identity = read_safetensors(paths[1], Z0_FORMAT)
        if identity != self._z0_identity():
            raise ValueError(f"{paths[1]}: made for other probe samples, layers or directions than this run's "
                             "(keep train.probe_samples and the ProCon directions/layers as they were)")
        self.z0 = tensors["z0"].to(self.ctx.device)
        return True
