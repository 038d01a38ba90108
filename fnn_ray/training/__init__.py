"""Training a twin of a new mouse on the frozen foundation core, on Ray Train.

Modules, in the order a run uses them: ``layout`` (the public ``training_data`` layout: listing and checks),
``prepare`` (the streaming pass: checks, imputation, statistics, the prepared dataset), ``dataset`` (a prepared
dataset memory-mapped on a node, seeded training windows), ``checkpoints`` (per-epoch checkpoints on the output
store, verified by hash), ``loop`` (the per-rank training loop Ray Train runs), ``trainer`` (one twin's
``TorchTrainer``), ``twins`` (many twins side by side, their plan), ``curves`` (metrics CSV and learning-curve
plot), ``release_writer`` (the trained twins as a release every job opens) and ``synthetic_data`` (a planted
teacher's recordings in the public layout: dry runs and tests). Design: ``docs/training.md``.
"""
