"""The trainer's learning-rate schedules: Keras's cosine decay, the paper's step decay, and a
linear warm-up before either. Each is a function of the optimizer's update count (0 for the first
update)."""
import keras
import tensorflow as tf

from choices import SCHEDULES  # the names the flags choose from

# The paper divides the learning rate by 10 at epochs 30, 60 and 90 of 100.
STEP_FRACTIONS = (0.3, 0.6, 0.9)


def build(name, learning_rate, total_steps, warmup_steps=0):
    """The `--lr_schedule` `name` peaking at `learning_rate` over `total_steps` updates, after a
    warm-up of `warmup_steps` updates (none for 0)."""
    if name == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
    elif name == "step":
        schedule = StepDecay(learning_rate, total_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return LinearWarmup(schedule, warmup_steps) if warmup_steps else schedule


@keras.saving.register_keras_serializable(package="gn")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate`, divided by 10 from update round(f x total_steps) on, for each f of
    STEP_FRACTIONS: with 100 updates, updates 0-29 take the rate, 30-59 a tenth of it, 60-89 a
    hundredth and 90-99 a thousandth."""

    def __init__(self, learning_rate, total_steps):
        self.learning_rate = learning_rate
        self.total_steps = total_steps
        self.boundaries = [round(fraction * total_steps) for fraction in STEP_FRACTIONS]

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        divisions = tf.add_n([tf.cast(step >= boundary, tf.float32)
                              for boundary in self.boundaries])
        return self.learning_rate * tf.pow(0.1, divisions)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps}


@keras.saving.register_keras_serializable(package="gn")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule`, multiplied by (step + 1) / warmup_steps for the first warmup_steps updates:
    the first update takes 1 / warmup_steps of the schedule's rate, update warmup_steps all of
    it."""

    def __init__(self, schedule, warmup_steps):
        self.schedule = schedule
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        ramp = tf.minimum(1.0, tf.cast(step + 1, tf.float32) / self.warmup_steps)
        return self.schedule(step) * ramp

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]),
                   config["warmup_steps"])
