"""The ILTM loop's rules on hand-made inputs: threshold schedule, stopping, map -> token masks, masks reach training."""

import logging
import math

import pytest
import torch

from scripts.iltm import images_changed, precision_recall, should_stop, threshold_schedule, tokens_from_map
from scripts.steps import RunState
from scripts.transformer import MaskedTransformer
from scripts.transformer_stage import TransformerStage


def config_stage(load_preset, **settings) -> TransformerStage:
    """The Transformer stage as train.yaml builds it, with `transformer#<key>` overrides."""
    parser, _ = load_preset("demo.yaml", tracking=None, **{f"transformer#{k}": v for k, v in settings.items()})
    return parser.get_parsed_content("transformer#stage")


def test_threshold_schedule_decreases_by_the_paper_rate_or_stays_fixed():
    assert threshold_schedule(0.005, 3) == pytest.approx([0.005, 0.004375, 0.003828125])
    assert threshold_schedule(0.005, 3, fixed=True) == [0.005] * 3
    assert threshold_schedule(0.01, 2, decay=0.5) == pytest.approx([0.01, 0.005])
    with pytest.raises(ValueError):
        threshold_schedule(0.005, 3, decay=1.0)


def test_stopping_rule_is_relative_change_below_tolerance():
    assert should_stop(1000, 1009)  # 0.9 %
    assert should_stop(1000, 991)
    assert not should_stop(1000, 1010)  # exactly 1 %: not less than
    assert not should_stop(1000, 900)
    assert not should_stop(0, 5)  # iteration 0 masks nothing: any mask is a change
    assert should_stop(0, 0)  # nothing found twice: converged
    assert should_stop(100, 104, tolerance=0.05)


def test_downsampling_rules_on_hand_made_maps():
    anomalous = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    anomalous[0, 0, 0, 0] = True  # 1 of 16 pixels of token (0, 0)
    anomalous[0, 0, 4:8, 4:6] = True  # half of token (1, 1)
    anomalous[0, 0, 0:3, 4:8] = True  # 12 of 16 pixels of token (0, 1)
    any_rule = tokens_from_map(anomalous, (2, 2), "any")
    assert any_rule[0].tolist() == [[True, True], [False, True]]
    half = tokens_from_map(anomalous, (2, 2), "fraction", 0.5)
    assert half[0].tolist() == [[False, True], [False, True]]
    most = tokens_from_map(anomalous, (2, 2), "fraction", 0.7)
    assert most[0].tolist() == [[False, True], [False, False]]
    volume = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    volume[1, 0, 2:, 2:, 2:] = True
    tokens = tokens_from_map(volume, (2, 2, 2), "fraction", 1.0)
    assert tokens.shape == (2, 2, 2, 2) and int(tokens.sum()) == 1 and bool(tokens[1, 1, 1, 1])
    with pytest.raises(ValueError):
        tokens_from_map(anomalous, (2, 2), "majority")


def test_images_changed_counts_each_labelled_image_scored_alone():
    """Image 0's defect scores higher after, image 1's lower, image 2 is unchanged; image 3 (no anomaly) and image 4
    (all anomaly) have no AUPRO of their own and are left out."""
    labels = torch.zeros(5, 8, 8, dtype=torch.bool)
    labels[:3, 2:4, 2:4] = True
    labels[4] = True
    grid = torch.linspace(0, 1, 64).reshape(8, 8)  # every pixel its own score; the defect's are below most normal ones
    before = grid.expand(5, 8, 8).clone()
    before[1, 2:4, 2:4] += 2.0  # above every normal pixel: AUPRO 1
    after = grid.expand(5, 8, 8).clone()
    after[0, 2:4, 2:4] += 2.0
    assert images_changed(before, after, labels) == {"images_better": 1, "images_worse": 1}
    assert images_changed(before, before, labels) == {"images_better": 0, "images_worse": 0}


def test_precision_recall_of_token_masks():
    truth = torch.tensor([[True, True, False, False]])
    assert precision_recall(torch.tensor([[True, False, True, False]]), truth) == (0.5, 0.5)
    p, r = precision_recall(torch.zeros(1, 4, dtype=torch.bool), truth)
    assert math.isnan(p) and r == 0.0


