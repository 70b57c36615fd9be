"""The parts a recipe is made of: the network, optimiser, lr schedule, loss, MixUp/CutMix and EMA.

    models.py     networks: one ``ARCHS`` table (ResNets, their plain twins, CIFAR-style nets)
    optim.py      optimisers: ``OPTIMIZERS`` (sgd, lars, lamb, adamw), name -> builder
    schedules.py  lr schedules after the warmup: ``SCHEDULES``, name -> multiplier of the step
    losses.py     losses: ``LOSSES`` (ce, bce), name -> builder
    mixing.py     MixUp/CutMix of each training batch on its device
    ema.py        the exponential moving average of the weights (a callback)
    specs.py      the frozen specs trainer/config.py hands to them: OptimSpec, ScheduleSpec, ...

Each is chosen by name in the config (``model.arch``, ``optim.name``, ...); trainer/module.py
puts them together into the LightningModule. Nothing is imported here: ``import trainer`` and
the CLI stay cheap.
"""
