"""Several training runs in one ``mlx.launch`` (the Python API on every process), for
test_train_distributed.py: ``python tests/dist_worker.py RUNS.json``, RUNS.json a list of
:class:`~mlx_dsvl.train.TrainConfig` fields.  One launch saves each run the start-up."""

import json
import sys

from mlx_dsvl.train import TrainConfig, train

if __name__ == "__main__":
    for fields in json.loads(open(sys.argv[1]).read()):
        train(TrainConfig(**fields))
