"""The interop tests need transformers (the reference they compare with); their helpers are in
:mod:`hf_checkpoints`."""

import pytest

pytest.importorskip("transformers")
