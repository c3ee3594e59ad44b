"""Does ProCon keep refusal through benign fine-tuning? The paper's experiment on SmolLM2-135M-Instruct,
end to end with fastprocon's own commands.

Stages (each skipped when its output exists and was made by the same code version, so a rerun
resumes; one made by another version stops the run, or is redone with --stale rerun):
  data       seeded, disjoint slices of the shared data written to WORK/data
  distill    benign pairs: the base model's own greedy answers to Alpaca instructions
  align      `fastprocon train`: plain IFT on safety (harmful -> refusal) + benign pairs
  directions `fastprocon directions` of the aligned model
  reference  `fastprocon reference`: z0 of the aligned model on the GSM8K training rows
  train      `fastprocon train` from the aligned model on GSM8K, one run per variant
  eval       `fastprocon eval-refusal` + GSM8K test CE and exact match, per model
  drift      `fastprocon drift`: per-layer cosine of each variant's directions vs the aligned ones
  projection_drift  mean |z - z0| of each variant on the GSM8K rows (what ProCon penalises)
  report     table.md, results.json, drift.png, completions/, configs/, commands.txt, stage_times.json

Usage (defaults are the reduced CPU configuration; every size is a flag):
  python experiments/procon_smollm2.py --threads 1              # ~50 min on 2 CPU cores (measured)
  python experiments/procon_smollm2.py --device cuda --n-gsm8k-train 2000 --ift epochs=10
  python experiments/procon_smollm2.py --model tiny --work /tmp/w --results /tmp/r --sizes micro
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import report  # noqa: E402  (experiments/report.py)
from provenance import code_version, describe  # noqa: E402  (experiments/provenance.py)

from fastprocon.cli import main as fastprocon_main  # noqa: E402
from fastprocon.utils.io import write_json  # noqa: E402

SIZES = {  # --sizes presets; any single size can still be set by its own flag
    "cpu": dict(n_align_safety=64, n_distill=16, n_direction=64, n_gsm8k_train=32, n_safe_mix=8,
                n_eval_safety=24, n_eval_harmless=48, n_test_loss=32, n_test_gen=16,
                gen_tokens=48, test_gen_tokens=160, max_length=160),
    "micro": dict(n_align_safety=8, n_distill=4, n_direction=8, n_gsm8k_train=8, n_safe_mix=4,
                  n_eval_safety=4, n_eval_harmless=4, n_test_loss=4, n_test_gen=2,
                  gen_tokens=8, test_gen_tokens=8, max_length=512),
}
VARIANTS = ("ift", "ift_safe", "procon_s", "procon_wu", "procon_wu_safe", "procon_s_token", "procon_s_token_huber")


def toml_value(value) -> str:
    """A value of variants.toml as the trainer's ``key=value`` override text (a bare word is a string)."""
    if isinstance(value, str):
        return value if value.replace("_", "").isalnum() else json.dumps(value)
    return json.dumps(value) if isinstance(value, bool) else str(value)


