"""Hub ids resolve to a local snapshot and its commit; offline, missing, gated and bad-revision
ids end in one line saying what to do (huggingface_hub's exceptions mocked: nothing downloads)."""

from __future__ import annotations

from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub import errors

from bam_pipeline.errors import BamError
from bam_pipeline.interop import resolve_hf_model_dir
from bam_pipeline.interop.hub import DOWNLOAD_PATTERNS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _http_error(cls):
    return cls("mocked", response=mock.Mock(headers={}, status_code=404, request=mock.Mock(url="https://hf.co")))


def test_a_local_directory_is_used_as_is(tmp_path):
    src = resolve_hf_model_dir(str(tmp_path))
    assert (src.path, src.repo_id, src.revision) == (tmp_path.resolve(), None, None)
    with pytest.raises(BamError, match="revision='main' applies to hub ids"):
        resolve_hf_model_dir(str(tmp_path), revision="main")


@pytest.mark.parametrize("source", ["./no/such", "/no/such/dir", "no_such_dir", "a/b/c"])
def test_a_missing_directory_that_is_no_hub_id_is_refused(source):
    with pytest.raises(BamError, match=f"checkpoint directory {source} does not exist"):
        resolve_hf_model_dir(source)


def test_a_hub_id_resolves_to_its_snapshot_and_commit(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--org--name" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    download = mock.Mock(return_value=str(snapshot))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    src = resolve_hf_model_dir("org/name", revision="v1.0")
    assert (src.path, src.repo_id, src.revision) == (snapshot, "org/name", COMMIT)
    download.assert_called_once_with(repo_id="org/name", revision="v1.0", allow_patterns=list(DOWNLOAD_PATTERNS))


@pytest.mark.parametrize("raised,message", [
    (lambda: errors.LocalEntryNotFoundError("mocked"), "cannot download org/name: offline .* pass that directory"),
    (lambda: errors.OfflineModeIsEnabled("mocked"), "cannot download org/name: offline"),
    (lambda: _http_error(errors.RepositoryNotFoundError),
     "no hub model org/name .*log in with a token.*local directory"),
    (lambda: _http_error(errors.GatedRepoError), "hub model org/name is gated: .*log in with a token"),
    (lambda: _http_error(errors.RevisionNotFoundError), "has no revision None"),
    (lambda: _http_error(errors.HfHubHTTPError), "downloading org/name failed .*pass a local directory"),
])
def test_hub_failures_end_in_one_line(raised, message, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", mock.Mock(side_effect=raised()))
    with pytest.raises(BamError, match=message) as err:
        resolve_hf_model_dir("org/name")
    assert "\n" not in str(err.value)


def test_offline_and_uncached_for_real():
    """HF_HUB_OFFLINE=1 (tests/conftest.py) and an id no cache holds: huggingface_hub's own error."""
    with pytest.raises(BamError, match="cannot download bam-pipeline-tests/no-such-model@abc: offline"):
        resolve_hf_model_dir("bam-pipeline-tests/no-such-model", revision="abc")
