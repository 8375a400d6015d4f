"""The data stage: sources, splits, tokenizer, mixtures, Arrow storage and the LightningDataModule.

Entry points: ``spec.read_data_spec`` (the typed ``data:`` settings), ``prepare.prepare_data`` /
``prepare.open_current``, ``mixtures.stage_mixture``, ``datamodule.MixtureDataModule`` and
``storage.load_split_sequences``.
"""
