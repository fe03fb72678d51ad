"""The embedded default: the shapes world (`world`), its files (`files`), its small Mllama (`model`), that
model's pretraining (`pretrain`), the loop's rates against the scenes (`rates`) and the shipped base (`base/`)."""
