"""Small run configs for tests (importable by name: tests/ is on sys.path through its conftest)."""

# The tiny bundles' quality report: a small sample keeps the fixtures fast (a few seconds).
TINY_QUALITY_OPTIONS = {"sample": 64, "curve_images": 8, "steps": 10, "encodings": 1000}


def tiny_config_dict(**train_overrides) -> dict:
    """A small PrototypeDL config (full architecture, few images, no augmentation by default)."""
    train = {"epochs": 1, "batch_size": 50, "lr": 0.002, "elastic": False, "checkpoint_every": 1,
             "eval_batch_size": 500, "seed": 0, "num_threads": 1}
    train.update(train_overrides)
    return {
        "data": {"dataset": "mnist", "val_size": 500, "split_seed": 0, "train_subset": 300},
        "model": {"hidden_activation": "relu"},
        "train": train,
    }


def tiny_protopnet_dict(**schedule) -> dict:
    """A small ProtoPNet config (small CNN, 20 prototypes of 16 channels, 300 images, 3 epochs)."""
    return {
        "data": {"dataset": "mnist", "val_size": 200, "split_seed": 0, "train_subset": 300},
        "model": {"family": "protopnet", "backbone": "small_cnn", "n_prototypes": 20, "prototype_dim": 16},
        "train": {"epochs": 3, "batch_size": 50, "eval_batch_size": 300, "elastic": False, "seed": 0,
                  "checkpoint_every": 1, "num_threads": 1},
        "schedule": {"warm_epochs": 1, "push_start": 2, "push_every": 1, "last_layer_epochs": 2,
                     "lr_features": 1e-3, **schedule},
    }