def test_masks_of_an_iteration_are_used_by_its_training(tmp_path, load_preset):
    """A token masked in every image cannot influence the trained model's logits at kept positions."""
    torch.manual_seed(0)
    n, length, codes = 24, 12, 6
    seq = torch.cat([torch.full((n, 1), codes), torch.randint(0, codes, (n, length))], dim=1)
    keep = torch.ones(n, length + 1, dtype=torch.bool)
    keep[:, 5] = False  # sequence position 5 is suspect in every training image
    stage = config_stage(load_preset, epochs=3, batch_size=8, val_interval=3, lr=1e-2)
    model = MaskedTransformer(codes + 1, length, embed_dim=32, num_layers=2, num_heads=2)
    stage("t", model, seq, keep, seq[:4], str(tmp_path / "t"), str(tmp_path))
    model.eval()
    probe = seq[:4, :-1].clone()
    altered = probe.clone()
    altered[:, 5] = (altered[:, 5] + 1) % codes
    with torch.no_grad():
        a, b = model(probe, keep[:4, :-1]), model(altered, keep[:4, :-1])
    assert torch.allclose(a, b, atol=1e-6)
    # and without the mask the same model does see the token, so the check above is not vacuous
    with torch.no_grad():
        assert not torch.allclose(model(probe)[:, 5:], model(altered)[:, 5:], atol=1e-4)


def test_the_last_epoch_of_a_transformer_is_validated_once(tmp_path, load_preset, monkeypatch):
    """val_interval 2 over 3 epochs: validated at epochs 2 and 3, and the record holds the kept weights' val_loglik."""
    import json

    from monai.engines import SupervisedEvaluator

    epochs, run = [], SupervisedEvaluator.run
    monkeypatch.setattr(SupervisedEvaluator, "run", lambda self, *a, **k: (epochs.append(a or k), run(self, *a, **k)))
    torch.manual_seed(0)
    seq = torch.cat([torch.full((8, 1), 6), torch.randint(0, 6, (8, 12))], dim=1)
    stage = config_stage(load_preset, epochs=3, batch_size=8, val_interval=2, lr=1e-2)
    model = MaskedTransformer(7, 12, embed_dim=16, num_layers=1, num_heads=2)
    stage("t", model, seq, torch.ones_like(seq, dtype=torch.bool), seq[:4], str(tmp_path / "t"), str(tmp_path))
    assert epochs == [(2,), (3,)]
    assert json.loads((tmp_path / "state.json").read_text())["t"]["val_loglik"] < 0