def read_rows(path: Path) -> list:
    """The rows of a shared data file (.json list or .jsonl), or a FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"shared data file not found: {path} (set --data)")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


@contextmanager
def cpu_threads(n: int):
    """Torch CPU threads = ``n`` inside the block. Stages whose output must not depend on --threads run
    at one thread: greedy decoding flips an argmax on last-bit differences between thread counts (one
    of 192 distilled stage-1 answers changed between 1 and 2 threads, and so did the aligned model).
    Training gave every logged value equal at 1 and 2 threads (stage 1, 6 steps), so it keeps --threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _labels_in(path: Path) -> set[str]:
    """The model labels a drift report covers (so adding a variant reruns the drift stages)."""
    report = json.loads(path.read_text())
    return {e["label"] for e in report["checkpoints"]} if "checkpoints" in report else set(report)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="base model spec (default smollm2; 'tiny' for smoke tests)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="shared data directory")
    p.add_argument("--work", default=str(REPO / "runs" / "procon_smollm2"), help="models, runs, eval outputs")
    p.add_argument("--results", default=str(HERE / "results"), help="committed report files")
    p.add_argument("--configs", default=str(HERE / "configs"), help="align.toml, ift.toml, variants.toml")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="stage-3 variants (sections of variants.toml)")
    p.add_argument("--sizes", choices=sorted(SIZES), default="cpu", help="preset of the sizes below")
    for key in SIZES["cpu"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"(preset {SIZES['cpu'][key]} for cpu)")
    p.add_argument("--align", nargs="*", default=[], metavar="key=value", help="extra overrides for stage 1")
    p.add_argument("--ift", nargs="*", default=[], metavar="key=value", help="extra overrides for every variant")
    p.add_argument("--max-question-chars", type=int, default=360,
                   help="GSM8K training questions longer than this are skipped (default 360: ~90 tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data slices")
    p.add_argument("--batch-size", type=int, default=16, help="generation / forward batch size")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is much faster on a CPU shared with other jobs")
    p.add_argument("--no-base-eval", action="store_true", help="skip evaluating the base model")
    p.add_argument("--stale", choices=("refuse", "rerun"), default="refuse",
                   help="a finished stage made by another code version (see experiments/provenance.py): "
                        "stop and say so (default), or delete its output and run it again")
    args = p.parse_args(argv)
    for key, value in SIZES[args.sizes].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Experiment:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work, self.results = Path(args.work).resolve(), Path(args.results).resolve()
        self.data_dir = self.work / "data"
        self.log_path = self.work / "stages.json"   # every stage's wall time and commands, kept over reruns
        self.log = json.loads(self.log_path.read_text()) if self.log_path.exists() else {}
        self.device_flag = args.device
        self.version = code_version()   # stamped on every stage; a report never mixes two versions

    # -- plumbing ------------------------------------------------------------------------------

    def fastprocon(self, stage: str, argv: list[str]) -> None:
        """Run one `fastprocon` command in this process (the CLI itself, not a re-implementation)."""
        argv = [str(a) for a in argv]
        self.log.setdefault(stage, {}).setdefault("commands", []).append("fastprocon " + shlex.join(argv))
        print(f"\n$ fastprocon {shlex.join(argv)}", flush=True)
        code = fastprocon_main(argv)
        if code != 0:
            raise SystemExit(f"stage {stage}: `fastprocon {argv[0]}` exited with {code}")

    def stage(self, name: str, output: Path, fn, labels: list[str] | None = None, clear: Path | None = None,
              one_thread: bool = False) -> None:
        """Run ``fn`` unless ``output`` exists (and, with ``labels``, names all of them) and was made by
        this code version; record its wall time, version and thread count. ``clear``: what to delete
        before a rerun of a stage made by another version (default ``output``). ``one_thread``: run at
        one CPU thread (see :func:`cpu_threads`)."""
        if output.exists() and (labels is None or set(labels) <= _labels_in(output)):
            made_by = self.log.get(name, {}).get("version")
            if made_by and made_by["code"] == self.version["code"]:
                print(f"[experiment] {name}: done ({output})", flush=True)
                return
            if self.args.stale == "refuse":
                raise SystemExit(f"stage {name}: {output} was made by {describe(made_by)}, this is "
                                 f"{describe(self.version)}; rerun with --stale rerun to redo it (and every "
                                 "stage after it), or use another --work directory")
            doomed = clear or output
            print(f"[experiment] {name}: made by {describe(made_by)}: deleting {doomed} to rerun", flush=True)
            shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
        print(f"[experiment] {name}: running", flush=True)
        import torch

        self.log[name] = {"commands": [], "version": self.version}
        start = time.perf_counter()
        with cpu_threads(1) if one_thread else nullcontext():
            self.log[name]["threads"] = torch.get_num_threads()
            fn()
        self.log[name]["seconds"] = round(time.perf_counter() - start, 1)
        write_json(self.log_path, self.log)
        print(f"[experiment] {name}: {self.log[name]['seconds']} s", flush=True)

    def load(self, spec: str):
        """A model for the driver's own API calls, on the --device the CLIs get."""
        from fastprocon.models.load import load_model, resolve_device

        return load_model(spec, device=resolve_device(self.device_flag))

    def model_flags(self) -> list[str]:
        return ["--device", self.device_flag]

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    # -- stage bodies --------------------------------------------------------------------------

    def make_data(self) -> None:
        """Disjoint, seeded slices. safety_only.json: stage-1 rows | stage-3 `_safe` rows | held-out eval
        prompts. harmful/harmless_train: directions (and, disjoint, the distillation prompts).
        GSM8K train: stage-3 rows; test: loss and exact-match rows. Evaluation harmful prompts:
        HarmBench (harmful_val.json, never used elsewhere) + the held-out safety slice."""
        from fastprocon.refusal.evaluate import is_refusal

        a, src = self.args, Path(self.args.data)
        rng = random.Random(a.seed)

        def shuffled(rows: list) -> list:
            rows = list(rows)
            rng.shuffle(rows)
            return rows

        read = read_rows
        def take(rows: list, *counts: int) -> list[list]:
            if sum(counts) > len(rows):
                raise ValueError(f"need {sum(counts)} rows for slices {counts}, the file has {len(rows)}")
            out, start = [], 0
            for n in counts:
                out.append(rows[start:start + n])
                start += n
            return out

        # only rows whose response the substring rule reads as a refusal: the model learns what is scored
        safety = shuffled([r for r in read(src / "safety" / "safety_only.json") if is_refusal(r["output"])])
        align_safety, ift_safety, eval_safety = take(safety, a.n_align_safety, a.n_safe_mix, a.n_eval_safety)
        harmful_train = shuffled(read(src / "direction" / "harmful_train.json"))
        harmless_train = shuffled(read(src / "direction" / "harmless_train.json"))
        (harmful_dir,) = take(harmful_train, a.n_direction)
        harmless_dir, distill = take(harmless_train, a.n_direction, a.n_distill)
        harmbench = read(src / "direction" / "harmful_val.json")
        (harmless_eval,) = take(shuffled(read(src / "direction" / "harmless_val.json")), a.n_eval_harmless)
        # short questions only, so every prompt leaves room for response tokens within max_length
        gsm_rows = [r for r in shuffled(read(src / "gsm8k" / "train.jsonl"))
                    if len(r["question"]) <= a.max_question_chars]
        (gsm_train,) = take(gsm_rows, a.n_gsm8k_train)
        gsm_loss, gsm_gen = take(shuffled(read(src / "gsm8k" / "test.jsonl")), a.n_test_loss, a.n_test_gen)

        eval_harmful = ([{"instruction": r["instruction"], "source": "harmbench_val"} for r in harmbench]
                        + [{"instruction": r["instruction"], "input": r.get("input", ""), "source": "safety_heldout"}
                           for r in eval_safety])
        files = {"align_safety.json": align_safety, "ift_safety.json": ift_safety, "harmful_dir.json": harmful_dir,
                 "harmless_dir.json": harmless_dir, "distill_prompts.json": distill, "eval_harmful.json": eval_harmful,
                 "eval_harmless.json": harmless_eval, "gsm8k_train.json": gsm_train,
                 "gsm8k_test_loss.json": gsm_loss, "gsm8k_test_gen.json": gsm_gen}
        for name, rows in files.items():
            write_json(self.data_dir / name, rows)
        write_json(self.data_dir / "manifest.json", {"seed": a.seed, "source": str(src),
                                                     "rows": {k: len(v) for k, v in files.items()}})

    def distill(self) -> None:
        """Benign pairs for stage 1: the built-in benign set plus the base model's own greedy answers to
        Alpaca instructions (keeps its helpful behaviour, so refusal training does not spread to them)."""
        from fastprocon.data.examples import builtin_path, load_instructions
        from fastprocon.refusal.evaluate import greedy_completions, is_refusal

        self.log["distill"]["commands"].append(
            f"# fastprocon.refusal.evaluate.greedy_completions of {self.args.model} on data/distill_prompts.json "
            f"({self.distill_tokens()} tokens, python API)")
        prompts = load_instructions(self.data_dir / "distill_prompts.json")
        answers, _ = greedy_completions(self.load(self.args.model), prompts, max_new_tokens=self.distill_tokens(),
                                        batch_size=self.args.batch_size, desc="distill")
        rows = [{"instruction": p, "input": "", "output": t} for p, t in zip(prompts, answers)
                if t.strip() and not is_refusal(t)]
        rows += json.loads(builtin_path("benign").read_text())
        self.log["distill"]["kept"] = f"{len(rows)} benign pairs ({len(prompts)} distilled, refusals/empty dropped)"
        write_json(self.data_dir / "benign.json", rows)

    def distill_tokens(self) -> int:
        return self.args.test_gen_tokens

    def train(self, run: str, config: str, overrides: list[str]) -> None:
        stage = run if run == "align" else f"train:{run}"
        self.fastprocon(stage, ["train", "--config", config, f"device={self.device_flag}",
                                f"run_dir={self.path('runs', run)}", *overrides])

    def align(self) -> None:
        self.train("align", str(Path(self.args.configs) / "align.toml"),
                   [f"spec={self.args.model}", f"train={self.data_dir / 'benign.json'}",
                    f"safety={self.data_dir / 'align_safety.json'}",
                    f"safety_samples={len(read_rows(self.data_dir / 'align_safety.json'))}",
                    f"max_length={self.args.max_length}", *self.args.align])

    @property
    def aligned(self) -> Path:
        return self.path("runs", "align", "model")

    @property
    def directions_file(self) -> Path:
        return self.path("directions", "directions.safetensors")

    def direction_validation(self) -> tuple[Path, Path]:
        """Harmful and harmless prompts on which `fastprocon directions` checks its directions."""
        return Path(self.args.data) / "direction" / "harmful_val.json", self.data_dir / "eval_harmless.json"

    def directions(self) -> None:
        self.fastprocon("directions", ["directions", "--model", self.aligned, *self.model_flags(),
                                       "--harmful", self.data_dir / "harmful_dir.json",
                                       "--harmless", self.data_dir / "harmless_dir.json", "--max-prompts", 0,
                                       "--harmful-val", self.direction_validation()[0],
                                       "--harmless-val", self.direction_validation()[1],
                                       "--batch-size", self.args.batch_size, "--out", self.path("directions")])

    def reference(self) -> None:
        self.fastprocon("reference", ["reference", "--model", self.aligned, *self.model_flags(),
                                      "--directions", self.directions_file,
                                      "--data", self.data_dir / "gsm8k_train.json",
                                      "--max-length", self.args.max_length, "--batch-size", 8,
                                      "--out", self.path("reference", "gsm8k.safetensors")])

    def variant_overrides(self, variant: str) -> list[str]:
        table = tomllib.loads((Path(self.args.configs) / "variants.toml").read_text())
        if variant not in table:
            raise ValueError(f"variant {variant!r} is not a section of variants.toml (has: {', '.join(table)})")
        keys = dict(table[variant])
        safety_samples = keys.pop("safety_samples", 0)
        safety_samples = self.args.n_safe_mix if safety_samples == -1 else safety_samples
        fraction = keys.pop("warmup_fraction", None)
        extra = dict(o.split("=", 1) for o in self.args.ift)
        if fraction is not None:
            epochs = float(extra.get("epochs", tomllib.loads((Path(self.args.configs) / "ift.toml").read_text())
                                     .get("train", {}).get("epochs", 1.0)))
            keys["alpha_warmup_epochs"] = round(fraction * epochs, 6)
        # `_safe` data differs from the plain GSM8K rows, so its z0 cache is made by the trainer itself
        reference = "" if safety_samples else str(self.path("reference", "gsm8k.safetensors"))
        return ([f"spec={self.aligned}", f"train={self.data_dir / 'gsm8k_train.json'}",
                 f"safety={self.data_dir / 'ift_safety.json'}", f"safety_samples={safety_samples}",
                 f"directions={self.directions_file}", f"reference_cache={reference}",
                 f"max_length={self.args.max_length}", f"name={variant}"]
                + [f"{k}={toml_value(v)}" for k, v in keys.items()] + self.args.ift)

    def evaluate(self, name: str, model: str) -> None:
        from task_eval import exact_match, test_loss

        from fastprocon.data.examples import load_examples

        out = self.path("eval", name)
        self.fastprocon(f"eval:{name}", ["eval-refusal", "--model", model, *self.model_flags(),
                                         "--harmful", self.data_dir / "eval_harmful.json",
                                         "--harmless", self.data_dir / "eval_harmless.json",
                                         "--max-new-tokens", self.args.gen_tokens,
                                         "--batch-size", self.args.batch_size, "--out", out / "refusal.json"])
        self.log[f"eval:{name}"]["commands"].append(
            f"# then experiments/task_eval.py: test_loss and exact_match of {model} (python API)")
        loaded = self.load(model)
        loss = test_loss(loaded, load_examples(self.data_dir / "gsm8k_test_loss.json"), self.args.max_length)
        match = exact_match(loaded, load_examples(self.data_dir / "gsm8k_test_gen.json"),
                            self.args.test_gen_tokens, self.args.batch_size)
        write_json(out / "gsm8k.json", {"model": model, "test_loss": loss, "exact_match": match})

    def drift(self) -> None:
        variants = self.args.variants
        self.fastprocon("drift", ["drift", "--directions", self.directions_file,
                                  "--checkpoints", *[self.path("runs", v, "model") for v in variants],
                                  "--labels", *variants, *self.model_flags(), "--batch-size", self.args.batch_size,
                                  "--out", self.path("drift")])

    def projection_drift(self) -> None:
        """Mean |z - z0| on the GSM8K training rows for every variant, z0 from the aligned model."""
        from projection_drift import deviation, projections

        from fastprocon.data.examples import load_examples
        from fastprocon.data.tokenize import tokenize_examples
        from fastprocon.refusal.directions import load_directions

        directions = load_directions(self.directions_file)
        self.log["projection_drift"]["commands"].append(
            "# experiments/projection_drift.py: mean |r.h(trained) - r.h(aligned)| on the GSM8K rows (python API)")
        examples = load_examples(self.data_dir / "gsm8k_train.json")
        reference, report = None, {}
        models = [("aligned", self.aligned)] + [(v, self.path("runs", v, "model")) for v in self.args.variants]
        for name, model in models:
            loaded = self.load(str(model))
            tokenized, _ = tokenize_examples(examples, loaded.tokenizer, self.args.max_length)
            z = projections(loaded, directions, tokenized)
            reference = z if reference is None else reference
            report[name] = deviation(z, reference, directions.defined_layers)
        write_json(self.path("projection_drift.json"), report)

    # -- the whole experiment ------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        self.work.mkdir(parents=True, exist_ok=True)
        self.log.setdefault("invocations", []).append("python " + shlex.join(sys.argv))
        print(f"[experiment] {describe(self.version)}", flush=True)
        t0 = time.perf_counter()
        self.stage("data", self.data_dir / "manifest.json", self.make_data)
        self.stage("distill", self.data_dir / "benign.json", self.distill)
        self.stage("align", self.aligned, self.align, clear=self.path("runs", "align"))
        # the stage-1 check (base and aligned refusal) comes before the long stage 3
        starts = ([] if a.no_base_eval else [("base", a.model)]) + [("aligned", str(self.aligned))]
        trained = [(v, str(self.path("runs", v, "model"))) for v in a.variants]
        for name, model in starts:
            self.stage(f"eval:{name}", self.path("eval", name, "gsm8k.json"),
                       lambda n=name, m=model: self.evaluate(n, m), clear=self.path("eval", name))
        self.stage("directions", self.directions_file, self.directions, clear=self.path("directions"))
        self.stage("reference", self.path("reference", "gsm8k.safetensors"), self.reference)
        for v in a.variants:
            self.stage(f"train:{v}", self.path("runs", v, "model"),
                       lambda v=v: self.train(v, str(Path(a.configs) / "ift.toml"), self.variant_overrides(v)),
                       clear=self.path("runs", v))
        for name, model in trained:
            self.stage(f"eval:{name}", self.path("eval", name, "gsm8k.json"),
                       lambda n=name, m=model: self.evaluate(n, m), clear=self.path("eval", name))
        self.stage("drift", self.path("drift", "drift.json"), self.drift, labels=a.variants, clear=self.path("drift"))
        self.stage("projection_drift", self.path("projection_drift.json"), self.projection_drift, labels=a.variants)
        self.log["total_this_invocation_s"] = round(time.perf_counter() - t0, 1)
        write_json(self.log_path, self.log)
        report.write_report(self.work, self.results, [n for n, _ in starts + trained], a.variants, self.log, vars(a))
        print(f"[experiment] report written to {self.results}")


def main(argv=None, parse=parse_args, experiment=Experiment) -> int:
    """Parse ``argv``, set the thread count, run the experiment (also the powered driver's entry)."""
    args = parse(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    experiment(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
