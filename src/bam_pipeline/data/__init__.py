"""The data stage: sources, splits, tokenizer, mixtures, Arrow storage and the LightningDataModule.

Entry points: ``prepare.prepare_data`` / ``prepare.open_prepared``, ``mixtures.stage_mixture``,
``datamodule.MixtureDataModule`` and ``storage.load_split_sequences``.
"""
