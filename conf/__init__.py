# Makes conf/ a package (installed as trainer.conf, see setup.py) so that an installed
# imagenet-trainer finds its YAML files from any directory.
