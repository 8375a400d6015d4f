"""The specs of the sections only the stages read (stages/context.py), checked where they are read."""

import pytest

from bam_pipeline.errors import ConfigError
from bam_pipeline.stages.context import InfoSpec


def test_the_info_section_reads_a_device_size():
    assert InfoSpec("141GB", "speeds.json").device_bytes == 141 * 10**9
    with pytest.raises(ConfigError, match="device_memory='80 gigs'"):
        InfoSpec("80 gigs", "speeds.json")
