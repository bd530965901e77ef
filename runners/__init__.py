"""What executes a trial, knowing nothing of the search above it (it takes plain values, raises its own errors).

    protocol.py     the Runner contract every model module fulfils: narrow_choices, train_and_evaluate,
                    measure_speed, release; RunnerConfigError and ArchitectureError
    datasets.py     splits (official ones kept, the rest by a stable hash), subsets, the decoded-image cache
    cifar10.py      CIFAR-10 from a download, Keras's cache or a local copy
    photos.py       photo folders and Stanford Dogs: listing, safe archives, decoding any image file
    pipeline.py     tf.data batches with albumentations (augment.py) for training and evaluation
    scratch_cnn.py  a CNN from random initialisation (generated, or spelled out under `architectures:`)
    transfer.py     ImageNet backbones with a trained head; backbones.py: which backbones, their weights files;
                    features.py caches embeddings (photos and mirror images); feature_heads.py trains heads on
                    them (several backbones together, mirror TTA, ensembles sharing backbones); last_stage.py
                    fine-tunes a backbone's last stage on cached activations; lite.py is EfficientNet-Lite0/1/2
                    in Keras, reading the PyTorch weights with torch_legacy.py
    train.py        fit with early stopping and resumable checkpoints, test evaluation
    callbacks.py    epoch hook, deadline (and the schedule it shortens), progress line, checkpoints, Ctrl-C
                    (the first at a batch end, the second at once)
    speed.py        the machine's matmul rate and a configuration's measured training speed
    digest.py       file digests (downloads, weights tags, the feature cache)
    console.py      libraries' notices kept off the console (a logger quieter for a block, stderr lines filtered)
    device.py       GPUs, precision (bfloat16 where the CPU multiplies it natively; frozen backbones float32)
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of progress output
