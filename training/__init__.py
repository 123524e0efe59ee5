"""The offline trainer: transform nets trained against the fixed VGG-16 loss network.

``python -m training style|sr ...``. One loop (``training.loop``) serves every model family; what
a family trains, on what, against which loss, and what its manifest entry records is a
:class:`training.tasks.TrainingTask` (one module per family under ``training/tasks/``).

Nothing in the serving path imports this package: the worker and the API only need
``model_zoo`` (nets, registry, manifest).
"""
