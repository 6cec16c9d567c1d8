"""Classifier builders, made only of ops.py layers.

The residual nets end in global average pooling; the `conv` net flattens its last map, as the 2018
net did. Every builder serves 28, 32 and 64 px inputs and returns logits. `build_model` picks one
by its `--model` name.
"""
import keras

import ops
from choices import MODELS, RESIDUAL_MODELS  # the names the flags choose from


def default_model(image_size):
    """The 2018 small-image net for 28-32 px sets, the residual net for 64 px and larger."""
    return "conv" if image_size <= 32 else "resnet"


def build_model(name, input_shape, num_classes, norm_type, groups=ops.DEFAULT_GROUPS,
                weight_std=False, dropout=0.5, channels_per_group=None, zero_init_residual=False,
                ghost_batch_size=None, renorm_relax=None):
    """The `--model` network for images of `input_shape` (H, W, C); raises ValueError on a bad
    name, on a channel count that `groups` (or `channels_per_group`, which replaces it) does not
    divide, and on `zero_init_residual` (the scale of each residual block's last norm starts at
    0) for a net without residual blocks or norm. `ghost_batch_size`: BN's examples per
    statistic in training, when a call holds several such batches. `renorm_relax`: the updates
    over which batch renorm relaxes its clipping (ops.BatchRenorm's `relax`)."""
    builders = {"conv": conv_net, "resnet": resnet, "resnet20": resnet20}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if zero_init_residual and name not in RESIDUAL_MODELS:
        raise ValueError(f"zero_init_residual: the {name} net has no residual blocks; "
                         f"choose one of {', '.join(RESIDUAL_MODELS)}")
    inputs = keras.Input(shape=input_shape, name="images")
    norm = dict(norm_type=norm_type, groups=groups, channels_per_group=channels_per_group,
                weight_std=weight_std, ghost_batch_size=ghost_batch_size,
                renorm_relax=renorm_relax)
    logits = builders[name](inputs, num_classes, norm, dropout, zero_init_residual)
    if logits.dtype != "float32":  # a mixed-precision policy: the softmax and loss in float32
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    return keras.Model(inputs, logits, name=name)


def conv_net(x, num_classes, norm, dropout, zero_init_residual):
    """The 2018 small-image net: four 4x4 stride-2 convs (64-512 channels), each followed by
    leaky ReLU(0.2), the norm and dropout; then the last map flattened and fully connected 512,
    128, 32, n without norm. A norm that carries its own nonlinearity (FRN + TLU, EvoNorm)
    replaces the leaky ReLU and the norm together: conv, that norm, dropout.

    Flattening, not global average pooling, is what lets instance norm and BN at batch 1 learn
    here: both normalize each channel of one example over its positions, so the positions' mean
    is exactly beta and a pooled map would carry nothing about the image."""
    carried = ops.carries_activation(norm["norm_type"])
    for i, filters in enumerate((64, 128, 256, 512)):
        x = ops.conv2d(x, filters, kernel_size=4, strides=2, weight_std=norm["weight_std"],
                       use_bias=True, name=f"conv{i}")
        if not carried:
            x = ops.LeakyReLU(0.2, name=f"conv{i}_act")(x)
        x = ops.norm(x, norm["norm_type"], norm["groups"], name=f"conv{i}_norm",
                     channels_per_group=norm["channels_per_group"],
                     ghost_batch_size=norm["ghost_batch_size"],
                     renorm_relax=norm["renorm_relax"], nonlinear=carried)
        x = keras.layers.Dropout(dropout, name=f"conv{i}_dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate((512, 128, 32)):
        x = ops.fc(x, units, name=f"fc{i}")
        x = ops.LeakyReLU(0.2, name=f"fc{i}_act")(x)
    return ops.fc(x, num_classes, name="logits")


def resnet(x, num_classes, norm, dropout, zero_init_residual):
    """The 2018 ImageNet-style net: five stride-2 conv-norm-ReLU stages of 64, 128, 256, 512 and
    1024 channels, followed by 0, 2, 3, 5 and 2 residual blocks; global pool; fc."""
    for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512, 1024), (0, 2, 3, 5, 2))):
        x = ops.conv_norm_act(x, filters, strides=2, kernel_size=7 if stage == 0 else 3,
                              name=f"stage{stage}", **norm)
        for block in range(blocks):
            x = ops.residual_block(x, filters, name=f"stage{stage}_block{block}",
                                   zero_init=zero_init_residual, **norm)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return ops.fc(x, num_classes, name="logits")


def resnet20(x, num_classes, norm, dropout, zero_init_residual):
    """ResNet-20 of He et al. 2016 for CIFAR: a 3x3 conv of 16 channels, then three stages of
    three basic blocks (16, 32, 64 channels; the 2nd and 3rd stages start with stride 2); global
    pool; fc. Shortcuts that change shape are 1x1 conv + norm. `dropout` is not used: the
    original has none."""
    x = ops.conv_norm_act(x, 16, name="stem", **norm)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            x = ops.residual_block(x, filters, strides=strides, name=f"stage{stage}_block{block}",
                                   zero_init=zero_init_residual, **norm)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return ops.fc(x, num_classes, name="logits")
