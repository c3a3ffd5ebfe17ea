import lightning as L
import pytest
import torch

from fgvce_lightning.demo import DemoClassifier, train_demo


class _Record(L.Callback):
    def __init__(self) -> None:
        self.val_acc: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val_acc"]))


@pytest.fixture
def one_thread():
    # small convolutions on a busy 2-core machine run several times faster on one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_beats_chance(tmp_path, one_thread):
    # two species told apart by the bill only, 32x32 and without clutter so that it runs in seconds;
    # a from-scratch CNN sits at chance for a few epochs before it finds the bill
    record = _Record()
    easy = dict(image_size=32, attribute_noise=0.0, clutter_prob=0.0, occluder_prob=0.0, noise_std=0.0)
    trainer, module = train_demo(max_epochs=15, num_train=320, num_val=64, batch_size=16, num_classes=2,
                                 width=8, lr=1e-2, dataset_kwargs=easy, callbacks=[record],
                                 default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                                 enable_checkpointing=False, num_sanity_val_steps=0)
    assert isinstance(module, DemoClassifier) and trainer.current_epoch == 15
    assert len(record.val_acc) == 15
    assert max(record.val_acc[-3:]) > 0.75, record.val_acc     # chance is 0.5
    assert {"val_acc", "val_loss", "train_loss"} <= set(trainer.callback_metrics)


def test_module_exposes_the_split():
    module = DemoClassifier(num_classes=3, width=4).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(module.forward_head(module.forward_features(x)), module(x))
