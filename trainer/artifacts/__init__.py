"""What is done with trained runs: their checkpoints, weights and records, after (or outside) a fit.

    export.py      a checkpoint into a torchvision state_dict, safetensors or ONNX (``export``)
    pretrained.py  ``trainer.load_pretrained``: any of those files back into a network
    predict.py     top-k classes of image files (``predict``)
    finetune.py    trained weights into a new network before a fit (``model.init_from``, ``model.freeze``)
    plot.py        a run's metrics.csv into a PNG (``plot``)
    study.py       the degradation study (``study``): a figure and table over several runs

study.py lives here, not beside the run: it is a report made from finished runs' metrics.csv,
as plot.py is, and it trains its nets only through child ``imagenet-trainer fit`` processes or
SLURM jobs; nothing in a fit imports it.

Nothing is imported here: ``import trainer`` and the CLI stay cheap.
"""
