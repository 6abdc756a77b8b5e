"""Model behaviour: one epoch learns something, the best epoch is kept, weights load safely."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from darkroom.config import TrainConfig
from darkroom.data.sync import sync_prefix
from darkroom.model.backbone import create_model, load_weights, sha256, to_bytes
from darkroom.training.fit import fit
from darkroom.training.recipe import amp_dtype, class_weights, local_weights
from darkroom.training.records import FoldData
from darkroom.training.rng import seed_everything
from darkroom.training.steps import NonFiniteLoss, StepOptions, mix_batch, to_device
from tests.conftest import TINY, write_digits

CPU = torch.device("cpu")


@pytest.fixture
def digit_files(local_storage, cache_dir):
    truth = write_digits(local_storage, classes=("0", "1", "7"), per_class=16)
    _, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    classes = sorted(set(truth.values()))
    keys = sorted(manifest)
    paths = [manifest[k].path for k in keys]
    labels = [classes.index(truth[k]) for k in keys]
    return paths, labels, classes


def test_fit_returns_best_epoch_weights_and_validation_probs(digit_files):
    paths, labels, classes = digit_files
    cfg = TINY.model_copy(update={"epochs": 3})
    seen = []
    data = FoldData(paths[::2], labels[::2], paths[1::2], labels[1::2], len(classes))
    res = fit(data, cfg, device=CPU, on_epoch=seen.append)
    assert [h["epoch"] for h in res.history] == [0, 1, 2] == [row.epoch for row in seen]
    best = min(range(3), key=lambda e: res.history[e]["val_loss"])
    assert res.best_epoch == best
    assert res.val_probs.shape == (len(paths[1::2]), len(classes))
    np.testing.assert_allclose(res.val_probs.sum(1), 1.0, rtol=1e-4)
    # the weights returned are the best epoch's: re-evaluating reproduces its validation loss
    from darkroom.data.images import build_transform
    from darkroom.training.steps import evaluate, make_loader

    loader = make_loader(
        paths[1::2], labels[1::2], build_transform(32, res.mean, res.std), 32, shuffle=False
    )
    stats, _ = evaluate(res.model, loader, torch.nn.CrossEntropyLoss(), CPU)
    assert stats["loss"] == pytest.approx(res.history[best]["val_loss"], rel=1e-4)


def test_training_reduces_loss_on_real_digits(digit_files):
    paths, labels, classes = digit_files
    cfg = TINY.model_copy(update={"epochs": 4, "lr": 1e-2, "batch_size": 8})
    res = fit(FoldData(paths, labels, paths, labels, len(classes)), cfg, device=CPU)
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < first["train_loss"] / 2
    assert last["train_accuracy"] > 0.9
    # eval mode (BatchNorm running statistics) also beats chance clearly
    assert max(h["val_accuracy"] for h in res.history) > 1 / len(classes) + 0.2


def test_seeded_training_is_reproducible(digit_files):
    paths, labels, classes = digit_files
    data = FoldData(paths, labels, paths[:6], labels[:6], len(classes))
    a = fit(data, TINY, device=CPU)
    b = fit(data, TINY, device=CPU)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-5)


def test_non_finite_loss_stops_the_fold(digit_files):
    paths, labels, classes = digit_files
    # An absurd learning rate makes Adam blow the weights up within a few steps.
    cfg = TINY.model_copy(update={"lr": 1e30, "lr_min": 1e29, "epochs": 3, "batch_size": 4})
    with pytest.raises(NonFiniteLoss, match="lower the lr"):
        fit(FoldData(paths, labels, paths[:4], labels[:4], len(classes)), cfg, device=CPU)


def test_pretrained_file_keeps_backbone_and_resizes_head(tmp_path):
    source = create_model(TINY, num_classes=10)
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    cfg = TINY.model_copy(update={"pretrained": True, "pretrained_file": str(weights)})
    model = create_model(cfg, num_classes=3)
    head = model.get_classifier()
    assert head.out_features == 3
    src, dst = source.state_dict(), model.state_dict()
    body = [k for k in src if not k.startswith(("fc.", "head."))]
    assert body and all(torch.equal(src[k], dst[k]) for k in body)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    cfg = TINY.model_copy(update={"pretrained": True, "pretrained_file": str(tmp_path / "x")})
    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        create_model(cfg, num_classes=3)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_model(TINY.model_copy(update={"backbone": "resnet_does_not_exist"}), 3)


def test_weights_round_trip_and_tamper_check():
    model = create_model(TINY, 3)
    data = to_bytes(model)
    other = create_model(TINY.model_copy(update={"seed": 1}), 3)
    load_weights(other, data, sha256(data))
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="sha256"):
        load_weights(other, data[:-1] + b"\x00", sha256(data))


def test_config_rejects_lr_min_above_lr():
    with pytest.raises(ValueError, match="lr_min"):
        TrainConfig(lr=1e-4, lr_min=1e-3)


# ---- every TrainConfig option on tiny data --------------------------------------------------


def _fit(digit_files, cfg, **kw):
    paths, labels, classes = digit_files
    data = FoldData(paths[::2], labels[::2], paths[1::2], labels[1::2], len(classes))
    return fit(data, cfg, device=CPU, **kw)


@pytest.mark.parametrize(
    "update",
    [
        {"optimizer": "adamw", "weight_decay": 0.05},
        {"optimizer": "sgd", "lr": 0.05},
        {"mixup_prob": 1.0},
        {"cutmix_prob": 1.0},
        {"mixup_prob": 0.5, "cutmix_prob": 0.5, "augment": "no-flip"},
    ],
)
def test_each_option_trains_and_reaches_lr_min(digit_files, update):
    """Each option trains a fold to its end (a finite loss, the schedule run out). What each
    one changes (the loss by hand, the optimizer's class, the mixed targets, the trainer
    built with them) is in test_options.py."""
    cfg = TINY.model_copy(update={"epochs": 2, "batch_size": 8, **update})
    res = _fit(digit_files, cfg)
    assert len(res.history) == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    assert res.history[-1]["lr"] == pytest.approx(cfg.lr_min)


def test_grad_accumulation_steps_the_scheduler_once_per_accumulated_batch(digit_files):
    cfg = TINY.model_copy(update={"epochs": 2, "batch_size": 4, "grad_accum_steps": 3})
    res = _fit(digit_files, cfg)
    # 24 train images / 4 = 6 batches = 2 optimizer steps per epoch; the cosine ends at lr_min
    # exactly after 4 steps, so one scheduler step too many or too few would miss it.
    assert res.history[-1]["lr"] == pytest.approx(cfg.lr_min)
    assert res.history[0]["lr"] == pytest.approx(
        cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + np.cos(np.pi * 2 / 4)) / 2
    )


def test_freeze_backbone_trains_only_the_head_first(digit_files):
    cfg = TINY.model_copy(update={"epochs": 1, "freeze_backbone_epochs": 1})
    seed_everything(cfg.seed)  # fit starts from this same initialisation
    start = create_model(cfg, 3).state_dict()
    res = _fit(digit_files, cfg)
    end = res.model.state_dict()
    head = {"fc.weight", "fc.bias"}
    assert all(torch.equal(start[k], end[k]) for k in start if k not in head)  # BN stats too
    assert not torch.equal(start["fc.weight"], end["fc.weight"])
    assert res.history[0]["frozen_backbone"]
    res2 = _fit(digit_files, cfg.model_copy(update={"epochs": 2}))
    assert [h["frozen_backbone"] for h in res2.history] == [True, False]
    assert not torch.equal(start["conv1.0.weight"], res2.model.state_dict()["conv1.0.weight"])


def test_early_stopping_keeps_the_best_epoch(digit_files, monkeypatch):
    import darkroom.training.trainer as tr

    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.95])
    real = tr.evaluate

    def fake(*a, **kw):
        stats, probs = real(*a, **kw)
        return {**stats, "loss": next(losses)}, probs

    monkeypatch.setattr(tr, "evaluate", fake)
    res = _fit(digit_files, TINY.model_copy(update={"epochs": 6, "early_stopping_patience": 2}))
    assert len(res.history) == 4 and res.stopped_early and res.best_epoch == 1


def test_class_weights_balance_the_classes():
    w = class_weights([0, 0, 0, 1], 3)
    # n / (n_classes * count): 4 / (3 * 3), 4 / (3 * 1); a class without rows weighs 0
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_cutmix_pastes_a_box_and_reports_its_area():
    cfg = TINY.model_copy(update={"cutmix_prob": 1.0})
    torch.manual_seed(3)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    mixed, ya, yb, lam = mix_batch(images, torch.tensor([0, 1]), cfg)
    pasted = (mixed[0] == 1).float().mean().item()  # image 0 got pixels from image 1 only
    assert yb.tolist() == [1, 0] and lam == pytest.approx(1 - pasted)


def test_mixup_blends_images_and_no_mixing_is_identity():
    images, labels = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]), torch.tensor([0, 1])
    mixed, ya, yb, lam = mix_batch(images, labels, TINY.model_copy(update={"mixup_prob": 1.0}))
    assert torch.allclose(mixed[0], torch.full((3, 4, 4), 1 - lam)) and yb.tolist() == [1, 0]
    same = mix_batch(images, labels, TINY)
    assert same[0] is images and same[3] == 1.0


def test_mixed_precision_layout_and_compile_settings(monkeypatch):
    cuda = torch.device("cuda")
    assert amp_dtype(TINY, CPU) is None  # never on a CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert amp_dtype(TINY, cuda) is torch.float16  # auto: fp16 + scaler on older GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_dtype(TINY, cuda) is torch.bfloat16
    assert amp_dtype(TINY.model_copy(update={"mixed_precision": "fp16"}), cuda) is torch.float16
    assert amp_dtype(TINY.model_copy(update={"mixed_precision": "off"}), cuda) is None
    x, _ = to_device(torch.zeros(2, 3, 8, 8), torch.zeros(2), CPU, StepOptions(channels_last=True))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_compile_and_channels_last_are_cuda_only(digit_files, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    cfg = TINY.model_copy(update={"compile": True, "channels_last": True})
    res = _fit(digit_files, cfg)
    assert compiled == []  # on a CPU the eager model trains
    assert res.model.conv1[0].weight.is_contiguous()


def test_dataloader_workers(digit_files, monkeypatch):
    import darkroom.training.trainer as tr

    stopped = []

    def spy(loader):
        tr_stop(loader)
        stopped.append(loader)

    tr_stop = tr.stop_workers
    monkeypatch.setattr(tr, "stop_workers", spy)
    res = _fit(digit_files, TINY, num_workers=1)
    assert len(res.history) == 1
    # both loaders' persistent workers are shut down when the fold ends
    assert len(stopped) == 2 and all(loader._iterator is None for loader in stopped)


def test_config_rejects_mix_probabilities_above_one():
    with pytest.raises(ValueError, match="mixup_prob"):
        TrainConfig(mixup_prob=0.6, cutmix_prob=0.5)


def test_fingerprint_covers_every_field_and_the_code_version(monkeypatch):
    import darkroom

    base = TINY.fingerprint()
    assert TINY.model_copy(update={"label_smoothing": 0.1}).fingerprint() != base
    monkeypatch.setattr(darkroom, "__version__", "99.0")
    assert TINY.fingerprint() != base


def test_pretrained_file_from_a_storage_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_CACHE", str(tmp_path / "cache"))
    source = create_model(TINY, num_classes=10)
    (tmp_path / "w").mkdir()
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        str(tmp_path / "w" / "backbone.safetensors"),
    )
    cfg = TINY.model_copy(
        update={"pretrained": True, "pretrained_file": f"file://{tmp_path}/w/backbone.safetensors"}
    )
    model = create_model(local_weights(cfg), num_classes=3)
    assert torch.equal(model.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])


# ---- checkpoints, resume, out of memory -----------------------------------------------------


class MemoryCheckpointer:
    """Round-trips every save through torch.save / torch.load(weights_only=True)."""

    def __init__(self):
        self.data, self.saves = None, 0

    def load(self):
        import io

        return None if self.data is None else torch.load(io.BytesIO(self.data), weights_only=True)

    def save(self, state):
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        self.data, self.saves = buf.getvalue(), self.saves + 1


class Crash(Exception):
    pass


@pytest.mark.parametrize("every", [0, 1e9])
def test_resume_after_a_crash_gives_the_uninterrupted_model(digit_files, every):
    cfg = TINY.model_copy(update={"epochs": 3, "batch_size": 8, "mixup_prob": 0.5})
    whole = _fit(digit_files, cfg)
    ckpt = MemoryCheckpointer()

    def crash_after_epoch_1(row):
        if row.epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        _fit(
            digit_files, cfg, checkpoint=ckpt, checkpoint_every=every, on_epoch=crash_after_epoch_1
        )
    # a crash between epochs saves the finished epoch, whatever the interval
    assert ckpt.load()["epoch"] == 1 and ckpt.saves == (2 if every == 0 else 1)
    resumed = _fit(digit_files, cfg, checkpoint=ckpt)
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 3
    assert resumed.best_epoch == whole.best_epoch
    for a, b in zip(
        whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
    np.testing.assert_allclose(resumed.val_probs, whole.val_probs, rtol=1e-5)


def test_cuda_out_of_memory_retries_with_half_the_batch(digit_files, monkeypatch):
    import darkroom.training.trainer as tr

    real, calls = tr.train_one_epoch, []

    def oom_once(model, loader, *a, **kw):
        calls.append(loader.batch_size)
        if len(calls) == 2:  # the second epoch of the first attempt
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, loader, *a, **kw)

    monkeypatch.setattr(tr, "train_one_epoch", oom_once)
    ckpt = MemoryCheckpointer()
    cfg = TINY.model_copy(update={"epochs": 3, "batch_size": 8})
    res = _fit(digit_files, cfg, checkpoint=ckpt)
    assert calls == [8, 8, 4, 4]  # resumed at epoch 1 from the checkpoint, half the batch
    assert (res.batch_size, res.grad_accum_steps, res.resumed_from_epoch) == (4, 2, 1)
    assert res.history[-1]["lr"] == pytest.approx(cfg.lr_min)  # same optimizer steps


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_out_of_memory_rebuilds_the_trainer_with_half_the_batch(digit_files, with_checkpoint):
    ckpt = MemoryCheckpointer() if with_checkpoint else None
    seen = []

    def oom_after_epoch_0_once(row):
        seen.append(row.epoch)
        if len(seen) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    cfg = TINY.model_copy(update={"epochs": 3, "batch_size": 8, "grad_accum_steps": 1})
    res = _fit(digit_files, cfg, checkpoint=ckpt, on_epoch=oom_after_epoch_0_once)
    assert (res.batch_size, res.grad_accum_steps) == (4, 2)
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    # with a checkpoint the retry resumes after epoch 0; without one it starts over
    assert seen == ([0, 1, 2] if with_checkpoint else [0, 0, 1, 2])
    assert res.resumed_from_epoch == (1 if with_checkpoint else 0)
    assert res.history[-1]["lr"] == pytest.approx(cfg.lr_min)
    if with_checkpoint:
        assert (ckpt.load()["batch_size"], ckpt.load()["grad_accum_steps"]) == (4, 2)


def test_out_of_memory_at_batch_size_one_is_raised(digit_files):
    class OutOfMemoryCheckpointer(MemoryCheckpointer):
        def load(self):
            self.saves += 1  # counts the attempts here
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    ckpt = OutOfMemoryCheckpointer()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _fit(digit_files, TINY.model_copy(update={"batch_size": 4}), checkpoint=ckpt)
    assert ckpt.saves == 3  # batch sizes 4, 2 and 1


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def test_checkpoint_stores_the_best_weights_only_when_they_differ(digit_files, monkeypatch):
    import darkroom.training.trainer as tr

    losses = iter([1.0, 0.5, 0.7, 0.8])
    real = tr.evaluate

    def fake(*a, **kw):
        stats, probs = real(*a, **kw)
        return {**stats, "loss": next(losses)}, probs

    monkeypatch.setattr(tr, "evaluate", fake)
    ckpt, saved = MemoryCheckpointer(), []
    cfg = TINY.model_copy(update={"epochs": 4})
    res = _fit(digit_files, cfg, checkpoint=ckpt, on_epoch=lambda row: saved.append(ckpt.load()))
    assert [s["best"]["epoch"] for s in saved] == [0, 1, 1, 1] and ckpt.saves == 4
    weights = res.model.state_dict()
    assert set(saved[1]["model"]) == set(weights)
    probs = saved[1]["best"]["probs"]
    # the best epoch is the current one: its weights are stored once, beside the optimizer's
    assert saved[1]["best"]["state"] is None
    assert _tensor_bytes(saved[1]) == _tensor_bytes(
        [saved[1][k] for k in ("model", "optimizer", "rng")]
    ) + _tensor_bytes(probs)
    best = saved[2]["best"]["state"]  # epoch 2 is worse: the best weights are kept apart
    assert best is not None and not saved[2]["final"]
    # the fold's end: only the best weights, once, and no optimizer state left to resume
    final = saved[3]
    assert final["final"] and final["best"]["state"] is None and "optimizer" not in final
    assert _tensor_bytes(final) == _tensor_bytes(weights) + _tensor_bytes(final["best"]["probs"])
    for k, v in saved[1]["model"].items():
        torch.testing.assert_close(best[k], v)
        torch.testing.assert_close(final["model"][k], v)
        torch.testing.assert_close(weights[k], v)  # and fit returns it


@pytest.mark.parametrize("every", [0, 1e9])
def test_checkpoint_interval_saves_every_epoch_or_only_at_the_end(digit_files, every):
    ckpt, saved = MemoryCheckpointer(), []
    cfg = TINY.model_copy(update={"epochs": 3})
    _fit(
        digit_files,
        cfg,
        checkpoint=ckpt,
        checkpoint_every=every,
        on_epoch=lambda row: saved.append(ckpt.load() and ckpt.load()["epoch"]),
    )
    # 0: after every epoch; a long interval: once, at the fold's end
    assert saved == ([0, 1, 2] if every == 0 else [None, None, 2])
    assert ckpt.saves == (3 if every == 0 else 1) and ckpt.load()["final"]


@pytest.mark.parametrize("every", [0, 1e9])
def test_a_fold_killed_inside_an_epoch_resumes_from_the_last_saved_epoch(
    digit_files, monkeypatch, every
):
    import darkroom.training.trainer as tr

    real, epochs = tr.train_one_epoch, []

    def crash_in_epoch_2(*a, **kw):
        epochs.append(len(epochs))
        if len(epochs) == 3:
            raise Crash
        return real(*a, **kw)

    monkeypatch.setattr(tr, "train_one_epoch", crash_in_epoch_2)
    ckpt, cfg = MemoryCheckpointer(), TINY.model_copy(update={"epochs": 3})
    with pytest.raises(Crash):
        _fit(digit_files, cfg, checkpoint=ckpt, checkpoint_every=every)
    monkeypatch.setattr(tr, "train_one_epoch", real)
    resumed = _fit(digit_files, cfg, checkpoint=ckpt, checkpoint_every=every)
    # every epoch saved: epoch 2 again; nothing saved yet: from the start
    assert resumed.resumed_from_epoch == (2 if every == 0 else 0)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]


def test_a_finished_fold_resumes_from_its_final_checkpoint_without_training(
    digit_files, monkeypatch
):
    import darkroom.training.trainer as tr

    cfg = TINY.model_copy(update={"epochs": 2})
    ckpt = MemoryCheckpointer()
    whole = _fit(digit_files, cfg, checkpoint=ckpt, checkpoint_every=1e9)
    # e.g. the task died after fit, before fold.json: the retry trains no epoch again
    monkeypatch.setattr(tr, "train_one_epoch", lambda *a, **kw: pytest.fail("trained again"))
    again = _fit(digit_files, cfg, checkpoint=ckpt, checkpoint_every=1e9)
    assert (again.resumed_from_epoch, again.best_epoch) == (2, whole.best_epoch)
    assert again.history == whole.history and ckpt.saves == 1
    np.testing.assert_allclose(again.val_probs, whole.val_probs)
    for a, b in zip(
        whole.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_lr_suggestion_is_the_steepest_descent_before_the_minimum():
    from darkroom.training.lr_finder import suggest

    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    losses = [2.3, 2.2, 1.2, 0.9, 0.8, 5.0]  # steepest drop around 1e-3
    assert suggest(lrs, losses) == {"suggested_lr": 1e-3, "min_loss_lr": 1e-1}
    assert suggest(lrs[:2], losses[:2])["suggested_lr"] is None


def test_a_hung_loader_worker_fails_the_epoch_instead_of_waiting_forever(tmp_path, digit_files):
    """A read that never returns (a FIFO nobody writes to, like a stuck network mount) in a
    DataLoader worker: the loader gives up after its timeout, with an error a task retries."""
    import os

    from darkroom.data.images import build_transform
    from darkroom.training.records import LoaderLimits
    from darkroom.training.steps import make_loader
    from tasks.retry import NOT_RETRIED

    paths, labels, _ = digit_files
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    loader = make_loader(
        [paths[0], str(stuck)],
        [labels[0], labels[0]],
        build_transform(32, [0.5] * 3, [0.5] * 3),
        batch_size=1,
        shuffle=False,
        num_workers=1,
        limits=LoaderLimits(worker_timeout=3),
    )
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out") as err:
        list(loader)
    assert time.monotonic() - t0 < 60
    assert not isinstance(err.value, NOT_RETRIED)
    with open(stuck, "wb"):  # let the blocked worker go, so it exits
        pass
