"""A refit's learning-rate schedule ends with its time budget: the Deadline moves the end of a one_cycle /
warmup_cosine / cosine schedule to the last epoch that fits (earlier, or later again when epochs speed up), and
without one the curves are unchanged."""
from __future__ import annotations

import time

import numpy as np
import pytest

PEAK = 0.01
EPOCHS, STEPS = 20, 2  # 20 planned epochs of 2 steps (32 samples, batches of 16)


def slow_model(lr_schedule: str):
    """A tiny model compiled with the trial's optimiser for the planned epochs."""
    import keras

    from runners.train import make_optimizer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=make_optimizer({"learning_rate": PEAK, "lr_schedule": lr_schedule, "optimizer": "sgd"},
                                           STEPS, EPOCHS), loss="mse")
    return model


def train(model, callbacks: list, epochs: int = EPOCHS, first_epoch_pause: float = 0.2) -> dict:
    """fit_resumable as a trial trains (clock first, the Deadline before the others), epochs made ~0.4 s long
    (the first `2 * first_epoch_pause`, as when the first epoch traces the graphs)."""
    import keras

    from runners.callbacks import EpochClock
    from runners.train import fit_resumable

    class Slow(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.pause = first_epoch_pause if epoch == 0 else 0.2

        def on_train_batch_end(self, batch, logs=None):
            time.sleep(self.pause)

    x, y = np.ones((32, 4), np.float32), np.zeros((32, 2), np.float32)
    history, _, _ = fit_resumable(model, lambda first_epoch: x, None, epochs=epochs, own_callbacks=[EpochClock()],
                                  callbacks=[Slow(), *callbacks], y=y, batch_size=16, shuffle=False)
    return history


def test_a_deadline_that_cuts_the_planned_epochs_short_still_ends_the_one_cycle_annealed():
    from runners.callbacks import Deadline

    deadline = Deadline(time.time() + 2.5)  # room for ~4 of the 20 epochs (the first also traces the step)
    rates = train(slow_model("one_cycle"), [deadline])["learning_rate"]

    assert deadline.stopped_at_epoch == len(rates) < EPOCHS / 2
    assert rates[-1] < 0.1 * PEAK, f"learning rate per epoch {rates}: the schedule was cut, not annealed"


def test_a_slow_first_epoch_does_not_end_the_schedule_early_when_later_epochs_are_faster():
    from runners.callbacks import Deadline

    # the first epoch takes ~1.0 s (tracing), the next ~0.4 s: ~13 epochs fit in 6 s. Planned from the first
    # epoch alone the schedule would end with epoch 6 and the epochs after it would train at a learning rate of 0
    deadline = Deadline(time.time() + 6.0)
    rates = train(slow_model("one_cycle"), [deadline], first_epoch_pause=0.5)["learning_rate"]

    assert 7 <= deadline.stopped_at_epoch == len(rates) < EPOCHS
    assert rates[-1] < 0.1 * PEAK, f"learning rate per epoch {rates}: the schedule was cut, not annealed"
    assert sum(rate < 1e-4 * PEAK for rate in rates) <= 1, f"learning rate per epoch {rates}: annealed too early"


def test_without_a_deadline_the_one_cycle_is_still_rising_at_epoch_3_of_20():
    import keras

    from runners.callbacks import Deadline

    far = Deadline(time.time() + 3600)  # room for every epoch: the schedule is left as planned
    rates = train(slow_model("one_cycle"), [far], epochs=3)["learning_rate"]
    warmup = int(EPOCHS * STEPS * 0.3)
    planned = keras.optimizers.schedules.CosineDecay(PEAK / 25, EPOCHS * STEPS - warmup, warmup_target=PEAK,
                                                     warmup_steps=warmup)
    assert far.stopped_at_epoch is None
    assert rates == [float(planned(STEPS * epoch)) for epoch in (1, 2, 3)]
    assert rates[-1] > 0.5 * PEAK


@pytest.mark.parametrize("name", ["one_cycle", "warmup_cosine", "cosine"])
def test_the_schedules_keep_their_curves_until_their_end_is_brought_forward_then_continue_from_there(name):
    import keras

    from runners.train import WARMUP, learning_rate_schedule

    total = EPOCHS * STEPS
    schedule = learning_rate_schedule({"learning_rate": PEAK, "lr_schedule": name}, STEPS, EPOCHS)
    fraction, start = WARMUP.get(name, (0.0, None))
    warmup = max(1, int(total * fraction))
    planned = (keras.optimizers.schedules.CosineDecay(PEAK, total) if start is None else
               keras.optimizers.schedules.CosineDecay(PEAK * start, total - warmup, warmup_target=PEAK,
                                                      warmup_steps=warmup))
    assert [float(schedule(s)) for s in range(total + 2)] == [float(planned(s)) for s in range(total + 2)]

    assert not schedule.finish_by(total + 10, 4)  # never later than planned
    before = float(schedule(4))
    assert schedule.finish_by(10, 4)
    assert float(schedule(4)) == pytest.approx(before, rel=1e-5)  # no jump where the end moved
    assert float(schedule(10)) == float(schedule(30)) == pytest.approx(0.0, abs=1e-9)
    assert schedule.finish_by(8, 6) and float(schedule(8)) == pytest.approx(0.0, abs=1e-9)  # and earlier again
    before = float(schedule(7))
    assert schedule.finish_by(total, 7)  # later again, up to the planned end (epochs turned out faster)
    assert float(schedule(7)) == pytest.approx(before, rel=1e-5) and float(schedule(total - 1)) > 0
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-9)
    assert not schedule.finish_by(total, 8)  # already the end


def test_a_saved_model_compiled_with_the_schedule_loads_with_its_optimizer(tmp_path):
    import keras

    model = slow_model("warmup_cosine")
    model.fit(np.ones((32, 4)), np.zeros((32, 2)), batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer._learning_rate) is type(model.optimizer._learning_rate)
    assert float(loaded.optimizer.learning_rate) == float(model.optimizer.learning_rate)
    assert float(loaded.optimizer._learning_rate(20)) == float(model.optimizer._learning_rate(20))
