"""The ILTM loop (Patel et al. 2023, §3.2, Figure 2): find the suspicious tokens of the training images, mask them
out of the Transformer's attention and loss, retrain, repeat.

Iteration 0 trains the Transformer on all tokens. Iteration k >= 1 runs the KDE inferer with Transformer k-1 and
resampling threshold t_k on every training image, turns each density map into a binary anomaly map (density below
`density_threshold`), downsamples it to the token grid and retrains with those tokens masked; t_{k+1} =
t_k (1 - threshold_decay) unless the threshold is fixed. The loop stops when the number of masked tokens changes by
less than `stop_tolerance` (relative) from the previous iteration, or after `max_iterations`.

Every step is recorded in `<output_dir>/state.json` when it completes; a rerun of the same command loads completed
steps and continues at the first incomplete one (a Transformer mid-training resumes from its epoch checkpoint).
"""

from __future__ import annotations

import filecmp
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from torch import nn
from tqdm import tqdm

from scripts import distributed, iltm_checks, metrics, tracking
from scripts.checkpoint import detector_record, load_checkpoint, load_weights, save_detector
from scripts.data import intensity_band
from scripts.detector import AnomalyDetector, check_density_threshold, segment
from scripts.files import atomic_save
from scripts.healing import LatentSequencer, token_log_likelihood
from scripts.iltm_report import write_report
from scripts.runs import RunConflict
from scripts.steps import RunState
from scripts.tokens import cached_tokens, latent_shape, load_token_masks, mask_spec, save_token_masks
from scripts.transformer_stage import TransformerStage

logger = logging.getLogger(__name__)

MASK_CHUNK = 32  # training images per file of a mask pass: the unit a killed pass resumes from and ranks share out


def threshold_schedule(t0: float, iterations: int, decay: float = 0.125, fixed: bool = False) -> list[float]:
    """Resampling thresholds t_1..t_iterations of the mask-generating passes: t_{k+1} = t_k (1 - decay)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"threshold_decay must be in [0, 1), got {decay}")
    return [t0 if fixed else t0 * (1.0 - decay) ** k for k in range(iterations)]


def should_stop(previous: int, current: int, tolerance: float = 0.01) -> bool:
    """Masked-token count changed by less than `tolerance` of the previous count (0 -> 0 counts as converged)."""
    return abs(current - previous) < tolerance * max(previous, 1) if previous else current == 0


def tokens_from_map(anomalous: torch.Tensor, grid: Sequence[int], rule: str = "any", fraction: float = 0.5):
    """Binary voxel map [N, 1, *S] -> suspect tokens [N, *grid].

    rule "any": a token is suspect if any voxel under it is anomalous; "fraction": if at least `fraction` of them are.
    The voxels under a token are its receptive block of the image (image size / grid size per axis).
    """
    if rule not in ("any", "fraction"):
        raise ValueError(f"downsample rule must be 'any' or 'fraction', got {rule!r}")
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    covered = pool(anomalous.float(), tuple(grid))[:, 0]
    return covered > 0 if rule == "any" else covered >= fraction - 1e-6


def precision_recall(suspect: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Token-mask precision and recall against the true anomalous tokens (NaN where undefined)."""
    hits = float((suspect & truth).sum())
    flagged, positives = float(suspect.sum()), float(truth.sum())
    return (hits / flagged if flagged else float("nan")), (hits / positives if positives else float("nan"))