def test_a_transformer_that_memorises_its_training_sequences_keeps_its_best_validated_epoch(
    tmp_path, load_preset, monkeypatch
):
    """Random training sequences, other random validation ones: once the Transformer memorises the first its
    validation likelihood falls, and the stage ends with the weights of the best validated epoch, not the last."""
    import json
    import os

    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    from scripts.healing import token_log_likelihood

    torch.manual_seed(0)
    seq = torch.cat([torch.full((16, 1), 6), torch.randint(0, 6, (16, 12))], dim=1)
    train, val = seq[:4], seq[8:]
    scores, run = {}, SupervisedEvaluator.run

    def record(self, epoch):  # each validation's score, by the trainer's epoch
        self.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: scores.setdefault(epoch, e.state.metrics["val_loglik"])
        )
        return run(self, epoch)

    def model() -> MaskedTransformer:
        torch.manual_seed(1)
        return MaskedTransformer(7, 12, embed_dim=32, num_layers=2, num_heads=2)

    def train_into(folder, network: MaskedTransformer) -> MaskedTransformer:
        keep = torch.ones_like(train, dtype=torch.bool)
        return stage("t", network, train, keep, val, str(tmp_path / folder / "t"), str(tmp_path / folder))

    stage = config_stage(load_preset, epochs=12, batch_size=4, val_interval=1, lr=1e-2)
    with monkeypatch.context() as patch:
        patch.setattr(SupervisedEvaluator, "run", record)
        whole = train_into("a", model())
    best = max(scores, key=lambda epoch: (scores[epoch], epoch))
    assert best < 6 and scores[best] > scores[12] + 0.1  # it did memorise, so the choice matters
    record_ = json.loads((tmp_path / "a" / "state.json").read_text())["t"]
    assert record_["best_epoch"] == best and record_["val_loglik"] == pytest.approx(scores[best])
    saved = model()
    saved.load_state_dict(torch.load(tmp_path / "a" / "t" / "transformer.pt"))
    with torch.no_grad():  # the weights in memory and on disk are that epoch's
        for network in (whole, saved):
            assert token_log_likelihood(network.eval(), val).mean().item() == pytest.approx(scores[best], abs=1e-5)
    assert not os.path.exists(tmp_path / "a" / "t" / "best.pt")

    # killed after epoch 6, past the best one: the resumed run still ends with the best epoch's weights
    original = SupervisedTrainer.run

    def run_and_die(self, *args, **kwargs):
        self.add_event_handler(Events.EPOCH_COMPLETED(once=6), lambda _: (_ for _ in ()).throw(Killed()))
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(SupervisedTrainer, "run", run_and_die)
        train_into("b", model())
    resumed = train_into("b", model())
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "b" / "state.json").read_text())["t"]["best_epoch"] == best


class Killed(Exception):
    pass


