"""Training: from a job config to a trained, logged, registered model.

- ``data``: datasets as Ray Datasets (bundled, synthetic, files), splits, fingerprints, standardisation
- ``loop``: the worker side (one epoch, evaluation, checkpoint save and restore; runs without Ray in tests)
- ``run``: what a training run and a Tune trial share (:class:`~mlray.training.run.TrainingRun`)
- ``train``: the driver side of one run (TorchTrainer, scaling, failure config, registration)
- ``tune``: a sweep of trials and registration of the best
"""
