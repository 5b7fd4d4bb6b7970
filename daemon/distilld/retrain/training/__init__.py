"""The parts of :func:`distilld.retrain.train.train_student`, one job each.

* :mod:`.examples`: a teacher-labelled example and its soft targets;
* :mod:`.loop`: the optimiser loop, curriculum stages and progress;
* :mod:`.classifier`: a sequence-classification student (encoder + head);
* :mod:`.causal`: a causal-LM student (full fine-tuning or LoRA).

Each student architecture is a :class:`~.loop.Task`; adding a training
method for one is a change to its task module (the losses stay the pure
functions of :mod:`distilld.retrain.losses`).
"""