@pytest.mark.parametrize("when", ["after an epoch", "while writing a checkpoint"])
def test_training_resumes_after_a_kill_with_the_same_result(tmp_path, load_preset, monkeypatch, when):
    """A kill while ignite writes a checkpoint (it removes the one it replaces first) still leaves one to resume."""
    import os

    from ignite.engine import Events
    from ignite.handlers import DiskSaver
    from monai.engines import SupervisedTrainer

    from scripts.steps import latest_checkpoint

    torch.manual_seed(0)
    n, length, codes = 32, 10, 5
    seq = torch.cat([torch.full((n, 1), codes), torch.randint(0, codes, (n, length))], dim=1)
    keep = torch.rand(n, length + 1) > 0.2

    def model():
        torch.manual_seed(1)
        return MaskedTransformer(codes + 1, length, embed_dim=16, num_layers=1, num_heads=2, resid_dropout=0.1)

    stage = config_stage(load_preset, epochs=4, batch_size=8, val_interval=2, lr=1e-2)
    whole = stage("t", model(), seq, keep, seq[:4], str(tmp_path / "a" / "t"), str(tmp_path / "a"))

    with monkeypatch.context() as patch:
        if when == "after an epoch":
            original = SupervisedTrainer.run

            def run_and_die(self, *args, **kwargs):
                self.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda _: (_ for _ in ()).throw(Killed()))
                return original(self, *args, **kwargs)

            patch.setattr(SupervisedTrainer, "run", run_and_die)
        else:
            writes, write = [], DiskSaver._save_func

            def die_on_the_third(self, checkpoint, path, func):
                writes.append(path)
                if len(writes) < 3:
                    return write(self, checkpoint, path, func)
                open(os.path.join(self.dirname, "tmpk1lled_0"), "wb").close()  # the half-written temporary
                raise Killed()

            patch.setattr(DiskSaver, "_save_func", die_on_the_third)
        with pytest.raises(Killed):
            stage("t", model(), seq, keep, seq[:4], str(tmp_path / "b" / "t"), str(tmp_path / "b"))
    assert latest_checkpoint(str(tmp_path / "b" / "t")) is not None
    resumed = stage("t", model(), seq, keep, seq[:4], str(tmp_path / "b" / "t"), str(tmp_path / "b"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [f for f in os.listdir(tmp_path / "b" / "t") if f.startswith("tmp")]
    assert not [f for f in os.listdir(tmp_path / "b" / "t") if f.startswith("checkpoint_")]  # done: none left
    assert RunState(str(tmp_path / "b")).steps["t"]["resumed_after_epoch"] in (2, 3)


class Inspect:
    """A handler factory's product: records what the Transformer's trainer was built with."""

    seen: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        loader = engine.data_loader
        Inspect.seen.append({"lr": engine.optimizer.param_groups[0]["lr"], "epochs": engine.state.max_epochs,
                             "batch_size": loader.batch_size, "num_workers": loader.num_workers})  # fmt: skip


def test_every_transformer_training_setting_comes_from_the_config(tmp_path, load_preset) -> None:
    """optimiser lr, epochs, batch size, num_workers and extra handlers, as command-line overrides set them."""
    handler = {"_target_": "test_iltm_rules.Inspect", "_mode_": "callable"}
    parser, _ = load_preset("demo.yaml", **{"transformer#lr": 0.003, "transformer#epochs": 2,
                                            "transformer#batch_size": 4, "num_workers": 1,
                                            "transformer#handlers": [handler], "tracking": None})  # fmt: skip
    stage = parser.get_parsed_content("transformer#stage")
    torch.manual_seed(0)
    n, length, codes = 8, 6, 4
    seq = torch.cat([torch.full((n, 1), codes), torch.randint(0, codes, (n, length))], dim=1)
    keep = torch.ones(n, length + 1, dtype=torch.bool)
    Inspect.seen.clear()
    stage("t", MaskedTransformer(codes + 1, length, embed_dim=8, num_layers=1, num_heads=2), seq, keep, seq[:2],
          str(tmp_path / "t"), str(tmp_path))  # fmt: skip
    assert Inspect.seen == [{"lr": 0.003, "epochs": 2, "batch_size": 4, "num_workers": 1}]


def test_a_killed_mask_pass_resumes_at_the_first_missing_chunk(tmp_path, monkeypatch, caplog) -> None:
    """Mask passes are written in chunks (shared out over torchrun's ranks); a rerun computes only what is missing,
    and a chunk of other images is refused rather than used."""
    from scripts import iltm

    monkeypatch.setattr(iltm, "MASK_CHUNK", 2)
    workflow = object.__new__(iltm.ILTMWorkflow)
    workflow.grid = (2, 2)
    files = [{"image": f"img_{i}.png"} for i in range(5)]
    computed = []

    def mask_pass(chunk, threshold, desc):
        if len(computed) == 1 and not getattr(mask_pass, "resumed", False):
            raise KeyboardInterrupt  # killed during the second chunk
        computed.append([e["image"] for e in chunk])
        masks = torch.stack([torch.full((2, 2), int(e["image"][4]) % 2 == 1) for e in chunk])
        return masks, ~masks

    monkeypatch.setattr(workflow, "_mask_pass", mask_pass)
    with pytest.raises(KeyboardInterrupt):
        workflow._sharded_pass(files, 0.005, "masks", str(tmp_path))
    mask_pass.resumed = True
    monkeypatch.setattr(logging.getLogger("scripts.iltm"), "disabled", False)  # logging.conf of an earlier run
    with caplog.at_level(logging.INFO, logger="scripts.iltm"):
        suspect, flags = workflow._sharded_pass(files, 0.005, "masks", str(tmp_path))
    assert "masks: resuming, 1 of 3 chunks of 2 images already on disk" in caplog.text
    assert computed == [["img_0.png", "img_1.png"], ["img_2.png", "img_3.png"], ["img_4.png"]]  # chunk 0 once
    assert suspect[:, 0, 0].tolist() == [False, True, False, True, False] and torch.equal(flags, ~suspect)
    with pytest.raises(RuntimeError, match="other images"):
        workflow._sharded_pass([{"image": "other.png"}, *files[1:]], 0.005, "masks", str(tmp_path))


def test_tensorboard_gets_each_iteration_once_across_reruns_and_a_longer_run(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scripts.iltm_report import _log_scalars
    from scripts.steps import RunState

    state = RunState(str(tmp_path))
    row = {"masked_tokens": 5, "masked_pct": 1.0, "precision": 0.5, "recall": 0.5, "flag_precision": 0.4,
           "flag_recall": 0.3, "threshold": 0.005, "val_loglik": -2.0}  # fmt: skip
    rows = [{**row, "iteration": k} for k in range(4)]
    _log_scalars(state, rows[:2], str(tmp_path / "tb"))  # a run that ended at iteration 1
    _log_scalars(state, rows[:2], str(tmp_path / "tb"))  # its rerun
    _log_scalars(state, rows, str(tmp_path / "tb"))  # rerun with a higher iltm#max_iterations: two more
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("iltm/masked_tokens")] == [0, 1, 2, 3]


def test_an_unmeasured_mask_precision_is_strict_json_and_shows_as_a_dash(tmp_path) -> None:
    """Without labelled training images precision is NaN: state.json holds null, which any JSON reader accepts."""
    import json

    from scripts.iltm_report import format_table, iteration_rows
    from scripts.steps import RunState

    state = RunState(str(tmp_path))
    precision, recall = precision_recall(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))
    state.complete("masks_01", masked_tokens=0, total_tokens=4, threshold=0.005, precision=precision, recall=recall)
    text = (tmp_path / "state.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"state.json holds {name}"))
    assert record["masks_01"]["precision"] is None and record["masks_01"]["recall"] is None
    row = iteration_rows(state, final=1)[1]
    assert math.isnan(row["precision"]) and "| 1 | 5.00e-03 | 0 | 0.000 | - | - |" in format_table([row])


def test_initial_masks_split_a_runs_masks_into_what_they_catch_and_what_they_mask_wrongly(tmp_path, caplog) -> None:
    """`labels&PATH` keeps the file's correct masks (its recall, no false masks), `labels|PATH` adds every labelled
    token (full recall, the file's false masks); `labels` alone is the oracle, a plain path the file's masks."""
    from scripts import iltm
    from scripts.tokens import save_token_masks

    workflow = object.__new__(iltm.ILTMWorkflow)
    workflow.grid = (2, 2)
    workflow.train_files = [{"image": f"img_{i}.png"} for i in range(2)]
    truth = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    run = torch.tensor([[[True, False], [True, False]], [[False, True], [False, False]]])  # 1 hit, 2 false, 1 missed
    path = str(tmp_path / "token_masks.pt")
    save_token_masks(path, workflow.train_files, run)
    expected = {None: torch.zeros_like(truth), path: run, "labels": truth, f"labels&{path}": truth & run,
                f"labels|{path}": truth | run}  # fmt: skip
    for spec, masks in expected.items():
        workflow.initial_masks = spec
        assert torch.equal(workflow._initial_masks(truth), masks), spec
    assert precision_recall(workflow._initial_masks(truth), truth) == (0.5, 1.0)  # `labels|`: 2 labelled, 2 false
    for spec in ("labels", f"labels&{path}"):
        workflow.initial_masks = spec
        with pytest.raises(ValueError, match=f"iltm#initial_masks '{spec}' needs a label for every training image"):
            workflow._initial_masks(None)
    workflow.initial_masks = tmp_path / "token_masks.pt"  # a path object from Python
    assert torch.equal(workflow._initial_masks(truth), run)
    workflow.initial_masks = f"labels|{tmp_path / 'missing.pt'}"
    with pytest.raises(FileNotFoundError, match="missing.pt: token mask file not found"):
        workflow._initial_masks(truth)
    # masks of other images (another dataset folder) would silently train every image unmasked: refused
    save_token_masks(str(tmp_path / "other.pt"), [{"image": "elsewhere/img_0.png"}], run[:1])
    workflow.initial_masks = f"labels|{tmp_path / 'other.pt'}"
    with pytest.raises(ValueError, match="other.pt: token masks of none of the 2 training images .* another dataset"):
        workflow._initial_masks(truth)
    # a file missing some training images: a warning names it (those images get no mask from the file)
    save_token_masks(str(tmp_path / "half.pt"), workflow.train_files[:1], run[:1])
    workflow.initial_masks = f"labels|{tmp_path / 'half.pt'}"
    with caplog.at_level(logging.WARNING):
        assert torch.equal(workflow._initial_masks(truth), truth | torch.stack([run[0], torch.zeros_like(run[1])]))
    assert "half.pt: no token masks for 1 of the training images" in caplog.text
    # row 0 of the summary: the given masks, recorded once; other masks on a rerun are named, the record kept, and
    # iteration 0's masks are unknown (None), so that no later iteration with today's masks is taken for its copy
    state = RunState(str(tmp_path))
    workflow.initial_masks = "labels"
    assert torch.equal(workflow._first_masks(state, truth, truth), truth)
    recorded = {k: v for k, v in state.steps["masks_00"].items() if k != "completed_at"}
    assert recorded == {"source": "labels", "masked_tokens": 2, "total_tokens": 8, "precision": 1.0, "recall": 1.0}
    assert torch.equal(workflow._first_masks(state, truth, truth), truth)  # the same masks again
    workflow.initial_masks = path
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert workflow._first_masks(state, run, truth) is None
    assert f"{path} (3 tokens) now, but this run recorded labels (2 tokens)" in caplog.text
    assert state.steps["masks_00"]["source"] == "labels"
    state.complete("transformer_00")
    workflow.initial_masks = None  # masks dropped under resume: iteration 0 still trained with the labels
    assert workflow._first_masks(state, torch.zeros_like(truth), truth) is None
    # a run whose iteration 0 trained without masks, resumed with some: no record is made up for it
    unmasked = RunState(str(tmp_path / "unmasked"))
    unmasked.complete("transformer_00")
    assert torch.equal(workflow._first_masks(unmasked, torch.zeros_like(truth), truth), torch.zeros_like(truth))
    workflow.initial_masks = "labels"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert workflow._first_masks(unmasked, truth, truth) is None
    assert "labels (2 tokens) now, but this run recorded no masks (0 tokens)" in caplog.text
    assert not unmasked.done("masks_00")
    # and the run's settings check names a missing file before any training
    from scripts.settings import SettingError, check_settings

    check_settings({"iltm": {"initial_masks": f"labels&{path}"}}, {"iltm#initial_masks": "labels"})
    with pytest.raises(SettingError, match=r"iltm#initial_masks must be a token mask file that exists \(.*nope.pt not"):
        check_settings({"iltm": {"initial_masks": f"labels|{tmp_path / 'nope.pt'}"}})


@pytest.mark.parametrize("restricted", [True, False])
def test_masks_come_from_the_map_their_setting_names_whatever_map_the_detector_serves(restricted: bool) -> None:
    """iltm#mask_restrict_to_flags (default on) picks the restricted or unrestricted map for the masks; the served
    map (restrict_to_flags, default off since 0.6.12) does not enter them."""
    from scripts.iltm import ILTMWorkflow

    near = torch.full((1, 1, 4, 4), -5.0)  # scores (-log density): normal at -5, anomalous at 10
    near[..., :2, :2] = 10.0  # anomalous near the flags
    far = torch.zeros(1, 1, 4, 4)
    far[..., 2:, 2:] = 15.0  # anomalous far from them

    class Detector:
        def infer(self, image, **kwargs) -> dict:
            return {"score": torch.zeros(1, 1, 4, 4), "restricted_score": near, "unrestricted_score": near + far,
                    "latent_flags": torch.zeros(1, 2, 2, dtype=torch.bool)}  # fmt: skip

    workflow = object.__new__(ILTMWorkflow)
    workflow.detector, workflow.device, workflow.transform = Detector(), torch.device("cpu"), lambda d: d
    workflow.mask_batch_size, workflow.mask_counts, workflow.mask_density_threshold = 1, {}, 1.275
    workflow.grid, workflow.downsample_rule, workflow.downsample_fraction = (2, 2), "any", 0.5
    workflow.mask_restrict_to_flags = restricted
    masks, _ = workflow._mask_pass([{"image": torch.zeros(1, 4, 4)}], 0.005, "test")
    expected = [[True, False], [False, not restricted]]
    assert masks[0].tolist() == expected