def images_changed(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """How many labelled images [N, *S] score a higher / lower AUPRO of their own with map `after` than with map
    `before`: a set-level change on a few validation images can rest on one or two of them, so the summary shows
    both (on the 2D demo's 16 the set-level change had the test set's sign in 2 of 8 runs, docs/README.md)."""
    changes = [  # NaN (an image without both classes) neither rises nor falls
        metrics.image_aupro(a.numpy(), lab.numpy()) - metrics.image_aupro(b.numpy(), lab.numpy())
        for b, a, lab in zip(before, after, labels)
    ]
    return {"images_better": int(sum(c > 0 for c in changes)), "images_worse": int(sum(c < 0 for c in changes))}


def mask_record(suspect: torch.Tensor, truth: torch.Tensor | None) -> dict:
    """What ``state.json`` records of a set of token masks: its size, and its quality where labels exist."""
    counts = {"masked_tokens": int(suspect.sum()), "total_tokens": suspect.numel()}
    if truth is not None:
        counts["precision"], counts["recall"] = precision_recall(suspect, truth)
    return counts


class ILTMWorkflow:
    """Runs iteration 0 and the ILTM iterations; `run()` is the bundle's Transformer + ILTM training.

    Args:
        output_dir: where every iteration's checkpoint, masks and counts go (`iltm/iter_KK/`).
        detector: the whole detector (`network_def`) around the trained VQ-VAE and the Transformer to train.
        tracking: MLflow settings (scripts/tracking.py) when `--tracking mlflow` is on: the ILTM table is logged.
        detector_settings: the data settings every detector checkpoint records beside the networks' own
            (`scripts.checkpoint.detector_record`); None records the networks' only.
        stage: trains one Transformer (hyperparameters from the config).
        train_files, val_files, transform: training / validation entries and their deterministic preprocessing.
        resample_threshold: t_1, the first mask-generating pass's threshold (paper: 0.005).
        threshold_decay, fixed_threshold: the schedule (paper: 12.5 % decrease per iteration).
        downsample_rule, downsample_fraction: voxel map -> token mask (see `tokens_from_map`).
        max_iterations: ILTM iterations after iteration 0.
        min_iterations: ILTM iterations trained before the stopping rule may end the loop.
        stop_tolerance: relative change of the masked-token count below which the loop stops (paper: 1 %).
        warm_start: start each retraining from the previous Transformer instead of its initial weights.
        mask_batch_size: training images per inferer call while generating masks.
        mask_num_samples, mask_num_decodes: N and M of the mask-generating passes (None: the detector's). Inference
            may run cheaper than the paper's N = 60, M = 5; masks that decide what the Transformer learns should not.
        mask_density_threshold: KDE density below which a training voxel is anomalous for the masks (None: the
            detector's ``density_threshold``), on the bundle's [0, 1] intensity scale.
        mask_restrict_to_flags: masks from the map restricted to flagged tokens (the prior work's restriction, see
            :class:`scripts.detector.AnomalyDetector`), whatever map the detector serves: a mask is then what the
            Transformer found and healed, not the VQ-VAE's reconstruction error.
        export: where the final detector's state dict is also written (the bundle's `models/model.pt`); None = not.
        initial_masks: a token mask file (`token_masks.pt` of an earlier run, or one written with
            `scripts.tokens.save_token_masks`) that iteration 0 trains with; None = all tokens; "labels" = the
            training labels' anomalous tokens, the oracle that bounds what any mask can achieve (a diagnostic);
            "labels&PATH" / "labels|PATH" = the file's masks within / together with the labelled tokens (diagnostics
            of a run's masks: their recall alone, and their false masks alone).
    """

    def __init__(
        self,
        output_dir: str,
        detector: AnomalyDetector,
        stage: TransformerStage,
        train_files: Sequence[dict],
        val_files: Sequence[dict],
        transform: Callable,
        image_size: Sequence[int],
        device: str | torch.device = "cpu",
        resample_threshold: float = 0.005,
        threshold_decay: float = 0.125,
        fixed_threshold: bool = False,
        downsample_rule: str = "any",
        downsample_fraction: float = 0.5,
        max_iterations: int = 5,
        min_iterations: int = 1,
        stop_tolerance: float = 0.01,
        warm_start: bool = False,
        mask_batch_size: int = 4,
        mask_num_samples: int | None = None,
        mask_num_decodes: int | None = None,
        mask_density_threshold: float | None = None,
        mask_restrict_to_flags: bool = True,
        export: str | None = None,
        initial_masks: str | None = None,
        detector_settings: Mapping[str, Any] | None = None,
        tracking: Mapping[str, str] | None = None,
    ) -> None:
        self.tracking = tracking
        self.output_dir, self.detector, self.stage = output_dir, detector, stage
        self.detector_settings = dict(detector_settings or {})
        self.train_files, self.val_files, self.transform = list(train_files), list(val_files), transform
        self.device = torch.device(device)
        self.thresholds = threshold_schedule(resample_threshold, max_iterations, threshold_decay, fixed_threshold)
        self.downsample_rule, self.downsample_fraction = downsample_rule, downsample_fraction
        self.max_iterations, self.min_iterations = max_iterations, min_iterations
        self.stop_tolerance, self.warm_start = stop_tolerance, warm_start
        self.mask_batch_size, self.export, self.initial_masks = mask_batch_size, export, initial_masks
        self.mask_counts = {"num_samples": mask_num_samples, "num_decodes": mask_num_decodes}
        self.mask_restrict_to_flags = mask_restrict_to_flags
        self.mask_density_threshold = mask_density_threshold or detector.density_threshold
        if self.mask_density_threshold <= 0:
            raise ValueError(f"mask_density_threshold must be > 0, got {self.mask_density_threshold}")
        check_density_threshold("mask_density_threshold", self.mask_density_threshold, detector.epsilon)
        self.grid = latent_shape(detector.vqvae, detector.vqvae.in_channels, image_size)
        self.codebook_size = detector.vqvae.num_embeddings

    def _initial_masks(self, truth: torch.Tensor | None) -> torch.Tensor:
        """Iteration 0's token masks: none, a file, the labels (the oracle), or the labels combined with a file's
        masks, which separates what a run's masks miss from what they mask wrongly: ``labels&PATH`` keeps the
        file's correct masks only (its recall, no false masks), ``labels|PATH`` adds every labelled token (full
        recall, its false masks)."""
        spec = os.fspath(self.initial_masks or "")
        if not spec:
            return torch.zeros((len(self.train_files), *self.grid), dtype=torch.bool)
        labels, path = mask_spec(spec)
        if labels and truth is None:
            raise ValueError(f"iltm#initial_masks {spec!r} needs a label for every training image")
        if not path:
            return truth
        masks = load_token_masks(path, self.train_files, self.grid, required=True)
        return masks if not labels else (truth & masks if labels == "labels&" else truth | masks)

    def _first_masks(self, state: RunState, suspect: torch.Tensor, truth: torch.Tensor | None) -> torch.Tensor | None:
        """The masks iteration 0 trains with; a user's are recorded once as ``masks_00``, row 0 of the summary.

        Under ``resume`` a completed iteration 0 is not retrained. Where the masks it trained with (the record, or none)
        differ from today's, they are unknown here (None), so no later iteration is taken for a copy of it."""
        source = os.fspath(self.initial_masks or "")
        now = {"source": source, "masked_tokens": int(suspect.sum())}
        kept = state.steps.get("masks_00")
        if kept is None and not state.done("transformer_00"):
            if source and distributed.is_main():
                state.complete("masks_00", source=source, **mask_record(suspect, truth))
            return suspect
        was = {key: kept.get(key) for key in now} if kept else {"source": "", "masked_tokens": 0}
        if was == now:
            return suspect
        if distributed.is_main():

            def named(masks: dict) -> str:
                return f"{masks['source'] or 'no masks'} ({masks['masked_tokens']} tokens)"

            logger.warning(f"iltm#initial_masks: {named(now)} now, but this run recorded {named(was)} as iteration 0's "
                           "masks; a completed iteration 0 is not retrained, and no later iteration is taken for a copy "
                           "of it")  # fmt: skip
        return None

    def folder(self, k: int) -> str:
        return os.path.join(self.output_dir, "iltm", f"iter_{k:02d}")

    def run(self) -> dict:
        state = RunState(self.output_dir)
        transformer = self.detector.transformer.to(self.device)
        self.detector.vqvae.to(self.device)
        initial = self._initial_weights(transformer)
        sequencer = LatentSequencer(self.grid, transformer.bos_id)
        tokens = os.path.join(self.output_dir, "tokens")
        train_seq = sequencer.to_sequence(self._tokens(self.train_files, f"{tokens}/train.pt"))
        val_seq = sequencer.to_sequence(self._tokens(self.val_files, f"{tokens}/val.pt"))
        truth = self._true_tokens()

        suspect = self._initial_masks(truth)
        final, trained_on = 0, [self._first_masks(state, suspect, truth)]  # the masks each iteration trained with
        for k in range(self.max_iterations + 1):
            if k > 0:
                suspect = self._masks(state, k, truth)
                previous = int(state.steps[f"masks_{k - 1:02d}"]["masked_tokens"]) if k > 1 else 0
                if k > self.min_iterations and should_stop(previous, int(suspect.sum()), self.stop_tolerance):
                    logger.info(f"ILTM: masked tokens changed by < {self.stop_tolerance:.0%}; stopping at {k - 1}")
                    break
                if not self.warm_start:
                    transformer.load_state_dict(initial)
                    same = [
                        j for j, masks in enumerate(trained_on) if masks is not None and torch.equal(suspect, masks)
                    ]
                    if same:  # the first: a later equal one is its copy
                        self._reuse(state, k, same[0])
                trained_on.append(suspect)
            keep = sequencer.to_keep(suspect)
            self.stage(f"transformer_{k:02d}", transformer, train_seq, keep, val_seq, self.folder(k), self.output_dir)
            model = os.path.join(self.folder(k), "model.pt")
            if distributed.is_main() and not os.path.isfile(model):
                save_detector(self.detector, detector_record(self.detector, self.detector_settings), model)
            final = k
        if state.done(f"transformer_{final + 1:02d}"):  # settings lowered since: the run would go back an iteration
            raise RunConflict(
                f"{self.output_dir}: this run has trained ILTM iteration {final + 1}; with these settings "
                f"(iltm#max_iterations, iltm#min_iterations, iltm#stop_tolerance) it would end at iteration {final} "
                f"and replace its final model.pt. Every iteration's detector is kept: use "
                f"{os.path.join(self.folder(final), 'model.pt')}, or train into a new --output_dir."
            )
        report = distributed.main_first(lambda: self._finish(state, final, truth, val_seq))
        return report or {}

    def _reuse(self, state: RunState, k: int, j: int) -> None:
        """Iteration k's masks are iteration j's: retraining from the same initial weights, with the same per-epoch
        seeds (:func:`scripts.steps.train_stage`), would give the same Transformer, so it is copied instead (on real
        data where nothing is flagged, every forced iteration retrained iteration 0 to the same weights; a last pass
        that masks nothing is iteration 0 again)."""
        step = f"transformer_{k:02d}"
        if distributed.is_main() and not state.done(step):
            source, weights = (os.path.join(self.folder(i), "transformer.pt") for i in (j, k))
            os.makedirs(self.folder(k), exist_ok=True)
            atomic_save(load_checkpoint(source), weights)
            record = {key: v for key, v in state.steps[f"transformer_{j:02d}"].items() if key != "resumed_after_epoch"}
            state.complete(step, **{**record, "weights": os.path.relpath(weights, self.output_dir), "wall_time_s": 0.0,
                                    "same_masks_as": j})  # fmt: skip
            logger.info(f"ILTM {k}: the masks are those of iteration {j}; its Transformer is reused, not retrained")
        distributed.barrier()

    def _finish(self, state: RunState, final: int, truth: torch.Tensor | None, val_seq: torch.Tensor) -> dict:
        """Checks, report, export and tracking of a finished loop: rank 0's work under torchrun. The export comes after
        the report, so that a run with its `model.pt` has its report too (the experiments runner skips such runs)."""
        checks = self._checks(state, final, truth, val_seq)
        report = write_report(self.output_dir, state, final, self.train_files, self.transform, truth, self.grid, checks)
        self._export(state, final)
        params = {"final_iteration": final, "thresholds": ", ".join(f"{t:.3g}" for t in self.thresholds[:final]),
                  "downsample_rule": self.downsample_rule, "training_images": len(self.train_files)}  # fmt: skip
        logged = f"tracking_{final:02d}"  # once per final iteration: a rerun of the finished run logs nothing again
        if self.tracking and not state.done(logged):
            tracking.log_table(self.tracking, os.path.join(self.output_dir, "iltm"), params)
            state.complete(logged, experiment=self.tracking["experiment_name"])
        return report

    def _tokens(self, files: Sequence[dict], path: str) -> torch.Tensor:
        """Token grids of `files`, quantised once by rank 0 and read from its cache by the other ranks."""

        def tokens() -> torch.Tensor:
            return cached_tokens(self.detector.vqvae, files, self.transform, self.device, path)

        quantised = distributed.main_first(tokens)
        return tokens() if quantised is None else quantised

    def _masks(self, state: RunState, k: int, truth: torch.Tensor | None) -> torch.Tensor:
        """Token masks for iteration k from Transformer k-1 (computed once; loaded when the step is complete).

        The validation images get masks too (``val_token_masks.pt``), never used in training: they let the run
        check, without labels, whether the retrained Transformer unlearns what was masked (:mod:`scripts.iltm_checks`).
        Under torchrun the ranks share the images (see :meth:`_sharded_pass`); rank 0 writes the merged files.
        """
        path = os.path.join(self.folder(k), "token_masks.pt")
        step = f"masks_{k:02d}"
        if state.done(step):
            logger.info(f"{step}: already complete, loading {path}")
            return load_token_masks(path, self.train_files, self.grid)
        start, threshold = time.time(), self.thresholds[k - 1]
        chunks = os.path.join(self.folder(k), "mask_chunks")
        suspect, flags = self._sharded_pass(self.train_files, threshold, f"ILTM {k}: masks (t={threshold:.2e})", chunks)
        val_suspect, _ = self._sharded_pass(self.val_files, threshold, f"ILTM {k}: validation masks", chunks, "val")
        if distributed.is_main():
            save_token_masks(os.path.join(self.folder(k), "val_token_masks.pt"), self.val_files, val_suspect)
            save_token_masks(path, self.train_files, suspect)
            info = {
                "threshold": threshold,
                "density_threshold": self.mask_density_threshold,
                **mask_record(suspect, truth),
                "resampled_tokens": int(flags.sum()),
                "val_masked_tokens": int(val_suspect.sum()),
            }
            if truth is not None:
                info["flag_precision"], info["flag_recall"] = precision_recall(flags, truth)
            info["wall_time_s"] = round(time.time() - start, 1)
            info["seconds_per_image"] = round(info["wall_time_s"] / len(self.train_files), 3)
            state.complete(step, **info)
        distributed.barrier()  # every rank has read the chunks before they go
        if distributed.is_main():
            shutil.rmtree(chunks, ignore_errors=True)
        return suspect

    def _sharded_pass(
        self, files: Sequence[dict], threshold: float, desc: str, folder: str, name: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_mask_pass` over chunks of MASK_CHUNK images, chunk i on rank i % world size, each written once.

        A killed pass resumes at the first chunk not on disk, whatever the number of processes; every rank then
        reads all chunks. Maps do not depend on the batch (the detector seeds each image), so the masks equal a
        single process's.
        """
        chunks = [files[i : i + MASK_CHUNK] for i in range(0, len(files), MASK_CHUNK)]
        paths = [os.path.join(folder, f"{name}_{i:05d}.pt") for i in range(len(chunks))]
        done = sum(os.path.isfile(p) for p in paths)
        if done and distributed.is_main():
            logger.info(f"{desc}: resuming, {done} of {len(chunks)} chunks of {MASK_CHUNK} images already on disk")
        for i in range(distributed.rank(), len(chunks), distributed.world_size()):
            if not os.path.isfile(paths[i]):
                suspect, flags = self._mask_pass(chunks[i], threshold, f"{desc} [{i + 1}/{len(chunks)}]")
                images = [str(e["image"]) for e in chunks[i]]
                atomic_save({"images": images, "suspect": suspect, "flags": flags}, paths[i])
        distributed.barrier()
        parts = [load_checkpoint(path) for path in paths]
        for part, chunk, path in zip(parts, chunks, paths):
            if part.get("images") != [str(e["image"]) for e in chunk]:
                raise RuntimeError(f"{path}: masks of other images than this run's; delete {folder} and rerun")
        empty = torch.zeros((0, *self.grid), dtype=torch.bool)
        return tuple(torch.cat([empty, *(p[key] for p in parts)]) for key in ("suspect", "flags"))

    def _mask_pass(self, files: Sequence[dict], threshold: float, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Suspect tokens and resampling flags [N, *grid] of `files` under the current Transformer."""
        empty = torch.zeros((0, *self.grid), dtype=torch.bool)
        masks, flags = [empty], [empty]
        loader = DataLoader(Dataset(list(files), self.transform), batch_size=self.mask_batch_size)
        for batch in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_main()):
            out = self.detector.infer(batch["image"].to(self.device), resample_threshold=threshold, **self.mask_counts)
            flags.append(out["latent_flags"].cpu())
            score = out["restricted_score" if self.mask_restrict_to_flags else "unrestricted_score"]
            suspect = segment(score, self.mask_density_threshold)
            masks.append(tokens_from_map(suspect, self.grid, self.downsample_rule, self.downsample_fraction).cpu())
        return torch.cat(masks), torch.cat(flags)

    def _checks(self, state: RunState, final: int, truth: torch.Tensor | None, val_seq: torch.Tensor) -> dict:
        """The evidence of :mod:`scripts.iltm_checks`, computed once per final iteration (``state.json`` step
        ``checks_KK``): a rerun that trains further checks its new final iteration."""
        step = f"checks_{final:02d}"
        if state.done(step):
            return state.steps[step]
        start = time.time()
        checks: dict = {"first_stage": iltm_checks.first_stage(state.steps.get("vqvae", {}), self.codebook_size)}
        if iltm_checks.collapsed(checks["first_stage"]) and self.train_files:  # one cause the warning can name
            checks["first_stage"]["intensity_band"] = list(intensity_band(self.train_files))
            checks["first_stage"]["intensity_range"] = [
                self.detector_settings[k] for k in ("intensity_min", "intensity_max")
            ]
        first_masks = "masks_01" in state.steps  # also where the loop stopped before training on them
        if truth is not None and first_masks and truth.any():
            first, rate = state.steps["masks_01"], float(truth.float().mean())
            checks["iteration_0"] = {
                "flag_lift": iltm_checks.lift(first.get("flag_precision"), rate),
                "mask_lift": iltm_checks.lift(first.get("precision"), rate),
                "mask_recall": first.get("recall"),
            }
        if first_masks and state.steps["masks_01"].get("total_tokens"):  # no labels needed
            first = state.steps["masks_01"]
            checks["flags"] = {
                f"{k}_share": first[f"{k}_tokens"] / first["total_tokens"] for k in ("resampled", "masked")
            }
            if final >= 1:  # what the kept Transformer trained without
                checks["flags"]["final_masked_share"] = (
                    state.steps[f"masks_{final:02d}"]["masked_tokens"] / first["total_tokens"]
                )
        if final >= 1 and len(val_seq):
            checks["masks"] = self._mask_signals(state, final, val_seq)
        elif first_masks:
            checks["masks"] = {"masked_tokens": [int(state.steps["masks_01"]["masked_tokens"])]}
        if final >= 1:
            checks.setdefault("masks", {})["final_same_as"] = state.steps[f"transformer_{final:02d}"].get(
                "same_masks_as"
            )
        if self.val_files:
            checks.update(self._map_checks(final))
        self._load_transformer(final)
        state.complete(step, wall_time_s=round(time.time() - start, 1), **checks)
        return state.steps[step]  # as a rerun reads it: an unmeasured value is None, never NaN

    def _mask_signals(self, state: RunState, final: int, val_seq: torch.Tensor) -> dict:
        """Validation log-likelihoods of masked and kept tokens before and after each retraining (no labels)."""
        sequencer = LatentSequencer(self.grid, self.detector.transformer.bos_id)
        log_lik = {}
        for k in range(final + 1):
            self._load_transformer(k)
            with torch.no_grad():
                log_lik[k] = token_log_likelihood(self.detector.transformer.eval(), val_seq.to(self.device)).cpu()

        def means(k: int, masks: torch.Tensor) -> dict[str, float]:
            values = {"masked": log_lik[k][masks], "kept": log_lik[k][~masks]}
            return {name: float(v.mean()) if v.numel() else float("nan") for name, v in values.items()}

        per_iteration = []
        for k in range(1, final + 1):
            masks = load_token_masks(os.path.join(self.folder(k), "val_token_masks.pt"), self.val_files, self.grid)
            masks = sequencer.to_tokens(masks)
            unlearned = iltm_checks.unlearning(means(k - 1, masks), means(k, masks))
            per_iteration.append(None if math.isnan(unlearned) else unlearned)  # no validation token masked
        last = sequencer.to_tokens(
            load_token_masks(os.path.join(self.folder(final), "val_token_masks.pt"), self.val_files, self.grid)
        )
        counts = [int(state.steps[f"masks_{k:02d}"]["masked_tokens"]) for k in range(1, final + 1)]
        return {
            "unlearning": per_iteration[0],
            "unlearning_per_iteration": per_iteration,
            "kept_drop": means(0, last)["kept"] - means(final, last)["kept"],
            "mask_growth": counts[-1] / counts[0] - 1.0 if counts[0] else None,
            "masked_tokens": counts,
        }

    def _map_checks(self, final: int) -> dict:
        """Iteration 0 with and without resampling, and the final iteration, on the validation images."""
        loader = DataLoader(Dataset(self.val_files, self.transform), batch_size=self.mask_batch_size)
        batches = list(loader)
        labels = torch.cat([b["label"] for b in batches]) > 0 if all("label" in b for b in batches) else None

        def maps(k: int, resample: bool) -> dict[str, torch.Tensor]:
            self._load_transformer(k)
            outs = [self.detector.infer(b["image"].to(self.device), resample=resample) for b in batches]
            keys = ("score", "unrestricted_score", "restricted_score", "segmentation", "num_flagged")
            return {key: torch.cat([o[key].cpu() for o in outs]) for key in keys}

        full, ablation = maps(0, True), maps(0, False)
        # an image without a flagged token: healing changes nothing, the Transformer adds nothing to its map
        restricted = self.detector.restrict_to_flags
        restriction = {"restricted": restricted, "images": len(full["score"]),
                       "unflagged_images": int((full["num_flagged"] == 0).sum())}  # fmt: skip
        segmented = {"segmentation": {"share_iteration_0": float(full["segmentation"].float().mean())}}
        if labels is not None and labels.any() and not labels.all():
            scores = {"full": full["score"], "ablation": ablation["score"], "final": maps(final, True)["score"],
                      "other": full["unrestricted_score" if restricted else "restricted_score"]}  # fmt: skip
            aupro = {k: metrics.aupro(v[:, 0].numpy(), labels[:, 0].numpy()) for k, v in scores.items()}
            images = labels.flatten(1).any(dim=1)
            both = 0 < int(images.sum()) < len(images)  # image AUROC needs normal and anomalous validation images
            image = {k: metrics.image_auroc(scores[k][:, 0].numpy(), labels[:, 0].numpy()) if both else None
                     for k in ("full", "final")}  # fmt: skip
            return {
                "map_source": {"aupro_full": aupro["full"], "aupro_ablation": aupro["ablation"],
                               "aupro_gap": aupro["full"] - aupro["ablation"]},
                "restriction": {**restriction, "aupro_other": aupro["other"]},
                "outcome": {"aupro_iteration_0": aupro["full"], "aupro_final": aupro["final"],
                            "image_auroc_iteration_0": image["full"], "image_auroc_final": image["final"],
                            "normal_images": int((~images).sum()), "anomalous_images": int(images.sum()),
                            **images_changed(scores["full"][:, 0], scores["final"][:, 0], labels[:, 0])},
                **segmented,
            }  # fmt: skip
        marked = int(full["segmentation"].sum())
        overlap = int((full["segmentation"] & ablation["segmentation"]).sum()) / marked if marked else None
        return {"map_source": {"overlap": overlap, "marked_voxels": marked}, "restriction": restriction, **segmented}

    def _load_transformer(self, k: int) -> None:
        path = os.path.join(self.folder(k), "transformer.pt")
        load_weights(self.detector.transformer, load_checkpoint(path, self.device), path)

    def _initial_weights(self, transformer: nn.Module) -> dict:
        """The weights every from-scratch retraining starts from, stored so that a resumed run (and every rank) uses
        the same ones."""
        path = os.path.join(self.output_dir, "iltm", "transformer_init.pt")

        def write() -> None:
            if not os.path.isfile(path):
                atomic_save(transformer.state_dict(), path)

        distributed.main_first(write)  # every rank reaches the barrier, whether or not the file exists yet
        initial = load_checkpoint(path, self.device)
        load_weights(transformer, initial, path)
        return initial

    def _true_tokens(self) -> torch.Tensor | None:
        """True anomalous tokens of the training images, for diagnostics only, when every one has a label."""
        if not all("label" in e for e in self.train_files):
            return None
        loader = DataLoader(Dataset(self.train_files, self.transform), batch_size=16)
        maps = [batch["label"] > 0 for batch in loader]
        return tokens_from_map(torch.cat(maps), self.grid, self.downsample_rule, self.downsample_fraction)

    def _export(self, state: RunState, final: int) -> None:
        """The final detector as `<output_dir>/model.pt` and `iltm#export`, once: a rerun of a finished run must not
        replace what a later run has exported since (unless the export is gone)."""
        source = os.path.join(self.folder(final), "model.pt")
        step = f"export_{final:02d}"  # per final iteration: a rerun that trained further exports its new model
        targets = [t for t in (os.path.join(self.output_dir, "model.pt"), self.export) if t]
        if state.done(step):
            kept, targets = targets, [t for t in targets if not os.path.isfile(t)]
            if not targets:
                logger.info(f"ILTM: final detector already exported ({', '.join(kept)}); left as is")
                return
        for target in targets:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            if target == self.export and os.path.isfile(target) and not filecmp.cmp(target, source, shallow=False):
                logger.warning(f"iltm#export: {target} held another detector (an earlier export), replaced by this "
                               "run's final one; each run keeps its own <output_dir>/model.pt")  # fmt: skip
            if os.path.abspath(target) != os.path.abspath(source):
                shutil.copyfile(source, f"{target}.tmp")
                os.replace(f"{target}.tmp", target)
        if not state.done(step):
            state.complete(step)
        logger.info(f"ILTM: final detector (iteration {final}) written to {', '.join(targets)}")
